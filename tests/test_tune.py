"""flotilla tune: the search space and its refusals, a study that runs, is killed and resumes, the
noisy evaluation's pieces."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from flotilla.config import ConfigError, validate
from flotilla.tune.noisy_eval import (
    NoiseConfig,
    NoisyEvaluation,
    bias_probabilities,
    laplace_scale,
    private_value,
    reassign,
    sample_clients,
    subsample_size,
)

ROOT = Path(__file__).resolve().parents[1]
STALL = "FLOTILLA_TEST_TUNE_STALL"  # set in the process to be killed: its second trial hangs


def tiny_task(seed: int, builds: str | None = None):
    """8 clients of 2-D Gaussian blobs, a linear model: a trial takes milliseconds."""
    if builds is not None:
        with open(builds, "a") as f:
            f.write("x")
        if os.environ.get(STALL) and Path(builds).stat().st_size >= 2:
            time.sleep(600)  # the second trial of the killed process never ends
    g = torch.Generator().manual_seed(1234)
    clients = {}
    for c in range(8):
        y = torch.randint(0, 2, (24,), generator=g)
        x = torch.randn(24, 2, generator=g) + 2.0 * y[:, None].float() - 1.0
        clients[f"c{c}"] = torch.utils.data.TensorDataset(x, y)
    tests = {k: torch.utils.data.Subset(v, range(16, 24)) for k, v in clients.items()}
    trains = {k: torch.utils.data.Subset(v, range(16)) for k, v in clients.items()}
    return {"model": torch.nn.Linear(2, 2), "data": (trains, tests)}


def write_space(tmp_path: Path, builds: Path | None = None, **extra) -> Path:
    options = {"builds": str(builds)} if builds is not None else {}
    space = {
        "base": {
            "task": {"name": "python", "factory": "tests.test_tune:tiny_task", "options": options},
            "rounds": 3,
            "cohort": 4,
            "client": {"batch_size": 8},
            "output": {"progress": False},
        },
        "method": "random",
        "trials": 3,
        "seed": 7,
        "heartbeat_s": 1,
        "space": {
            "client.lr": {"log_uniform": [0.01, 1.0]},
            "client.batch_size": {"choice": [4, 8]},
            "server.momentum": {"uniform": [0.0, 0.9]},
            "client.epochs": {"int": [1, 2]},
        },
        "noise": {"clients": 3, "bias": 1.0, "epsilon": 100.0},
        **extra,
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # the factory "tests.test_tune:tiny_task" is found from the repository root


# --- the space ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dims, expected",
    [
        (
            {"client.lrr": {"uniform": [0.1, 0.2]}},
            "space.client.lrr: 0.1 is not a valid value (client.lrr: unknown key)",
        ),
        ({"client.lr": {"uniform": [0.3, 0.3]}}, "space.client.lr: empty range [0.3, 0.3]"),
        ({"client.lr": {"log_uniform": [0.5, 0.1]}}, "space.client.lr: empty range [0.5, 0.1]"),
        ({"client.lr": {"log_uniform": [0.0, 0.1]}}, "space.client.lr: log_uniform needs low > 0"),
        ({"client.batch_size": {"choice": []}}, "space.client.batch_size: choice needs a non-empty list"),
        ({"client.epochs": {"int": [0, 3]}}, "space.client.epochs: 0 is not a valid value"),
        ({"client.lr": {"normal": [0, 1]}}, "space.client.lr: give one of log_uniform, uniform, int, choice"),
    ],
)
def test_space_refusals_name_the_key_and_write_nothing(tmp_path, dims, expected):
    from flotilla.tune import tune

    path = write_space(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["space"] = dims
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "study"
    with pytest.raises(ConfigError) as e:
        tune(path, out=out)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_unknown_tuning_key_and_bad_base_refused(tmp_path):
    from flotilla.tune import load_space

    path = write_space(tmp_path, method="grid")
    with pytest.raises(ConfigError, match="method"):
        load_space(path)
    path = write_space(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["base"]["cohort"] = 0
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"base: cohort"):
        load_space(path)


def test_unreadable_study_database_is_one_line(tmp_path):
    from flotilla.tune import StudyError, tune

    out = tmp_path / "study"
    out.mkdir()
    (out / "study.db").write_bytes(b"this is not a database" * 10)
    with pytest.raises(StudyError) as e:
        tune(write_space(tmp_path), out=out, resume=True)
    assert "study.db: not a readable study database" in str(e.value) and "\n" not in str(e.value)
    assert (out / "study.db").read_bytes() == b"this is not a database" * 10
    with pytest.raises(FileExistsError, match="--resume"):
        tune(write_space(tmp_path), out=out)


# --- a study: runs, is killed after one trial, resumes ---------------------------------------
def _complete(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_study_killed_after_one_trial_resumes_without_duplicates(tmp_path):
    import optuna

    from flotilla.tune import tune

    builds = tmp_path / "builds"
    path = write_space(tmp_path, builds=builds)
    out = tmp_path / "study"
    env = dict(os.environ, **{STALL: "1"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "flotilla.cli", "tune", str(path), "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while not (_complete(out / "study.db") == 1 and builds.exists() and builds.stat().st_size >= 2):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _complete(out / "study.db") == 1

    summary = tune(path, out=out, resume=True, echo=lambda *_: None)
    study = optuna.load_study(study_name="flotilla", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1  # the killed trial, run again
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    keys = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(keys)) == 3  # no configuration trained twice
    killed = next(t for t in study.trials if t.state.name == "FAIL")
    assert [t.user_attrs.get("retry_of") for t in done].count(killed.number) == 1
    assert tuple(sorted(killed.params.items())) in keys

    # the same draws as a study that was never interrupted (the sampler is seeded per trial number)
    fresh = tune(path, out=tmp_path / "fresh", echo=lambda *_: None)
    assert sorted(tuple(sorted(r["params"].items())) for r in fresh["table"]) == sorted(keys)

    table = summary["table"]
    assert len(table) == 3 and len({r["trial"] for r in table}) == 3
    assert all(r["rounds"] == 3 and 0 <= r["tuner_error"] <= 1 and 0 <= r["true_error"] <= 1 for r in table)
    lines = (out / "trials.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("trial,state,rounds,tuner_error,true_error,wall_s")
    assert (out / "best_so_far.png").stat().st_size > 0
    best = validate(yaml.safe_load((out / "best.yaml").read_text()))
    chosen = summary["chosen"]
    assert chosen["tuner_error"] == min(r["tuner_error"] for r in table)
    assert best.client.lr == chosen["params"]["client.lr"]
    runs = sorted(p.name for p in (out / "trials").iterdir() if (p / "state.safetensors").exists())
    assert len(runs) == 3  # one run directory per finished trial (the killed one never wrote one)


# --- noisy evaluation --------------------------------------------------------------------------
def test_subsample_size():
    assert subsample_size(NoiseConfig(), 50) == 50
    assert subsample_size(NoiseConfig(clients=5), 50) == 5
    assert subsample_size(NoiseConfig(clients=80), 50) == 50
    assert subsample_size(NoiseConfig(client_fraction=0.01), 250) == 3  # rounded up
    assert subsample_size(NoiseConfig(client_fraction=0.01), 20) == 1  # at least one client
    with pytest.raises(ValueError, match="not both"):
        NoiseConfig(clients=2, client_fraction=0.5)


def test_bias_probabilities_and_sampling():
    errors = np.array([0.0, 0.5, 1.0])
    p = bias_probabilities(errors, 2.0)
    w = (1.0001 - errors) ** 2
    np.testing.assert_allclose(p, w / w.sum())
    np.testing.assert_allclose(bias_probabilities(errors, 0.0), [1 / 3] * 3)
    rng = np.random.default_rng(0)
    draws = np.bincount([sample_clients(errors, 1, 2.0, rng)[0] for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(draws, p, atol=0.03)
    chosen = sample_clients(np.linspace(0, 1, 10), 4, 1.0, np.random.default_rng(1))
    assert len(set(chosen.tolist())) == 4  # without replacement


def test_laplace_scale_and_clipping():
    assert laplace_scale(16, 4, 2.0) == 2.0  # N / (n x epsilon)
    rng = np.random.default_rng(0)
    noise = np.array([private_value(0.5, 0.01, rng) for _ in range(4000)]) - 0.5
    assert abs(np.abs(noise).mean() - 0.01) < 0.001  # Laplace: E|X| = scale
    clipped = np.array([private_value(0.95, 1.0, rng) for _ in range(500)])
    assert clipped.min() == 0.0 and clipped.max() == 1.0 and ((clipped > 0) & (clipped < 1)).any()


def test_reassign_keeps_sizes_and_moves_the_fraction():
    sizes = [5, 10, 20, 15]
    owner = reassign(sizes, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(owner, np.repeat(np.arange(4), sizes))
    shuffled = reassign(sizes, 1.0, np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(shuffled), sizes)
    assert (shuffled != owner).mean() > 0.5


def test_noisy_evaluation_deterministic_and_true_error_exact():
    g = torch.Generator().manual_seed(0)
    correct = [torch.rand(n, generator=g) < q for n, q in [(30, 0.9), (20, 0.5), (40, 0.2), (10, 0.7)]]
    noise = NoiseConfig(clients=2, shuffle_fraction=0.3, bias=3.0, epsilon=5.0)
    ev = NoisyEvaluation(noise, [len(c) for c in correct], seed=3, trial=1, releases=10)
    a, b = ev(correct, 5), NoisyEvaluation(noise, [30, 20, 40, 10], seed=3, trial=1, releases=10)(correct, 5)
    assert a == b
    assert a["true_error"] == pytest.approx(1 - sum(int(c.sum()) for c in correct) / 100)
    assert a["tuner_clients"] == 2 and 0.0 <= a["tuner_error"] <= 1.0
    other = NoisyEvaluation(noise, [30, 20, 40, 10], seed=3, trial=2, releases=10)(correct, 5)
    assert other["tuner_error"] != a["tuner_error"]
    exact = NoisyEvaluation(NoiseConfig(), [30, 20, 40, 10], seed=0, trial=0, releases=1)(correct, 1)
    assert exact["tuner_error"] == pytest.approx(np.mean([1 - float(c.float().mean()) for c in correct]))
