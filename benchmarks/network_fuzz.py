"""Longer hostile-client fuzz of the network server (the default suite runs a bounded version:
tests/test_network_hostile.py).

    .venv/bin/python benchmarks/network_fuzz.py                    # 60 s, 3 hostile + 3 honest devices
    .venv/bin/python benchmarks/network_fuzz.py --seconds 600 --hostile 6 --mode async

A server in a thread (TLS on loopback, tiny model) trains with honest devices while hostile ones,
each holding a valid token, send random mixes of: garbage messages to every method, mutated upload
headers (signature, version, dtype, shape, numbers), hostile values (NaN, inf, 3e38, over-long and
short bodies), replays of accepted uploads with other bytes, six check-ins in a row, stalled and
duplicate upload streams, and random SecAggStep JSON; with ``--sealed-downloads``, also junk,
random tickets, cut requests and second fetches of their own ticket on the sealed-download port;
with ``--sealed-uploads`` (implies it), also hostile sealed uploads under the device's own key
(junk, random tickets, forged records, NaN and wrong-sized bodies, other requests, cut bodies).
At the end it checks what must hold:

* no answer was UNKNOWN or INTERNAL, and every refusal carried ``flotilla-retry``;
* the ledger is dense and strict JSON; no assignment was accepted twice; every accepted update
  is applied in exactly one step or dropped with a reason; the model is finite;
* honest devices kept training (their uploads were accepted; the run reached its step count or
  kept stepping); with ``--sealed-downloads``, every honest download came sealed and checked out;
  with ``--sealed-uploads``, every honest upload went sealed.

Prints one JSON summary line; exits 1 if an invariant failed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--hostile", type=int, default=3)
    p.add_argument("--honest", type=int, default=3)
    p.add_argument("--mode", choices=["sync", "async"], default="sync")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sealed-downloads", action="store_true", help="the server offers sealed downloads too")
    p.add_argument("--sealed-uploads", action="store_true", help="and sealed uploads (implies --sealed-downloads)")
    args = p.parse_args()
    args.sealed_downloads = args.sealed_downloads or args.sealed_uploads

    import logging

    import grpc
    import torch

    from flotilla.client import Connection, Refused
    from flotilla.network import wire
    from flotilla.network.server import Limits
    from tests.network_helpers import PKI, start_server
    from tests.test_network_hostile import NUMEL, Raw, _mutations, header, trailing

    logging.getLogger("flotilla.network").setLevel(logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="flotilla-fuzz-"))
    pki = PKI(tmp / "pki", devices=args.hostile + args.honest)
    kw = (
        dict(cohort=max(1, args.honest - 1), total_steps=10**6)
        if args.mode == "sync"
        else dict(
            mode="async",
            concurrency=args.honest + args.hostile,
            buffer_size=max(1, args.honest - 1),
            total_steps=10**6,
            max_staleness=4,
        )
    )
    limits = Limits(rate=200.0, burst=400, upload_timeout_s=3.0)
    answers: Counter[str] = Counter()
    bad: list[str] = []
    honest_ok = Counter()
    deadline = time.time() + args.seconds

    server = {"sealed_download_port": "auto", "sealed_uploads": args.sealed_uploads} if args.sealed_downloads else None
    sealed_failed: Counter[str] = Counter()
    sealed_up_failed: Counter[str] = Counter()

    def sealed_upload_attack(offer, token: str, a, rng) -> None:
        """One hostile sealed upload under the device's own (single-use) ticket and key: junk, a
        random ticket, a forged record, a NaN or wrong-sized body, another request, a cut body.
        What must hold: a refusal or a closed connection, never an acceptance of a bad body."""
        import socket

        import numpy as np

        from flotilla.network import sealed_uploads as su
        from flotilla.network.dataplane_client import DataRefusal
        from flotilla.network.wire import frame, pb

        kind = rng.choice(["junk", "random_ticket", "forged", "nan", "long", "short", "check_in", "cut"])
        h = pb.UploadHeader(ticket=a.ticket, base_version=a.version, dtype="float32", shape=[NUMEL], num_examples=10)
        body = np.full(NUMEL, 1e-3, np.float32)
        if kind == "nan":
            body[rng.randrange(NUMEL)] = np.nan
        with socket.create_connection(("localhost", offer.port), timeout=10) as c:
            try:
                if kind == "junk":
                    c.sendall(su.MAGIC + rng.randbytes(rng.randrange(0, 60)))
                    c.shutdown(socket.SHUT_WR)
                    got = c.recv(1)
                    answers[f"sealed_up:{kind}:{'refused' if got == su.REFUSED else 'closed'}"] += 1
                    return
                if kind == "random_ticket":
                    offer = pb.SealedUpload(port=offer.port, ticket=rng.randbytes(16), key=offer.key)
                if kind == "forged":
                    keys = su.DeviceKeys(offer)
                    c.sendall(keys.hello() + (64).to_bytes(4, "big") + rng.randbytes(64))
                    got = c.recv(1 + su.SALT_BYTES, socket.MSG_WAITALL)
                    rest = c.recv(1)  # the port reads the forged record and closes
                    answers[f"sealed_up:{kind}:{'closed' if not rest else 'answered'}"] += 1
                    if rest:
                        bad.append("sealed port answered a forged record")
                    return
                if kind in ("check_in", "cut"):
                    keys = su.DeviceKeys(offer)
                    ch = su.SealedChannel(c, send_key=keys.up)
                    c.sendall(keys.hello())
                    if kind == "check_in":
                        ch.sendall(frame(pb.DataRequest(token=token, check_in=pb.CheckInRequest(num_examples=1))))
                    else:
                        ch.sendall(frame(pb.DataRequest(token=token, upload=h, body_bytes=4 * NUMEL)))
                        ch.sendall(body.tobytes()[: rng.randrange(0, 4 * NUMEL)])
                    c.shutdown(socket.SHUT_WR)
                    answers[f"sealed_up:{kind}:done"] += 1
                    return
                data = body.tobytes()
                if kind == "long":
                    data += b"\0" * 4
                elif kind == "short":
                    data = data[:-4]
                su.upload(c, offer, token, h, data)
                answers[f"sealed_up:{kind}:accepted"] += 1
                if kind != "random_ticket":  # a random ticket never gets in; the rest carry bad bodies
                    bad.append(f"a hostile sealed upload ({kind}) was accepted")
            except su.SealedUploadRefused:
                answers[f"sealed_up:{kind}:ticket_refused"] += 1
            except DataRefusal as e:
                answers[f"sealed_up:{kind}:{e.reply.reason}"] += 1
            except OSError:
                answers[f"sealed_up:{kind}:closed"] += 1

    def sealed_attacks(offer, rng) -> None:
        """Hostile requests to the sealed-download port: junk, random tickets, a cut request, and a
        second fetch of the device's own ticket; only the first fetch of a real ticket gets bytes."""
        import errno
        import socket

        from flotilla.network import sealed_downloads as sd

        def ask(payload: bytes) -> int:
            """The length the port answers (0: refused), or -1 when it closed the connection (a
            reset too: closing with junk unread resets it).  Not reaching the port is a failure."""
            with socket.create_connection(("localhost", offer.port), timeout=10) as c:
                try:
                    c.sendall(payload)
                    c.shutdown(socket.SHUT_WR)
                    head = c.recv(8, socket.MSG_WAITALL)
                except (ConnectionResetError, BrokenPipeError):
                    return -1
                except OSError as e:
                    if e.errno == errno.ENOTCONN:  # closed before our shutdown
                        return -1
                    raise
                return int.from_bytes(head, "big") if len(head) == 8 else -1

        own = sd.MAGIC + bytes(offer.ticket)
        for payload, expect in (
            (bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 40))), -1),
            (sd.MAGIC + rng.randbytes(16), 0),
            (own[: rng.randrange(0, len(own))], -1),
            (own, sd.sealed_size(offer.total_bytes)),
            (own, 0),
        ):
            got = ask(payload)
            answers[f"sealed:{'sent' if got > 0 else 'refused' if got == 0 else 'closed'}"] += 1
            if got != expect and not (expect == -1 and got == 0 and payload[:4] == sd.MAGIC):
                bad.append(f"sealed port answered {got} to {payload[:24]!r}..., expected {expect}")

    with start_server(
        pki, tmp / "state", limits=limits, retry_after_s=0.05, round_deadline_s=5.0, server=server, **kw
    ) as st:

        def hostile(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            raw = Raw(pki, st.port, i)
            conn = Connection(f"localhost:{st.port}", pki.token(i), ca=pki.ca, timeout_s=10)
            while time.time() < deadline:
                try:
                    ci = conn.check_in(10)
                except Refused:
                    time.sleep(0.05)
                    continue
                if ci.action != "train":
                    time.sleep(min(ci.retry_after_s, 0.2))
                    continue
                a = ci.assignment
                offer = conn._sealed_offers.get(a.version)
                if offer is not None and rng.random() < 0.5:
                    try:
                        sealed_attacks(offer, rng)
                    except OSError as e:
                        bad.append(f"sealed port: {e}")
                up_offer = conn._sealed_upload_offers.get(a.ticket)
                if up_offer is not None and rng.random() < 0.5:
                    try:
                        sealed_upload_attack(up_offer, pki.token(i), a, rng)
                    except OSError as e:
                        bad.append(f"sealed upload port: {e}")
                attacks = list(_mutations(a, rng))
                rng.shuffle(attacks)
                for parts, why in attacks[: rng.randrange(1, 12)]:
                    try:
                        raw.upload(parts)
                        answers["accepted(hostile)"] += 1  # a mutation that happens to be valid (e.g. cut header)
                    except grpc.RpcError as e:
                        answers[e.code().name] += 1
                        if e.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                            bad.append(f"{why}: {e.code().name} {e.details()}")
                        if e.code() != grpc.StatusCode.UNAVAILABLE and "flotilla-retry" not in trailing(e):
                            bad.append(f"{why}: refusal without flotilla-retry: {e.code().name} {e.details()}")
                for method in rng.sample([wire.CHECK_IN, wire.STATUS, wire.DOWNLOAD, wire.SECAGG_STEP], 2):
                    body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
                    if method == wire.SECAGG_STEP and rng.random() < 0.5:
                        body = json.dumps(
                            {
                                "op": rng.choice(["join", "get", "part", "masked"]),
                                "ticket": a.ticket,
                                "index": rng.randrange(-2, 5),
                                "count": rng.randrange(-2, 5),
                            }
                        ).encode()
                    try:
                        r = raw.unary(method, body)
                        list(r) if method == wire.DOWNLOAD else r
                    except grpc.RpcError as e:
                        answers[e.code().name] += 1
                        if e.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                            bad.append(f"{method}: {e.code().name} {e.details()}")
                if rng.random() < 0.2:  # an honest-looking update under the hostile device's ticket, then a replay
                    try:
                        conn.upload(a, torch.full((NUMEL,), 1e-3), 10)
                        conn.upload(a, torch.full((NUMEL,), 2e-3), 10)
                    except Refused as e:
                        answers[e.code.name] += 1
                if rng.random() < 0.1:  # stalled duplicate streams
                    release = threading.Event()

                    def stall(a=a, release=release):
                        yield header(a)
                        release.wait(1.0)

                    futs = [raw.upload_future(stall(), timeout=10) for _ in range(3)]
                    release.set()
                    for f in futs:
                        try:
                            f.result()
                        except grpc.RpcError as e:
                            answers[e.code().name] += 1
            raw.close()
            conn.close()

        def honest(i: int) -> None:
            conn = Connection(f"localhost:{st.port}", pki.token(i), ca=pki.ca, timeout_s=10)
            torch.manual_seed(i)
            while time.time() < deadline:
                try:
                    ci = conn.check_in(10)
                    if ci.action != "train":
                        time.sleep(min(ci.retry_after_s, 0.2))
                        continue
                    conn.download(ci.assignment.version)
                    conn.upload(ci.assignment, torch.randn(NUMEL) * 1e-2, 10, train_loss=1.0, examples_seen=10)
                    honest_ok["accepted"] += 1
                except Refused as e:
                    honest_ok[e.code.name] += 1
                    time.sleep(0.05)
            sealed_failed[i] = conn.sealed_downloads["failed"]
            sealed_up_failed[i] = conn.sealed_uploads["failed"]
            if args.sealed_uploads and conn.sealed_uploads["sent"] == 0:
                bad.append(f"honest device {i} uploaded nothing sealed")
            if args.sealed_downloads and conn.sealed_downloads["fetched"] == 0:
                bad.append(f"honest device {i} fetched nothing sealed")
            conn.close()

        threads = [threading.Thread(target=hostile, args=(i,)) for i in range(args.hostile)]
        threads += [threading.Thread(target=honest, args=(args.hostile + i,)) for i in range(args.honest)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + 60)
        s = st.call(st.server.coord.status)
        finite = bool(torch.isfinite(st.server.coord.weights).all())

    def strict(c):
        raise ValueError(c)

    records = [json.loads(x, parse_constant=strict) for x in (tmp / "state" / "ledger.jsonl").read_text().splitlines()]
    accepted = [r for r in records if r["event"] == "accepted"]
    settled = [q for r in records if r["event"] in ("step", "dropped") for q in r["seqs"]]
    if [r["seq"] for r in accepted] != list(range(len(accepted))):
        bad.append("ledger seqs are not dense")
    if len({r["assignment"] for r in accepted}) != len(accepted):
        bad.append("an assignment was accepted twice")
    if len(settled) != len(set(settled)):
        bad.append("an update was applied or dropped twice")
    if not set(settled) <= {r["seq"] for r in accepted}:
        bad.append("a step names an unknown update")
    if not finite:
        bad.append("the model is not finite")
    if sum(sealed_failed.values()):
        bad.append(f"honest sealed downloads failed: {dict(sealed_failed)}")
    if sum(sealed_up_failed.values()):
        bad.append(f"honest sealed uploads failed: {dict(sealed_up_failed)}")
    if honest_ok["accepted"] == 0 or s["version"] == 0:
        bad.append("honest devices made no progress")
    summary = {
        "seconds": args.seconds,
        "mode": args.mode,
        "answers": dict(answers),
        "honest": dict(honest_ok),
        "version": s["version"],
        "accepted": s["accepted"],
        "rejected_by_reason": s["rejected_by_reason"],
        "requests": sum(answers.values()),
        "failures": bad[:20],
        "ok": not bad,
    }
    print(json.dumps(summary))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
