"""Scale-out benchmark: one process vs a coordinator with 1 and 2 aggregator processes.

    nice -n 10 .venv/bin/python benchmarks/network_scaleout.py                         # 0, 1, 2 aggregators
    nice -n 10 .venv/bin/python benchmarks/network_scaleout.py --aggregators 2 --clients 100 --duration 30
    nice -n 10 .venv/bin/python benchmarks/network_scaleout.py --transport grpc        # no data planes

For each ``--aggregators`` value: a coordinator process (``FlotillaServer``, async FedBuff, TLS,
tokens, fsync on, as ``flotilla serve``; with N > 0, ``aggregators=N``), N aggregator processes
(:class:`flotilla.network.aggregator.AggregatorServer`, fsync on) and one load process running
``--clients`` devices as asyncio coroutines (no training: check in at the coordinator, download the
model and upload a fixed ~1M-parameter delta where the assignment says, repeat).  ``--transport
data`` (the default): downloads and uploads go through the data plane (flotilla/network/dataplane.py,
``DataStream`` of benchmarks/network_load.py, one kept TLS connection per device and server) of the
aggregator the assignment names (``aggregator_data_port``), or with N = 0 of the single server,
which also takes the check-ins after the first there; with N > 0 check-ins stay gRPC calls to the
coordinator (it opens no data port then).  ``--transport grpc``: every data port off, everything
over gRPC.  Over the
window after ``--warmup``: accepted updates/s, and CPU seconds of every server process (read from
/proc), as milliseconds per accepted trip: the coordinator's (check-in, claim, step, one model
fetch per version and aggregator) and each aggregator's (download, upload stream, validation, fsync,
partial sum).  N = 0 is today's single process.

The last lines project, from each scale-out run's per-process costs, how many aggregators a fleet
needs: trips/s = concurrency / mean trip seconds (Little's law; ``--trip-s``, an assumption),
aggregator cores = trips/s x aggregator ms/trip (one process is one event loop, about one core),
coordinator cores = trips/s x coordinator ms/trip.  Prints one JSON line per run and the
projection; ``--json`` writes them to a file, ``--from FILE`` projects again from one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # network_load's DataStream


def mlp(params: int):
    from torch import nn

    hidden = max(1, round((params - 200) / (784 + 1 + 200)))
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 200))


def coordinator(args, n: int, pki: str, state: str, ready, stop) -> None:
    import logging

    import torch

    logging.getLogger("flotilla.network").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    from flotilla.network.auth import TokenTable
    from flotilla.network.coordinator import CoordinatorSettings
    from flotilla.network.server import FlotillaServer, Limits, ServerThread, TLSFiles

    torch.manual_seed(0)
    p = Path(pki)
    server = FlotillaServer(
        mlp(args.params),
        tls=TLSFiles(str(p / "server.pem"), str(p / "server.key")),
        tokens=TokenTable.load(p / "tokens.json"),
        state_dir=state,
        settings=CoordinatorSettings(
            mode="async",
            total_steps=10**9,
            concurrency=args.clients,
            buffer_size=args.buffer,
            assignment_timeout_s=600,
            max_update_norm=100.0,
            retry_after_s=0.05,
        ),
        limits=Limits(rate=1000.0, burst=1000),
        fsync=True,
        linger_s=0,
        aggregators=n,
        data_port="auto" if args.transport == "data" else "off",
    )
    st = ServerThread(server)
    if args.profile:  # the coordinator's event loop, whole run (Python 3.11: per thread)
        import cProfile

        prof = cProfile.Profile()
        st.call(prof.enable)
    ready.put(("coordinator", st.port, server.flat.numel, os.getpid()))
    stop.wait()
    if args.profile:
        st.call(prof.disable)
        prof.dump_stats(f"{args.profile}.{n}")
    st.stop()


def aggregator(args, name: str, port: int, pki: str, state: str, ready, stop) -> None:
    import logging

    import torch

    logging.getLogger("flotilla.network").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    from flotilla.network.aggregator import AggregatorServer, AggregatorThread
    from flotilla.network.auth import TokenTable
    from flotilla.network.server import Limits, TLSFiles

    p = Path(pki)
    agg = AggregatorServer(
        name=name,
        coordinator=f"localhost:{port}",
        key=(Path(state) / "aggregator.key").read_bytes().strip(),
        tls=TLSFiles(str(p / "server.pem"), str(p / "server.key")),
        tokens=TokenTable.load(p / "tokens.json"),
        state_dir=Path(state) / "aggregators" / name,
        ca=str(p / "ca.pem"),
        limits=Limits(rate=1000.0, burst=1000),
        fsync=True,
        data_port="auto" if args.transport == "data" else "off",
    )
    t = AggregatorThread(agg)
    ready.put((name, t.port, 0, os.getpid()))
    stop.wait()
    t.stop()


async def device(token: str, port: int, ca: bytes, deadline: float, parts, body: bytes, records: list) -> None:
    import grpc
    from network_load import DataStream, rest

    from flotilla.network import wire
    from flotilla.network.wire import pb

    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    options = wire.channel_options(wire.DEFAULT_MAX_MESSAGE_BYTES)
    meta = ((wire.AUTH_HEADER, f"Bearer {token}"),)
    ser = lambda m: m.SerializeToString()  # noqa: E731
    channels = {}
    streams: dict[int, DataStream] = {}  # data port -> this device's kept data-plane connection

    def stream_to(data_port: int) -> DataStream:
        if data_port not in streams:
            streams[data_port] = DataStream(data_port, ca, token)
        return streams[data_port]

    def uploader(address: str):
        if address not in channels:
            ch = grpc.aio.secure_channel(address, creds, options=options)
            channels[address] = (
                ch,
                ch.unary_stream(wire.DOWNLOAD, ser, pb.ModelChunk.FromString),
                ch.stream_unary(wire.UPLOAD, ser, pb.UploadReply.FromString),
            )
        return channels[address][1:]

    async with grpc.aio.secure_channel(f"localhost:{port}", creds, options=options) as ch:
        check_in = ch.unary_unary(wire.CHECK_IN, ser, pb.CheckInReply.FromString)
        direct = (
            ch.unary_stream(wire.DOWNLOAD, ser, pb.ModelChunk.FromString),
            ch.stream_unary(wire.UPLOAD, ser, pb.UploadReply.FromString),
        )
        own = 0  # the server's data port, once a check-in named it (then check-ins go there, as the SDK's)
        while time.time() < deadline:
            try:
                if own:
                    r = await stream_to(own).check_in(10)
                else:
                    r = await check_in(pb.CheckInRequest(num_examples=10, sdk_version=wire.SDK_VERSION), metadata=meta)
                own = r.data_port
                if r.action != pb.CheckInReply.TRAIN:
                    await asyncio.sleep(r.retry_after_s or 0.1)
                    continue
                a = r.assignment
                spec = json.loads(a.client_json)
                to = spec.get("aggregator")
                data_port = spec.get("aggregator_data_port", 0) if to else r.data_port
                h = pb.UploadHeader(
                    ticket=a.ticket, base_version=a.version, dtype="float32", shape=[a.numel], num_examples=10
                )
                if data_port:  # the data plane of the aggregator (or of the server itself)
                    stream = stream_to(data_port)
                    await stream.download(a.version)
                    t0 = time.time()
                    up = await stream.upload(h, body)
                    records.append((time.time(), time.time() - t0, True))
                    await rest(up)  # as the SDK: the server (not an aggregator) may name a rest
                    continue
                download, upload = uploader(to) if to else direct
                async for _ in download(pb.DownloadRequest(version=a.version), metadata=meta):
                    pass
                header = pb.UploadPart(header=h)

                async def stream():
                    yield header
                    for x in parts:
                        yield x

                t0 = time.time()
                up = await upload(stream(), metadata=meta)
                records.append((time.time(), time.time() - t0, True))
                await rest(up)
            except grpc.aio.AioRpcError as e:
                records.append((time.time(), 0.0, False))
                if e.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
                    await asyncio.sleep(0.5)
            except (RuntimeError, OSError, asyncio.IncompleteReadError):  # a data plane refused or broke
                records.append((time.time(), 0.0, False))
                for x in streams.values():
                    x.close()
                streams.clear()
                await asyncio.sleep(0.5)
    for x in streams.values():
        x.close()
    for c, *_ in channels.values():
        await c.close()


def load(port: int, numel: int, pki: str, tokens: list[str], deadline: float, out) -> None:
    import torch

    from flotilla.network.wire import chunks, pb

    torch.manual_seed(1)
    data = (torch.randn(numel) * 1e-3).numpy().tobytes()
    parts = [pb.UploadPart(data=bytes(c)) for c in chunks(data, 1 << 20)]
    ca = (Path(pki) / "ca.pem").read_bytes()
    records: list = []

    async def main():
        await asyncio.gather(*(device(t, port, ca, deadline, parts, data, records) for t in tokens))

    asyncio.run(main())
    out.put(records)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args, n: int, pki: str, tokens: list[str]) -> dict:
    state = tempfile.mkdtemp(prefix=f"flotilla-scaleout-{n}-")
    ctx = mp.get_context("fork")
    ready, stop, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=coordinator, args=(args, n, pki, state, ready, stop), daemon=True)]
    procs[0].start()
    _, port, numel, cpid = ready.get(timeout=300)
    pids = {"coordinator": cpid}
    for i in range(n):
        p = ctx.Process(target=aggregator, args=(args, f"agg-{i}", port, pki, state, ready, stop), daemon=True)
        p.start()
        procs.append(p)
    for _ in range(n):
        name, _, _, pid = ready.get(timeout=300)
        pids[name] = pid
    t0 = time.time()
    deadline = t0 + args.warmup + args.duration
    gen = ctx.Process(target=load, args=(port, numel, pki, tokens[: args.clients], deadline, out), daemon=True)
    gen.start()
    time.sleep(args.warmup)
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    w0 = time.time()
    time.sleep(args.duration)
    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
    window = time.time() - w0
    records = out.get(timeout=300)
    gen.join(30)
    stop.set()
    for p in procs:
        p.join(30)
    ok = [r for r in records if r[2] and w0 <= r[0] <= w0 + window]
    trips = len(ok)
    used = {k: cpu1[k] - cpu0[k] for k in pids}
    lat = sorted(r[1] for r in ok)
    res = {
        "aggregators": n,
        "transport": args.transport,
        "clients": args.clients,
        "params": numel,
        "window_s": round(window, 1),
        "accepted_per_s": round(trips / window, 1),
        "refused": sum(1 for r in records if not r[2] and w0 <= r[0] <= w0 + window),
        "upload_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
        "server_cores": round(sum(used.values()) / window, 2),
        "server_ms_per_trip": round(1000 * sum(used.values()) / max(trips, 1), 2),
        "ms_per_trip": {k: round(1000 * v / max(trips, 1), 2) for k, v in used.items()},
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(res), flush=True)
    return res


def project(res: dict, concurrencies: list[int], trip_s: float, cores: int) -> list[dict]:
    """What a fleet needs at each concurrency, from one run's per-process costs.  An aggregator or
    coordinator process is one event loop: it saturates near one core, so processes = cores."""
    agg_ms = sum(v for k, v in res["ms_per_trip"].items() if k != "coordinator")
    coord_ms = res["ms_per_trip"]["coordinator"]
    out = []
    for c in concurrencies:
        rate = c / trip_s  # Little's law: trips/s = concurrency / mean trip duration
        agg_cores = rate * agg_ms / 1000
        out.append(
            {
                "concurrency": c,
                "trips_per_s": round(rate, 1),
                "aggregator_cores": round(agg_cores, 1),
                "aggregator_processes": math.ceil(agg_cores),
                f"machines_of_{cores}_cores": math.ceil(agg_cores / cores),
                "coordinator_cores": round(rate * coord_ms / 1000, 2),
                "from_run": {"aggregators": res["aggregators"], "aggregator_ms": agg_ms, "coordinator_ms": coord_ms},
            }
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aggregators", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--clients", type=int, default=60)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--buffer", type=int, default=10, help="FedBuff K")
    ap.add_argument(
        "--transport",
        choices=("data", "grpc"),
        default="data",
        help="data: downloads and uploads through the data planes (aggregators', or the single server's); "
        "grpc: every data port off",
    )
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--trip-s", type=float, default=60.0, help="projection: mean device trip (train + transfer), s")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--cores", type=int, default=16, help="projection: cores per aggregator machine")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--profile", help="cProfile the coordinator's event loop into PATH.<aggregators>")
    ap.add_argument("--from", dest="saved", help="no runs: project from the runs saved by an earlier --json")
    args = ap.parse_args()
    if args.saved:
        for r in json.loads(Path(args.saved).read_text())["runs"]:
            for p in project(r, args.concurrency, args.trip_s, args.cores) if r["aggregators"] > 0 else []:
                print(json.dumps({"projection": p}), flush=True)
        return 0

    from flotilla.network.certs import make_deployment, read_tokens_txt

    pki = tempfile.mkdtemp(prefix="flotilla-scaleout-pki-")
    paths = make_deployment(pki, devices=args.clients)
    tokens = list(read_tokens_txt(paths["tokens_txt"]).values())
    tokens = [t for name, t in read_tokens_txt(paths["tokens_txt"]).items() if name.startswith("device-")]
    results = [run(args, n, pki, tokens) for n in args.aggregators]
    scaled = [r for r in results if r["aggregators"] > 0]
    proj = [p for r in scaled for p in project(r, args.concurrency, args.trip_s, args.cores)]
    for p in proj:
        print(json.dumps({"projection": p}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "projection": proj}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
