"""Turn secure aggregation on in a training algorithm: what ``flotilla.train(secure_aggregation=...)``
and the ``secure_aggregation:`` config section use.

    secure = SecureParts(SecureAggregationSpec(degree="auto"), SyncFedAvg.shape(**kwargs), privacy_parts)
    algorithm = SyncFedAvg(**kwargs, components=secure.components)   # composed when built

(``flotilla.experiment.compose.build_algorithm`` does this, and privacy, for every runtime.)

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

from flotilla.core.protocols import Components, Shape
from flotilla.secure.aggregator import DropoutSim, SecureAggregator
from flotilla.secure.fedbuff import SecureFedBuff

_DROPOUT_KEYS = ("advertise", "share", "mask", "unmask")

ADAPTIVE_CLIPPING_REFUSED = (
    "secure_aggregation: privacy.user_level.adaptive_clipping is not wired with secure aggregation "
    "(the noised count of unclipped updates would have to be aggregated securely too); use a fixed clip_norm"
)


@dataclass(frozen=True)
class SecureAggregationSpec:
    """The ``secure_aggregation:`` config section (see flotilla/config.py for each key)."""

    degree: int | str = "auto"  # "auto" (SecAgg+), "full" (Bonawitz), or k neighbours
    threshold: int | None = None
    clip: float | None = None  # default 1.0; with user-level DP: clip_norm
    bits: int = 32
    max_weight: float | None = None  # default: largest client's example count (1 if uniform)
    dropout: DropoutSim | None = None
    max_norm: float | None = None  # async buffer only

    def __post_init__(self):
        if not (self.degree in ("auto", "full") or (isinstance(self.degree, int) and self.degree >= 1)):
            raise ValueError(
                f"secure_aggregation.degree: must be 'auto', 'full' or a number of neighbours >= 1, got {self.degree!r}"
            )
        if self.bits not in (32, 64):
            raise ValueError(f"secure_aggregation.bits: must be 32 or 64, got {self.bits}")
        for key in ("clip", "max_weight", "max_norm"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ValueError(f"secure_aggregation.{key}: must be > 0, got {v}")
        if self.threshold is not None and self.threshold < 1:
            raise ValueError(f"secure_aggregation.threshold: must be >= 1, got {self.threshold}")

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any] | SecureAggregationSpec | None, seed: int = 0
    ) -> SecureAggregationSpec | None:
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
            d["dropout"] = DropoutSim(
                **{k: float(drop.get(k, 0.0)) for k in _DROPOUT_KEYS},
                seed=drop["seed"] if drop.get("seed") is not None else seed,
            )
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
        self.noise = noise  # flotilla.privacy.GaussianSumNoise
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


_RING_BITS_REFUSED = (
    "secure_aggregation.bits: sets the fixed-point ring; with channels.upload quantize the ring is "
    "bits + ceil(log2 cohort) wide (flotilla/channels/ring.py); leave it unset"
)


def _ring_quantize(channels):
    if channels is None:
        return None
    from flotilla.channels.ring import ring_quantize

    return ring_quantize(channels)


def _noise(user, plan, seed: int):
    from flotilla.privacy import GaussianSumNoise

    return GaussianSumNoise(user.clip_norm, plan.noise_multiplier, seed=seed)


class SecureParts:
    """What secure aggregation contributes to an algorithm that is about to be built.

        privacy = PrivacyParts(...) or None                  # DP first: it decides clipping and noise
        secure = SecureParts(spec, shape, privacy)           # every check happens here
        components = privacy.components.merged(secure.components) if privacy else secure.components

    Sync rounds get a :class:`SecureAggregator` factory; FedBuff gets a :class:`SecureFedBuff`
    factory around the plain buffer.  With user-level DP the noise moves into the protocol, and the
    secure component installs the DP mechanism the privacy wrapper meters (``privacy.mechanism``).
    """

    def __init__(self, spec: SecureAggregationSpec | Mapping[str, Any], shape: Shape, privacy=None, channels=None):
        self.spec = spec = SecureAggregationSpec.from_dict(spec, seed=shape.seed)
        # channels.upload: quantize runs in the ring (flotilla.channels.ring; it refuses the rest)
        self.quantize = _ring_quantize(channels) if shape.aggregation == "round" else None
        self.shape, self.privacy = shape, privacy
        self.user = privacy.spec.user_level if privacy is not None and privacy.plan is not None else None
        if self.user is not None and self.user.adaptive_clipping is not None:
            raise ValueError(ADAPTIVE_CLIPPING_REFUSED)
        if not shape.composable:
            raise ValueError(
                f"secure_aggregation: the protocol runs over the whole cohort in one process, but "
                f"{shape.name}: {shape.why_not_composable}; use the in-process runtime (workers: 1, "
                f"no runtime section)"
            )
        self.built = None  # the SecureAggregator or SecureFedBuff, once built
        if shape.aggregation == "round" and shape.selection == "uniform":
            self.components = Components(aggregator=self._check_sync())
        elif shape.aggregation == "buffer":
            self.components = Components(buffer=self._check_fedbuff())
        elif shape.aggregation == "per_update":
            raise ValueError(
                f"secure_aggregation: {shape.name} applies every update on its own, so the server would "
                f"see single updates; use fedbuff"
            )
        else:
            raise ValueError(
                f"secure_aggregation: {shape.name} is not covered; secure aggregation is wired for "
                f"synchronous rounds (SyncFedAvg) and FedBuff on the fleet simulator (mode: async)"
            )

    # -- sync: a SecureAggregator over the cohort's protocol slots ------------------------------------
    def _check_sync(self):
        spec, shape, user, n = self.spec, self.shape, self.user, self.shape.cohort
        if n < 2:
            raise ValueError(f"secure_aggregation: needs cohort >= 2, got {n} (the sum of one update is that update)")
        if spec.max_norm is not None:
            raise ValueError(
                "secure_aggregation.max_norm: only for the async secure buffer; masked sync inputs cannot be "
                "inspected (bound norms client-side with privacy.user_level.clip_norm)"
            )
        common = dict(
            degree=spec.protocol_degree,
            threshold=spec.threshold,
            bits=spec.bits,
            dropout=spec.dropout,
            session_seed=shape.seed,
        )  # the simulator replays rounds exactly (see SecureAggregator)
        if self.quantize is not None:
            if spec.bits != 32:
                raise ValueError(_RING_BITS_REFUSED)
            common.update(quantize_bits=self.quantize[0], stochastic=self.quantize[1])
        if user is not None:
            if user.sampling == "poisson":
                raise ValueError(
                    "secure_aggregation: privacy.user_level.sampling: poisson gives a cohort of random size; "
                    "the protocol is set up for a fixed number of clients; use sampling: fixed"
                )
            if spec.max_weight is not None and spec.max_weight != 1:
                raise ValueError(
                    f"secure_aggregation.max_weight: user-level DP weighs every user 1 (got {spec.max_weight}); leave it unset"
                )
            plan, S, privacy = self.privacy.plan, user.clip_norm, self.privacy

            def build(numel: int) -> SecureAggregator:
                noise = _noise(user, plan, shape.seed)
                agg = SecureAggregator(
                    numel,
                    n,
                    clip=spec.clip or S,
                    max_weight=1.0,
                    noise_fn=noise,
                    l2_clip=S,
                    denominator=plan.expected_cohort,
                    **common,
                )
                privacy.mechanism = SecureDPMechanism(
                    S,
                    noise,
                    lambda: {
                        "clip_norm": S,
                        "dp_updates": agg.count,
                        # simulator diagnostic, NOT released under DP (each client knows only its own):
                        "clipped_fraction": agg.l2_clipped / agg.count if agg.count else 0.0,
                    },
                )
                self.built = agg
                return agg

            return build
        if shape.weighting == "examples":
            largest = float(shape.dataset.train_sizes.max())
            max_weight = spec.max_weight if spec.max_weight is not None else largest
            if max_weight < largest:
                raise ValueError(
                    f"secure_aggregation.max_weight: {max_weight:g} is below the largest client's example "
                    f"count {largest:g} (weighting: examples); raise it or leave it unset"
                )
        else:
            max_weight = spec.max_weight if spec.max_weight is not None else 1.0
            if max_weight < 1:
                raise ValueError(
                    f"secure_aggregation.max_weight: {max_weight:g} is below 1, every client's weight with weighting: uniform"
                )

        def build(numel: int) -> SecureAggregator:
            self.built = SecureAggregator(numel, n, clip=spec.clip or 1.0, max_weight=max_weight, **common)
            return self.built

        return build

    # -- async: FedBuff's buffer inside the secure buffer ---------------------------------------------
    def _check_fedbuff(self):
        spec, user, shape = self.spec, self.user, self.shape
        if not shape.trains:
            raise ValueError("secure_aggregation: the null client trains nothing, there is nothing to aggregate")
        given = [k for k in ("threshold", "clip", "max_weight", "dropout") if getattr(spec, k) is not None]
        if given or spec.degree != "auto" or spec.bits != 32:
            key = given[0] if given else ("degree" if spec.degree != "auto" else "bits")
            raise ValueError(
                f"secure_aggregation.{key}: only used by sync masking; the async secure buffer takes max_norm "
                f"(K is async.buffer_size)"
            )
        privacy = self.privacy

        def build(plain, version_fn) -> SecureFedBuff:  # plain: the FedBuff this buffer takes K and staleness from
            noise = _noise(user, privacy.plan, shape.seed) if user is not None else None
            buf = SecureFedBuff(
                plain.numel,
                plain.buffer_size,
                plain.staleness,
                version_fn=version_fn,
                normalize=plain.normalize,
                max_staleness=plain.max_staleness,
                max_norm=spec.max_norm,
                dp_clip=user.clip_norm if user is not None else None,
                noise_fn=noise,
            )
            buf.dropped_stale = plain.dropped_stale
            if user is not None:
                privacy.mechanism = SecureDPMechanism(user.clip_norm, noise, lambda: buf.last_metrics)
            self.built = buf
            return buf

        return build


def make_secure(algorithm_class, kwargs: Mapping[str, Any], spec: SecureAggregationSpec | Mapping[str, Any]):
    """Build ``algorithm_class(**kwargs)`` with secure aggregation composed in (no DP: see
    flotilla.experiment.compose for both).  Refuses, naming the setting, what cannot work."""
    parts = SecureParts(spec, algorithm_class.shape(**kwargs))
    return algorithm_class(**kwargs, components=parts.components)
