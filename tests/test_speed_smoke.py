"""The speed-benchmark harness runs end to end on Flotilla alone (benchmarks/speed/smoke.py)."""
import sys
from pathlib import Path

import pytest

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed"
sys.path.insert(0, str(SPEED))


def test_speed_harness_smoke(tmp_path):
    import smoke
    runs = smoke.smoke(tmp_path)
    assert set(runs) == {"raw", "flotilla", "flotilla-w2"}
    for r in runs.values():
        assert r["rc"] == 0 and r["rounds"] == 2
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["wall_s"] > 0 and r["peak_mb"] > 10       # the tree was sampled
    assert runs["flotilla-w2"]["workers"] == 2 and runs["flotilla"]["workers"] == 1
    assert runs["raw"]["weights_sha"] == runs["flotilla"]["weights_sha"]
    assert runs["flotilla-w2"]["accuracy"] == pytest.approx(runs["flotilla"]["accuracy"], abs=0.02)
    report = (tmp_path / "speed-scale.json").read_text()
    assert "flotilla / raw" in report


def test_on_demand_population_holds_no_per_user_data():
    from common import Workload
    from fl_flotilla import OnDemandUsers
    import json, tempfile
    with tempfile.TemporaryDirectory() as d:
        meta = {"workload": "scale", "users": 10**6, "per_user": 50, "cohort": 50, "rounds": 1, "epochs": 1,
                "batch": 10, "lr": 0.1, "seed": 0, "dim": 20, "classes": 5, "hidden": 64, "test_users": 20}
        (Path(d) / "meta.json").write_text(json.dumps(meta))
        data = OnDemandUsers(Workload(d))
    assert data.num_clients == 10**6 and data.num_train(999_999) == 50
    import torch
    g = torch.Generator().manual_seed(0)
    a = list(data.train_batches(123_456, 10, g))
    b = list(data.train_batches(123_456, 10, torch.Generator().manual_seed(0)))
    assert len(a) == 5 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))  # same user, same data
    c = list(data.train_batches(7, 10, torch.Generator().manual_seed(0)))
    assert not torch.equal(a[0][0], c[0][0])                                           # other user, other data
    assert data.num_test(19) == 10 and data.num_test(20) == 0
