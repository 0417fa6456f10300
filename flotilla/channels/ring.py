"""``channels.upload`` under secure aggregation: the quantise channel becomes quantisation into the
ring (docs/channels.md, "Under secure aggregation").

Masked uploads are ring elements that the server sums before anyone can look at them, so nothing
per device can travel beside them: no per-device scale or zero point, no sparse mask, no float
encoding.  What does compose is ``quantize`` (per tensor, 2-8 bits): every device quantises to the
same grid, set by the public clip bound (``secure_aggregation.clip``, else user-level DP's
``clip_norm``, else 1), with stochastic rounding, into ``Z_{2^r}`` with ``r = bits + ceil(log2
cohort)``, the fewest bits in which the sum of the cohort's codes cannot wrap
(:class:`flotilla.secure.encoding.QuantizedEncoder`).  Masks are drawn in that ring and cancel
exactly; a masked upload is ``numel + 1`` elements (the weight travels as the last) of ``r`` bits,
packed: ``ceil((numel + 1) * r / 8)`` bytes, by the convention of flotilla.channels.codec (the real
bytes of the message; the scale is public, so none travels).

Wired for the in-process synchronous runtime (SyncFedAvg) and ``flotilla serve`` in sync mode; every
other combination is refused with a one-line reason (:func:`secure_refusal`).
"""

from __future__ import annotations

from dataclasses import replace

from flotilla.channels.config import ChannelsConfig, as_channels
from flotilla.channels.device import DeviceChannels, ResidualStore

RUNTIMES = ("SyncFedAvg",)  # in-process sync rounds (the network server is wired separately)


def secure_refusal(cfg: ChannelsConfig, runtime: str | None = None) -> str | None:
    """Why ``cfg.upload`` cannot run under secure aggregation (one line naming the key), or None.
    ``runtime``: the simulator's runtime name (None: the network server's sync masking)."""
    for step in cfg.upload:
        if step.name in ("topk", "random"):
            return (
                f"channels.upload: not with secure_aggregation: {step.name}: a sparse upload's mask would show the "
                "server which coordinates each device sends, and masked vectors must be dense to sum; use quantize"
            )
        if step.name in ("fp16", "bf16"):
            return (
                f"channels.upload: not with secure_aggregation: {step.name}: floating-point values cannot be summed "
                "modulo the ring under the masks; use quantize (it is quantised into the ring)"
            )
        if step.per_channel:
            return (
                "channels.upload: not with secure_aggregation: quantize per_channel: every device must share one "
                "scale (the clip bound's), there is no per-device scale to send; set per_channel: false"
            )
        if step.bits < 2:
            return (
                "channels.upload: not with secure_aggregation: quantize bits 1: the shared grid is symmetric "
                "around zero and needs >= 2 bits"
            )
    if cfg.error_feedback:
        return (
            "channels.error_feedback: not with secure_aggregation: the upload is quantised inside the masking "
            "step, after the device's update leaves its trainer"
        )
    if runtime is not None and runtime not in RUNTIMES:
        return (
            f"channels.upload: quantising into the secure-aggregation ring is wired for SyncFedAvg (in-process "
            f"sync rounds) and flotilla serve, not {runtime}"
        )
    return None


def ring_quantize(cfg) -> tuple[int, bool] | None:
    """``(bits, stochastic)`` of the upload's quantise channel when it runs in the ring, else None
    (no upload channel, or one :func:`secure_refusal` refuses)."""
    cfg = as_channels(cfg)
    if cfg is None or not cfg.upload or secure_refusal(cfg) is not None:
        return None
    (step,) = cfg.upload
    return step.bits, step.stochastic


def ring_bits(bits: int, cohort: int) -> int:
    """Width of the ring: ``bits + ceil(log2 cohort)`` (8 bits, 100 devices: 15)."""
    return bits + (cohort - 1).bit_length()


def masked_upload_bytes(numel: int, bits: int, cohort: int) -> int:
    """Bytes of one masked upload: ``numel + 1`` ring elements, packed."""
    return -(-(numel + 1) * ring_bits(bits, cohort) // 8)


def download_only(cfg: ChannelsConfig) -> ChannelsConfig:
    """``cfg`` without its upload chain (the device's codecs when the ring does the upload's quantising)."""
    return cfg.model_copy(update={"upload": [], "error_feedback": False})


class RingChannels(DeviceChannels):
    """The device's download codec; the upload leaves uncompressed for the secure aggregator, which
    quantises it into the ring, and counts as the masked upload's bytes."""

    def __init__(self, cfg: ChannelsConfig, shapes, upload_bytes: int):
        super().__init__(download_only(cfg), shapes)
        self._upload_bytes = upload_bytes

    @property
    def upload_bytes(self) -> int:
        return self._upload_bytes


def compose(cfg: ChannelsConfig, shape, components, update_cls, algorithm_cls):
    """flotilla.channels.sim.compose's answer under secure aggregation: the download channel around the
    client update (``update_cls``, sim's ChannelClientUpdate), bytes_up counted as masked uploads by
    ``algorithm_cls`` (sim's ChannelsAlgorithm); the quantising happens in the SecureAggregator,
    which flotilla.secure.wiring.SecureParts built with the same bits."""
    from flotilla.core.client import LocalTrainer

    bits, _ = ring_quantize(cfg)
    inner = components.client_update or LocalTrainer
    store = ResidualStore()

    def make(flat, loss_fn, spec):
        channels = RingChannels(cfg, flat.shapes, masked_upload_bytes(flat.numel, bits, shape.cohort))
        return update_cls(inner(flat, loss_fn, spec), channels, store, flat.numel)

    return replace(components, client_update=make), lambda algorithm: algorithm_cls(algorithm, store, True)
