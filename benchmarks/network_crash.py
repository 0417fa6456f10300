"""Crash driver for the network server: ``kill -9`` at random moments, restart, check the books.

    .venv/bin/python benchmarks/network_crash.py                   # 8 kills, sync rounds
    .venv/bin/python benchmarks/network_crash.py --kills 30 --mode async

A server process (a tiny model, TLS on loopback, fsync on, a fixed state directory) trains with
honest devices (threads of this process that upload small deltas and retry through outages as a
device should: the same upload again while the server is unreachable).  Every ``0.2..2 s`` the
server is killed with SIGKILL and started again on the same state directory and port.  At the
end, what must hold after every crash:

* the ledger is strict JSON, its seqs dense; no assignment was accepted twice; every accepted
  update is in exactly one step or one "dropped" line; step versions are 1, 2, 3, ...;
* every upload a device was told was accepted is in the ledger with the seq it was told
  (retries across a crash get the original answer, issue 11 item 5);
* metrics.jsonl has one record per committed step, in order (issue 11 item 6);
* the model is finite, and training reached ``--steps``;
* with ``--sealed-downloads`` (the devices then download each assignment's model before they
  upload): every download passed the SDK's checks (sealed: every tag and the digest) and is
  finite; an offer a crash made stale falls back to TLS, and the restarted server's new port is
  used (the summary counts sealed fetches that worked and failed);
* with ``--sealed-uploads`` (implies ``--sealed-downloads``): the first try of each upload goes
  sealed; one a crash cut is sent again over TLS, and the books above still hold (the summary
  counts sealed uploads sent and failed).

Prints one JSON line; exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVER = r"""
import sys, torch
from torch import nn
from flotilla.network.auth import TokenTable
from flotilla.network.coordinator import CoordinatorSettings
from flotilla.network.server import FlotillaServer, TLSFiles
pki, state, port, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
sealed, sealed_uploads = sys.argv[6], sys.argv[7] == "1"
torch.manual_seed(0)
kw = dict(cohort=3, over_selection=1.0) if mode == "sync" else dict(mode="async", concurrency=4, buffer_size=3)
server = FlotillaServer(nn.Linear(5, 3), tls=TLSFiles(pki + "/server.pem", pki + "/server.key"),
                        tokens=TokenTable.load(pki + "/tokens.json"), state_dir=state, fsync=True, linger_s=2.0,
                        settings=CoordinatorSettings(total_steps=steps, selection_window_s=0.0, retry_after_s=0.05,
                                                     assignment_timeout_s=30.0, **kw),
                        sealed_download_port=sealed, sealed_uploads=sealed_uploads)
print("ready", flush=True)
server.serve(port=port)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=8)
    p.add_argument("--mode", choices=["sync", "async"], default="sync")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sealed-downloads", action="store_true", help="network.sealed_download_port: auto")
    p.add_argument("--sealed-uploads", action="store_true", help="network.sealed_uploads (implies --sealed-downloads)")
    args = p.parse_args()
    args.sealed_downloads = args.sealed_downloads or args.sealed_uploads

    import grpc
    import torch

    from flotilla.client import Connection, Refused
    from flotilla.network.certs import make_deployment, read_tokens_txt

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="flotilla-crash-"))
    paths = make_deployment(tmp / "pki", devices=args.devices)
    tokens = read_tokens_txt(paths["tokens_txt"])
    state = tmp / "state"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    log = open(tmp / "server.log", "w")

    def start():
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SERVER,
                str(tmp / "pki"),
                str(state),
                str(port),
                args.mode,
                str(args.steps),
                "auto" if args.sealed_downloads else "off",
                "1" if args.sealed_uploads else "0",
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        assert proc.stdout.readline().strip() == "ready", (tmp / "server.log").read_text()[-2000:]
        return proc

    server = start()
    acked: list[tuple[str, int]] = []  # (assignment id, seq) the devices were told
    errors: list[str] = []
    stop = threading.Event()
    sealed = {"fetched": 0, "failed": 0}
    sealed_up = {"sent": 0, "failed": 0}

    def device(i: int) -> None:
        conn = Connection(f"localhost:{port}", tokens[f"device-{i:03d}"], ca=str(paths["ca_pem"]), timeout_s=10)
        g = torch.Generator().manual_seed(i)
        while not stop.is_set():
            try:
                ci = conn.check_in(10)
            except Refused:
                time.sleep(0.1)
                continue
            if ci.action == "done":
                break
            if ci.action != "train":
                time.sleep(ci.retry_after_s)
                continue
            a, delta = ci.assignment, torch.randn(18, generator=g) * 1e-2
            if args.sealed_downloads:
                try:
                    if not torch.isfinite(conn.download(a.version)).all():
                        errors.append(f"a download of version {a.version} is not finite")
                except Refused:
                    pass  # the server went down mid-download, or the version is gone: upload anyway
            while not stop.is_set():  # the same upload again until the server answers
                try:
                    seq, _ = conn.upload(a, delta, 10, train_loss=1.0, examples_seen=10)
                    acked.append((a.id, seq))
                    break
                except Refused as e:
                    if e.code in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.CANCELLED,
                    ):
                        time.sleep(0.1)
                        continue
                    if e.code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                        errors.append(str(e))
                    break
        for k in sealed:
            sealed[k] += conn.sealed_downloads[k]
        for k in sealed_up:
            sealed_up[k] += conn.sealed_uploads[k]
        conn.close()

    threads = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(args.devices)]
    for t in threads:
        t.start()
    kills = 0
    t0 = time.time()
    while kills < args.kills and server.poll() is None:
        time.sleep(rng.uniform(0.2, 2.0))
        if server.poll() is not None:
            break
        server.send_signal(signal.SIGKILL)
        server.wait()
        kills += 1
        server = start()
    try:
        server.wait(600)  # trains to the end, lingers, exits
    except subprocess.TimeoutExpired:
        errors.append("the server did not finish training within 600 s of the last kill")
        server.kill()
    took = time.time() - t0
    stop.set()
    for t in threads:
        t.join(30)

    def strict(c):
        raise ValueError(c)

    ledger = [json.loads(x, parse_constant=strict) for x in (state / "ledger.jsonl").read_text().splitlines()]
    accepted = {r["seq"]: r for r in ledger if r["event"] == "accepted"}
    settled = [q for r in ledger if r["event"] in ("step", "dropped") for q in r["seqs"]]
    steps = [r["version"] for r in ledger if r["event"] == "step"]
    bad = list(errors)
    if sorted(accepted) != list(range(len(accepted))):
        bad.append("ledger seqs are not dense")
    if len({r["assignment"] for r in accepted.values()}) != len(accepted):
        bad.append("an assignment was accepted twice")
    if sorted(settled) != sorted(accepted):
        bad.append("an accepted update is in no step (or in two)")
    if steps != list(range(1, len(steps) + 1)) or len(steps) != args.steps:
        bad.append(f"step versions {steps[:5]}... (expected 1..{args.steps})")
    by_assignment = {r["assignment"]: seq for seq, r in accepted.items()}
    wrong = [(a, s) for a, s in acked if by_assignment.get(a) != s]
    if wrong:
        bad.append(f"{len(wrong)} acknowledged uploads are not in the ledger as told, e.g. {wrong[:3]}")
    rounds = [m["round"] for m in (json.loads(x) for x in (state / "metrics.jsonl").read_text().splitlines())]
    if rounds != steps:
        missing = sorted(set(steps) - set(rounds))
        bad.append(f"metrics records {len(rounds)} for {len(steps)} steps (missing {missing[:10]})")
    if args.sealed_uploads and sealed_up["sent"] == 0:
        bad.append("no upload went sealed")
    from safetensors.torch import load_file

    if not bool(torch.isfinite(load_file(str(state / "state.safetensors"))["weights"]).all()):
        bad.append("the saved model is not finite")
    print(
        json.dumps(
            {
                "mode": args.mode,
                "kills": kills,
                "seconds": round(took, 1),
                "steps": len(steps),
                "accepted": len(accepted),
                "acked": len(acked),
                "sealed_downloads": sealed if args.sealed_downloads else None,
                "sealed_uploads": sealed_up if args.sealed_uploads else None,
                "recovered_metrics": sum(
                    "recovered metrics" in line or "wrote back the metrics" in line
                    for line in (tmp / "server.log").read_text().splitlines()
                ),
                "failures": bad[:10],
                "ok": not bad,
            }
        )
    )
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
