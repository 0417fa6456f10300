"""The ``flotilla tune`` and ``flotilla pretrain`` subcommands (hooked into flotilla/cli.py)."""

from __future__ import annotations

COMMANDS = ("tune", "pretrain")


def add_parsers(sub) -> None:
    t = sub.add_parser(
        "tune",
        help="tune an experiment's hyperparameters (Optuna: random, hyperband, tpe, bohb; see docs/tuning.md)",
    )
    t.add_argument("space", metavar="SPACE.yaml", help="tuning file: base config, space, method, noise")
    t.add_argument("--resume", action="store_true", help="continue the study in the output folder (or join it)")
    t.add_argument("--workers", type=int, default=1,
                   help="processes working on the study at once (default 1); with --ray: trials at once")  # fmt: skip
    t.add_argument("--ray", action="store_true", help="run each trial as a Ray task (a private local Ray by default)")
    t.add_argument("--ray-address", metavar="ADDR", default=None,
                   help="with --ray: the Ray cluster (auto, host:port or ray://host:10001); implies --ray")  # fmt: skip
    t.add_argument("--ray-gpus-per-trial", dest="ray_gpus", type=float, default=None, metavar="G",
                   help="with --ray: GPUs each trial's task reserves, may be a fraction (default 0); implies --ray")  # fmt: skip
    t.add_argument("--out", metavar="DIR", help="study folder (default: the file's output, else tune/<name>)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the tuning file, e.g. --set trials=8")  # fmt: skip
    p = sub.add_parser("pretrain", help="train a task's model centrally and write a checkpoint (init: {checkpoint})")
    p.add_argument("config", metavar="CONFIG.yaml", help="pretrain file: task, epochs, batch_size, lr, output")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set epochs=5")  # fmt: skip


def run(args) -> int:
    if args.command == "tune":
        from flotilla.tune.tuning import tune

        tune(
            args.space,
            resume=args.resume,
            workers=args.workers,
            out=args.out,
            overrides=args.overrides,
            ray=args.ray,
            ray_address=args.ray_address,
            ray_gpus=args.ray_gpus,
        )
        return 0
    from flotilla.experiment.pretrain import load_pretrain_config, pretrain

    pretrain(load_pretrain_config(args.config, args.overrides))
    return 0
