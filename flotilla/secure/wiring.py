"""Turn secure aggregation on in a training algorithm: what ``flotilla.train(secure_aggregation=...)``
and the ``secure_aggregation:`` config section use.

    algorithm = SyncFedAvg(...)            # or AsyncFleetSim(algorithm="fedbuff"); either may be
    algorithm = make_private(algorithm, …) # wrapped by flotilla.privacy.make_private first
    make_secure(algorithm, SecureAggregationSpec(degree="auto"))

* **Sync rounds** (:class:`~flotilla.sim.sync.SyncFedAvg`): the round loop's aggregator becomes a
  :class:`~flotilla.secure.SecureAggregator` over ``cohort`` protocol slots.  Example-count weights
  need a public bound ``max_weight`` (default: the largest client's training set).  A round the
  protocol aborts makes no server step (the loop records ``aborted``).
* **Async FedBuff** (:class:`~flotilla.sim.fleet.AsyncFleetSim`): the server's buffer becomes a
  :class:`~flotilla.secure.fedbuff.SecureFedBuff`: updates are sealed to the secure buffer, the
  staleness weights applied inside it, and the server gets only released sums of >= K updates.
* **User-level DP** (a :class:`~flotilla.privacy.PrivateAlgorithm` with ``user_level``): noise goes
  where the threat model puts it (docs/security.md).  Sync: clients clip to L2 norm S before encoding,
  weights are 1, and the server adds ``N(0, (z S)^2)`` to the unmasked sum and divides by the expected
  cohort (DP-FedAvg's release).  Async: clients clip to S before sealing, the buffer enforces
  ``max_norm = S``, keeps one update per client per release and adds the noise inside, before the
  sum leaves (DP-FedBuff's release).  Adaptive clipping and Poisson cohorts are refused.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flotilla.secure.aggregator import DropoutSim, SecureAggregator
from flotilla.secure.fedbuff import SecureFedBuff

_DROPOUT_KEYS = ("advertise", "share", "mask", "unmask")

ADAPTIVE_CLIPPING_REFUSED = ("secure_aggregation: privacy.user_level.adaptive_clipping is not wired with secure aggregation "
                             "(the noised count of unclipped updates would have to be aggregated securely too); use a fixed clip_norm")


@dataclass(frozen=True)
class SecureAggregationSpec:
    """The ``secure_aggregation:`` config section (see flotilla/config.py for each key)."""
    degree: int | str = "auto"          # "auto" (SecAgg+), "full" (Bonawitz), or k neighbours
    threshold: int | None = None
    clip: float | None = None           # default 1.0; with user-level DP: clip_norm
    bits: int = 32
    max_weight: float | None = None     # default: largest client's example count (1 if uniform)
    dropout: DropoutSim | None = None
    max_norm: float | None = None       # async buffer only

    def __post_init__(self):
        if not (self.degree in ("auto", "full") or (isinstance(self.degree, int) and self.degree >= 1)):
            raise ValueError(f"secure_aggregation.degree: must be 'auto', 'full' or a number of neighbours >= 1, got {self.degree!r}")
        if self.bits not in (32, 64):
            raise ValueError(f"secure_aggregation.bits: must be 32 or 64, got {self.bits}")
        for key in ("clip", "max_weight", "max_norm"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ValueError(f"secure_aggregation.{key}: must be > 0, got {v}")
        if self.threshold is not None and self.threshold < 1:
            raise ValueError(f"secure_aggregation.threshold: must be >= 1, got {self.threshold}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | SecureAggregationSpec | None, seed: int = 0) -> SecureAggregationSpec | None:
        """From the config section (``model_dump()``) or an equivalent dict; dropout seed defaults to ``seed``."""
        if d is None or isinstance(d, SecureAggregationSpec):
            return d
        d = {k: v for k, v in dict(d).items() if v is not None}
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"secure_aggregation: unknown keys {sorted(unknown)}")
        drop = d.get("dropout")
        if drop is not None and not isinstance(drop, DropoutSim):
            drop = dict(drop)
            bad = set(drop) - set(_DROPOUT_KEYS) - {"seed"}
            if bad:
                raise ValueError(f"secure_aggregation.dropout: unknown keys {sorted(bad)}")
            d["dropout"] = DropoutSim(**{k: float(drop.get(k, 0.0)) for k in _DROPOUT_KEYS},
                                      seed=drop["seed"] if drop.get("seed") is not None else seed)
        return cls(**d)

    @property
    def protocol_degree(self) -> int | str | None:
        """What SecureAggregator takes: None (complete graph), "auto" or k."""
        return None if self.degree == "full" else self.degree


class SecureDPMechanism:
    """Stands where :class:`flotilla.privacy.PrivateAlgorithm` expects its DP aggregator (metrics,
    the clip norm and the noise seed counter it checkpoints) when the noise is added by a secure
    aggregator's ``noise_fn``."""
    adaptive = None

    def __init__(self, clip_norm: float, noise, metrics):
        self.clip_norm = float(clip_norm)
        self.noise = noise                 # flotilla.privacy.GaussianSumNoise
        self._metrics = metrics

    @property
    def releases(self) -> int:
        return self.noise.releases

    @releases.setter
    def releases(self, value: int) -> None:
        self.noise.releases = int(value)

    @property
    def last_metrics(self) -> dict[str, float]:
        return self._metrics()


def _is_private(algorithm) -> bool:
    from flotilla.privacy import PrivateAlgorithm
    return isinstance(algorithm, PrivateAlgorithm)


def make_secure(algorithm, spec: SecureAggregationSpec | Mapping[str, Any]):
    """Swap secure aggregation into ``algorithm`` (see module docstring); returns the secure component
    (the SecureAggregator or the SecureFedBuff).  Refuses, naming the setting, what cannot work;
    ``algorithm`` is modified only after every check has passed."""
    from flotilla.sim.sync import SyncFedAvg, sample_cohort

    private = algorithm if _is_private(algorithm) else None
    inner = private.inner if private is not None else algorithm
    spec = SecureAggregationSpec.from_dict(spec, seed=getattr(inner, "seed", 0))
    user = private.spec.user_level if private is not None and private.plan is not None else None
    if user is not None and user.adaptive_clipping is not None:
        raise ValueError(ADAPTIVE_CLIPPING_REFUSED)
    if getattr(inner, "workers", 1) > 1:
        raise ValueError("secure_aggregation: the protocol runs over the whole cohort in one process; use workers=1")

    if isinstance(inner, SyncFedAvg):
        return _secure_sync(inner, private, spec, user, sample_cohort)
    from flotilla.sim.fleet import AsyncFleetSim
    if isinstance(inner, AsyncFleetSim):
        return _secure_fedbuff(inner, private, spec, user)
    raise ValueError(f"secure_aggregation: {type(inner).__name__} is not covered; secure aggregation is wired for "
                     f"synchronous rounds (SyncFedAvg) and FedBuff on the fleet simulator (mode: async)")


def _noise(user, plan, seed: int):
    from flotilla.privacy import GaussianSumNoise
    return GaussianSumNoise(user.clip_norm, plan.noise_multiplier, seed=seed)


def _secure_sync(inner, private, spec: SecureAggregationSpec, user, default_sampler) -> SecureAggregator:
    n, numel = inner.cohort, inner.flat.numel
    if n < 2:
        raise ValueError(f"secure_aggregation: needs cohort >= 2, got {n} (the sum of one update is that update)")
    if spec.max_norm is not None:
        raise ValueError("secure_aggregation.max_norm: only for the async secure buffer; masked sync inputs cannot be "
                         "inspected (bound norms client-side with privacy.user_level.clip_norm)")
    common = dict(degree=spec.protocol_degree, threshold=spec.threshold, bits=spec.bits, dropout=spec.dropout,
                  session_seed=inner.seed)   # the simulator replays rounds exactly (see SecureAggregator)
    if user is not None:
        if user.sampling == "poisson" or inner.sample_cohort is not default_sampler:
            raise ValueError("secure_aggregation: privacy.user_level.sampling: poisson gives a cohort of random size; "
                             "the protocol is set up for a fixed number of clients; use sampling: fixed")
        if spec.max_weight is not None and spec.max_weight != 1:
            raise ValueError(f"secure_aggregation.max_weight: user-level DP weighs every user 1 (got {spec.max_weight}); leave it unset")
        plan, S = private.plan, user.clip_norm
        noise = _noise(user, plan, inner.seed)
        agg = SecureAggregator(numel, n, clip=spec.clip or S, max_weight=1.0, noise_fn=noise, l2_clip=S,
                               denominator=plan.expected_cohort, **common)
        mech = SecureDPMechanism(S, noise, lambda: {
            "clip_norm": S, "dp_updates": agg.count,
            # simulator diagnostic, NOT released under DP (each client knows only its own):
            "clipped_fraction": agg.l2_clipped / agg.count if agg.count else 0.0})
    else:
        if inner.weighting == "examples":
            largest = float(inner.dataset.train_sizes.max())
            max_weight = spec.max_weight if spec.max_weight is not None else largest
            if max_weight < largest:
                raise ValueError(f"secure_aggregation.max_weight: {max_weight:g} is below the largest client's example "
                                 f"count {largest:g} (weighting: examples); raise it or leave it unset")
        else:
            max_weight = spec.max_weight if spec.max_weight is not None else 1.0
            if max_weight < 1:
                raise ValueError(f"secure_aggregation.max_weight: {max_weight:g} is below 1, every client's weight with weighting: uniform")
        agg = SecureAggregator(numel, n, clip=spec.clip or 1.0, max_weight=max_weight, **common)
        mech = None
    # All checks passed: now modify the algorithm.
    inner.aggregator = agg
    if mech is not None:
        private.aggregator = mech
    return agg


def _secure_fedbuff(inner, private, spec: SecureAggregationSpec, user) -> SecureFedBuff:
    if inner.algorithm != "fedbuff":
        raise ValueError(f"secure_aggregation: async.algorithm={inner.algorithm} applies every update on its own, so the "
                         f"server would see single updates; use fedbuff")
    if inner.null_client:
        raise ValueError("secure_aggregation: the null client trains nothing, there is nothing to aggregate")
    given = [k for k in ("threshold", "clip", "max_weight", "dropout") if getattr(spec, k) is not None]
    if given or spec.degree != "auto" or spec.bits != 32:
        key = given[0] if given else ("degree" if spec.degree != "auto" else "bits")
        raise ValueError(f"secure_aggregation.{key}: only used by sync masking; the async secure buffer takes max_norm "
                         f"(K is async.buffer_size)")
    server = inner.server
    old = server.buffer                                    # FedBuff, or DPFedBuff under user-level DP
    noise = mech = None
    if user is not None:
        noise = _noise(user, private.plan, inner.seed)
    buf = SecureFedBuff(inner.flat.numel, old.buffer_size, old.staleness, version_fn=lambda: server.version,
                        normalize=old.normalize, max_staleness=old.max_staleness, max_norm=spec.max_norm,
                        dp_clip=user.clip_norm if user is not None else None, noise_fn=noise)
    if user is not None:
        mech = SecureDPMechanism(user.clip_norm, noise, lambda: buf.last_metrics)
    # All checks passed: now modify the algorithm.
    buf.dropped_stale = old.dropped_stale
    server.buffer = buf
    if mech is not None:
        private.aggregator = mech
    return buf
