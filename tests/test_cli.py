"""The CLI: config validation before any work, --set overrides, help text, report."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from flotilla.cli import main
from flotilla.config import ConfigError, load_config


def write(tmp_path, cfg):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


BASE = {"task": {"name": "fashion-mnist", "num_clients": 20}, "rounds": 1, "cohort": 5}


@pytest.mark.parametrize(
    "patch, key, reason",
    [
        ({"client": {"lr": -0.1}}, "client.lr", "greater than 0"),
        ({"cohort": 50}, "cohort", "larger than the population"),
        ({"client": {"batchsize": 3}}, "client.batchsize", "unknown key"),
        ({"rounds": "many"}, "rounds", "valid integer"),
        ({"server": {"optimizer": "fedfoo"}}, "server.optimizer", "fedavg"),
        ({"task": {"name": "mnist-x"}}, "task", "does not match"),
    ],
)
def test_config_errors_name_the_key(tmp_path, patch, key, reason):
    cfg = {**BASE, **patch}
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, cfg))
    assert f"{key}:" in str(e.value) and reason in str(e.value)


def test_missing_required_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match="rounds: required key is missing"):
        load_config(write(tmp_path, {"task": {"name": "shakespeare"}}))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_set_overrides_are_validated(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_config(path, ["client.lr=0.25", "server.optimizer=fedadam"])
    assert cfg.client.lr == 0.25 and cfg.server.optimizer == "fedadam"
    with pytest.raises(ConfigError, match="client.lr"):
        load_config(path, ["client.lr=-1"])


def test_cli_refuses_bad_config_before_any_work(tmp_path, capsys):
    path = write(tmp_path, {**BASE, "client": {"lr": 0}, "output": {"dir": str(tmp_path / "runs")}})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "client.lr" in err
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_help_documents_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "flotilla.cli", "run", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for key in [
        "task.partition",
        "task.min_chars",
        "client.lr",
        "server.optimizer",
        "server.tau",
        "eval.every",
        "output.tensorboard",
        "--resume",
        "--set",
    ]:
        assert key in out


def test_cli_run_resume_and_report(tmp_path, capsys):
    cfg = {
        "task": {"name": "fashion-mnist", "num_clients": 20, "partition": "iid"},
        "rounds": 2,
        "cohort": 2,
        "client": {"steps": 2, "batch_size": 8},
        "eval": {"max_clients": 3},
        "output": {"progress": False, "tensorboard": True},
    }
    run_dir = tmp_path / "run"
    assert main(["run", str(write(tmp_path, cfg)), "--run-dir", str(run_dir)]) == 0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    for k in ["round", "loss", "accuracy", "wall_time_s", "examples_seen"]:
        assert k in lines[-1]
    for f in ["config.yaml", "model.safetensors", "state.safetensors", "plot.png"]:
        assert (run_dir / f).exists()
    assert list((run_dir / "tensorboard").iterdir())
    # A second run into the same directory is refused; --resume of a finished run is a no-op.
    assert main(["run", str(write(tmp_path, cfg)), "--run-dir", str(run_dir)]) == 2
    assert main(["run", "--resume", str(run_dir)]) == 0
    capsys.readouterr()
    out_png = tmp_path / "cmp.png"
    assert main(["report", str(run_dir), str(run_dir), "--out", str(out_png)]) == 0
    table = capsys.readouterr().out
    assert "final_acc" in table and "fashion-mnist" in table and out_png.exists()


TINY = {
    "task": {"name": "fashion-mnist", "num_clients": 20, "partition": "iid"},
    "rounds": 1,
    "cohort": 2,
    "client": {"steps": 1, "batch_size": 8},
    "eval": {"max_clients": 2},
    "output": {"progress": False},
}


def test_resume_with_more_rounds_continues_a_finished_run(tmp_path, capsys):
    """`flotilla run --resume RUN --set rounds=N` adds rounds to a finished run: the same model as
    a run of N rounds from the start; nothing else may change, and never below the rounds done."""
    from safetensors.torch import load_file

    short, full = tmp_path / "short", tmp_path / "full"
    assert main(["run", str(write(tmp_path, TINY)), "--run-dir", str(short)]) == 0
    assert main(["run", "--resume", str(short), "--set", "rounds=2"]) == 0
    assert main(["run", str(write(tmp_path, {**TINY, "rounds": 2})), "--run-dir", str(full)]) == 0
    assert [json.loads(x)["round"] for x in (short / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    a, b = load_file(str(short / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((short / "config.yaml").read_text())["rounds"] == 2  # a later --resume keeps it
    capsys.readouterr()
    saved = (short / "config.yaml").read_text()
    assert main(["run", "--resume", str(short), "--set", "client.lr=0.5"]) == 2
    assert main(["run", "--resume", str(short), "--set", "rounds=1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "flotilla: error: --set client.lr: --resume can only change rounds (any other key would make a "
        "different experiment)",
        "flotilla: error: rounds: 1 is fewer than the 2 rounds this run has done",
    ]
    assert (short / "config.yaml").read_text() == saved


def test_diverging_run_exits_non_zero_without_a_nan_model(tmp_path, capsys):
    """Item 13: a finite but huge server.lr makes the model inf in round 1: exit 1, one line, no model file."""
    run_dir = tmp_path / "run"
    cfg = {**TINY, "client": {"steps": 3, "batch_size": 8, "lr": 1.0}, "server": {"lr": 3e38}}
    assert main(["run", str(write(tmp_path, cfg)), "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "round 1: the global model became non-finite" in err[0]
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "state.safetensors").exists()


def test_damaged_checkpoint_on_resume_is_one_line(tmp_path, capsys):
    """Item 16 through the CLI: exit 2 and one line naming the file."""
    run_dir = tmp_path / "run"
    assert main(["run", str(write(tmp_path, TINY)), "--run-dir", str(run_dir)]) == 0
    state = run_dir / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flotilla: error: {state}: the checkpoint is damaged")


def test_secure_aggregation_run_resumes(tmp_path):
    """Item 14 end to end: the run's own config.yaml (max_norm: null, degree: auto, bits: 32) resumes."""
    run_dir = tmp_path / "run"
    cfg = {**TINY, "rounds": 1, "secure_aggregation": {"dropout": {"unmask": 0.5}}}
    assert main(["run", str(write(tmp_path, cfg)), "--run-dir", str(run_dir)]) == 0
    assert "max_norm: null" in (run_dir / "config.yaml").read_text()
    assert main(["run", "--resume", str(run_dir), "--set", "rounds=2"]) == 0
    assert [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "x.yaml", "--port", "70000"],
        ["serve", "x.yaml", "--port", "-5"],
        ["status", "--server", "localhost:70000"],
        ["join", "--server", "localhost:-1", "--data", "d"],
    ],
)
def test_port_out_of_range_is_refused_not_wrapped(argv, capsys):
    """Item 12: --port 70000 used to listen on 70000 % 65536 = 4464."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "is not a port number" in capsys.readouterr().err


def test_resume_cannot_change_rounds_of_a_calibrated_dp_run(tmp_path, capsys):
    """The noise of target_epsilon was calibrated to the run's rounds: more rounds would overspend."""
    from flotilla.config import validate
    from flotilla.runs.rundir import RunDir

    cfg = validate({**TINY, "privacy": {"user_level": {"clip_norm": 1.0, "target_epsilon": 5.0}}})
    RunDir(tmp_path / "run").write_config(cfg.model_dump(mode="json"))
    assert main(["run", "--resume", str(tmp_path / "run"), "--set", "rounds=5"]) == 2
    assert "rounds: the noise of this run was calibrated" in capsys.readouterr().err
