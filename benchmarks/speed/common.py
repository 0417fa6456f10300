"""What every framework script of the speed benchmark shares: data, models, evaluation, output.

Imports only torch and numpy (plus the standard library), because the peer scripts run in the
peers' own virtual environments where Flotilla is not installed.  The models are Flotilla's own
classes (flotilla/tasks/models.py loaded by file path, torch only), so every framework trains
the very same architecture from the very same initial weights (``torch.manual_seed(seed)``).

Workloads and their data (written by prepare.py into benchmarks/out/data/<workload>/):

* ``fmnist``: ``x_train.npy`` uint8 [users*k, 28, 28] grouped by user (user u owns rows
  ``u*k .. u*k+k-1``), ``y_train.npy``, ``x_test.npy``/``y_test.npy`` (all 10,000 test images).
* ``shakespeare``: ``stream.npy`` (uint8 character codes), ``train_starts.npy`` and
  ``train_offsets.npy`` (user u's training windows start at ``train_starts[o[u]:o[u+1]]``),
  ``test_starts.npy``; a window is ``stream[s:s+seq_len]`` with target ``stream[s+seq_len]``.
* ``scale``: nothing on disk.  User u's data is synthesised on demand from ``(seed, u)``:
  20-dim Gaussian inputs, 5 classes from a fixed random linear teacher, k examples per user.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel mean/std (as flotilla.data.fashion_mnist)
T0 = time.perf_counter()

# --- workload definitions (the single source of truth for every framework) -------------------
WORKLOADS = {
    "fmnist": dict(users=1000, per_user=50, cohort=50, rounds=10, epochs=1, batch=10, lr=0.1, seed=0),
    "shakespeare": dict(
        min_chars=1000,
        seq_len=80,
        per_user=100,
        test_per_user=10,
        cohort=10,
        rounds=30,
        epochs=1,
        batch=10,
        lr=0.8,
        seed=0,
        embed=8,
        hidden=128,
        layers=1,
    ),
    "scale": dict(
        users=100_000,
        per_user=50,
        cohort=50,
        rounds=10,
        epochs=1,
        batch=10,
        lr=0.1,
        seed=0,
        dim=20,
        classes=5,
        hidden=64,
        test_users=200,
    ),
}


def _models_module():
    spec = importlib.util.spec_from_file_location("flotilla_models", REPO / "flotilla" / "tasks" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_model(meta: dict) -> nn.Module:
    """The workload's model, initialised from ``meta['seed']`` (identical in every framework)."""
    models = _models_module()
    torch.manual_seed(meta["seed"])
    if meta["workload"] == "fmnist":
        return models.SmallCNN()
    if meta["workload"] == "shakespeare":
        return models.CharLSTM(meta["vocab"], meta["embed"], meta["hidden"], meta["layers"])
    return nn.Sequential(nn.Linear(meta["dim"], meta["hidden"]), nn.ReLU(), nn.Linear(meta["hidden"], meta["classes"]))


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


# --- data ------------------------------------------------------------------------------------
class Workload:
    """Per-user training data and the central test set of one prepared workload."""

    def __init__(self, data_dir: str | Path, overrides: dict | None = None):
        self.dir = Path(data_dir)
        self.meta = json.loads((self.dir / "meta.json").read_text()) if (self.dir / "meta.json").exists() else {}
        self.meta.update(overrides or {})
        self.kind = self.meta["workload"]
        m = self.meta
        if self.kind == "fmnist":

            def norm(x: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(x).unsqueeze(1).float().div_(255.0).sub_(MEAN).div_(STD)

            self.x = norm(np.load(self.dir / "x_train.npy"))
            self.y = torch.from_numpy(np.load(self.dir / "y_train.npy")).long()
            self.x_test = norm(np.load(self.dir / "x_test.npy"))
            self.y_test = torch.from_numpy(np.load(self.dir / "y_test.npy")).long()
            k = m["per_user"]
            self.offsets = np.arange(0, m["users"] * k + 1, k, dtype=np.int64)
            self.starts = None
        elif self.kind == "shakespeare":
            self.stream = torch.from_numpy(np.load(self.dir / "stream.npy"))
            self.starts = torch.from_numpy(np.load(self.dir / "train_starts.npy"))
            self.offsets = np.load(self.dir / "train_offsets.npy")
            self.window = torch.arange(m["seq_len"] + 1)
            self.test_starts = torch.from_numpy(np.load(self.dir / "test_starts.npy"))
            self.test_offsets = np.load(self.dir / "test_offsets.npy")
            self.x_test, self.y_test = self.windows(self.test_starts)
        else:
            g = np.random.default_rng([m["seed"], 0xC0FFEE])
            self.teacher = g.standard_normal((m["dim"], m["classes"])).astype(np.float32)
            xs, ys = zip(*(self._synth(u, test=True) for u in range(m["test_users"])))
            self.x_test, self.y_test = torch.cat(xs), torch.cat(ys)
        self.num_users = int(m["users"]) if self.kind != "shakespeare" else len(self.offsets) - 1

    def windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.stream[starts[:, None] + self.window].long()
        return codes[:, :-1], codes[:, -1]

    def _synth(self, u: int, test: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.meta
        g = np.random.default_rng([m["seed"], 1 if test else 0, u])
        x = g.standard_normal((m["per_user"] if not test else 10, m["dim"]), dtype=np.float32)
        logits = x @ self.teacher + 0.5 * g.standard_normal((len(x), m["classes"]), dtype=np.float32)
        return torch.from_numpy(x), torch.from_numpy(logits.argmax(1).astype(np.int64))

    def user_size(self, u: int) -> int:
        if self.kind == "scale":
            return self.meta["per_user"]
        return int(self.offsets[u + 1] - self.offsets[u])

    def user_data(self, u: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All of user ``u``'s training examples, in storage order."""
        if self.kind == "scale":
            return self._synth(u)
        a, b = int(self.offsets[u]), int(self.offsets[u + 1])
        if self.kind == "fmnist":
            return self.x[a:b], self.y[a:b]
        return self.windows(self.starts[a:b])


# --- evaluation and output -------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> dict:
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += float(nn.functional.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    model.train()
    return {"accuracy": correct / len(y), "loss": loss / len(y)}


def round_stats(stamps: list[float]) -> dict:
    """Per-round durations from timestamps at the end of each round (stamps[0]: training start)."""
    d = np.diff(np.asarray(stamps, dtype=float))
    if len(d) == 0:
        return {}
    steady = d[1:] if len(d) > 1 else d
    return {
        "first_round_s": float(d[0]),
        "round_s_median": float(np.median(steady)),
        "train_s": float(stamps[-1] - stamps[0]),
    }


def emit(result: dict) -> None:
    """Print the result line the harness reads (and the in-process time since import)."""
    result.setdefault("in_process_s", time.perf_counter() - T0)
    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result.setdefault("process_cpu_s", own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime)
    result.setdefault("torch_threads", torch.get_num_threads())
    print("RESULT " + json.dumps(result), flush=True)


def base_args(description: str):
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", required=True, help="prepared workload folder (prepare.py)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--users", type=int, default=None, help="scale workload: population size")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=None, help="override the workload's seed (model init, sampling)")
    return p


def load(args) -> Workload:
    overrides = {}
    if args.rounds:
        overrides["rounds"] = args.rounds
    if getattr(args, "users", None):
        overrides["users"] = args.users
    if getattr(args, "seed", None) is not None:
        overrides["seed"] = args.seed
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    set_threads(args.threads)
    ensure_prepared(Path(args.data))
    return Workload(args.data, overrides)


def ensure_prepared(folder: Path) -> None:
    """Scripts run by hand (profile_round.py, round_ab.py) used to stop with ``KeyError: 'workload'``
    when prepare.py had not run: a folder named after a workload is now prepared on the spot
    (with Flotilla's loaders, so only from Flotilla's venv); any other folder is a clear error."""
    if (folder / "meta.json").exists():
        return
    if folder.name not in WORKLOADS:
        raise SystemExit(
            f"--data {folder}: no prepared workload there (no meta.json); make one with "
            f"`.venv/bin/python benchmarks/speed/prepare.py --workload {{{','.join(WORKLOADS)}}} --out DIR` "
            f"and pass DIR/<workload>"
        )
    print(
        f"--data {folder}: not prepared yet, running prepare.py --workload {folder.name} --out {folder.parent}",
        file=sys.stderr,
        flush=True,
    )
    from prepare import prepare

    prepare(folder.name, folder.parent)
