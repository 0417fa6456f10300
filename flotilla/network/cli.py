"""The network subcommands of ``flotilla`` (registered by :mod:`flotilla.cli`).

    flotilla certs DIR [--hosts localhost,127.0.0.1] [--devices 10]
    flotilla serve CONFIG.yaml --port P [--state-dir DIR] [--set key=value ...]
    flotilla join --server HOST:P --token T --data PATH [--ca DIR/ca.pem]
    flotilla status --server HOST:P [--token T] [--ca DIR/ca.pem] [--json]

Imports nothing heavy until a subcommand runs, so ``flotilla --help`` stays instant.
"""

from __future__ import annotations

import json
import logging
import os
import sys

COMMANDS = ("certs", "serve", "join", "status", "aggregator")


def add_parsers(sub) -> None:
    c = sub.add_parser("certs", help="make a CA, server/client certificates and device tokens for a test deployment")
    c.add_argument("dir", help="folder to write ca.pem, server.pem/.key, client.pem/.key, tokens.json, tokens.txt")
    c.add_argument(
        "--hosts", default="localhost,127.0.0.1", help="comma-separated names/IPs the server certificate is valid for"
    )
    c.add_argument("--devices", type=int, default=10, help="number of device tokens (plus one admin token)")
    c.add_argument("--days", type=int, default=30, help="certificate validity in days")
    c.add_argument("--force", action="store_true", help="overwrite existing files in DIR")

    s = sub.add_parser(
        "serve", help="run a training server (gRPC over TLS) from an experiment config with a network section"
    )
    s.add_argument("config", help="experiment YAML with a network: section (see docs/deployment.md)")
    from flotilla.network.addresses import (
        port_number,
        server_address,
    )  # refuse 70000 and -5 (an int would wrap or fail late)

    s.add_argument(
        "--port", type=port_number, required=True, help="TCP port to listen on (0: any free port, printed at start)"
    )
    s.add_argument(
        "--data-port",
        type=_data_port,
        help="the data plane's port (downloads and uploads without gRPC): a number, auto (any free port) or "
        "off (default: network.data_port, auto)",
    )
    s.add_argument("--host", help="address to listen on (default: network.host)")
    s.add_argument(
        "--state-dir",
        help="server state / run directory (default: network.state_dir, else output.dir/output.name); "
        "an existing one is resumed",
    )
    s.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    s.add_argument("--dashboard", action="store_true", help="serve the live deployment view (flotilla dashboard)")
    s.add_argument(
        "--dashboard-host", default="127.0.0.1", help="dashboard address (beyond this machine needs a token)"
    )
    s.add_argument("--dashboard-port", type=port_number, default=8050, help="dashboard port (default 8050)")
    s.add_argument("--dashboard-token", help="require this token on the dashboard ('auto': a random one, printed)")
    s.add_argument("--metrics-port", type=port_number, help="serve Prometheus metrics on this port (off by default)")
    s.add_argument("--metrics-host", default="127.0.0.1", help="Prometheus metrics address (default 127.0.0.1)")
    from flotilla.network.scaleout_cli import add_aggregator_parser, add_serve_args

    add_serve_args(s)
    add_aggregator_parser(sub)

    j = sub.add_parser("join", help="run a device: train on local data whenever the server assigns work")
    j.add_argument("--server", type=server_address, required=True, metavar="HOST:PORT")
    j.add_argument("--token", default=os.environ.get("FLOTILLA_TOKEN"), help="device token (default: $FLOTILLA_TOKEN)")
    j.add_argument("--data", required=True, help="safetensors file with tensors x (inputs) and y (labels)")
    _tls_args(j)
    j.add_argument("--compression", choices=["none", "gzip", "deflate"], default="none", help="compress uploads")
    j.add_argument("--max-tasks", type=int, help="stop after this many trained assignments")
    j.add_argument("--threads", type=int, default=1, help="torch threads for local training (default 1)")
    j.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default="cpu",
        help="where to train: cpu (default), cuda, or auto (cuda if torch sees a GPU)",
    )

    st = sub.add_parser("status", help="show a server's version, clients in flight, accepted/rejected updates, metrics")
    st.add_argument("--server", type=server_address, required=True, metavar="HOST:PORT")
    st.add_argument(
        "--token", default=os.environ.get("FLOTILLA_TOKEN"), help="device or admin token (default: $FLOTILLA_TOKEN)"
    )
    _tls_args(st)
    st.add_argument("--json", action="store_true", help="print the raw JSON")


def _tls_args(p) -> None:
    p.add_argument(
        "--ca",
        default=os.environ.get("FLOTILLA_CA"),
        help="CA certificate that signed the server's (default: $FLOTILLA_CA, else system roots)",
    )
    p.add_argument("--cert", help="client certificate (servers that require mutual TLS)")
    p.add_argument("--key", help="client certificate's private key")
    p.add_argument("--server-name", help="expected name in the server certificate, if not the host in --server")


def run(args) -> int:
    # gRPC's C core logs TLS failures itself ("ssl_transport_security.cc:... Handshake failed"),
    # around our own one-line errors.  It reads GRPC_VERBOSITY when grpc is first imported, which
    # is just below.  Devices say nothing (their errors name the cause); the server keeps gRPC's
    # errors.  A GRPC_VERBOSITY in the environment wins.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if args.command == "serve" else "NONE")
    from flotilla.network.client import GaveUp, Refused

    try:
        if args.command == "aggregator":
            from flotilla.config import load_config
            from flotilla.network.scaleout_cli import run_aggregator

            return run_aggregator(args, load_config(args.config, args.overrides))
        return {"certs": _certs, "serve": _serve, "join": _join, "status": _status}[args.command](args)
    except (Refused, ConnectionError, GaveUp) as e:  # the server said no, could not be reached, or TLS failed
        print(f"flotilla: error: {e}", file=sys.stderr)
        return 1


def _certs(args) -> int:
    from flotilla.network.certs import existing_files, make_deployment

    if not args.force and (existing := existing_files(args.dir)):
        raise FileExistsError(
            f"{args.dir} already holds {', '.join(existing)}; choose an empty folder, or pass --force to overwrite them"
        )
    paths = make_deployment(
        args.dir,
        hosts=[h.strip() for h in args.hosts.split(",") if h.strip()],
        devices=args.devices,
        days=args.days,
        overwrite=args.force,
    )
    print(f"wrote {', '.join(p.name for p in paths.values())} to {args.dir}")
    print(
        f"server: network.tls.cert={paths['server_pem']} key={paths['server_key']}, network.tokens={paths['tokens_json']}"
    )
    print(f"devices: --ca {paths['ca_pem']} and one line of {paths['tokens_txt']} each (keep it secret)")
    return 0


def _logging() -> None:
    # force: a library may have configured the root logger at import (Opacus calls basicConfig),
    # which would leave ours a no-op and the server's INFO lines (resumed at, finished) unseen
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )


def check_server_files(net) -> None:
    """The files ``serve`` reads (certificate, key, CA, token table), checked before anything is
    created: a missing one is one line naming its key, and no state directory is left behind."""
    files = [("network.tls.cert", net.tls.cert), ("network.tls.key", net.tls.key), ("network.tokens", net.tokens)]
    if net.tls.ca:
        files.append(("network.tls.ca", net.tls.ca))
    for key, path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{key}: {path} not found (make test certificates and tokens with `flotilla certs DIR`)"
            )
        if not os.access(path, os.R_OK):
            raise ValueError(f"{key}: {path} is not readable by this user")
    from flotilla.network.tls_check import check_tls_pair

    check_tls_pair(net.tls.cert, net.tls.key)  # a key that is not the certificate's (TLSFilesError: a ValueError)


def _serve(args) -> int:
    from flotilla.config import ConfigError, load_config

    if getattr(args, "aggregators", None) is not None:  # scale-out: network.aggregators
        args.overrides = [*args.overrides, f"network.aggregators={args.aggregators}"]
    cfg = load_config(args.config, args.overrides)
    if cfg.network is None:
        raise ConfigError(
            "invalid config:\n  network: flotilla serve needs a network section (tls, tokens); see docs/deployment.md"
        )
    check_server_files(cfg.network)
    _logging()
    from flotilla.experiment.serve import server_from_config

    watchers = _watchers(args)  # checked (extras installed, token for an exposed host) before the state directory
    server = server_from_config(cfg, state_dir=args.state_dir)
    if args.data_port is not None:
        server.data_port = args.data_port
    host = args.host or cfg.network.host
    print(f"state directory: {server.store.path}", flush=True)
    try:
        dashboard = watchers(server)
    except BaseException:
        server.store.close()
        raise
    from flotilla.network.scaleout_cli import Spawned

    spawned = Spawned(args, server)  # serve --aggregators N: the aggregator processes, once the port is bound
    try:
        stopped_by = _serve_until_done(server, host, args.port, spawned.start)
    finally:
        spawned.stop()
        if dashboard is not None:
            dashboard.stop()
    if stopped_by is not None:
        print("interrupted; state is saved, run the same command to resume", file=sys.stderr)
        return 128 + stopped_by
    m = server.latest_metrics
    if m.get("accuracy") is not None:
        print(f"final: version {m['round']} accuracy {m['accuracy']:.4f} loss {m['loss']:.4f}")
    print(f"run directory: {server.store.path}")
    return 0


def _watchers(args):
    """What ``--dashboard`` and ``--metrics-port`` ask for, checked now; returns a function that
    starts them for a built server (and returns the dashboard thread, or None)."""
    if not args.dashboard and args.metrics_port is None:
        return lambda server: None
    try:
        if args.dashboard:
            from flotilla.dashboard import app, serve
        if args.metrics_port is not None:
            from flotilla.network import metrics
    except ImportError as e:
        raise ImportError(
            f"--dashboard / --metrics-port need the dashboard extra: pip install 'flotilla[dashboard]' ({e})"
        ) from None
    token = None
    if args.metrics_port is not None:
        from flotilla.dashboard.serve import bind

        bind(
            args.metrics_host, args.metrics_port, "--metrics-port"
        ).close()  # in use: one line now, before any state is made
    if args.dashboard:
        token = serve.resolve_token(args.dashboard_token)
        serve.check_exposure(args.dashboard_host, token)
        sock = serve.bind(args.dashboard_host, args.dashboard_port)

    def start(server):
        if args.metrics_port is not None:
            try:
                httpd, _ = metrics.start_exporter(server, args.metrics_port, args.metrics_host)
            except OSError as e:
                raise ValueError(f"--metrics-port {args.metrics_port}: cannot listen: {e.strerror}") from None
            print(f"prometheus metrics: http://{args.metrics_host}:{httpd.server_port}/metrics", flush=True)
        if not args.dashboard:
            return None
        server.watched = True
        web = app.build_app(runs_dir=server.store.path, deployment=server.observed.snapshot, token=token)
        print(f"dashboard: {serve.address(args.dashboard_host, sock, token)}", flush=True)
        return serve.DashboardThread(web, sock)

    return start


def _data_port(text: str) -> int | str:
    """--data-port: auto, off, or a port number."""
    import argparse

    if text in ("auto", "off"):
        return text
    if text.isdigit() and int(text) <= 65535:
        return int(text)
    raise argparse.ArgumentTypeError(f"must be a port number (0-65535), auto or off, got {text!r}")


def _serve_until_done(server, host: str, port: int, on_bound=None) -> int | None:
    """Serve until training is done; None, or the signal (SIGINT, SIGTERM) that stopped it.

    A signal sets the server's stop event, so the loop shuts the gRPC server down and writes the
    pending metrics before it closes (a KeyboardInterrupt through ``asyncio.run`` left grpc's
    server to be collected after the loop had closed: "RuntimeError: Event loop is closed").
    A second Ctrl-C during the shutdown stops at once."""
    import asyncio
    import signal

    got: list[int] = []

    async def main():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(sig: int) -> None:
            got.append(sig)
            stop.set()
            for s in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(s)  # the next one interrupts the shutdown itself

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        bound = await server.start(host, port)
        print(f"listening on {host}:{bound}", flush=True)
        if server.data_bound:
            print(f"data plane on {host}:{server.data_bound}", flush=True)
        if on_bound is not None:
            on_bound(bound)
        await server.run_until_done(stop)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return int(signal.SIGINT)
    return got[0] if got else None


def _join(args) -> int:
    if not args.token:
        raise ValueError("--token: give this device's token (or set FLOTILLA_TOKEN)")
    import torch

    from flotilla.network.client import Device, load_device_data, model_for_task

    torch.set_num_threads(args.threads)
    _logging()
    x, y = load_device_data(args.data)
    tls = dict(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)

    def event(kind, info):
        print(json.dumps({"event": kind, **info}), flush=True)

    device = Device(
        args.server,
        args.token,
        model_for_task,
        (x, y),
        compression=args.compression,
        max_tasks=args.max_tasks,
        on_event=event,
        device=args.device,
        **tls,
    )
    report = device.run()
    print(
        json.dumps(
            {
                "event": "finished",
                "tasks": report.tasks,
                "accepted": len(report.accepted),
                "refused": len(report.refused),
                "gave_up": len(report.gave_up),
                "reconnects": report.reconnects,
                **({} if report.epsilon is None else {"epsilon": report.epsilon}),
            }
        ),
        flush=True,
    )
    return 0


def _status(args) -> int:
    from flotilla.network.client import Connection

    with Connection(
        args.server, args.token, ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name, timeout_s=10
    ) as c:
        s = c.status()
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(format_status(s))
    return 0


def format_status(s: dict) -> str:
    mode = s["mode"]
    where = f"round {s['round']}" if mode == "sync" else f"version {s['version']}"
    lines = [
        f"{mode} training, {where} of {s['total_steps']}{' (done)' if s['done'] else ''}, up {s.get('uptime_s', 0):.0f} s",
        f"clients in flight: {s['in_flight']}   buffered updates: {s['buffered']}   timed out: {s['timed_out']}",
        f"updates accepted: {s['accepted']}   rejected: {s['rejected']}"
        + (
            " (" + ", ".join(f"{k} {v}" for k, v in sorted(s["rejected_by_reason"].items())) + ")"
            if s["rejected_by_reason"]
            else ""
        ),
    ]
    m = s.get("metrics") or {}
    if m:
        parts = [f"{k} {m[k]:.4f}" for k in ("train_loss", "loss", "accuracy") if isinstance(m.get(k), (int, float))]
        lines.append(f"metrics at version {m.get('round')}: " + ("   ".join(parts) or "(none yet)"))
    if s.get("privacy"):
        lines.append(format_privacy(s["privacy"]))
    lines.append(f"model sha256: {s['weights_sha256'][:16]}")
    return "\n".join(lines)


def format_privacy(p: dict) -> str:
    """User-level DP as ``status`` reports it: epsilon (None: not finite), delta, clip norm, budget."""
    eps = p.get("epsilon")
    line = f"privacy: epsilon {'inf' if eps is None else f'{eps:.4g}'} at delta {p.get('delta', 0):.3g}"
    if p.get("accountant"):
        line += f" ({p['accountant']})"
    if p.get("clip_norm") is not None:
        line += f"   clip norm {p['clip_norm']:.4g}"
    if p.get("noise_multiplier") is not None:
        line += f"   noise multiplier {p['noise_multiplier']:.4g}"
    if p.get("budget") is not None:
        line += f"   budget {p['budget']:.4g} ({p.get('steps_allowed')} steps allowed{', spent' if p.get('budget_spent') else ''})"
    return line
