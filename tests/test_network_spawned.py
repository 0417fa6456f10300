"""``serve --aggregators N`` keeps its spawned aggregators running (flotilla/network/scaleout_cli.py
``Spawned``): one that dies is started again, one that keeps dying at once stops the coordinator
with the reason, and none is started again once training is over.  Stand-in processes here; the
real aggregators under kill -9 are in test_network_scaleout_cli.py."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from types import SimpleNamespace

from flotilla.network.scaleout_cli import Spawned


class Fake(Spawned):
    CHECK_S = 0.05
    QUICK_S = 0.5
    GIVE_UP = 3

    def __init__(self, body: str, n: int = 2):
        server = SimpleNamespace(aggregators=n, coord=SimpleNamespace(done=False))
        super().__init__(SimpleNamespace(no_spawn=False), server)
        self.body = body
        self.gave_up: list[str] = []

    def command(self, i: int) -> list[str]:
        return [sys.executable, "-c", self.body]

    def give_up(self, why: str) -> None:
        self.gave_up.append(why)


async def _until(cond, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_killed_aggregator_is_started_again_until_training_is_over():
    async def main():
        s = Fake("import time; time.sleep(60)")
        s.start(1234)
        try:
            first = [p.pid for p in s.procs]
            await asyncio.sleep(0.6)  # past QUICK_S: a kill now is not a crash loop
            os.kill(first[1], signal.SIGKILL)
            await _until(lambda: s.restarts == 1)
            assert s.procs[0].pid == first[0] and s.procs[1].pid != first[1]
            assert s.procs[1].poll() is None and not s.gave_up
            s.server.coord.done = True  # training over: an exit now is the end, not a crash
            os.kill(s.procs[0].pid, signal.SIGKILL)
            await asyncio.sleep(0.3)
            assert s.restarts == 1 and s.procs[0].poll() is not None
        finally:
            s.stop()
        assert all(p.poll() is not None for p in s.procs)

    asyncio.run(main())


def test_an_aggregator_that_keeps_dying_at_once_stops_the_coordinator_with_the_reason():
    async def main():
        s = Fake("import sys; sys.exit(3)", n=1)
        s.start(1234)
        try:
            await _until(lambda: s.gave_up)
            await asyncio.sleep(0.2)
        finally:
            s.stop()
        assert s.restarts == Fake.GIVE_UP - 1  # started GIVE_UP times in all, then given up
        assert s.gave_up == [
            "aggregator agg-0 exited with code 3, 3 times within 0.5 s of its start (its output is above); "
            "stopping the coordinator"
        ]

    asyncio.run(main())


def test_no_spawn_starts_nothing():
    s = Spawned(SimpleNamespace(no_spawn=True), SimpleNamespace(aggregators=2))
    assert s.n == 0
    s.start(1234)  # nothing to start, no timer (no running loop needed)
    s.stop()


def test_spawned_aggregators_take_any_free_data_port_unless_it_is_off(tmp_path):
    """N aggregators on one machine cannot share a fixed network.data_port: each gets any free one."""

    def command(data_port):
        server = SimpleNamespace(aggregators=2, data_port=data_port, store=SimpleNamespace(path=tmp_path))
        args = SimpleNamespace(no_spawn=False, config="serve.yaml", overrides=["network.data_port=5000"])
        return Spawned(args, server).command(1)

    from flotilla.config import apply_overrides

    for setting, want in ((5000, "auto"), ("auto", "auto"), ("off", "off"), (None, "off")):
        cmd = command(setting)
        sets = [cmd[i + 1] for i, x in enumerate(cmd) if x == "--set"]
        assert apply_overrides({"network": {}}, sets)["network"]["data_port"] == want  # the last one wins
        assert cmd[cmd.index("--name") + 1] == "agg-1"
