"""Secure aggregation end to end: the config section, sync rounds (masking, dropouts, aborts, resume),
async FedBuff through the secure buffer, and composition with user-level DP, on Fashion-MNIST.

Small budgets (30 clients, cohort 10, a few rounds of a few local steps) keep the file fast; the
point is that the secure path computes the same model as the plaintext one, not that it trains well.
"""

from types import SimpleNamespace

import pytest
import torch

from flotilla.api import run_experiment, train
from flotilla.config import ConfigError, validate
from flotilla.core.aggregate import Aggregator, WeightedMean
from flotilla.core.client import ClientSpec
from flotilla.core.server_opt import ServerOptimizerSpec
from flotilla.experiment.run import build
from flotilla.secure import DropoutSim, SecureAggregator, SecureBuffer
from flotilla.secure.fedbuff import SecureFedBuff
from flotilla.secure.wiring import SecureAggregationSpec, make_secure
from flotilla.sim.sync import SyncFedAvg
from flotilla.tasks.registry import build_task

TASK = {"name": "fashion-mnist", "partition": "iid", "num_clients": 30}
SYNC = {
    "task": TASK,
    "rounds": 3,
    "cohort": 10,
    "client": {"steps": 5, "batch_size": 20, "lr": 0.05},
    "eval": {"every": 3, "max_clients": 5},
    "output": {"progress": False},
    "threads": 1,
}
ASYNC = {
    "task": TASK,
    "rounds": 4,
    "mode": "async",
    "client": {"steps": 5, "batch_size": 20, "lr": 0.05},
    "fleet": {"population": 300, "availability": {"dropout": 0.05}},
    "async": {"concurrency": 20, "buffer_size": 5, "max_staleness": 10},
    "eval": {"every": 4, "max_clients": 10},
    "output": {"progress": False},
    "threads": 1,
}
CLIENT = ClientSpec(steps=5, batch_size=20, lr=0.05)


def _task():
    return build_task(validate({**SYNC}).task, 0)  # the data is cached in-process; the model is seeded


def _sync(aggregator=None, server=ServerOptimizerSpec()):
    task = _task()
    if aggregator is not None:  # built before the algorithm, from what it will be (numel, dataset)
        numel = sum(p.numel() for p in task.model.parameters())
        aggregator = aggregator(SimpleNamespace(flat=SimpleNamespace(numel=numel), dataset=task.dataset))
    return SyncFedAvg(
        task.model, task.dataset, task.loss_fn, cohort=10, client=CLIENT, server=server, seed=0, aggregator=aggregator
    )


# --- sync ---------------------------------------------------------------------------------------
def test_sync_run_with_secure_aggregation_matches_plaintext(tmp_path):
    plain = run_experiment(validate(SYNC), run_dir=tmp_path / "plain")
    secure = run_experiment(validate({**SYNC, "secure_aggregation": {"degree": "full"}}), run_dir=tmp_path / "secure")
    # Each round's aggregate is within the fixed-point bound of the plaintext one (~2.5e-7 here, checked
    # per round below); local SGD then amplifies the difference ~10x a round: 6e-5 after 3 rounds.
    assert (plain.weights - secure.weights).abs().max() < 1e-3
    acc_p, acc_s = plain.history[-1]["accuracy"], secure.history[-1]["accuracy"]
    assert acc_s == pytest.approx(acc_p, abs=0.01)
    assert acc_p > 0.4  # it did learn (chance: 0.1)
    for rec in secure.history:
        assert rec["secagg_updates"] == 10 and rec["secagg_dropped"] == 0 and "aborted" not in rec


class _SkipSlots(Aggregator):
    """Plaintext reference for dropouts: a weighted mean that leaves out exactly the updates the
    secure aggregator loses (slots dropping before their masked input)."""

    def __init__(self, numel, dropout, cohort):
        self.mean, self.dropout, self.cohort, self.rounds = WeightedMean(numel), dropout, cohort, 0

    def reset(self):
        self.mean.reset()
        self.slot, self.stages = 0, self.dropout.draw(self.cohort, self.rounds)
        self.rounds += 1

    @property
    def count(self):
        return self.mean.count

    def add(self, delta, weight, client):
        self.slot += 1
        if self.stages.get(self.slot) not in ("advertise", "share", "mask"):
            self.mean.add(delta, weight, client)

    def result(self):
        return self.mean.result()


def test_sync_dropouts_at_every_stage_give_fedavg_over_the_survivors():
    drop = DropoutSim(advertise=0.1, share=0.1, mask=0.1, unmask=0.1, seed=3)
    alg_s = _sync(
        lambda a: SecureAggregator(
            a.flat.numel, 10, clip=1.0, max_weight=float(a.dataset.train_sizes.max()), degree=6, dropout=drop
        )
    )
    alg_p = _sync(lambda a: _SkipSlots(a.flat.numel, drop, 10))
    for r in range(2):
        rec = alg_s.step()
        alg_p.step()
        assert rec["secagg_updates"] == 7 and rec["secagg_dropped"] == 4  # 3 lost + 1 kept (dropped at unmask)
        assert "aborted" not in rec
        if r == 0:  # same start: the models differ by the aggregate's error (FedAvg, lr 1) plus one float32 add
            assert (alg_s.weights - alg_p.weights).abs().max() <= alg_s.aggregator.error_bound() + 1e-7
    assert (alg_s.weights - alg_p.weights).abs().max() < 1e-4


class _AbortRound(DropoutSim):
    """All but one slot drop before their masked input in round ``bad``: too few to unmask."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def draw(self, cohort, round_):
        return {s: "mask" for s in range(2, cohort + 1)} if round_ == self.bad else {}


def test_aborted_round_leaves_model_and_optimizer_unchanged_and_run_continues():
    alg = _sync(
        lambda a: SecureAggregator(
            a.flat.numel, 10, max_weight=float(a.dataset.train_sizes.max()), dropout=_AbortRound(bad=1)
        ),
        server=ServerOptimizerSpec("fedavgm", lr=1.0, momentum=0.9),
    )
    assert "aborted" not in alg.step()
    before = alg.state_dict()
    rec = alg.step()
    assert rec["aborted"] is True and "threshold" in rec["abort_reason"], rec
    assert rec["round"] == 2 and alg.round == 2
    after = alg.state_dict()
    for k in before:  # weights and server momentum untouched
        if k not in ("round", "aggregator.rounds"):
            assert torch.equal(before[k], after[k]), k
    rec = alg.step()  # the next round runs normally
    assert "aborted" not in rec and rec["secagg_updates"] == 10
    assert not torch.equal(alg.weights, after["weights"])


def test_every_round_aborting_from_the_config_keeps_the_initial_model(tmp_path):
    # cohort 10, complete graph: t = 6 shares; 5 clients dropping before the key share leaves 5 < 6.
    cfg = validate({**SYNC, "rounds": 2, "secure_aggregation": {"degree": "full", "dropout": {"share": 0.5}}})
    w0 = torch.cat([p.detach().flatten() for p in _task().model.parameters()])
    result = run_experiment(cfg, run_dir=tmp_path / "abort")
    assert [r.get("aborted") for r in result.history] == [True, True]
    assert torch.equal(result.weights, w0)


def test_resumed_secure_run_redraws_the_same_dropouts(tmp_path):
    kw = dict(
        cohort=10,
        client=CLIENT,
        eval={"every": 10, "max_clients": 2},
        secure_aggregation={"degree": 4, "dropout": {"mask": 0.2, "unmask": 0.1}},
    )
    t = _task()
    full = train(t.model, t.dataset, t.loss_fn, rounds=3, **kw)
    t = _task()
    train(t.model, t.dataset, t.loss_fn, rounds=2, run_dir=tmp_path / "r", **kw)
    t = _task()
    resumed = train(t.model, t.dataset, t.loss_fn, rounds=3, run_dir=tmp_path / "r", resume=True, **kw)
    assert torch.equal(full.weights, resumed.weights)


# --- async ---------------------------------------------------------------------------------------
def test_async_fedbuff_through_the_secure_buffer_matches_plaintext_fedbuff(tmp_path):
    plain = run_experiment(validate(ASYNC), run_dir=tmp_path / "plain")
    secure = run_experiment(validate({**ASYNC, "secure_aggregation": {}}), run_dir=tmp_path / "secure")
    # Same float operations inside the buffer (s(tau) * w * d summed, divided by sum w): bit-identical.
    assert torch.equal(plain.weights, secure.weights)
    assert [r["staleness_mean"] for r in plain.history] == [r["staleness_mean"] for r in secure.history]
    assert secure.history[-1]["accuracy"] == plain.history[-1]["accuracy"]


def test_async_server_only_gets_released_sums_of_at_least_k(monkeypatch):
    cfg = validate({**ASYNC, "secure_aggregation": {}})
    released = []
    real = SecureBuffer.release

    def spy(self):
        rel = real(self)
        released.append(rel.count)
        return rel

    monkeypatch.setattr(SecureBuffer, "release", spy)
    alg, rounds, _, _ = build(cfg, build_task(cfg.task, cfg.seed))
    assert isinstance(alg.server.buffer, SecureFedBuff)
    for _ in range(rounds):
        alg.step()
    assert released == [5] * rounds and alg.server.version == rounds


# --- user-level DP composed with secure aggregation ------------------------------------------------
def _dp_sync(z, secure):
    t = _task()
    r = train(
        t.model,
        t.dataset,
        t.loss_fn,
        rounds=1,
        cohort=10,
        client=CLIENT,
        eval={"every": 1, "max_clients": 1},
        privacy={"user_level": {"clip_norm": 0.5, "noise_multiplier": z}},
        secure_aggregation={} if secure else None,
    )
    return r.weights, r.history[-1]


def test_sync_user_level_dp_noise_is_added_by_the_server_after_unmasking():
    w_plain0, _ = _dp_sync(0.0, secure=False)
    w_sec0, rec = _dp_sync(0.0, secure=True)
    assert rec["secagg_updates"] == 10 and rec["dp_updates"] == 10
    assert (w_plain0 - w_sec0).abs().max() < 1e-6  # same clipped mean, up to fixed point
    w_sec1, rec = _dp_sync(1.0, secure=True)
    assert rec["epsilon"] < float("inf")
    # FedAvg (server lr 1): the model moved by N(0, (z S / m)^2) per coordinate = 0.05, over ~115k coordinates.
    assert (w_sec1 - w_sec0).std().item() == pytest.approx(1.0 * 0.5 / 10, rel=0.02)


def test_async_user_level_dp_noise_is_added_inside_the_buffer():
    def one_step(z, secure):
        raw = {**ASYNC, "weighting": "uniform", "privacy": {"user_level": {"clip_norm": 0.5, "noise_multiplier": z}}}
        if secure:
            raw["secure_aggregation"] = {}
        cfg = validate(raw)
        task = build_task(cfg.task, cfg.seed)
        alg = build(cfg, task)[0]
        rec = alg.step()
        return alg.weights.clone(), rec, alg

    w_plain0, _, _ = one_step(0.0, secure=False)
    w_sec0, rec, alg = one_step(0.0, secure=True)
    assert isinstance(alg.inner.server.buffer, SecureFedBuff) and alg.inner.server.buffer.secure.max_norm == 0.5
    assert rec["dp_updates"] == 5
    assert (w_plain0 - w_sec0).abs().max() < 1e-6  # DP-FedBuff's release, computed in the buffer
    w_sec1, _, _ = one_step(1.0, secure=True)
    assert (w_sec1 - w_sec0).std().item() == pytest.approx(1.0 * 0.5 / 5, rel=0.02)


# --- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, key",
    [
        ({"secure_aggregation": {"clip": 0}}, "secure_aggregation.clip"),
        ({"secure_aggregation": {"bits": 16}}, "secure_aggregation.bits"),
        ({"secure_aggregation": {"threshold": 11}}, "secure_aggregation.threshold: 11 is larger than the cohort"),
        (
            {"secure_aggregation": {"degree": 4, "threshold": 6}},
            "secure_aggregation.threshold: 6 is larger than a client's neighbourhood",
        ),
        ({"secure_aggregation": {"degree": "some"}}, "secure_aggregation.degree"),
        ({"secure_aggregation": {"dropout": {"mask": 0.6, "unmask": 0.6}}}, "secure_aggregation.dropout"),
        ({"secure_aggregation": {"max_norm": 1.0}}, "secure_aggregation.max_norm: only for mode: async"),
        ({"secure_aggregation": {"colour": "blue"}}, "secure_aggregation.colour: unknown key"),
        (
            {"secure_aggregation": {}, "workers": 2},
            "secure_aggregation: the protocol runs over the whole cohort in one process",
        ),
        ({"secure_aggregation": {}, "cohort": 1}, "secure_aggregation: needs cohort >= 2"),
        (
            {"secure_aggregation": {}, "fleet": {"population": 100}},
            "secure_aggregation: not wired for sync rounds on a simulated fleet",
        ),
        (
            {
                "secure_aggregation": {},
                "privacy": {"user_level": {"clip_norm": 1, "noise_multiplier": 1, "sampling": "poisson"}},
            },
            "secure_aggregation: privacy.user_level.sampling: poisson",
        ),
        (
            {
                "secure_aggregation": {},
                "privacy": {"user_level": {"clip_norm": 1, "noise_multiplier": 1, "adaptive_clipping": {}}},
            },
            "secure_aggregation: privacy.user_level.adaptive_clipping is not wired",
        ),
    ],
)
def test_sync_config_errors_name_the_key(extra, key):
    with pytest.raises(ConfigError) as e:
        validate({**SYNC, **extra})
    assert key in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "extra, key",
    [
        ({"secure_aggregation": {"degree": "full"}}, "secure_aggregation.degree: only used by sync masking"),
        ({"secure_aggregation": {"dropout": {"mask": 0.1}}}, "secure_aggregation.dropout: only used by sync masking"),
        (
            {"secure_aggregation": {}, "async": {"algorithm": "fedasync"}},
            "secure_aggregation: async.algorithm=fedasync",
        ),
        ({"secure_aggregation": {}, "async": {"buffer_size": 1}}, "secure_aggregation: async.buffer_size must be >= 2"),
    ],
)
def test_async_config_errors_name_the_key(extra, key):
    with pytest.raises(ConfigError) as e:
        validate({**ASYNC, **extra})
    assert key in str(e.value), str(e.value)


def test_python_api_refusals_name_the_setting():
    t = _task()
    with pytest.raises(ValueError, match="workers"):
        train(t.model, t.dataset, t.loss_fn, rounds=1, cohort=10, workers=2, secure_aggregation={})
    with pytest.raises(
        ValueError, match="secure_aggregation.max_weight: 5 is below the largest client's example count"
    ):
        train(t.model, t.dataset, t.loss_fn, rounds=1, cohort=10, secure_aggregation={"max_weight": 5})
    with pytest.raises(ValueError, match="secure_aggregation.bits"):
        SecureAggregationSpec(bits=16)
    with pytest.raises(ValueError, match="secure_aggregation.dropout: unknown keys"):
        SecureAggregationSpec.from_dict({"dropout": {"late": 0.1}})
    t = _task()
    with pytest.raises(ValueError, match="cohort >= 2"):
        make_secure(SyncFedAvg, dict(model=t.model, dataset=t.dataset, loss_fn=t.loss_fn, cohort=1), {})


def test_async_secure_dp_run_resumes_bit_identically():
    cfg = validate(
        {
            **ASYNC,
            "weighting": "uniform",
            "secure_aggregation": {},
            "privacy": {"user_level": {"clip_norm": 0.5, "noise_multiplier": 0.7}},
        }
    )

    def fresh():
        return build(cfg, build_task(cfg.task, cfg.seed))[0]

    straight, first = fresh(), fresh()
    for _ in range(4):
        straight.step()
    for _ in range(2):
        first.step()
    state = first.state_dict()
    assert state["privacy.releases"] == 2 and "buffer.secure.sum" in state
    resumed = fresh()
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.step()
    assert torch.equal(straight.weights, resumed.weights)  # same noise draws, same buffers
