"""Experiment configuration: one pydantic model, validated before any work starts.

Unknown keys, wrong types and impossible values are refused with the dotted key path named
(``client.lr: must be > 0``).  ``--set key=value`` overrides are applied to the raw mapping
before validation, so they are checked the same way.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flotilla.algorithms import Setting, algorithm_config_union, algorithm_names, refusal
from flotilla.algorithms.finetune import PersonalizeConfig
from flotilla.algorithms.rowwise import MODES as EMBEDDING_ROWS
from flotilla.algorithms.rowwise import refusal as embedding_rows_refusal
from flotilla.channels.config import ChannelsConfig
from flotilla.core.schema import Section
from flotilla.core.server_opt import OPTIMIZERS
from flotilla.core.staleness import AVERAGE_WITH_DP
from flotilla.experiment.init import InitConfig
from flotilla.fairness.config import TiersConfig
from flotilla.fairness.config import check_experiment as check_tiers
from flotilla.fleet.config import AsyncConfig, FleetConfig
from flotilla.network.config import NetworkConfig
from flotilla.sim.ray_config import RuntimeConfig, check_runtime
from flotilla.sim.sync import check_device_keys
from flotilla.tasks import (
    TaskConfig,
    task_names,
)  # the task: section is one schema per registered task (flotilla/tasks/)
from flotilla.tasks.fashion_mnist import FashionMNISTTask
from flotilla.tasks.shakespeare import CharLSTMConfig, ShakespeareTask  # noqa: F401  (re-exported)


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the reason."""


class Strict(Section):
    """Every key of the experiment config: see flotilla.core.schema."""


# --- algorithm ----------------------------------------------------------------------------
class HeterogeneousEpochs(Strict):
    """Where to Begin? (Nguyen et al. 2023): 30% of clients run a uniform 1-5 local epochs."""

    fraction: float = Field(0.3, ge=0, le=1, description="chance that a client (each round) draws its own epochs")
    min: int = Field(1, ge=1, description="fewest local epochs such a client trains")
    max: int = Field(5, ge=1, description="most local epochs such a client trains")

    @model_validator(mode="after")
    def _range(self):
        if self.min > self.max:
            raise ValueError(f"min: {self.min} is larger than max: {self.max}")
        return self


class ClientConfig(Strict):
    epochs: int = Field(1, ge=1, description="local epochs (ignored when steps is set)")
    steps: int | None = Field(None, ge=1, description="exact number of local steps instead of epochs")
    batch_size: int = Field(10, ge=1, description="local batch size")
    lr: float = Field(0.1, gt=0, description="client SGD learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="client SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="client SGD weight decay")
    heterogeneous_epochs: HeterogeneousEpochs | None = Field(
        None, description="system heterogeneity: a fraction of clients trains a random number of local epochs"
    )
    vectorize: int = Field(
        1,
        ge=1,
        description="train K clients of a round at once on stacked weights (torch.func.vmap; in-process sync "
        "rounds, for GPUs; see docs/gpus.md); 1 = one after another",
    )
    algorithm: algorithm_config_union() | None = Field(  # type: ignore[valid-type]
        None,
        description=f"client algorithm, by name: {', '.join(algorithm_names())} (default: fedavg's local SGD; "
        f"see docs/algorithms.md)",
    )

    @model_validator(mode="after")
    def _epochs_drawn(self):
        if self.heterogeneous_epochs is not None and self.steps is not None:
            raise ValueError("heterogeneous_epochs: draws local epochs, but client.steps fixes the steps; remove one")
        return self


class ServerConfig(Strict):
    optimizer: Literal[OPTIMIZERS] = Field(
        "fedavg", description="server optimizer (Reddi et al. 2021; flotilla.core.server_opt's registry)"
    )
    lr: float = Field(1.0, gt=0, description="server learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="server momentum (fedavgm)")
    beta1: float = Field(0.9, ge=0, lt=1, description="first-moment decay (fedadam/fedyogi/fedadagrad)")
    beta2: float = Field(0.99, ge=0, lt=1, description="second-moment decay (fedadam/fedyogi)")
    tau: float = Field(1e-3, gt=0, description="adaptivity constant added to sqrt(v)")
    initial_accumulator: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="starting value of the second moment v (fedadam/fedyogi/fedadagrad). 0 (default) keeps "
        "earlier runs unchanged; Reddi et al. start at tau^2 (1e-6 for the default tau), which shrinks "
        "a step by at most 2x, and only where sqrt(v) is not well above tau",
    )
    embedding_rows: Literal[EMBEDDING_ROWS] = Field(
        "dense",
        description="embedding tables (task movielens): dense = whole deltas; sparse = clients upload only the "
        "rows they touched (bytes reported; same mean); rowwise = RF^2's per-row mean over the clients that "
        "touched each row (see docs/fairness.md)",
    )


class EvalConfig(Strict):
    every: int = Field(1, ge=1, description="evaluate every N rounds (and after the last)")
    max_clients: int | None = Field(
        None, ge=1, description="evaluate on a fixed random subset of N clients (default: all)"
    )
    batch_size: int = Field(1024, ge=1, description="evaluation batch size")
    personalize: PersonalizeConfig | None = Field(
        None,
        description="also evaluate personalised models: each evaluation client fine-tunes the global model on its "
        "own training data first (personal_* metrics)",
    )


class OutputConfig(Strict):
    dir: str = Field("runs", description="parent folder of run directories")
    name: str | None = Field(None, description="run directory name (default: <task>-<optimizer>-<timestamp>)")
    checkpoint_every: int = Field(1, ge=1, description="save the training state every N rounds")
    tensorboard: bool = Field(False, description="also write TensorBoard event files")
    progress: bool = Field(True, description="show a progress bar")
    plot: bool = Field(True, description="draw plot.png when the run ends (flotilla tune's trials skip it)")


# --- differential privacy (flotilla.privacy; see docs/privacy.md) -------------------------------
class SampleLevelPrivacy(Strict):
    """DP-SGD on each client through Opacus (per-example clipping + Gaussian noise, Poisson batches)."""

    noise_multiplier: float = Field(1.0, ge=0, description="sigma: noise std / max_grad_norm")
    max_grad_norm: float = Field(1.0, gt=0, description="C: per-example gradient L2 clip")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta at which each client's epsilon is reported")
    secure_mode: bool = Field(False, description="Opacus' floating-point-attack-resistant noise (slower)")
    grad_sample_mode: Literal["auto", "hooks", "functorch", "ew", "ghost", "direct"] = Field(
        "auto", description="Opacus per-example gradient mode (same clipping, noise, epsilon); auto: per model"
    )


class AdaptiveClippingConfig(Strict):
    target_quantile: float = Field(
        0.5, gt=0, lt=1, description="aim the clip norm at this quantile of update norms (Andrew et al. 2021)"
    )
    learning_rate: float = Field(0.2, gt=0, description="geometric step of the clip-norm update")
    count_noise_multiplier: float | None = Field(
        None, gt=0, description="noise std of the clipped count (default: expected cohort / 20)"
    )


class UserLevelPrivacy(Strict):
    """DP-FedAvg / DP-FedBuff: clip each user's delta to clip_norm, Gaussian noise on the sum."""

    clip_norm: float = Field(
        ..., gt=0, description="S: L2 clip of each user's whole delta (initial S with adaptive clipping)"
    )
    noise_multiplier: float | None = Field(None, ge=0, description="z: noise std / S (or give target_epsilon)")
    target_epsilon: float | None = Field(
        None, gt=0, description="calibrate z so that `rounds` server steps spend this epsilon"
    )
    max_epsilon: float | None = Field(
        None, gt=0, description="stop training before epsilon would exceed this (default: target_epsilon)"
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="delta (must be < 1/population; default 1/population^1.1)"
    )
    sampling: Literal["fixed", "poisson"] = Field(
        "fixed", description="cohort sampling: fixed size, or each user with probability cohort/population"
    )
    adaptive_clipping: AdaptiveClippingConfig | None = Field(None, description="adapt S to a quantile of update norms")
    amplification: bool | None = Field(
        None,
        description="account sampling rate q = cohort (or async.buffer_size) / population; false: q = 1, no sampling assumption (default: true in simulations, false in flotilla serve, where devices choose when to check in)",
    )

    @model_validator(mode="after")
    def _one_noise(self):
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        return self


class PrivacyConfig(Strict):
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant: RDP or PRV")
    sample_level: SampleLevelPrivacy | None = Field(None, description="DP-SGD on clients")
    user_level: UserLevelPrivacy | None = Field(None, description="DP-FedAvg / DP-FedBuff on the server")

    @model_validator(mode="after")
    def _something(self):
        if self.sample_level is None and self.user_level is None:
            raise ValueError("give sample_level and/or user_level (an empty privacy section protects nothing)")
        return self


# --- secure aggregation (flotilla.secure; see docs/security.md) --------------------------------
class SecAggDropoutConfig(Strict):
    """Simulated protocol dropouts (sync): disjoint fractions of the cohort, redrawn every round."""

    advertise: float = Field(0.0, ge=0, le=1, description="drop before advertising keys (update lost)")
    share: float = Field(0.0, ge=0, le=1, description="drop before sharing secrets (update lost)")
    mask: float = Field(
        0.0, ge=0, le=1, description="drop before sending the masked input (update lost, its masks recovered)"
    )
    unmask: float = Field(0.0, ge=0, le=1, description="drop after the masked input, before unmasking (update kept)")
    seed: int | None = Field(None, ge=0, description="seed of the draws (default: the experiment seed)")

    @model_validator(mode="after")
    def _fractions(self):
        total = self.advertise + self.share + self.mask + self.unmask
        if total > 1:
            raise ValueError(f"the dropout fractions add up to {total:g} > 1 (each client drops at most once)")
        return self


class SecureAggregationConfig(Strict):
    """The server learns only the sum of client updates: masking (sync) or a secure buffer (async)."""

    degree: int | Literal["auto", "full"] = Field(
        "auto",
        description="sync: 'full' = every pair of clients masks (Bonawitz et al.); 'auto' = SecAgg+ with ~4 log2(cohort) neighbours; or k neighbours (>= cohort - 1: full)",
    )
    threshold: int | None = Field(
        None,
        ge=1,
        description="sync: Shamir shares needed to recover a secret (default: a strict majority of a client's neighbourhood)",
    )
    clip: float | None = Field(
        None,
        gt=0,
        description="sync: fixed-point range [-clip, clip] per coordinate; larger values are clipped (default 1.0; with user-level DP: privacy.user_level.clip_norm)",
    )
    bits: Literal[32, 64] = Field(
        32, description="sync: ring Z_2^bits of the masked vectors (64: ~2^19 x finer quantisation, 2 x mask cost)"
    )
    max_weight: float | None = Field(
        None,
        gt=0,
        description="sync: public bound on a client's weight (default: the largest client's example count; 1 with uniform weighting)",
    )
    dropout: SecAggDropoutConfig | None = Field(
        None, description="sync: simulate clients dropping at each protocol stage"
    )
    max_norm: float | None = Field(
        None,
        gt=0,
        description="async: the buffer rejects updates of larger L2 norm (default: none; with user-level DP: clip_norm)",
    )

    @field_validator("degree", mode="before")
    @classmethod
    def _degree(cls, v):
        if v in ("auto", "full") or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("must be 'auto', 'full' or a number of neighbours >= 1")


def _secagg_neighbourhood(cohort: int, degree) -> tuple[int, int]:
    """(neighbours per client, share holders per client) as flotilla.secure.SecAggConfig computes them."""
    import math

    if degree == "full":
        return cohort - 1, cohort
    if degree == "auto":
        degree = min(2 * math.ceil(2 * math.log2(cohort)), cohort - 1) if cohort > 2 else cohort - 1
    even = 2 * ((degree + 1) // 2)
    return (even, even + 1) if even < cohort - 1 else (cohort - 1, cohort)


class ExperimentConfig(Strict):
    # `async` is a Python keyword: the field is `async_`, the YAML key (alias) is `async`.
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    seed: int = Field(0, ge=0, description="seed for model init, cohorts and local shuffling")
    task: TaskConfig
    rounds: int = Field(..., ge=1, description="number of server rounds")
    cohort: int = Field(10, ge=1, description="clients per round (must not exceed the population)")
    weighting: Literal["examples", "uniform"] = Field(
        "examples", description="weight client deltas by example count or uniformly"
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice)")
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="where clients train and evaluation runs: cpu, cuda, or auto (cuda if torch sees a GPU)"
    )
    workers: int = Field(1, ge=1, description="processes that train each round's cohort (Linux; 1 = in-process)")
    runtime: RuntimeConfig | None = Field(
        None,
        description="where sync rounds train: in-process, processes or ray (Ray actors; see docs/ray.md); default: workers decides",
    )
    client: ClientConfig = ClientConfig()
    server: ServerConfig = ServerConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    mode: Literal["sync", "async"] = Field(
        "sync", description="sync rounds, or asynchronous training on a simulated fleet (see async)"
    )
    fleet: FleetConfig | None = Field(
        None, description="simulate a device fleet in simulated time (sync: over-selection, deadline; async: always)"
    )
    async_: AsyncConfig | None = Field(None, alias="async", description="mode async: FedBuff / FedAsync settings")
    network: NetworkConfig | None = Field(
        None, description="flotilla serve: TLS, device tokens, limits (see docs/deployment.md)"
    )
    privacy: PrivacyConfig | None = Field(
        None, description="differential privacy (sample-level DP-SGD and/or user-level DP-FedAvg)"
    )
    secure_aggregation: SecureAggregationConfig | None = Field(
        None, description="secure aggregation: the server sees only sums of updates (see docs/security.md)"
    )
    init: InitConfig | None = Field(
        None, description="start from a checkpoint instead of a random model (see docs/pretraining.md)"
    )
    tiers: TiersConfig | None = Field(
        None,
        description="device tiers low/mid/high coupled to the data, tier-aware optimisations (see docs/fairness.md)",
    )
    channels: ChannelsConfig | None = Field(
        None, description="compress uploads and downloads (fp16, quantize, topk, ...; see docs/channels.md)"
    )

    @model_validator(mode="after")
    def _fleet_fits(self):
        import math

        if self.mode == "async":
            if self.async_ is None:
                self.async_ = AsyncConfig()
            pop = (self.fleet or FleetConfig()).population
            if self.async_.concurrency > pop:
                raise ValueError(f"async.concurrency: {self.async_.concurrency} is larger than fleet.population={pop}")
            if self.async_.arrival_rate is not None and self.network is not None:
                raise ValueError(
                    "async.arrival_rate: simulates devices checking in; in flotilla serve real devices check "
                    "in by themselves; remove it"
                )
        elif self.async_ is not None:
            raise ValueError("async: only used with mode: async (set mode: async or remove the section)")
        if self.fleet is not None and self.mode == "sync":
            select = math.ceil(self.cohort * self.fleet.over_selection - 1e-9)
            if select > self.fleet.population:
                raise ValueError(
                    f"fleet.over_selection: cohort x over_selection = {select} devices per round is larger "
                    f"than fleet.population={self.fleet.population}"
                )
        if (self.fleet is not None or self.mode == "async") and self.workers > 1:
            raise ValueError("workers: the fleet simulator trains one client at a time in-process; set workers: 1")
        return self

    @model_validator(mode="after")
    def _tiers_fit(self):
        check_tiers(self)  # flotilla/fairness/config.py
        return self

    @model_validator(mode="after")
    def _runtime_fits(self):
        check_runtime(self)  # flotilla/sim/ray_config.py
        return self

    @model_validator(mode="after")
    def _embedding_rows_fits(self):  # flotilla/algorithms/rowwise.py
        p, a = self.privacy, self.client.algorithm
        setting = Setting(
            "round" if self.mode == "sync" else "buffer",
            self.workers <= 1,
            f"workers: {self.workers} sums each round in worker processes",
            p is not None and p.sample_level is not None,
            p is not None and p.user_level is not None,
            self.secure_aggregation is not None,
        )
        why = embedding_rows_refusal(
            self.server.embedding_rows,
            setting,
            weight_decay=self.client.weight_decay,
            client_algorithm=a.name if a is not None else None,
            ray=self.runtime is not None and self.runtime.name == "ray",
            channels=self.channels is not None,
        )
        if why:
            raise ValueError(why)
        return self

    @model_validator(mode="after")
    def _device_fits(self):
        check_device_keys(self)  # flotilla/sim/sync.py
        return self

    @model_validator(mode="after")
    def _cohort_fits(self):
        # mode async has no cohort (async.concurrency, checked against the fleet, plays its part)
        if self.mode == "sync" and isinstance(self.task, FashionMNISTTask) and self.cohort > self.task.num_clients:
            raise ValueError(
                f"cohort: {self.cohort} is larger than the population task.num_clients={self.task.num_clients}"
            )
        return self

    @model_validator(mode="after")
    def _client_algorithm_fits(self):
        a = self.client.algorithm
        if a is not None:
            p = self.privacy
            aggregation = (
                "round" if self.mode == "sync" else "buffer" if self.async_.algorithm == "fedbuff" else "per_update"
            )
            processes = f"workers: {self.workers} trains each round in worker processes with plain local SGD"
            why = refusal(
                a,
                Setting(
                    aggregation,
                    self.workers <= 1,
                    processes,
                    p is not None and p.sample_level is not None,
                    p is not None and p.user_level is not None,
                    self.secure_aggregation is not None,
                ),
            )
            if why:
                raise ValueError(why)
        if self.eval.personalize is not None and self.privacy is not None and self.privacy.sample_level is not None:
            raise ValueError(
                "eval.personalize: fine-tunes the shared model, which privacy.sample_level (DP-SGD) has "
                "wrapped with Opacus' per-sample hooks; personalised evaluation is not supported with it"
            )
        return self

    @model_validator(mode="after")
    def _privacy_fits(self):
        p = self.privacy
        if p is None:
            return self
        if getattr(self, "workers", 1) > 1:
            raise ValueError("privacy: DP trains every client in one process; set workers: 1")
        if self.mode == "sync" and self.fleet is not None:
            raise ValueError(
                "privacy: a sync fleet round keeps the first arrivals (over-selection, deadline), a cohort "
                "sampling the accountant does not cover; remove fleet or use mode: async with algorithm fedbuff"
            )
        if p.user_level is not None:
            if self.mode == "async" and self.async_ is not None and self.async_.algorithm != "fedbuff":
                raise ValueError(
                    f"privacy: user-level DP covers FedBuff (one noise release per buffer of K updates), not "
                    f"async.algorithm={self.async_.algorithm} which applies every update on its own"
                )
            if self.mode == "async" and self.async_ is not None and self.async_.staleness.average is not None:
                raise ValueError(AVERAGE_WITH_DP)
            if self.mode == "async" and p.user_level.sampling == "poisson":
                raise ValueError(
                    "privacy.user_level.sampling: poisson is for sync rounds; a FedBuff buffer takes the first K "
                    "arrivals (see docs/privacy.md)"
                )
            if self.weighting == "examples" and "weighting" in self.model_fields_set:
                raise ValueError(
                    "weighting: user-level DP needs weighting: uniform (weighting users by example count "
                    "breaks the per-user sensitivity bound clip_norm)"
                )
            self.weighting = "uniform"
            d = p.user_level.delta
            if d is not None and isinstance(self.task, FashionMNISTTask) and d >= 1 / self.task.num_clients:
                raise ValueError(
                    f"privacy.user_level.delta: {d} is not below 1/population = 1/{self.task.num_clients}; "
                    f"such a delta permits publishing a whole user's data"
                )
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self):
        sa = self.secure_aggregation
        if sa is None:
            return self
        if self.workers > 1:
            raise ValueError(
                "secure_aggregation: the protocol runs over the whole cohort in one process; set workers: 1"
            )
        if self.network is not None and self.mode != "async":
            # flotilla serve runs the 4-round masking protocol between devices (flotilla.network.secagg)
            if sa.dropout is not None:
                raise ValueError(
                    "secure_aggregation.dropout: simulates dropouts in the simulator; real devices drop "
                    "out by themselves in flotilla serve; remove it"
                )
            if self.weighting != "uniform" and sa.max_weight is None and self.network.max_examples is None:
                raise ValueError(
                    "secure_aggregation.max_weight: flotilla serve needs a public bound on a device's "
                    "weight with weighting: examples (set max_weight or network.max_examples), or use "
                    "weighting: uniform"
                )
        u = self.privacy.user_level if self.privacy is not None else None
        if u is not None and u.adaptive_clipping is not None:
            from flotilla.secure.wiring import ADAPTIVE_CLIPPING_REFUSED  # only on this error path

            raise ValueError(ADAPTIVE_CLIPPING_REFUSED)
        # Keys are judged by value, not by presence: the saved config.yaml lists every key with its
        # default (degree: auto, max_norm: null) and must validate back to the same experiment.
        given = {k for k, f in SecureAggregationConfig.model_fields.items() if getattr(sa, k) != f.default}
        if self.mode == "async":
            if self.async_.algorithm != "fedbuff":
                raise ValueError(
                    f"secure_aggregation: async.algorithm={self.async_.algorithm} applies every update on its "
                    f"own, so the server would see single updates; use async.algorithm: fedbuff"
                )
            if self.async_.buffer_size < 2:
                raise ValueError(
                    "secure_aggregation: async.buffer_size must be >= 2 (a released sum of one update is that update)"
                )
            sync_only = [k for k in ("degree", "threshold", "clip", "bits", "max_weight", "dropout") if k in given]
            if sync_only:
                raise ValueError(
                    f"secure_aggregation.{sync_only[0]}: only used by sync masking; mode: async uses the "
                    f"secure buffer (keys: max_norm; K is async.buffer_size)"
                )
            return self
        if self.fleet is not None:
            raise ValueError(
                "secure_aggregation: not wired for sync rounds on a simulated fleet (fleet section with "
                "mode: sync); remove fleet, or use mode: async (the secure buffer)"
            )
        if "max_norm" in given:
            raise ValueError(
                "secure_aggregation.max_norm: only for mode: async (the buffer sees plaintext inside); masked "
                "sync inputs cannot be inspected: bound norms client-side with privacy.user_level.clip_norm"
            )
        if u is not None and u.sampling == "poisson":
            raise ValueError(
                "secure_aggregation: privacy.user_level.sampling: poisson gives a cohort of random size; the "
                "protocol is set up for a fixed number of clients; use sampling: fixed"
            )
        if self.cohort < 2:
            raise ValueError(
                f"secure_aggregation: needs cohort >= 2, got {self.cohort} (the sum of one update is that update)"
            )
        k, holders = _secagg_neighbourhood(self.cohort, sa.degree)
        if sa.threshold is not None and sa.threshold > holders:
            where = (
                f"the cohort ({self.cohort})"
                if holders == self.cohort
                else f"a client's neighbourhood ({holders} share holders: itself and {k} neighbours)"
            )
            raise ValueError(
                f"secure_aggregation.threshold: {sa.threshold} is larger than {where}; no secret could "
                f"ever be reconstructed"
            )
        if sa.max_weight is not None and self.weighting == "uniform" and sa.max_weight < 1:
            raise ValueError(
                f"secure_aggregation.max_weight: {sa.max_weight} is below 1, the weight of every client "
                f"with weighting: uniform"
            )
        return self


# --- loading ------------------------------------------------------------------------------
def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        # Drop discriminator tags ("shakespeare") from the path so it reads like the YAML.
        loc = [
            str(p)
            for i, p in enumerate(e["loc"])
            if not (i and e["loc"][i - 1] == "task" and p in task_names())
            and not (i and e["loc"][i - 1] == "algorithm" and p in algorithm_names())
        ]  # client.algorithm's tag
        key = ".".join(loc) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        given = (
            f" (got {e['input']!r})"
            if e["type"] not in ("extra_forbidden", "missing") and not isinstance(e.get("input"), dict)
            else ""
        )
        # A model_validator error names its own key: print it bare.
        if (
            msg.split(":")[0]
            in ("cohort", "async", "async.concurrency", "fleet.over_selection", "workers", "weighting")
            + ("device", "client.vectorize")
            or msg.startswith(
                ("privacy", "tiers", "secure_aggregation", "client.algorithm", "eval.personalize", "runtime")
            )
            or msg.startswith("server.embedding_rows")
        ) and key == "config":
            lines.append(f"  {msg}")
        else:
            lines.append(f"  {key}: {msg}{given}")
    return "invalid config:\n" + "\n".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError("invalid config: the file must hold a YAML mapping of keys to values")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``; every failure is one ConfigError line naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
        return yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the file must hold a YAML mapping of keys to values")
    return validate(apply_overrides(raw, overrides or []))


def _named_list_items(ann) -> list[type[BaseModel]]:
    """The sections a ``list[A | B | ...]`` field holds, when each has a ``name`` (else [])."""
    if typing.get_origin(ann) is not list:
        return []
    (item,) = typing.get_args(ann)
    if typing.get_origin(item) is Annotated:
        item = typing.get_args(item)[0]
    options = typing.get_args(item) if typing.get_origin(item) in (Union, types.UnionType) else (item,)
    models = [o for o in options if isinstance(o, type) and issubclass(o, BaseModel) and "name" in o.model_fields]
    return models if len(models) == len(options) else []


def describe_options(
    model: type[BaseModel] = ExperimentConfig, prefix: str = "", within: str | None = None
) -> list[str]:
    """One line per option (key, type, default, description), for ``flotilla run --help``.

    ``within``: the nearest enclosing section that may be left out (optional or defaulted); a key
    required inside it is required only when that section is given."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        ann = field.annotation
        args = [typing.get_args(a)[0] if typing.get_origin(a) is Annotated else a for a in getattr(ann, "__args__", ())]
        args = [x for a in args for x in (typing.get_args(a) if typing.get_origin(a) is Union else (a,))]
        sub = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        inner = within if field.is_required() else key
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += describe_options(ann, key + ".", inner)
            continue
        if name == "task":
            for variant in ann.__args__:
                lines.append(
                    f"task (name: {variant.model_fields['name'].annotation.__args__[0]}): {variant.__doc__.strip()}"
                )
                lines += describe_options(variant, "task.", inner)
            continue
        if sub and "name" in sub[0].model_fields and len(sub) > 1:  # a union told apart by name (client.algorithm)
            for s in sub:
                lines.append(
                    f"{key} (name: {s.model_fields['name'].annotation.__args__[0]}): {(s.__doc__ or '').strip()}"
                )
                lines += [line for line in describe_options(s, key + ".", key) if not line.startswith(f"  {key}.name:")]
            continue
        if sub:
            for s in sub:
                lines += describe_options(s, key + ".", inner)
            continue
        if variants := _named_list_items(ann):  # a list of sections told apart by name (channels.upload)
            lines.append(
                f"  {key}: list, default {field.get_default(call_default_factory=True)!r}. {field.description or ''}"
            )
            for s in variants:
                about = (s.__doc__ or s.model_fields["name"].description or "").strip()
                lines.append(f"{key}[] (name: {s.model_fields['name'].annotation.__args__[0]}): {about}")
                lines += [
                    line for line in describe_options(s, key + "[].", key) if not line.startswith(f"  {key}[].name:")
                ]
            continue
        if field.is_required():
            default = "required" if within is None else f"required when {within} is given"
        else:
            default = f"default {field.get_default(call_default_factory=True)!r}"
        type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
        lines.append(f"  {key}: {type_name}, {default}. {field.description or ''}".rstrip())
    return lines
