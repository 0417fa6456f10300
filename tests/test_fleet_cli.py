"""Fleet configs end to end: validation naming the key, `flotilla run` in async and sync-fleet
mode, resume bit-identical, and `flotilla report --x sim_time_s` over several runs."""

import json

import pytest
import yaml
from safetensors.torch import load_file

from flotilla.cli import main
from flotilla.config import ConfigError, validate

TASK = {"name": "fashion-mnist", "num_clients": 20, "partition": "iid", "examples_per_client": 20}
BASE = {
    "task": TASK,
    "rounds": 6,
    "cohort": 4,
    "threads": 1,
    "client": {"steps": 1, "batch_size": 8},
    "eval": {"max_clients": 3, "every": 3},
    "output": {"progress": False, "checkpoint_every": 1},
}
FLEET = {
    "population": 10_000,
    "speed": {"dist": "lognormal", "median": 5, "sigma": 1.0},
    "availability": {"dropout": 0.1},
}


@pytest.mark.parametrize(
    "patch, message",
    [
        (
            {"mode": "async", "async": {"concurrency": 50}, "fleet": {"population": 10}},
            "async.concurrency: 50 is larger than fleet.population=10",
        ),
        ({"mode": "async", "async": {"buffer_size": 0}}, "async.buffer_size"),
        ({"fleet": {"speed": -2}}, "fleet.speed"),
        ({"fleet": {"bandwidth_down_mbps": {"dist": "uniform", "low": -1, "high": 2}}}, "fleet.bandwidth_down_mbps"),
        ({"fleet": {"availability": {"dropout": -0.1}}}, "fleet.availability.dropout"),
        ({"fleet": {"availability": {"diurnal": [0] * 24}}}, "fleet.availability.diurnal: never admits a device"),
        ({"fleet": {"population": 3}}, "fleet.over_selection"),
        ({"async": {"concurrency": 3}}, "async: only used with mode: async"),
        ({"mode": "async", "async": {"staleness": {"kind": "cubic"}}}, "async.staleness.kind"),
        ({"mode": "async", "async": {"mixing": 1.5}}, "async.mixing"),
        ({"mode": "async", "async": {"arrival_rate": 0}}, "async.arrival_rate"),
        (
            {
                "mode": "async",
                "async": {"staleness": {"average": 2.0}},
                "privacy": {"user_level": {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3}},
            },
            "async.staleness.average: normalised",
        ),
        ({"mode": "async", "async": {"arrival_rate": float("inf")}}, "async.arrival_rate"),
        (
            {
                "mode": "async",
                "async": {"arrival_rate": 1.0},
                "network": {"tls": {"cert": "a.pem", "key": "b.key"}, "tokens": "t.json"},
            },
            "async.arrival_rate: simulates devices checking in",
        ),
        (
            {"mode": "async", "fleet": {"speed": {"dist": "lognormal", "median": 3}}},
            "fleet.speed: lognormal needs sigma",
        ),
    ],
)
def test_impossible_fleet_settings_are_refused_with_the_key_named(patch, message):
    with pytest.raises(ConfigError) as e:
        validate({**BASE, **patch})
    assert message in str(e.value)


def test_async_key_round_trips_through_the_saved_config():
    cfg = validate({**BASE, "mode": "async", "async": {"buffer_size": 3}})
    dumped = cfg.model_dump(mode="json")
    assert dumped["async"]["buffer_size"] == 3 and "async_" not in dumped
    assert validate(yaml.safe_load(yaml.safe_dump(dumped))).async_.buffer_size == 3


def _run(tmp_path, name, patch):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**BASE, **patch}))
    run_dir = tmp_path / name
    assert main(["run", str(path), "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_fleet_runs_resume_and_report_by_simulated_time(tmp_path, capsys):
    fedbuff = {"mode": "async", "fleet": FLEET, "async": {"concurrency": 8, "buffer_size": 3, "max_staleness": 10}}
    a = _run(tmp_path, "fedbuff", fedbuff)
    records = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in (
        "sim_time_s",
        "wall_time_s",
        "trips",
        "bytes_down",
        "bytes_up",
        "wasted_trips",
        "staleness_mean",
        "concurrency",
        "dropouts",
        "accuracy",
    ):
        assert key in records[-1]
    assert records[-1]["sim_time_s"] > records[0]["sim_time_s"] > 0
    assert records[-1]["concurrency"] == pytest.approx(8)

    # Interrupted after 3 steps, then resumed: bit-identical to the uninterrupted run.
    part = _run(tmp_path, "part", {**fedbuff, "rounds": 3})
    assert main(["run", "--resume", str(part)]) == 0  # finished at 3: no-op
    cfg = yaml.safe_load((part / "config.yaml").read_text())
    cfg["rounds"] = 6
    (part / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", "--resume", str(part)]) == 0
    assert load_file(str(part / "model.safetensors")).keys() == load_file(str(a / "model.safetensors")).keys()
    for k, v in load_file(str(a / "model.safetensors")).items():
        assert (load_file(str(part / "model.safetensors"))[k] == v).all()
    resumed = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("wall_time_s",)}  # noqa: E731
    assert [strip(r) for r in resumed] == [strip(r) for r in records]

    fedasync = _run(tmp_path, "fedasync", {**fedbuff, "async": {"algorithm": "fedasync", "concurrency": 8}})
    # Poisson arrivals (FLSim's async model): fewer than `concurrency` in flight on average, counted arrivals
    poisson = _run(tmp_path, "poisson", {**fedbuff, "async": {**fedbuff["async"], "arrival_rate": 0.2}})
    last = [json.loads(x) for x in (poisson / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["arrivals"] >= last["trips"] > 0 and last["concurrency"] < 8
    assert last["arrivals"] - last["arrivals_missed"] == last["trips"]
    sync = _run(tmp_path, "sync", {"fleet": {**FLEET, "deadline_s": 30.0}})
    last = [json.loads(x) for x in (sync / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["trips"] == 6 * 6  # ceil(4 x 1.3) selected per round
    # fleet.max_sim_time_s stops the run once the simulated clock passes it.
    short = _run(tmp_path, "short", {**fedbuff, "fleet": {**FLEET, "max_sim_time_s": 1e-6}})
    assert len((short / "metrics.jsonl").read_text().splitlines()) == 1
    capsys.readouterr()
    out = tmp_path / "sim.png"
    assert main(["report", str(a), str(fedasync), str(sync), "--x", "sim_time_s", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "async/fedbuff+fedavg" in table and "async/fedasync" in table and "sync-fleet/fedavg" in table
    assert out.exists() and out.stat().st_size > 10_000


def test_async_run_ignores_the_unused_cohort(tmp_path):
    """Issue 11 item 28: mode async with 4 clients and the default cohort (10) runs; it was refused."""
    cfg = {
        "task": {**TASK, "num_clients": 4},
        "rounds": 2,
        "mode": "async",
        "threads": 1,
        "fleet": {"population": 8},
        "async": {"concurrency": 4, "buffer_size": 2},
        "client": {"steps": 1, "batch_size": 8},
        "eval": {"max_clients": 2},
        "output": {"progress": False},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    assert [json.loads(x)["round"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
