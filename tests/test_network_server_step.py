"""The coordinator's server step is core's: the same updates give bit-identically the model that
core's aggregators and FedBuffServer give (issue 12: the network runtime re-implements nothing)."""

from __future__ import annotations

import asyncio

import torch

from flotilla.core.aggregate import WeightedMean
from flotilla.core.fedbuff import FedBuff, FedBuffServer
from flotilla.core.server_opt import ServerOptimizer, ServerOptimizerSpec
from flotilla.core.staleness import Staleness
from flotilla.network.coordinator import Coordinator, CoordinatorSettings, Upload
from flotilla.network.store import StateStore

N = 50


def _upload(coord: Coordinator, ticket, delta: torch.Tensor, n: int) -> Upload:
    norm = coord.check_delta(delta, ticket.device)
    return Upload(ticket, n, 0.5, n, delta, norm, digest=f"d{ticket.id}")


def _run(coord: Coordinator, script):
    """``script``: (device, delta, num_examples, checkin_before) in arrival order; async check-ins
    are taken when ``checkin_before`` says, so staleness varies as in a real run."""

    async def main():
        tickets = {}
        for device, delta, n, fresh in script:
            if fresh or device not in tickets:
                t = coord.check_in(device)
                assert not isinstance(t, (float, type(None))), t
                tickets[device] = t
            await coord.commit(_upload(coord, tickets[device], delta, n), delta.numpy().tobytes())
            del tickets[device]
        coord.store.close()

    asyncio.run(main())


def test_sync_rounds_are_core_weighted_mean_then_the_server_optimizer_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    w0 = torch.randn(N)
    spec = ServerOptimizerSpec("fedadam", lr=0.01)
    s = CoordinatorSettings(cohort=3, over_selection=1.0, total_steps=4, selection_window_s=0.0, retry_after_s=0.0)
    coord = Coordinator(w0.clone(), ServerOptimizer(spec, N), s, StateStore(tmp_path, fsync=False))
    rounds = [[(f"d{i}", torch.randn(N) * 0.1, 5 + 7 * i) for i in range(3)] for _ in range(4)]
    _run(coord, [(d, x, n, True) for r in rounds for d, x, n in r])
    # core: the same updates through WeightedMean and the ServerOptimizer
    w, opt, agg = w0.clone(), ServerOptimizer(spec, N), WeightedMean(N)
    for r in rounds:
        for d, x, n in r:
            agg.add(x, float(n), d)
        opt.step(w, agg.result())
        agg.reset()
    assert coord.version == 4 and torch.equal(coord.weights, w)


def test_async_fedbuff_is_core_fedbuffserver_bit_for_bit(tmp_path):
    torch.manual_seed(1)
    w0 = torch.randn(N)
    spec = ServerOptimizerSpec("fedavgm", lr=0.7, momentum=0.9)
    st = Staleness("polynomial", 0.5)
    s = CoordinatorSettings(mode="async", concurrency=4, buffer_size=3, staleness=st, total_steps=5, retry_after_s=0.0)
    coord = Coordinator(w0.clone(), ServerOptimizer(spec, N), s, StateStore(tmp_path, fsync=False))
    # four devices hold assignments at once, so later uploads are stale by a version or two
    script, issued = [], {}
    for k in range(15):
        device = f"d{k % 4}"
        script.append((device, torch.randn(N) * 0.1, 3 + k, False))

    # check-ins happen in waves: every device takes work, then they upload in turn
    async def drive():
        core = FedBuffServer(w0.clone(), FedBuff(N, 3, st), ServerOptimizer(spec, N))
        for device, delta, n, _ in script:
            if device not in issued:
                t = coord.check_in(device)
                issued[device] = (t, coord.version)
            t, v0 = issued.pop(device)
            await coord.commit(_upload(coord, t, delta, n), delta.numpy().tobytes())
            core.submit(delta, float(n), v0, device)
            for other in [f"d{i}" for i in range(4)]:  # refill: every idle device takes new work now
                if other not in issued and not coord.done:
                    issued[other] = (coord.check_in(other), coord.version)
        coord.store.close()
        return core

    core = asyncio.run(drive())
    assert coord.version == core.version == 5
    staleness = [e["staleness"] for e in coord.store.read_ledger() if e["event"] == "accepted"]
    assert max(staleness) >= 1
    assert torch.equal(coord.weights, core.weights)
