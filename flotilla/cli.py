"""Command line: a thin layer over flotilla.api.

flotilla run CONFIG.yaml [--set key=value ...]
flotilla run --resume RUN_DIR [--set rounds=N]
flotilla report RUN_DIR [RUN_DIR ...] [--out FILE] [--x round|sim_time_s|wall_time_s]
flotilla certs DIR | serve CONFIG.yaml --port P | join --server HOST:P --token T --data PATH
flotilla status --server HOST:P                     (network deployment: flotilla/network/cli.py)
flotilla tune SPACE.yaml [--resume] [--workers N] | pretrain CONFIG.yaml   (flotilla/tune/commands.py)
flotilla dashboard RUNS_DIR [--host H] [--port P] [--token T|auto]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flotilla.config import ConfigError, describe_options
from flotilla.runner import DivergedError

# What --resume may change: more (or fewer, not below those done) rounds.  Anything else would
# make the resumed run a different experiment from the one its checkpoint belongs to.
RESUME_KEYS = ("rounds",)
# Where the run trains is not part of the experiment: a run started on a GPU resumes on a CPU.
RESUME_PLACE = ("device",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flotilla", description="Federated learning across fleets of devices.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run an experiment from a YAML config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a federated experiment described by a YAML file (see examples/).",
        epilog="config options (YAML keys; nested keys use dots with --set):\n" + "\n".join(describe_options()),
    )
    run.add_argument("config", nargs="?", help="experiment YAML file")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set client.lr=0.05 (repeatable; value parsed as YAML)",
    )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from its directory; "
        "with --set rounds=N, continue a finished run up to N rounds",
    )
    run.add_argument("--run-dir", metavar="DIR", help="write the run here instead of output.dir/output.name")

    rep = sub.add_parser("report", help="summarise runs in a table and overlay them in one plot")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", default="flotilla-report.png", help="plot file (default: flotilla-report.png)")
    rep.add_argument("--x", default="round", choices=["round", "sim_time_s", "wall_time_s"], help="x axis of the plot")

    dash = sub.add_parser("dashboard", help="serve a web page of runs (live as they write) on 127.0.0.1")
    dash.add_argument("runs_dir", metavar="RUNS_DIR", help="a run directory, or a folder of them (e.g. runs/)")
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond this machine needs --token)")
    from flotilla.network.addresses import port_number

    dash.add_argument("--port", type=port_number, default=8050, help="port (default 8050; 0: any free port)")
    dash.add_argument("--token", help="require this token on every request ('auto': a random one, printed)")

    from flotilla.tune import commands as tune_commands

    tune_commands.add_parsers(sub)  # flotilla tune / pretrain (flotilla/tune/commands.py)
    from flotilla.network import cli as network_cli

    network_cli.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "report":
            from flotilla.runs.report import report

            print(report(args.run_dirs, Path(args.out), x=args.x))
            print(f"plot: {args.out}")
            return 0
        if args.command == "dashboard":
            return _dashboard(args)
        from flotilla.tune import commands as tune_commands

        if args.command in tune_commands.COMMANDS:
            return tune_commands.run(args)
        from flotilla.network import cli as network_cli

        if args.command in network_cli.COMMANDS:
            return network_cli.run(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"flotilla: error: {e}", file=sys.stderr)
        return 2
    except DivergedError as e:
        print(f"flotilla: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:
        print(f"flotilla: error: {e}", file=sys.stderr)
        return 2
    return 1


def _run(args) -> int:
    from flotilla.config import load_config

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes only the run directory (its config.yaml is reused as it was)")
        from flotilla.api import run_experiment

        cfg = _resume_config(args.resume, args.overrides)
        result = run_experiment(cfg, run_dir=args.resume, resume=True)
    else:
        if not args.config:
            raise ConfigError("give a CONFIG.yaml (see examples/) or --resume RUN_DIR")
        cfg = load_config(args.config, args.overrides)  # validated before any work starts
        from flotilla.api import run_experiment

        result = run_experiment(cfg, run_dir=args.run_dir)
    last = [r for r in result.history if r.get("accuracy") is not None]
    if last:
        print(f"final: round {last[-1]['round']} accuracy {last[-1]['accuracy']:.4f} loss {last[-1]['loss']:.4f}")
    print(f"run directory: {result.run_dir}")
    return 0


def _dashboard(args) -> int:
    try:
        from flotilla.dashboard import app, serve
    except ImportError as e:
        raise ImportError(
            f"flotilla dashboard needs the dashboard extra: pip install 'flotilla[dashboard]' ({e})"
        ) from None
    token = serve.resolve_token(args.token)
    serve.check_exposure(args.host, token)
    web = app.build_app(runs_dir=args.runs_dir, token=token)
    sock = serve.bind(args.host, args.port)
    print(f"dashboard: {serve.address(args.host, sock, token)}  (Ctrl-C stops it)", flush=True)
    serve.run_blocking(web, sock)
    return 0


def _resume_config(run_dir: str, overrides: list[str]):
    """The run's saved config, with --set rounds=N applied (and saved) to continue a finished run."""
    from flotilla.config import apply_overrides, validate
    from flotilla.runs.rundir import RunDir

    rd = RunDir(run_dir)
    raw = rd.read_config()
    if not overrides:
        return validate(raw)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key not in RESUME_KEYS + RESUME_PLACE:
            raise ConfigError(
                f"--set {key}: --resume can only change {', '.join(RESUME_KEYS)} "
                f"(any other key would make a different experiment)"
            )
    # (the saved device may be one this machine lacks: validated with the new one)
    before = validate(apply_overrides(raw, [o for o in overrides if o.split("=", 1)[0].strip() in RESUME_PLACE]))
    cfg = validate(apply_overrides(raw, overrides))
    u = cfg.privacy.user_level if cfg.privacy is not None else None
    if cfg.rounds != before.rounds and u is not None and u.target_epsilon is not None:
        raise ConfigError(
            f"rounds: the noise of this run was calibrated to spend privacy.user_level.target_epsilon "
            f"over {before.rounds} rounds; it cannot be changed on resume"
        )
    done = rd.state_meta().get("round", 0) if rd.has_state() else 0
    if cfg.rounds < done:
        raise ConfigError(f"rounds: {cfg.rounds} is fewer than the {done} rounds this run has done")
    rd.write_config(cfg.model_dump(mode="json"))
    return cfg


if __name__ == "__main__":
    sys.exit(main())
