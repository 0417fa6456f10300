"""Numbers a device sends and numbers the server writes (issue 11 items 3, 4, 28): no finite update
can overflow the model, a step that still makes it non-finite is rolled back, every reported number
is validated, and every JSON file the server writes is strict JSON."""

from __future__ import annotations

import json
import math

import grpc
import pytest
import torch

from flotilla.client import Refused
from flotilla.network.auth import TokenTable
from flotilla.network.coordinator import CoordinatorSettings
from flotilla.network.server import FlotillaServer, ServerThread
from flotilla.privacy import UserLevelSpec
from tests.network_helpers import PKI, connect, start_server, status, tiny_model
from tests.network_helpers import train_assignment as train

NUMEL = 18


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=4)


def strict(path) -> list[dict]:
    """Every line of a JSONL file, refusing NaN and Infinity (not JSON)."""

    def bad(c):
        raise ValueError(f"{path.name}: {c} is not JSON")

    return [json.loads(line, parse_constant=bad) for line in path.read_text().splitlines()]


def test_the_default_config_refuses_finite_values_that_would_overflow_the_sum(pki, tmp_path):
    """Item 3: all 3e38 (each value finite) is refused by the default value bound; the model,
    the ledger and status are unchanged."""
    with start_server(pki, tmp_path / "s", cohort=2) as st:
        c0 = connect(pki, st, 0)
        a = train(c0)
        before = status(st)
        with pytest.raises(Refused) as e:
            c0.upload(a, torch.full((NUMEL,), 3e38), 10)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_update_abs" in str(e.value)
        after = status(st)
        assert after["weights_sha256"] == before["weights_sha256"] and after["rejected_by_reason"] == {"value": 1}
        assert c0.upload(a, torch.full((NUMEL,), 1e5), 10) == (0, 0)  # large but under the bound
        c0.close()


def test_a_step_that_makes_the_model_non_finite_is_rolled_back_and_the_ledger_says_why(pki, tmp_path):
    """Item 3: with the value bound off, two finite updates overflow the weighted sum; the step is
    rolled back (model and version unchanged, nothing non-finite served or saved), the ledger
    drops both updates with the reason, and the next round trains normally."""
    with start_server(pki, tmp_path / "s", cohort=2, max_update_abs=None, total_steps=2) as st:
        w0 = st.server.coord.weights.clone()
        c0, c1 = connect(pki, st, 0), connect(pki, st, 1)
        a0, a1 = train(c0), train(c1)
        assert c0.upload(a0, torch.full((NUMEL,), 3e38), 10) == (0, 0)
        assert c1.upload(a1, torch.full((NUMEL,), 3e38), 10) == (1, 0)  # the step overflowed: version stays 0
        s = status(st)
        assert (s["version"], s["buffered"], s["rolled_back_steps"], s["dropped_by_reason"]) == (
            0,
            0,
            1,
            {"nonfinite_step": 2},
        )
        assert torch.equal(st.server.coord.weights, w0)
        assert torch.equal(c0.download(0), w0)
        b0, b1 = train(c0), train(c1)  # the round starts over
        c0.upload(b0, torch.full((NUMEL,), 0.1), 10)
        assert c1.upload(b1, torch.full((NUMEL,), 0.1), 10) == (3, 1)
        assert torch.allclose(st.server.coord.weights, w0 + 0.1)
        c0.close()
        c1.close()
    ledger = strict(tmp_path / "s" / "ledger.jsonl")
    dropped = [r for r in ledger if r["event"] == "dropped"]
    assert len(dropped) == 1 and dropped[0]["seqs"] == [0, 1] and dropped[0]["reason"] == "nonfinite_step"
    assert "non-finite" in dropped[0]["why"]
    assert [r["seqs"] for r in ledger if r["event"] == "step"] == [[2, 3]]
    assert all(math.isfinite(r["norm"]) for r in ledger if r["event"] == "accepted")
    assert not list((tmp_path / "s" / "pending").iterdir())
    assert [m["round"] for m in strict(tmp_path / "s" / "metrics.jsonl")] == [1]
    # the state directory resumes past the rolled-back step (dropped updates are not re-applied)
    with start_server(pki, tmp_path / "s", cohort=2, max_update_abs=None, total_steps=3) as st:
        assert status(st)["version"] == 1 and status(st)["buffered"] == 0


@pytest.mark.parametrize(
    "field,value,text",
    [
        ("train_loss", float("nan"), "train_loss=nan"),
        ("train_loss", float("inf"), "train_loss=inf"),
        ("examples_seen", -1_000_000, "examples_seen=-1000000"),
        ("examples_seen", 2**60, "examples_seen=1152921504606846976"),
    ],
)
def test_every_number_a_device_reports_is_validated(pki, tmp_path, field, value, text):
    """Item 4: train_loss NaN, examples_seen -1e6 were accepted into metrics, ledger and status."""
    with start_server(pki, tmp_path / "s", cohort=1, over_selection=1.0) as st:
        c0 = connect(pki, st, 0)
        a = train(c0)
        before = status(st)
        kw = {"train_loss": 0.5, "examples_seen": 10, field: value}
        with pytest.raises(Refused) as e:
            c0.upload(a, torch.full((NUMEL,), 0.01), 10, **kw)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and text in str(e.value)
        after = status(st)
        assert after["weights_sha256"] == before["weights_sha256"] and after["rejected_by_reason"] == {"numbers": 1}
        assert c0.upload(a, torch.full((NUMEL,), 0.01), 10, train_loss=0.5, examples_seen=10) == (0, 1)
        c0.close()
    assert strict(tmp_path / "s" / "metrics.jsonl")[0]["train_loss"] == 0.5


def test_dp_metrics_carry_the_noise_multiplier_and_an_unbounded_epsilon_is_null(pki, tmp_path):
    """Item 28: the network's metrics.jsonl lacked noise_multiplier; epsilon = inf (z = 0) must be
    written as null, not the bare Infinity that is not JSON."""
    privacy = UserLevelSpec(clip_norm=1.0, noise_multiplier=0.0, delta=1e-3, amplification=False)
    settings = CoordinatorSettings(
        cohort=1, over_selection=1.0, weighting="uniform", total_steps=1, selection_window_s=0
    )
    server = FlotillaServer(
        tiny_model(),
        tls=pki.tls(),
        tokens=TokenTable.load(pki.paths["tokens_json"]),
        state_dir=tmp_path / "s",
        settings=settings,
        fsync=False,
        linger_s=0.0,
        privacy=privacy,
    )
    with ServerThread(server) as st:
        c0 = connect(pki, st, 0)
        c0.upload(train(c0), torch.full((NUMEL,), 0.01), 10)
        c0.close()
    [m] = strict(tmp_path / "s" / "metrics.jsonl")  # written before the server stops
    assert m["noise_multiplier"] == 0.0 and m["epsilon"] is None and m["delta"] == 1e-3 and m["clip_norm"] == 1.0
