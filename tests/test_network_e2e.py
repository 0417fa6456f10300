"""One server process and 20 device processes (``flotilla serve`` / ``flotilla join``) train
Fashion-MNIST over TLS on loopback, and reach the simulator's accuracy with the same config.

The sync run also kills the server with SIGKILL mid-round and restarts it on the same state
directory: training completes, the devices reconnect by themselves, and the ledger holds every
acknowledged update exactly once, each applied in exactly one server step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from flotilla.api import run_experiment
from flotilla.client import export_clients
from flotilla.config import validate
from flotilla.data.cache import DatasetMissingError
from flotilla.network.store import StateStore
from flotilla.tasks.registry import build_task
from tests.network_helpers import PKI

pytestmark = pytest.mark.slow

DEVICES = 20
BASE = {
    "seed": 0,
    "task": {"name": "fashion-mnist", "partition": "iid", "num_clients": DEVICES, "examples_per_client": 100},
    "client": {"epochs": 1, "batch_size": 10, "lr": 0.1},
    "eval": {"max_clients": 2},
    "output": {"progress": False},
}
LAUNCHER = Path(__file__).with_name("network_devices.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Deployment:
    def __init__(self, tmp: Path, config: dict):
        self.tmp = tmp
        self.pki = PKI(tmp / "pki", devices=DEVICES)
        self.config = {
            **config,
            "network": {
                "tls": {"cert": str(self.pki.paths["server_pem"]), "key": str(self.pki.paths["server_key"])},
                "tokens": str(self.pki.paths["tokens_json"]),
                "linger_s": 4.0,
                "fsync": True,
                "selection_window_s": 0.5,
                "retry_after_s": 0.3,
                "assignment_timeout_s": 60.0,
            },
        }
        self.config_file = tmp / "serve.yaml"
        self.config_file.write_text(yaml.safe_dump(self.config))
        self.state = tmp / "state"
        try:
            task = build_task(validate(config).task, config["seed"])
        except DatasetMissingError as e:
            pytest.skip(str(e))
        self.data = export_clients(task.dataset, tmp / "data")
        self.server: subprocess.Popen | None = None
        self.port = 0
        self.fleet: subprocess.Popen | None = None
        self.server_logs: list[Path] = []

    def start_server(self) -> None:
        log = self.tmp / f"server{len(self.server_logs)}.log"
        self.server_logs.append(log)
        self.server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flotilla.cli",
                "serve",
                str(self.config_file),
                "--port",
                str(self.port),
                "--state-dir",
                str(self.state),
            ],
            stdout=subprocess.PIPE,
            stderr=open(log, "w"),
            text=True,
            env=_env(),
        )
        deadline = time.time() + 120
        for line in self.server.stdout:
            if line.startswith("listening on"):
                self.port = int(line.rsplit(":", 1)[1])
                break
            if time.time() > deadline:
                break
        else:
            raise AssertionError(f"server did not start:\n{log.read_text()}")
        threading.Thread(target=self.server.stdout.read, daemon=True).start()  # drain

    def start_devices(self) -> None:
        pairs = [f"{self.pki.token(i)}={self.data[i]}" for i in range(DEVICES)]
        self.fleet = subprocess.Popen(
            [sys.executable, str(LAUNCHER), str(self.tmp), f"127.0.0.1:{self.port}", self.pki.ca, *pairs],
            stdout=subprocess.PIPE,
            stderr=open(self.tmp / "devices.err", "w"),
            text=True,
            env=_env(),
            start_new_session=True,
        )

    def ledger(self) -> list[dict]:
        return StateStore(self.state).read_ledger() if (self.state / "ledger.jsonl").exists() else []

    def wait(self, timeout: float = 240) -> None:
        try:
            assert self.server.wait(timeout) == 0, self.server_logs[-1].read_text()[-3000:]
            out, _ = self.fleet.communicate(timeout=60)
            codes = json.loads(out.strip().splitlines()[-1])
            bad = {i: (self.tmp / f"device{i}.err").read_text()[-1500:] for i, rc in codes.items() if rc}
            assert len(codes) == DEVICES and not bad, bad
        finally:
            self.kill_all()

    def kill_all(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait()
        if self.fleet is not None and self.fleet.poll() is None:
            os.killpg(self.fleet.pid, signal.SIGKILL)
            self.fleet.wait()

    def events(self) -> list[dict]:
        out = []
        for i in range(DEVICES):
            for line in (self.tmp / f"device{i}.out").read_text().splitlines():
                if line.startswith("{"):
                    out.append({**json.loads(line), "device": i})
        return out

    def accuracies(self) -> list[float]:
        metrics = [json.loads(x) for x in (self.state / "metrics.jsonl").read_text().splitlines()]
        return [m["accuracy"] for m in metrics if m.get("accuracy") is not None]


def simulate(config: dict, tmp: Path):
    """The simulator (`flotilla run`) on the same config, without the network section."""
    return run_experiment(validate(config), run_dir=tmp / "sim")


def check_ledger(dep: Deployment, steps: int, per_step: int | None) -> list[dict]:
    ledger = dep.ledger()
    accepted = [r for r in ledger if r["event"] == "accepted"]
    step_lines = [r for r in ledger if r["event"] == "step"]
    seqs = [r["seq"] for r in accepted]
    assert seqs == list(range(len(seqs))), "ledger seqs must be dense and in order"
    assert len({r["assignment"] for r in accepted}) == len(accepted), "an assignment was accepted twice"
    assert [s["version"] for s in step_lines] == list(range(1, steps + 1))
    applied = [q for s in step_lines for q in s["seqs"]]
    assert len(applied) == len(set(applied)), "an update was applied in two server steps"
    assert sorted(applied) == seqs, "an accepted update was never applied"
    if per_step is not None:
        assert all(len(s["seqs"]) == per_step for s in step_lines)
    # every upload a device was told was accepted is in the ledger
    acked = {e["assignment"] for e in dep.events() if e["event"] == "accepted"}
    assert acked <= {r["assignment"] for r in accepted}
    return ledger


def test_sync_twenty_devices_with_a_server_kill(tmp_path):
    """Cohort = all 20 devices, so the network run repeats the simulator's run: same cohorts,
    same client seeds, same data order; only the order in which updates are summed differs."""
    config = {**BASE, "rounds": 5, "cohort": DEVICES, "eval": {**BASE["eval"], "every": 5}}
    dep = Deployment(tmp_path, config)
    dep.config["network"]["over_selection"] = 1.0
    dep.config_file.write_text(yaml.safe_dump(dep.config))
    sim = simulate(config, tmp_path)
    dep.start_server()
    dep.start_devices()
    try:
        # kill -9 in the middle of a round: after step 2, with some (not all) of a round's updates
        # in the buffer
        deadline = time.time() + 180
        while time.time() < deadline:
            ledger = dep.ledger()
            steps = [i for i, r in enumerate(ledger) if r["event"] == "step"]
            if len(steps) >= 2 and 1 <= sum(r["event"] == "accepted" for r in ledger[steps[-1] + 1 :]) <= DEVICES // 2:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the run never reached the middle of round 3")
        dep.server.send_signal(signal.SIGKILL)
        dep.server.wait()
        ledger = dep.ledger()
        steps = [i for i, r in enumerate(ledger) if r["event"] == "step"]
        version_at_kill = len(steps)
        buffered_at_kill = sum(r["event"] == "accepted" for r in ledger[steps[-1] + 1 :])
        dep.start_server()  # same port, same state directory
    except BaseException:
        dep.kill_all()
        raise
    dep.wait()
    assert (
        f"resumed at version {version_at_kill} with {buffered_at_kill} buffered updates"
        in dep.server_logs[1].read_text()
    )
    assert 2 <= version_at_kill < 5 and buffered_at_kill >= 1
    check_ledger(dep, steps=5, per_step=DEVICES)
    events = dep.events()
    assert any(e["event"] == "reconnect" for e in events), "no device had to reconnect"
    assert sorted(e["device"] for e in events if e["event"] == "finished") == list(range(DEVICES))
    # Not bit-identical: the server sums updates in arrival order, and over five rounds of local
    # SGD that float rounding grows to weight differences (~1e-3) as large as one lost update
    # makes, so exactness of the bookkeeping is checked on the ledger above, not on the weights.
    accuracy = dep.accuracies()[-1]
    assert accuracy > 0.5
    assert abs(accuracy - sim.history[-1]["accuracy"]) <= 0.02, (accuracy, sim.history[-1]["accuracy"])


def test_async_fedbuff_twenty_devices(tmp_path):
    """FedBuff over the network against the fleet simulator's FedBuff with the same settings.
    Timing (hence staleness and who trains when) differs, so the runs are compared near the
    plateau: mean accuracy of the last four evaluations (steps 25-40, on 4 clients' test data).
    A single evaluation swings by +-0.04 between runs, more on a loaded machine: a fresh-clone CI
    run once missed by 0.0015 when two evaluations were averaged.  Averaging four, 10 runs (5 with
    three busy-loop processes beside them) were all within 0.011 of the simulator."""
    config = {
        **BASE,
        "mode": "async",
        "rounds": 40,
        "eval": {**BASE["eval"], "every": 5, "max_clients": 4},
        "async": {"concurrency": 10, "buffer_size": 5, "max_staleness": 8},
    }
    dep = Deployment(tmp_path, config)
    sim = simulate(config, tmp_path)
    dep.start_server()
    dep.start_devices()
    dep.wait()
    ledger = check_ledger(dep, steps=40, per_step=5)
    staleness = [r["staleness"] for r in ledger if r["event"] == "accepted"]
    assert max(staleness) > 0, "async training saw no staleness at all"
    net = sum(dep.accuracies()[-4:]) / 4
    ref = sum(h["accuracy"] for h in sim.history if h["round"] in (25, 30, 35, 40)) / 4
    assert net > 0.65
    assert abs(net - ref) <= 0.05, (net, ref)
