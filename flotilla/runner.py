"""Drives any training algorithm round by round: evaluation, metrics, checkpoints, progress.

An *algorithm* is any object with ``step() -> dict`` (one server step), ``round`` (steps done),
``weights`` (the global flat vector), ``flat`` (the FlatModel) and ``state_dict()`` /
``load_state_dict()``.  The synchronous FedAvg family and the asynchronous aggregators plug in
here the same way, so metrics files, checkpoints and resume work identically for all of them.

Clocks: ``wall_time_s`` is host time spent training (summed across resumes); an algorithm on a
simulated clock adds ``sim_time_s`` itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from flotilla.core.device import to_cpu
from flotilla.runs.rundir import RunDir

EvalFn = Callable[[torch.Tensor], dict[str, float]]


class DivergedError(RuntimeError):
    """The global model became non-finite: the run stops before saving it (the last checkpoint stays)."""


class Runner:
    def __init__(
        self,
        algorithm,
        evaluate: EvalFn | None,
        *,
        rounds: int,
        eval_every: int = 1,
        run_dir: RunDir | None = None,
        checkpoint_every: int = 1,
        progress: bool = True,
        tensorboard: bool = False,
        stop: Callable[[dict[str, Any]], bool] | None = None,
        plot: bool = True,
    ):
        self.algorithm = algorithm
        self.evaluate = evaluate
        self.rounds = rounds
        self.eval_every = eval_every
        self.run_dir = run_dir
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.tensorboard = tensorboard
        self.stop = stop
        self.plot = plot
        self.history: list[dict[str, Any]] = []

    def resume(self) -> None:
        """Load the latest checkpoint from the run directory and drop metrics written after it."""
        if self.run_dir is None or not self.run_dir.has_state():
            raise FileNotFoundError(
                f"nothing to resume in {self.run_dir.path if self.run_dir else None}: no state.safetensors"
            )
        self.run_dir.remove_temp_files()
        self.algorithm.load_state_dict(self.run_dir.load_state())
        self.history = self.run_dir.truncate_metrics(self.algorithm.round)

    def run(self) -> list[dict[str, Any]]:
        alg = self.algorithm
        last = self.history[-1] if self.history else {}
        wall = float(last.get("wall_time_s", 0.0))
        seen = float(last.get("examples_seen", 0.0))
        writer = self._tensorboard_writer()
        bar = tqdm(
            total=self.rounds,
            initial=alg.round,
            desc="rounds",
            unit="round",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            while alg.round < self.rounds:
                t0 = time.perf_counter()
                record = alg.step()
                self._check_finite(alg)
                seen += record.pop("examples_seen", 0.0)
                if self.evaluate is not None and (alg.round % self.eval_every == 0 or alg.round == self.rounds):
                    record.update(self.evaluate(alg.weights))
                else:
                    record.setdefault("loss", None)
                    record.setdefault("accuracy", None)
                wall += time.perf_counter() - t0
                record.update(round=alg.round, wall_time_s=round(wall, 4), examples_seen=seen)
                self.history.append(record)
                self._log(record, writer)
                if self.run_dir is not None and (alg.round % self.checkpoint_every == 0 or alg.round == self.rounds):
                    # Saved on the CPU whatever the device: a run started on a GPU resumes anywhere.
                    self.run_dir.save_state(to_cpu(alg.state_dict()), {"round": alg.round})
                bar.set_postfix(self._postfix(), refresh=False)
                bar.update(1)
                if self.stop is not None and self.stop(record):
                    break
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        self._finish()
        return self.history

    def _check_finite(self, alg) -> None:
        # A NaN/inf model must never be evaluated, checkpointed or written as the result.
        if not bool(torch.isfinite(alg.weights).all()):
            rd = self.run_dir
            saved = f"; {rd.state_file} holds an earlier round" if rd is not None and rd.has_state() else ""
            raise DivergedError(
                f"round {alg.round}: the global model became non-finite (NaN or inf), training diverged; "
                f"lower client.lr or server.lr{saved}"
            )

    def _log(self, record: dict[str, Any], writer) -> None:
        if self.run_dir is not None:
            self.run_dir.append_metrics(record)
        if writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "round":
                    writer.add_scalar(k, v, record["round"])

    def _postfix(self) -> dict[str, str]:
        out = {}
        for key in ("train_loss", "loss", "accuracy"):
            for r in reversed(self.history):
                if r.get(key) is not None:
                    out[key] = f"{r[key]:.4f}"
                    break
        return out

    def _tensorboard_writer(self):
        if not self.tensorboard or self.run_dir is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is an optional extra
            raise ImportError(
                "TensorBoard logging needs the tensorboard package: pip install 'flotilla[tensorboard]'"
            ) from e
        return SummaryWriter(str(self.run_dir.path / "tensorboard"))

    def _finish(self) -> None:
        if self.run_dir is None:
            return
        self.algorithm.flat.load(self.algorithm.weights)
        self.run_dir.save_model(to_cpu(self.algorithm.flat.named_views()))
        if not self.plot:
            return
        from flotilla.runs.plot import plot_runs  # matplotlib costs ~0.6 s: import only when plotting

        plot_runs({self.run_dir.path.name: self.history}, self.run_dir.path / "plot.png")
