"""Load test of sync secure aggregation over the network: rounds of the masking protocol between
real gRPC devices, relayed by one server process.

    .venv/bin/python benchmarks/network_secagg_load.py                      # cohort 20, 100k params, 3 rounds
    .venv/bin/python benchmarks/network_secagg_load.py --cohort 50 --params 1000000 --degree auto
    .venv/bin/python benchmarks/network_secagg_load.py --cohort 50 --params 1000000 --quantize-bits 8

One server process (``FlotillaServer``, ``mode: sync`` with masking, TLS, token auth, ledger with
fsync, as in production) and ``--procs`` device processes running ``--cohort`` devices as threads,
each with its own TLS channel and token.  A device does no training: it checks in, downloads the
model and runs its part of the protocol (``Connection.secagg_round``) with a fixed random delta,
then checks in for the next round.  Reported per round (after the first, which includes
start-up): wall time from the previous round's step to this one's, the server's CPU seconds (and
per device per million parameters), the devices' CPU seconds (all device processes together), and
the bytes each device sent (its SecAggStep request bodies).  ``--quantize-bits b``: the round
quantises into the narrow ring of ``channels.upload: quantize`` (b + ceil(log2 cohort) bits).

Every process runs on this machine, so the devices' protocol work (key agreement, PRG masks for
each neighbour, Shamir shares) competes with the server for the same cores: the round time is an
upper bound for a server with remote devices, the server CPU per round is what it would pay.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from network_load import mlp, report  # noqa: E402


def serve(args, pki_dir: str, state_dir: str, ready, stop) -> None:
    import logging

    import torch

    logging.getLogger("flotilla.network").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    from flotilla.network.auth import TokenTable
    from flotilla.network.coordinator import CoordinatorSettings
    from flotilla.network.secagg import SecAggParams
    from flotilla.network.server import FlotillaServer, Limits, ServerThread, TLSFiles

    torch.manual_seed(0)
    p = Path(pki_dir)
    degree = None if args.degree == "full" else ("auto" if args.degree == "auto" else int(args.degree))
    server = FlotillaServer(
        mlp(args.params),
        tls=TLSFiles(str(p / "server.pem"), str(p / "server.key")),
        tokens=TokenTable.load(p / "tokens.json"),
        state_dir=state_dir,
        settings=CoordinatorSettings(
            mode="sync",
            cohort=args.cohort,
            over_selection=1.0,
            total_steps=args.rounds,
            selection_window_s=0.5,
            secagg_stage_s=600.0,
            assignment_timeout_s=1200.0,
            retry_after_s=0.2,
            weighting="uniform",
        ),
        limits=Limits(rate=1000.0, burst=1000),
        fsync=True,
        linger_s=5.0,
        secure_masking=SecAggParams(clip=1.0, max_weight=1.0, degree=degree, quantize_bits=args.quantize_bits),
    )
    steps: list[tuple[float, float]] = []  # (time, server CPU seconds) at each step
    on_step = server.coord.on_step

    def timed_step(record):
        steps.append((time.time(), time.process_time()))
        on_step(record)

    server.coord.on_step = timed_step
    st = ServerThread(server)
    ready.put((st.port, server.flat.numel, os.getpid(), time.process_time()))
    stop.wait()
    st.stop()
    ready.put(steps)


def devices(pki_dir: str, port: int, numel: int, tokens: list[str], out) -> None:
    import torch

    from flotilla.client import Connection, Refused

    torch.set_num_threads(1)
    ca = str(Path(pki_dir) / "ca.pem")
    sent: list[int] = []

    def run(token: str, seed: int) -> None:
        delta = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 1e-3
        model = torch.empty(numel)
        with Connection(f"localhost:{port}", token, ca=ca, timeout_s=1200.0) as conn:
            send = conn.secagg_send  # every SecAggStep request goes through it

            def counted(body):
                sent.append(len(body))
                return send(body)

            conn.secagg_send = counted
            while True:
                ci = conn.check_in(10)
                if ci.action == "done":
                    return
                if ci.action == "wait":
                    time.sleep(ci.retry_after_s)
                    continue
                conn.download(ci.assignment.version, model)
                try:
                    conn.secagg_round(ci.assignment, delta, 10)
                except Refused:
                    pass

    threads = [threading.Thread(target=run, args=(t, i)) for i, t in enumerate(tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((time.process_time(), sum(sent), len(sent)))


def masked_bytes(numel: int, args) -> int:
    """Bytes of one masked input's vector: numel + 1 ring elements (32 bits, or the quantised ring's)."""
    if args.quantize_bits is None:
        return 4 * (numel + 1)
    from flotilla.channels.ring import masked_upload_bytes

    return masked_upload_bytes(numel, args.quantize_bits, args.cohort)


def codec_only(args) -> dict:
    """The server's CPU for one device's masked input, as it arrives (``--codec-only``): the body parsed
    (a SecAggBody with raw bytes, or older SDKs' bare JSON with base64), the message checked and
    decoded, the vector added to the running sum.  In-process, best of ``--repeats``: the part of
    the per-device cost the transport decides, without TLS, gRPC or the other stages."""
    import json

    import numpy as np

    from flotilla.network.secagg import decode_body, encode_body
    from flotilla.secure.messages import MaskedInput
    from flotilla.secure.serialize import dumps, dumps_raw, loads

    bits = 32 if args.quantize_bits is None else args.quantize_bits + (args.cohort - 1).bit_length()
    length = args.params + 1
    dt = np.uint16 if bits <= 16 else np.uint32
    y = np.random.default_rng(0).integers(0, 2**bits, length).astype(dt)
    msg = MaskedInput(b"s" * 16, 7, y)
    ticket = "t" * 200
    obj, raw = dumps_raw(msg, bits)
    new = encode_body({"op": "masked", "ticket": ticket, "msg": obj}, raw)
    old = json.dumps({"op": "masked", "ticket": ticket, "msg": dumps(msg)}).encode() if bits == 32 else None
    total = np.zeros(length, dt)

    def server(body):
        req, legacy = decode_body(body)
        data = None if legacy else req["data"]
        m = loads(req["msg"], MaskedInput, length=length, raw=data, bits=bits)
        np.add(total, m.y, out=total)

    out = {"params": args.params, "ring_bits": bits}
    for name, body in (("raw_bytes", new), ("base64_json", old)):
        if body is None:
            continue
        best = math.inf
        for _ in range(args.repeats):
            t0 = time.process_time()
            server(body)
            best = min(best, time.process_time() - t0)
        out[f"{name}_body_bytes"] = len(body)
        out[f"{name}_server_ms"] = round(1e3 * best, 2)
        out[f"{name}_server_ms_per_mparam"] = round(1e3 * best / (args.params / 1e6), 2)
    out["load_avg"] = os.getloadavg()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=int, default=20)
    ap.add_argument("--params", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--degree", default="auto", help="auto (SecAgg+), full (every pair), or k neighbours")
    ap.add_argument("--procs", type=int, default=2, help="device processes (the cohort's devices split among them)")
    ap.add_argument("--quantize-bits", type=int, default=None, help="channels.upload quantize: bits per value")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--codec-only", action="store_true", help="only time the server's decoding of one masked input")
    ap.add_argument("--repeats", type=int, default=20, help="--codec-only: best of this many")
    args = ap.parse_args()
    if args.codec_only:
        report(codec_only(args), args.json)
        return 0

    from flotilla.network.certs import make_deployment, read_tokens_txt

    tmp = Path(tempfile.mkdtemp(prefix="flotilla-secagg-load-"))
    paths = make_deployment(tmp / "pki", devices=args.cohort)
    tokens = [v for k, v in read_tokens_txt(paths["tokens_txt"]).items() if k != "admin"]
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    server = ctx.Process(target=serve, args=(args, str(tmp / "pki"), str(tmp / "state"), ready, stop))
    server.start()
    port, numel, server_pid, _ = ready.get(timeout=120)
    t0 = time.time()
    procs = [
        ctx.Process(target=devices, args=(str(tmp / "pki"), port, numel, tokens[i :: args.procs], out))
        for i in range(args.procs)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    stop.set()
    steps = ready.get(timeout=60)
    server.join(60)
    times = [t0] + [t for t, _ in steps]
    cpu = [c for _, c in steps]
    walls = [b - a for a, b in zip(times, times[1:])]
    server_cpu = [b - a for a, b in zip(cpu, cpu[1:])]
    res = {
        "cohort": args.cohort,
        "params": numel,
        "degree": args.degree,
        "rounds": len(steps),
        "first_round_wall_s": round(walls[0], 2) if walls else None,
        "round_wall_s": [round(w, 2) for w in walls[1:]],
        "round_wall_median_s": round(statistics.median(walls[1:]), 2) if len(walls) > 1 else None,
        "server_cpu_s_per_round": [round(c, 2) for c in server_cpu],
        # the issue-14 figure: server CPU per device per million parameters (median round)
        "server_cpu_ms_per_device_per_mparam": round(
            1e3 * statistics.median(server_cpu) / args.cohort / (numel / 1e6), 1
        )
        if server_cpu
        else None,
        "quantize_bits": args.quantize_bits,
        "devices_cpu_s_total": round(sum(r[0] for r in results), 1),
        "device_bytes_sent_per_round": round(sum(r[1] for r in results) / max(len(steps), 1) / args.cohort),
        # SecAggStep calls per device-round, the polls of `get` while a stage is open included
        "device_requests_per_round": round(sum(r[2] for r in results) / max(len(steps), 1) / args.cohort, 1),
        "masked_input_bytes_raw": masked_bytes(numel, args),
        "load_avg": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    report(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
