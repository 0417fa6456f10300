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
        assert r["wall_s"] > 0 and r["peak_mb"] > 10  # the tree was sampled
    assert runs["flotilla-w2"]["workers"] == 2 and runs["flotilla"]["workers"] == 1
    assert runs["raw"]["weights_sha"] == runs["flotilla"]["weights_sha"]
    assert runs["flotilla-w2"]["accuracy"] == pytest.approx(runs["flotilla"]["accuracy"], abs=0.02)
    report = (tmp_path / "speed-scale.json").read_text()
    assert "flotilla / raw" in report


def test_on_demand_population_holds_no_per_user_data():
    import json
    import tempfile

    from common import Workload
    from fl_flotilla import OnDemandUsers

    with tempfile.TemporaryDirectory() as d:
        meta = {
            "workload": "scale",
            "users": 10**6,
            "per_user": 50,
            "cohort": 50,
            "rounds": 1,
            "epochs": 1,
            "batch": 10,
            "lr": 0.1,
            "seed": 0,
            "dim": 20,
            "classes": 5,
            "hidden": 64,
            "test_users": 20,
        }
        (Path(d) / "meta.json").write_text(json.dumps(meta))
        data = OnDemandUsers(Workload(d))
    assert data.num_clients == 10**6 and data.num_train(999_999) == 50
    import torch

    g = torch.Generator().manual_seed(0)
    a = list(data.train_batches(123_456, 10, g))
    b = list(data.train_batches(123_456, 10, torch.Generator().manual_seed(0)))
    assert len(a) == 5 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))  # same user, same data
    c = list(data.train_batches(7, 10, torch.Generator().manual_seed(0)))
    assert not torch.equal(a[0][0], c[0][0])  # other user, other data
    assert data.num_test(19) == 10 and data.num_test(20) == 0


def _profile_round(data: Path):
    import subprocess

    return subprocess.run(
        [
            sys.executable,
            str(SPEED / "profile_round.py"),
            "--data",
            str(data),
            "--users",
            "1000",
            "--rounds",
            "1",
            "--top",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_profile_round_prepares_its_workload_first(tmp_path):
    """profile_round.py on a folder prepare.py had not written stopped with KeyError: 'workload'
    (issue 11 item 29); a folder named after a workload is now prepared, anything else is one line."""
    r = _profile_round(tmp_path / "scale")
    assert r.returncode == 0, r.stderr
    assert "profiled 1 round(s)" in r.stdout and (tmp_path / "scale" / "meta.json").exists()
    from common import ensure_prepared

    with pytest.raises(SystemExit, match=r"--data .*mydata: no prepared workload there .*prepare.py --workload"):
        ensure_prepared(tmp_path / "mydata")


def test_roofline_reports_best_of_repeats_and_load(tmp_path):
    """roofline.py's figures depend on the machine's load: it reports the best of its repeats and
    the load average before and after (issue 11 item 29)."""
    import json
    import subprocess

    r = subprocess.run(
        [
            sys.executable,
            str(SPEED / "roofline.py"),
            "--repeats",
            "2",
            "--import-repeats",
            "1",
            "--flower-wall",
            "36.3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["statistic"] == "best of repeats" and out["repeats"] == 2
    assert len(out["load_average_before"]) == 3 and len(out["load_average_after"]) == 3
    assert out["lstm_step_ms"] > 0 and "load average" in r.stdout
