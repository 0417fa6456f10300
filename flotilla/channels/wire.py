"""Channels over the network: the server's side (its codecs, the encoded download of each version, the
decoding of uploads) and the settings an assignment carries to the device.

The wire format is the compressed one: an upload's body is exactly ``Codec.encode``'s bytes
(``UploadHeader.dtype = "channels"``, shape ``[numel]``), a download's chunks exactly the encoded
model; the sizes are the simulator's counts.  No header travels in the body: both ends know the
chain (the assignment carries it) and the shapes, hence every tensor's layout.  After decoding, the
server checks the delta as any other (shape, finite, norm bound).
"""

from __future__ import annotations

from typing import Any

import torch

from flotilla.channels.config import ChannelsConfig, as_channels
from flotilla.channels.device import DeviceChannels

CHANNEL_DTYPE = "channels"  # UploadHeader.dtype of a compressed upload
_CACHED_VERSIONS = 8  # encoded downloads kept (versions in flight are few: FedBuff's staleness)


def network_refusal(
    cfg: ChannelsConfig, *, secure: bool, scaffold: bool, adaptive: bool, masked: bool = False
) -> str | None:
    if secure and cfg.upload and masked:  # sync masking: quantize runs in the ring (flotilla.channels.ring)
        from flotilla.channels.ring import secure_refusal

        why = secure_refusal(cfg)
        if why:
            return why
    elif secure and cfg.upload:
        return (
            "channels.upload: not with secure_aggregation in async mode: the server receives sealed updates "
            "and could not decode a compressed one (channels.download may stay)"
        )
    if scaffold:
        return "channels: not with client.algorithm scaffold (its messages carry control variates as well)"
    if adaptive and cfg.upload:
        return (
            "channels.upload: not with privacy.user_level.adaptive_clipping: the clipped-count bit is computed "
            "by the server from the update's norm, which compression changes; use a fixed clip_norm"
        )
    return None


class ServerChannels:
    """What ``flotilla serve`` does with a ``channels:`` section (None when it compresses nothing)."""

    def __init__(self, cfg: ChannelsConfig, shapes: list[tuple[int, ...]], clip_norm: float | None = None):
        self.cfg = cfg
        self.codecs = DeviceChannels(cfg, shapes, clip_norm if cfg.upload else None)
        self.assignment: dict[str, Any] = {**cfg.model_dump(mode="json"), "clip_norm": self.codecs.clip_norm}
        self._downloads: dict[int, bytes] = {}
        self.bytes_down = self.bytes_up = 0  # compressed bytes served and accepted for decoding

    @classmethod
    def build(
        cls, cfg, shapes, *, user_level=None, secure: bool = False, scaffold: bool = False, masked=None
    ) -> ServerChannels | None:
        """None when ``cfg`` compresses nothing; ValueError (naming the key) where it cannot run.
        ``masked``: sync secure aggregation's SecAggParams; its ``quantize_bits`` quantise the upload
        into the ring, so only the download is this server's to encode."""
        cfg = as_channels(cfg)
        if cfg is None or (not cfg.upload and not cfg.download):
            return None
        get = user_level.get if isinstance(user_level, dict) else (lambda k: getattr(user_level, k, None))
        why = network_refusal(
            cfg,
            secure=secure,
            scaffold=scaffold,
            adaptive=user_level is not None and get("adaptive_clipping") is not None,
            masked=masked is not None,
        )
        if why:
            raise ValueError(why)
        if masked is not None and cfg.upload:
            from flotilla.channels.ring import download_only, ring_quantize

            if ring_quantize(cfg) != (masked.quantize_bits, masked.stochastic):
                raise ValueError(
                    f"channels.upload: quantize {ring_quantize(cfg)} but secure aggregation quantises "
                    f"{masked.quantize_bits} bits (flotilla serve sets both from the config)"
                )
            cfg = download_only(cfg)
            if not cfg.download:
                return None
        return cls(cfg, shapes, float(get("clip_norm")) if user_level is not None else None)

    @property
    def upload_bytes(self) -> int:
        return self.codecs.upload_bytes

    @property
    def download_bytes(self) -> int:
        return self.codecs.download_bytes

    def download(self, version: int, model: bytes) -> bytes:
        """The encoded model of ``version`` (``model``: its float32 bytes), counted as served."""
        out = self.encoded(version, model)
        self.bytes_down += len(out)
        return out

    def encoded(self, version: int, model: bytes) -> bytes:
        """The encoded model of ``version``, encoded once per version (not counted: a sealed download
        is counted when the port sends it)."""
        if self.codecs.down.lossless:
            return model
        out = self._downloads.get(version)
        if out is None:
            out, _ = self.codecs.down.encode(torch.frombuffer(bytearray(model), dtype=torch.float32))
            self._downloads[version] = out
            while len(self._downloads) > _CACHED_VERSIONS:
                del self._downloads[min(self._downloads)]
        return out

    def decode_upload(self, body: bytes | bytearray) -> torch.Tensor:
        """The float32 delta of a compressed upload; ValueError if it is malformed."""
        delta = self.codecs.up.decode(body)
        self.bytes_up += len(body)
        return delta


def device_channels(spec: dict[str, Any], shapes: list[tuple[int, ...]]) -> DeviceChannels:
    """The device's codecs from an assignment's ``channels`` settings."""
    spec = dict(spec)
    clip = spec.pop("clip_norm", None)
    return DeviceChannels(as_channels(spec), shapes, clip)
