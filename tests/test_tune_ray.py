"""flotilla tune --ray: trials as Ray tasks on one private local Ray (2 CPUs) shared by the module;
Ray missing or a bad address is one line and writes nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flotilla.config import validate
from tests.test_tune import tiny_task, write_space

ROOT = Path(__file__).resolve().parents[1]
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed")


def pid_task(seed: int, pids: str):
    """tests.test_tune's tiny task, recording the pid of the process that builds it (one per trial)."""
    with open(pids, "a") as f:
        f.write(f"{os.getpid()}\n")
    return tiny_task(seed)


def space(folder: Path, pids: Path, **extra) -> Path:
    folder.mkdir(exist_ok=True)
    path = write_space(folder, **extra)
    raw = yaml.safe_load(path.read_text())
    raw["base"]["task"] = {"name": "python", "factory": "tests.test_tune_ray:pid_task", "options": {"pids": str(pids)}}
    raw["base"]["rounds"] = 4
    raw["heartbeat_s"] = 10  # the default: nothing is killed here, and a loaded machine may delay a beat
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # the factory "tests.test_tune_ray:pid_task" is found from the repository root


@pytest.fixture(scope="module")
def tune_ray():
    """Ray as `flotilla tune --ray` starts it (private, local, 2 CPUs), shared by this module's studies."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed")
    from flotilla.tune.ray_trials import start_ray

    ray, started = start_ray(None, 2)
    assert started and ray.cluster_resources()["CPU"] == 2
    yield ray
    ray.shutdown()


def _key(row):
    return (row["trial"], row["state"], row["rounds"], row["tuner_error"], row["true_error"], row["params"])


def _pids(path: Path) -> set[int]:
    return {int(line) for line in path.read_text().split()}


@needs_ray
def test_hyperband_study_on_ray_prunes_inside_the_tasks_as_in_process(tmp_path, tune_ray):
    import optuna

    from flotilla.tune import tune

    kw = dict(method="hyperband", seed=0, hyperband={"eta": 2, "min_rounds": 1})
    quiet = {"echo": lambda *_: None}
    here = tune(space(tmp_path / "a", tmp_path / "a.pids", **kw), out=tmp_path / "here", **quiet)
    out = tmp_path / "ray"
    summary = tune(space(tmp_path / "b", tmp_path / "b.pids", **kw), out=out, ray=True, **quiet)

    assert os.getpid() not in _pids(tmp_path / "b.pids")  # every trial was built in a Ray worker
    assert _pids(tmp_path / "a.pids") == {os.getpid()}
    # one task at a time: the same trials, reports, prunings and errors as in this process
    assert [_key(r) for r in summary["table"]] == [_key(r) for r in here["table"]]
    pruned = [r for r in summary["table"] if r["state"] == "pruned"]
    assert len(pruned) == 1 and pruned[0]["rounds"] < 4
    study = optuna.load_study(study_name="flotilla", storage=f"sqlite:///{out / 'study.db'}")
    for t in study.trials:  # every evaluation was reported to the study from inside the task
        run = out / "trials" / f"trial-{t.number:04d}"
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        reported = {r["round"]: r["tuner_error"] for r in metrics if r.get("tuner_error") is not None}
        assert t.intermediate_values == {k: v for k, v in reported.items() if k < 4}
        assert max(reported) == t.user_attrs["rounds"]  # a pruned run directory ends at its rung
    assert summary["chosen"]["trial"] == here["chosen"]["trial"]


@needs_ray
def test_random_study_two_tasks_at_once(tmp_path, tune_ray, capsys):
    from flotilla.cli import main

    pids = tmp_path / "pids"
    out = tmp_path / "study"
    assert main(["tune", str(space(tmp_path, pids)), "--ray", "--workers", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done after 4 rounds") == 3 and "chosen: trial" in printed
    assert os.getpid() not in _pids(pids) and len(_pids(pids)) >= 1
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and sorted(int(r.split(",")[0]) for r in rows[1:]) == [0, 1, 2]
    runs = sorted(p.name for p in (out / "trials").iterdir() if (p / "state.safetensors").exists())
    assert runs == ["trial-0000", "trial-0001", "trial-0002"]
    md = (out / "trials.md").read_text().splitlines()[2:]
    errors = {int(r.split("|")[1]): float(r.split("|")[4]) for r in md}
    best = validate(yaml.safe_load((out / "best.yaml").read_text()))
    chosen = min(errors, key=errors.get)
    cfg = validate(yaml.safe_load((out / "trials" / f"trial-{chosen:04d}" / "config.yaml").read_text()))
    assert best.client.lr == cfg.client.lr and best.client.batch_size == cfg.client.batch_size


def test_ray_missing_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from flotilla.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "study"
    assert main(["tune", str(space(tmp_path, tmp_path / "pids")), "--ray", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "flotilla: error: flotilla tune --ray needs Ray, which is not installed here: pip install 'flotilla[ray]'"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1:1", "--ray-address: no Ray cluster at '127.0.0.1:1' (Connection refused); start one with"),
        ("not an address", "--ray-address: 'not an address': must be null (a private local Ray), 'auto'"),
    ],
)
@needs_ray
def test_bad_ray_address_is_one_line_and_writes_nothing(tmp_path, capsys, address, expected):
    from flotilla.cli import main

    out = tmp_path / "study"
    assert main(["tune", str(space(tmp_path, tmp_path / "pids")), "--ray-address", address, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flotilla: error: {expected}") and "\n" not in err
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device: cuda is refused earlier without a GPU")
def test_cuda_trials_without_a_gpu_share_are_refused_before_ray_starts(tmp_path, capsys):
    from flotilla.cli import main

    path = space(tmp_path, tmp_path / "pids")
    raw = yaml.safe_load(path.read_text())
    raw["base"]["device"] = "cuda"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "study"
    assert main(["tune", str(path), "--ray", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flotilla: error: --ray-gpus-per-trial: the trials train on device: cuda") and "\n" not in err
    assert not out.exists()
