"""The ``channels:`` config section: compression of uploads and downloads (docs/channels.md).

channels:
  upload:   [{name: topk, keep: 0.1}, {name: quantize, bits: 8}]   # applied in order
  download: [{name: fp16}]
  error_feedback: true      # the device keeps what compression dropped and adds it next time
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from flotilla.channels.codec import ENCODINGS, SPARSIFIERS, Step
from flotilla.core.schema import Section


class Fp16Channel(Section):
    name: Literal["fp16"] = Field(description="IEEE half precision: 2 bytes per value")


class Bf16Channel(Section):
    name: Literal["bf16"] = Field(description="bfloat16: 2 bytes per value, fp32's range")


class QuantizeChannel(Section):
    name: Literal["quantize"] = Field(description="scalar quantisation with a min/max scale and zero point")
    bits: int = Field(8, ge=1, le=8, description="bits per value (1-8)")
    per_channel: bool = Field(False, description="a scale and zero point per output channel instead of per tensor")
    stochastic: bool = Field(True, description="stochastic rounding (unbiased); false: round to nearest")


class TopKChannel(Section):
    name: Literal["topk"] = Field(description="keep the largest-magnitude values of each tensor")
    keep: float = Field(0.1, gt=0, le=1, description="fraction of each tensor's values kept")


class RandomChannel(Section):
    name: Literal["random"] = Field(description="keep a uniformly random subset of each tensor's values")
    keep: float = Field(0.1, gt=0, le=1, description="fraction of each tensor's values kept")


ChannelConfig = Annotated[
    Fp16Channel | Bf16Channel | QuantizeChannel | TopKChannel | RandomChannel, Field(discriminator="name")
]


def _one_of_each(chain: list) -> list:
    enc = [c.name for c in chain if c.name in ENCODINGS]
    spa = [c.name for c in chain if c.name in SPARSIFIERS]
    if len(enc) > 1:
        raise ValueError(f"at most one of fp16, bf16, quantize, got {enc}")
    if len(spa) > 1:
        raise ValueError(f"at most one of topk, random, got {spa}")
    return chain


class ChannelsConfig(Section):
    upload: list[ChannelConfig] = Field(default_factory=list, description="channels applied to each update, in order")
    download: list[ChannelConfig] = Field(
        default_factory=list, description="channels applied to the model sent to devices (fp16, bf16, quantize)"
    )
    error_feedback: bool = Field(
        False, description="the device adds what its last upload's compression dropped to its next update"
    )

    @field_validator("upload")
    @classmethod
    def _upload(cls, chain):
        return _one_of_each(chain)

    @field_validator("download")
    @classmethod
    def _download(cls, chain):
        for i, c in enumerate(chain):
            if c.name in SPARSIFIERS:
                raise ValueError(
                    f"entry {i}: {c.name} would prune the model itself (a device holds no previous model to add a "
                    "sparse difference to); use fp16, bf16 or quantize"
                )
            if c.name == "quantize" and c.stochastic:
                raise ValueError(
                    f"entry {i}: stochastic: set false; the server sends one model per version to every device, "
                    "rounded to nearest"
                )
        return _one_of_each(chain)

    @field_validator("error_feedback")
    @classmethod
    def _feedback(cls, on, info):
        if on and not info.data.get("upload"):
            raise ValueError("needs a lossy upload channel (channels.upload is empty)")
        return on

    def steps(self, direction: str) -> list[Step]:
        return [Step(**c.model_dump()) for c in getattr(self, direction)]


def as_channels(cfg) -> ChannelsConfig | None:
    """A ``ChannelsConfig`` from the section, a plain dict (Python API, the network's JSON) or None."""
    if cfg is None or isinstance(cfg, ChannelsConfig):
        return cfg
    return ChannelsConfig.model_validate(dict(cfg))
