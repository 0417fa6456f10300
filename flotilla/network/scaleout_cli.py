"""Scale-out on the command line: ``serve --aggregators N`` and ``flotilla aggregator``.

    flotilla serve CONFIG --port P --aggregators 2              # spawns 2 aggregators on this machine
    flotilla serve CONFIG --port P --aggregators 2 --no-spawn   # waits for 2 started elsewhere:
    flotilla aggregator CONFIG --coordinator HOST:P --name a1 --key-file aggregator.key \\
        --state-dir agg-a1 --port Q --advertise HOST2:Q

Spawned aggregators get ``--name agg-<i>``, ``--state-dir STATE/aggregators/agg-<i>``, the key
``STATE/aggregator.key`` and any port (gRPC and data plane; ``network.data_port: "off"`` stays
off); they die with the coordinator (``PR_SET_PDEATHSIG``), so running the same ``serve`` command
again after a crash starts them again on the same directories;
one that dies while the coordinator runs is started again by it (:class:`Spawned`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def add_serve_args(s) -> None:
    s.add_argument(
        "--aggregators",
        type=int,
        metavar="N",
        help="async scale-out: N aggregator processes take the uploads, this one coordinates "
        "(sets network.aggregators; docs/deployment.md, Scaling out)",
    )
    s.add_argument(
        "--no-spawn",
        action="store_true",
        help="with --aggregators: start none here; wait for N `flotilla aggregator` processes started elsewhere",
    )


def add_aggregator_parser(sub) -> None:
    from flotilla.network.addresses import port_number, server_address

    a = sub.add_parser("aggregator", help="run an upload aggregator for a scale-out coordinator (serve --aggregators)")
    a.add_argument("config", help="the coordinator's experiment YAML (its network section: tls, tokens, limits)")
    a.add_argument("--coordinator", type=server_address, required=True, metavar="HOST:PORT")
    a.add_argument("--name", required=True, help="this aggregator's stable name (its updates are booked under it)")
    a.add_argument("--key-file", required=True, help="the coordinator's STATE/aggregator.key (keep it secret)")
    a.add_argument("--state-dir", required=True, help="where accepted uploads are kept until their step")
    a.add_argument("--port", type=port_number, default=0, help="port devices upload to (0: any free one)")
    a.add_argument("--host", default="127.0.0.1", help="address to listen on")
    a.add_argument("--advertise", help="HOST:PORT devices are told to upload to (default: localhost:PORT)")
    a.add_argument("--ca", help="CA of the coordinator's certificate (default: network.tls.ca, else ca.pem beside it)")
    a.add_argument("--server-name", help="expected name in the coordinator's certificate")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Spawned:
    """The aggregator processes of ``serve --aggregators N`` (none with --no-spawn or N = 0).

    One that exits while the coordinator runs (killed, crashed) is started again on the same
    directories, where it finds the updates it held (the ledger says which it must keep).  One that
    keeps dying within ``QUICK_S`` of its start ``GIVE_UP`` times in a row stops the coordinator
    with the reason, instead of leaving devices waiting for it forever."""

    CHECK_S = 1.0  # how often the processes are looked at
    QUICK_S = 10.0  # an exit sooner than this after a start counts towards giving up
    GIVE_UP = 5

    def __init__(self, args, server):
        self.n = 0 if getattr(args, "no_spawn", False) else server.aggregators
        self.args, self.server = args, server
        self.procs: list[subprocess.Popen] = []
        self.started: list[float] = []
        self.quick: list[int] = []  # exits in a row soon after a start, per aggregator
        self.restarts = 0
        self._port = 0
        self._stopping = False
        self._timer = None

    def command(self, i: int) -> list[str]:
        state = self.server.store.path
        name = f"agg-{i}"
        cmd = [
            sys.executable,
            "-m",
            "flotilla.cli",
            "aggregator",
            self.args.config,
            "--coordinator",
            f"localhost:{self._port}",
            "--name",
            name,
            "--key-file",
            str(state / "aggregator.key"),
            "--state-dir",
            str(state / "aggregators" / name),
        ]
        for o in self.args.overrides:
            cmd += ["--set", o]
        # any free data port, as for gRPC: N processes on one machine cannot share a fixed one
        off = getattr(self.server, "data_port", "auto") in (None, "off")
        port = '"off"' if off else "auto"  # quoted: YAML reads a bare off as false
        return cmd + ["--set", f"network.data_port={port}"]

    def _spawn(self, i: int) -> subprocess.Popen:
        # from the loop's thread, which lives as long as the coordinator: PR_SET_PDEATHSIG fires when
        # the thread that started the child ends, not only the process
        return subprocess.Popen(self.command(i), preexec_fn=_die_with_parent)  # noqa: PLW1509

    def start(self, port: int) -> None:
        """Start the N processes (on the coordinator's asyncio loop, once its port is bound)."""
        self._port = port
        for i in range(self.n):
            self.procs.append(self._spawn(i))
            self.started.append(time.monotonic())
            self.quick.append(0)
        if self.n:
            print(f"started {self.n} aggregators (pids {' '.join(str(p.pid) for p in self.procs)})", flush=True)
            self._timer = asyncio.get_running_loop().call_later(self.CHECK_S, self._check)

    def _check(self) -> None:
        if self._stopping or self.server.coord.done:  # training over: the aggregators end by themselves
            return
        for i, p in enumerate(self.procs):
            code = p.poll()
            if code is None:
                continue
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            quick = time.monotonic() - self.started[i] < self.QUICK_S
            self.quick[i] = self.quick[i] + 1 if quick else 0
            if self.quick[i] >= self.GIVE_UP:
                self._stopping = True
                self.give_up(
                    f"aggregator agg-{i} {how}, {self.quick[i]} times within {self.QUICK_S:g} s of its start "
                    "(its output is above); stopping the coordinator"
                )
                return
            print(f"aggregator agg-{i} (pid {p.pid}) {how}; starting it again", file=sys.stderr, flush=True)
            self.procs[i] = self._spawn(i)
            self.started[i] = time.monotonic()
            self.restarts += 1
        self._timer = asyncio.get_running_loop().call_later(self.CHECK_S, self._check)

    def give_up(self, why: str) -> None:
        print(f"flotilla: error: {why}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # the coordinator's own clean stop (state saved)

    def stop(self) -> None:
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def run_aggregator(args, cfg) -> int:
    import asyncio
    import logging

    from flotilla.network.aggregator import aggregator_from_config

    if cfg.network is None:
        raise ValueError("config: flotilla aggregator needs the coordinator's network section (tls, tokens)")
    key_file = Path(args.key_file)
    if not key_file.is_file():
        raise FileNotFoundError(
            f"--key-file: {key_file} not found (it is aggregator.key in the coordinator's state dir)"
        )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    agg = aggregator_from_config(
        cfg,
        name=args.name,
        coordinator=args.coordinator,
        key=key_file.read_text().strip().encode(),
        state_dir=args.state_dir,
        ca=args.ca,
        server_name=args.server_name,
        advertise=args.advertise,
    )

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        port = await agg.start(args.host, args.port)
        print(f"aggregator {args.name} listening on {args.host}:{port}", flush=True)
        await agg.run_until_done(stop)

    try:
        asyncio.run(main())
    except PermissionError as e:
        print(f"flotilla: error: {e}", file=sys.stderr)
        return 1
    return 0


__all__ = ["Spawned", "add_aggregator_parser", "add_serve_args", "run_aggregator"]
