"""The tuning file: a base experiment, a search space over its dotted keys, a method, the noise.

    base: fashion_mnist.yaml          # path (relative to this file) or an inline experiment mapping
    method: tpe                       # random | hyperband | tpe | bohb
    trials: 16
    space:
      client.lr: {log_uniform: [0.001, 1.0]}
      server.beta1: {uniform: [0.0, 0.9]}
      client.epochs: {int: [1, 3]}
      client.batch_size: {choice: [32, 64, 128]}
    noise: {client_fraction: 0.1, epsilon: 10}
    proxy_task: {name: mnist-5k}      # tune on this task; train the chosen config once on base's task

Every key of the space is checked against the experiment schema at both ends of its range (and
every choice) before a trial runs: an unknown key, an impossible value or an empty range is one
line naming it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from flotilla.config import ConfigError, apply_overrides, read_yaml, validate
from flotilla.core.schema import Section
from flotilla.tune.noisy_eval import NoiseConfig

METHODS = ("random", "hyperband", "tpe", "bohb")
KINDS = ("log_uniform", "uniform", "int", "choice")


class HyperbandConfig(Section):
    eta: int = Field(3, ge=2, description="reduction factor: a rung keeps 1/eta of its trials")
    min_rounds: int = Field(1, ge=1, description="smallest budget (server rounds); R is the base config's rounds")


class TuneConfig(Section):
    """A ``flotilla tune`` file."""

    base: str | dict[str, Any] = Field(..., description="experiment config (file or mapping) the trials vary")
    space: dict[str, dict[str, Any]] = Field(..., description="dotted config key -> {kind: range}")
    method: Literal[METHODS] = Field("random", description="random | hyperband | tpe | bohb (TPE + Hyperband)")
    trials: int = Field(16, ge=1, description="trials to finish (complete or pruned)")
    seed: int = Field(0, ge=0, description="seed of the sampler and of the noise")
    hyperband: HyperbandConfig = HyperbandConfig()
    startup_trials: int = Field(4, ge=1, description="TPE / BOHB: random trials before the model is used")
    noise: NoiseConfig = NoiseConfig()
    proxy_task: dict[str, Any] | None = Field(
        None, description="tune on this task instead; the chosen config is then trained once on the base's task"
    )
    output: str | None = Field(None, description="study folder (default: tune/<file name>)")
    threads: int | None = Field(None, ge=1, description="torch threads of every trial (overrides the base's threads)")
    heartbeat_s: float = Field(10.0, gt=0, description="a running trial silent 3x this long is taken as dead")

    @model_validator(mode="after")
    def _not_empty(self):
        if not self.space:
            raise ValueError("space: give at least one key to tune")
        return self


def _dims(key: str, spec: dict[str, Any]) -> tuple[str, Any]:
    """(kind, args) of one dimension; an empty or malformed range is one line naming the key."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(
            f"space.{key}: give one of {', '.join(KINDS)} (e.g. {{log_uniform: [0.001, 1]}}), got {spec!r}"
        )
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"space.{key}: choice needs a non-empty list of values")
        return kind, args
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)):
        raise ConfigError(f"space.{key}: {kind} needs [low, high], got {args!r}")
    low, high = args
    if kind == "int" and not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"space.{key}: int needs whole numbers [low, high], got {args!r}")
    if low > high or (kind != "int" and low == high):
        raise ConfigError(f"space.{key}: empty range [{low}, {high}] (need low < high)")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"space.{key}: log_uniform needs low > 0, got {low}")
    return kind, (low, high)


def set_key(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``raw`` with dotted ``key`` set to ``value``."""
    out = copy.deepcopy(raw)
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"space.{key}: {p!r} is not a section of the experiment config")
    node[parts[-1]] = value
    return out


def with_params(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    for key, value in params.items():
        raw = set_key(raw, key, value)
    return raw


class Space:
    """The parsed tuning file: the base config (raw), the dimensions, and the file's settings."""

    def __init__(self, cfg: TuneConfig, base: dict[str, Any], folder: Path):
        self.cfg = cfg
        self.base = base
        self.folder = folder
        self.dims = {k: _dims(k, v) for k, v in cfg.space.items()}
        self.proxy_base = dict(base, task=cfg.proxy_task) if cfg.proxy_task is not None else None
        for raw in (base, self.proxy_base):
            if raw is not None:
                self._check(raw)
        base_cfg = validate(base)
        if base_cfg.eval.personalize is not None:
            raise ConfigError("base: eval.personalize: flotilla tune scores the global model; remove it")
        self.rounds = base_cfg.rounds

    @property
    def tuning_base(self) -> dict[str, Any]:
        """The config the trials vary: the proxy task's when tuning on a proxy."""
        return self.proxy_base if self.proxy_base is not None else self.base

    def _check(self, raw: dict[str, Any]) -> None:
        validate(raw)  # the base itself
        for key, (_kind, args) in self.dims.items():
            for value in args:
                try:
                    validate(set_key(raw, key, value))
                except ConfigError as e:
                    detail = str(e).removeprefix("invalid config:\n").strip().splitlines()[0]
                    raise ConfigError(f"space.{key}: {value!r} is not a valid value ({detail})") from None

    def config(self, params: dict[str, Any], *, target: bool = False) -> dict[str, Any]:
        """The raw experiment config of a trial (or of the target run with ``target``)."""
        raw = with_params(self.base if target else self.tuning_base, params)
        return raw if self.cfg.threads is None else dict(raw, threads=self.cfg.threads)


def load_space(path: str | Path, overrides: list[str] | None = None) -> Space:
    """Read and check a tuning file; every problem is one ConfigError line."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a tuning file holds a mapping (base, space, method...)")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = TuneConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "tuning file"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: {key}: {msg}") from None
    if isinstance(cfg.base, str):
        base_path = (path.parent / cfg.base) if not Path(cfg.base).is_absolute() else Path(cfg.base)
        base = read_yaml(base_path)
        if not isinstance(base, dict):
            raise ConfigError(f"{base_path}: the base config must hold a YAML mapping")
    else:
        base = cfg.base
    try:
        return Space(cfg, base, path.parent)
    except ConfigError as e:
        msg = str(e)
        if msg.startswith("invalid config:"):  # the base itself
            msg = "base: " + msg.removeprefix("invalid config:\n").strip().replace("\n", "; ")
        raise ConfigError(f"{path}: {msg}") from None
