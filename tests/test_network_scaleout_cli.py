"""``flotilla serve --aggregators 2`` as a user runs it: the coordinator spawns its two aggregator
processes, ``flotilla join`` devices train FedBuff through them; a kill -9 of the coordinator takes
its aggregators with it, the same command resumes, a kill -9 of one aggregator before that is
started again by the coordinator, every update counts exactly once, and when training ends nothing is left
running.  (test_network_aggregators*.py drive the same classes in-process and under kill -9;
this is the command line's spawn path.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from flotilla.client import export_clients
from flotilla.config import validate
from flotilla.data.cache import DatasetMissingError
from flotilla.network.store import StateStore
from flotilla.tasks.registry import build_task
from tests.network_helpers import PKI

pytestmark = pytest.mark.slow

DEVICES, STEPS, K = 6, 4, 3
LAUNCHER = Path(__file__).with_name("network_devices.py")
CONFIG = {
    "seed": 0,
    "mode": "async",
    "rounds": STEPS,
    "task": {"name": "fashion-mnist", "partition": "iid", "num_clients": DEVICES, "examples_per_client": 40},
    "client": {"epochs": 1, "batch_size": 10, "lr": 0.1},
    "async": {"concurrency": 4, "buffer_size": K, "max_staleness": 8},
    "eval": {"max_clients": 2, "every": STEPS},
    "output": {"progress": False},
}


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc: no psutil here)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def test_serve_with_two_spawned_aggregators_survives_a_kill_9_and_leaves_nothing_running(tmp_path):
    pki = PKI(tmp_path / "pki", devices=DEVICES)
    try:
        task = build_task(validate(CONFIG).task, CONFIG["seed"])
    except DatasetMissingError as e:
        pytest.skip(str(e))
    data = export_clients(task.dataset, tmp_path / "data")
    config = {
        **CONFIG,
        "network": {
            "tls": {"cert": str(pki.paths["server_pem"]), "key": str(pki.paths["server_key"])},
            "tokens": str(pki.paths["tokens_json"]),
            "linger_s": 6.0,  # above the SDK's 5 s backoff cap, as the 10 s default is
            "fsync": True,
            "retry_after_s": 0.3,
            "assignment_timeout_s": 60.0,
            # fixed (the coordinator's, for check-ins): its two aggregators must each take any free one
            "data_port": _free_port(),
        },
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    state = tmp_path / "state"
    logs: list[Path] = []

    def serve(port: int) -> tuple[subprocess.Popen, int, list[int]]:
        logs.append(tmp_path / f"server{len(logs)}.log")
        proc = subprocess.Popen(
            [sys.executable, "-m", "flotilla.cli", "serve", str(tmp_path / "serve.yaml"), "--port", str(port)]
            + ["--state-dir", str(state), "--aggregators", "2"],
            stdout=subprocess.PIPE,
            stderr=open(logs[-1], "w"),
            text=True,
            env=_env(),
        )
        for line in proc.stdout:
            if line.startswith("listening on"):
                port = int(line.rsplit(":", 1)[1])
                break
        else:
            raise AssertionError(f"server did not start:\n{logs[-1].read_text()[-3000:]}")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain
        deadline = time.time() + 60
        while len(_children(proc.pid)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        kids = _children(proc.pid)
        assert len(kids) >= 2, f"no aggregator processes were spawned:\n{logs[-1].read_text()[-3000:]}"
        return proc, port, kids

    server, port, spawned = serve(0)
    fleet = None
    try:
        pairs = [f"{pki.token(i)}={data[i]}" for i in range(DEVICES)]
        fleet = subprocess.Popen(
            [sys.executable, str(LAUNCHER), str(tmp_path), f"127.0.0.1:{port}", pki.ca, *pairs],
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / "devices.err", "w"),
            text=True,
            env=_env(),
            start_new_session=True,
        )
        # kill -9 one aggregator as soon as it holds an update (early: training is far from over), and
        # the coordinator starts it again; it finds the update it held
        deadline = time.time() + 120
        while not any(r.get("aggregator") == "agg-1" for r in _ledger(state)) and time.time() < deadline:
            time.sleep(0.02)
        assert not any(r["event"] == "step" and r["version"] == STEPS for r in _ledger(state)), "training ended"
        victim = next(pid for pid in _children(server.pid) if "agg-1" in _cmdline(pid))
        os.kill(victim, 9)
        deadline = time.time() + 30
        while time.time() < deadline and not (again := [k for k in _children(server.pid) if k not in spawned]):
            time.sleep(0.1)
        assert again, f"the killed aggregator was not started again:\n{logs[-1].read_text()[-3000:]}"
        spawned += again
        # then kill -9 the coordinator once the aggregators hold updates no step has applied
        deadline = time.time() + 120
        while time.time() < deadline:
            ledger = _ledger(state)
            done = {q for r in ledger if r["event"] == "step" for q in r["seqs"]}
            if any(r["event"] == "accepted" and r["seq"] not in done for r in ledger) and len(done) >= K:
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"no step with updates held after it:\n{logs[-1].read_text()[-3000:]}")
        server.kill()
        server.wait()
        assert "agg-1 (pid" in logs[-1].read_text() and "starting it again" in logs[-1].read_text()
        time.sleep(1.0)
        left = [pid for pid in spawned if _alive(pid)]
        assert not left, f"aggregators outlived a kill -9 of the coordinator (the restarted one too): {left}"
        server, port, spawned = serve(port)  # the same command resumes the whole deployment
        assert server.wait(240) == 0, logs[-1].read_text()[-3000:]
        out, _ = fleet.communicate(timeout=60)
        codes = json.loads(out.strip().splitlines()[-1])
        bad = {i: (tmp_path / f"device{i}.err").read_text()[-1500:] for i, rc in codes.items() if rc}
        assert len(codes) == DEVICES and not bad, bad
    finally:
        for p in (server, fleet):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    # the aggregators died with the coordinator: none of the spawned processes is left
    time.sleep(0.5)
    alive = [pid for pid in spawned if _alive(pid)]
    assert not alive, f"aggregator processes left running: {alive}"
    ledger = _ledger(state)
    accepted = [r for r in ledger if r["event"] == "accepted"]
    steps = [r for r in ledger if r["event"] == "step"]
    assert [s["version"] for s in steps] == list(range(1, STEPS + 1))
    assert [r["seq"] for r in accepted] == list(range(len(accepted)))
    assert len({r["assignment"] for r in accepted}) == len(accepted), "an assignment was accepted twice"
    applied = [q for s in steps for q in s["seqs"]]
    assert len(applied) == len(set(applied)) and all(len(s["seqs"]) == K for s in steps)
    # the uploads went through the spawned aggregators (both of them), not the coordinator
    holders = {r.get("aggregator") for r in accepted if r["seq"] in set(applied)}
    assert holders == {"agg-0", "agg-1"}, holders
    metrics = [json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["round"] == STEPS and metrics[-1].get("accuracy") is not None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:  # gone meanwhile
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ledger(state: Path) -> list[dict]:
    return StateStore(state).read_ledger() if (state / "ledger.jsonl").exists() else []


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
