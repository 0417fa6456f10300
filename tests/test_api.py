"""The Python API and the config reach the same experiments: same names, same validation, same result."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

import flotilla
from flotilla.config import ConfigError, validate
from flotilla.experiment.run import run_experiment
from flotilla.tasks import build_task

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "own_task"
TASK = {"name": "fashion-mnist", "partition": "dirichlet", "num_clients": 20, "examples_per_client": 20}
COMMON = {
    "seed": 2,
    "rounds": 3,
    "cohort": 4,
    "client": {"steps": 2, "batch_size": 10, "lr": 0.05},
    "eval": {"every": 3, "max_clients": 4},
    "threads": 1,
}


@pytest.mark.parametrize(
    "extra",
    [
        {"server": {"optimizer": "fedadam", "lr": 0.01}},
        {"mode": "async", "fleet": {"population": 500}, "async": {"concurrency": 6, "buffer_size": 3}},
        {"privacy": {"user_level": {"clip_norm": 0.5, "noise_multiplier": 0.5}}},
        {"secure_aggregation": {"degree": "full"}},
    ],
    ids=["fedadam", "fedbuff-fleet", "dp-fedavg", "secagg"],
)
def test_a_config_and_the_equivalent_python_call_give_the_same_model(tmp_path, extra):
    cfg = validate({**COMMON, "task": TASK, **extra, "output": {"progress": False}})
    from_config = run_experiment(cfg, run_dir=tmp_path / "cfg")
    task = build_task(cfg.task, cfg.seed)
    from_api = flotilla.train(task.model, task.dataset, task.loss_fn, **COMMON, **extra)
    assert torch.equal(from_config.weights, from_api.weights)
    assert [r["train_loss"] for r in from_config.history] == [r["train_loss"] for r in from_api.history]


def _data():
    task = build_task(validate({**COMMON, "task": TASK}).task, 0)
    return task.model, task.dataset


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"client": {"lr": -1.0}}, "client.lr"),
        ({"server": {"name": "fedadam"}}, "server.name: unknown key"),
        ({"server": {"optimizer": "adamw"}}, "server.optimizer"),
        ({"eval_every": 2}, "eval_every: unknown key"),
        ({"cohort": 0}, "cohort"),
        ({"client": "fast"}, "client: expected a dict"),
    ],
)
def test_train_validates_its_arguments_as_the_config_does(kwargs, message):
    model, data = _data()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=message):
        flotilla.train(model, data, rounds=1, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_refuses_to_overwrite_a_run_unless_resuming(tmp_path):
    model, data = _data()
    kw = dict(rounds=2, cohort=4, client={"steps": 1}, run_dir=tmp_path / "run")
    first = flotilla.train(model, data, **kw)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="resume=True"):
        flotilla.train(model, data, **kw)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    more = flotilla.train(model, data, **{**kw, "rounds": 3}, resume=True)
    assert len(more.history) == 3 and more.history[:2] == first.history


def test_a_user_task_from_a_local_file_trains_from_the_command_line(tmp_path, monkeypatch):
    sys.path.insert(0, str(EXAMPLE))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from make_csv import main as make_csv

    csv_path = make_csv(tmp_path / "points.csv", users=20)
    raw = yaml.safe_load((EXAMPLE / "own_task.yaml").read_text())
    raw["task"]["options"]["path"] = str(csv_path)
    raw.update(rounds=12, output={"dir": str(tmp_path), "name": "own", "progress": False})
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(raw))
    from flotilla.cli import main

    assert main(["run", str(tmp_path / "own.yaml")]) in (0, None)
    lines = (tmp_path / "own" / "metrics.jsonl").read_text().splitlines()
    last = [line for line in lines if '"accuracy": 0' in line][-1]
    assert yaml.safe_load(last)["accuracy"] > 0.8  # better than the quadrant prior (~0.5)
    # the saved config resumes: the factory is found again from the saved config
    assert (
        validate(yaml.safe_load((tmp_path / "own" / "config.yaml").read_text())).task.factory == "quadrants:make_task"
    )


@pytest.mark.parametrize(
    "factory, message",
    [
        (None, "task.factory: give 'package.module:function'"),
        ("quadrants", "expected 'package.module:function'"),
        ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
        ("quadrants:nope", "has no function 'nope'"),
    ],
)
def test_python_task_refusals_name_the_key(factory, message, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    cfg = validate({**COMMON, "task": {"name": "python", "factory": factory}})
    with pytest.raises(ValueError, match=message):
        build_task(cfg.task, 0)


def test_a_device_builds_a_user_task_model_without_the_data(monkeypatch, tmp_path):
    from flotilla.tasks import model_for_task

    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.chdir(tmp_path)  # no points.csv here: the factory could not run
    task = {
        "name": "python",
        "factory": "quadrants:make_task",
        "model": "quadrants:make_model",
        "options": {"path": "points.csv", "hidden": 7},
    }
    model = model_for_task(task)
    assert model[0].out_features == 7
    with pytest.raises(FileNotFoundError):
        model_for_task({**task, "model": None})  # without task.model the whole factory runs
