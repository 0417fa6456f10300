"""Run files survive crashes and bad numbers (issue 11 items 13, 15, 16, 28).

A fake algorithm keeps these tests to milliseconds; test_cli.py runs the same paths end to end."""

import json

import pytest
import torch
from torch import nn

from flotilla.core.flat import FlatModel
from flotilla.runner import DivergedError, Runner
from flotilla.runs.rundir import DamagedRunError, RunDir


class Counter:
    """One-parameter 'algorithm': every step adds ``delta``; records carry ``extra``."""

    def __init__(self, delta=1.0, extra=None):
        self.flat = FlatModel(nn.Linear(1, 1, bias=False))
        self.weights = torch.zeros(1)
        self.round = 0
        self.delta = delta
        self.extra = extra or {}

    def step(self):
        self.weights = self.weights + self.delta(self.round) if callable(self.delta) else self.weights + self.delta
        self.round += 1
        return {"train_loss": 1.0, **self.extra}

    def state_dict(self):
        return {"weights": self.weights.clone(), "round": torch.tensor(self.round)}

    def load_state_dict(self, state):
        self.weights, self.round = state["weights"].clone(), int(state["round"])


def run(tmp_path, rounds, resume=False, **kw):
    runner = Runner(Counter(**kw), None, rounds=rounds, run_dir=RunDir(tmp_path / "run"), progress=False)
    if resume:
        runner.resume()
    else:
        (tmp_path / "run").mkdir(exist_ok=True)
    return runner, runner.run()


def test_non_finite_model_stops_the_run_and_is_never_saved(tmp_path):
    """Item 13: a step that makes the model NaN/inf raises; the checkpoint and metrics stay at the last good round."""
    blow_up = lambda r: torch.tensor([float("inf") if r == 2 else 1.0])  # noqa: E731
    with pytest.raises(DivergedError, match="round 3: the global model became non-finite"):
        run(tmp_path, rounds=5, delta=blow_up)
    rd = RunDir(tmp_path / "run")
    assert [r["round"] for r in rd.read_metrics()] == [1, 2]
    assert rd.state_meta()["round"] == 2 and torch.isfinite(rd.load_state()["weights"]).all()
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_non_finite_metrics_are_written_as_null(tmp_path):
    """Item 28: `epsilon: Infinity` is not JSON; every non-finite number becomes null."""
    run(
        tmp_path, rounds=1, extra={"epsilon": float("inf"), "nested": {"x": float("nan")}, "list": [1.0, float("-inf")]}
    )
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "Infinity" not in text and "NaN" not in text
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert record["epsilon"] is None and record["nested"] == {"x": None} and record["list"] == [1.0, None]


def test_partial_last_metrics_line_is_dropped_on_resume(tmp_path):
    """Item 15: a kill mid-append leaves half a line; resume drops it instead of failing."""
    run(tmp_path, rounds=2)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"round": 3, "train_loss": 0.5, "na')
    runner, history = run(tmp_path, rounds=3, resume=True)
    assert [r["round"] for r in history] == [1, 2, 3]
    assert [json.loads(line)["round"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    # Damage anywhere but at the end is not a crash artefact: refused, naming the file and line.
    metrics.write_text('{"round": 1}\n{"rou\n{"round": 2}\n')
    with pytest.raises(DamagedRunError, match="metrics.jsonl: line 2"):
        RunDir(tmp_path / "run").read_metrics()


def test_orphan_temp_files_are_removed(tmp_path):
    """Item 15: a checkpoint write killed before its renames leaves .tmpXXXXXX or state.safetensors.tmp behind."""
    run(tmp_path, rounds=1)
    orphan = tmp_path / "run" / "state.safetensors.tmp"
    orphan.write_bytes(b"\0" * 1000)
    run(tmp_path, rounds=1, resume=True)
    assert not orphan.exists()
    orphan.write_bytes(b"\0" * 1000)
    RunDir(tmp_path / "run").save_state(Counter().state_dict(), {"round": 0})  # and on every save
    assert not orphan.exists()
    hidden = tmp_path / "run" / ".tmpAb3xYz"  # safetensors' own temp file, renamed onto ours when complete
    hidden.write_bytes(b"\0" * 1000)
    run(tmp_path, rounds=1, resume=True)
    assert not hidden.exists()
    other = tmp_path / "run" / "notes.tmp"  # not a file of the run: left alone
    other.write_text("mine")
    run(tmp_path, rounds=2, resume=True)
    assert other.exists()


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_damaged_checkpoint_is_one_clear_error(tmp_path, damage):
    """Item 16: a truncated state.safetensors is reported as a damaged checkpoint, not a traceback."""
    run(tmp_path, rounds=1)
    state = tmp_path / "run" / "state.safetensors"
    data = state.read_bytes()
    state.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"x" * 64}[damage])
    with pytest.raises(DamagedRunError) as e:
        run(tmp_path, rounds=2, resume=True)
    message = str(e.value)
    assert message.startswith(f"{state}: the checkpoint is damaged") and "\n" not in message


def test_damaged_config_is_one_clear_error(tmp_path):
    rd = RunDir(tmp_path)
    (tmp_path / "config.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    with pytest.raises(DamagedRunError, match="config.yaml: damaged"):
        rd.read_config()
