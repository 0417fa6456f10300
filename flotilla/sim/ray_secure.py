"""Secure aggregation on Ray (``secure_aggregation`` with ``runtime: {name: ray}``; see docs/ray.md).

The driver keeps the protocol's state in the driver's :class:`~flotilla.secure.SecureAggregator`,
exactly as in-process: the key rounds, the SecAgg+ graph, the Shamir shares, the simulated
dropouts, the unmasking and the recovery of dropped clients' masks.  What a client does between
training and sending moves to the actor that trains it:

* :func:`admit_cohort` (driver): each client that in-process would ``add`` an update (it has
  training examples), in cohort order, gets its protocol slot and the seeds of its masks
  (``SecureAggregator.admit``: the self-mask seed and its pairwise seeds, what that client alone
  holds; never another client's secrets or the shares).
* :class:`ActorMasking` (actor): each trained client's delta is encoded into the ring (clipped to
  L2 norm S first under user-level DP, with the same :func:`~flotilla.secure.aggregator.encode_input`;
  with ``quantize_bits``, the quantised narrow ring and the same stochastic rounding draws, from
  the same (session seed, round, slot)),
  masked with its seeds (:func:`~flotilla.secure.protocol.add_masks`) and added mod 2^bits into
  the actor's one partial sum; the actor returns that sum and the slots in it.
* The driver adds the partial sums into the protocol server (``receive_masked_sum``) and calls
  ``result()``: unmask, remove the dropped clients' masks, decode, (noise,) divide.

Ring sums are exact, so the final weights are the in-process ones bit for bit, for any number of
actors (the clients' deltas themselves are bit-identical when actors and driver train with the same
torch thread count).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from flotilla.core.aggregate import RoundAborted
from flotilla.secure.aggregator import SecureAggregator, encode_input, rounding_rng
from flotilla.secure.encoding import FixedPointEncoder, QuantizedEncoder
from flotilla.secure.prg import PRG
from flotilla.secure.protocol import add_masks


@dataclass(frozen=True)
class MaskingSpec:
    """The public encoding parameters an actor needs to encode and mask its clients' inputs."""

    clip: float
    cohort: int
    bits: int
    max_weight: float
    l2_clip: float | None
    quantize_bits: int | None = None  # channels.upload quantize: the narrow ring (QuantizedEncoder)
    stochastic: bool = True
    session_seed: int | None = None  # with quantize_bits: seeds each client's rounding, as in-process
    round: int = 0

    @classmethod
    def of(cls, agg: SecureAggregator) -> MaskingSpec:
        e = agg.encoder
        if isinstance(e, QuantizedEncoder):
            return cls(
                e.clip,
                agg.cohort,
                agg.bits,
                agg.max_weight,
                agg.l2_clip,
                e.value_bits,
                e.stochastic,
                agg.session_seed,
                agg.rounds,
            )
        return cls(e.clip, agg.cohort, agg.bits, agg.max_weight, agg.l2_clip)

    def encoder(self) -> FixedPointEncoder | QuantizedEncoder:
        if self.quantize_bits is None:
            return FixedPointEncoder(self.clip, self.cohort, self.bits)
        return QuantizedEncoder(self.clip, self.cohort, self.quantize_bits, self.stochastic)


def admit_cohort(agg: SecureAggregator, clients: list[int], weight_of) -> tuple[dict, list[int], RoundAborted | None]:
    """``(masks, to_train, aborted)``: ``masks[c] = (slot, seeds)`` for each client that sends a masked
    input this round, admitted in cohort order as SyncFedAvg's ``add`` calls would be (``weight_of(c)``
    is its weight, or None for a client without training examples, which never adds).  If the protocol
    aborts at a client (too few parties left), in-process training stops after that client:
    ``to_train`` is the cohort up to it and ``aborted`` the error."""
    agg.reset()
    masks = {}
    for i, c in enumerate(clients):
        weight = weight_of(c)
        if weight is None:
            continue
        try:
            admitted = agg.admit(weight, c)
        except RoundAborted as e:
            return {}, clients[: i + 1], e
        if admitted is not None:
            masks[c] = admitted
    return masks, clients, None


class ActorMasking:
    """An actor's clients' masked inputs, summed mod 2^bits (the actor holds only this sum)."""

    def __init__(self, spec: MaskingSpec, numel: int):
        self.spec = spec
        self.encoder = spec.encoder()
        self.prg = PRG(numel + 1, self.encoder.dtype)
        self.ring = np.empty(numel + 1, self.encoder.dtype)
        self.sum = np.zeros(numel + 1, self.encoder.dtype)
        self.reset()

    def reset(self) -> None:
        self.sum.fill(0)
        self.slots: list[int] = []
        self.clipped = self.l2_clipped = self.fallbacks = 0
        self.seconds = 0.0

    def add(self, delta: torch.Tensor, weight: float, slot: int, seeds) -> None:
        """One client: encode ``weight / max_weight * delta``, add it and its masks into the sum."""
        t0 = time.perf_counter()
        spec = self.spec
        rng = rounding_rng(spec.session_seed, spec.round, slot) if spec.quantize_bits and spec.stochastic else None
        clipped, l2, fell_back = encode_input(
            self.encoder, delta, weight / spec.max_weight, spec.l2_clip, self.ring, rng
        )
        np.add(self.sum, self.ring, out=self.sum)
        add_masks(self.sum, seeds, self.prg)
        self.slots.append(slot)
        self.clipped += clipped
        self.l2_clipped += l2
        self.fallbacks += fell_back
        self.seconds += time.perf_counter() - t0

    def reply(self) -> dict:
        return {
            "slots": list(self.slots),
            "clipped": self.clipped,
            "l2_clipped": self.l2_clipped,
            "fallbacks": self.fallbacks,
            "seconds": self.seconds,
        }


def receive(agg: SecureAggregator, total: np.ndarray, info: dict, failed_slots: list[int]) -> None:
    """One actor's partial masked sum into the driver's protocol; its failed clients are dropouts
    before sending (their masks are recovered like any such dropout's)."""
    for slot in failed_slots:
        agg.drop(slot)
    if info["slots"]:
        agg.receive_masked_sum(info["slots"], total, info["clipped"], info["l2_clipped"], info.get("fallbacks", 0))
    agg.timing["client_s"] += info["seconds"]
