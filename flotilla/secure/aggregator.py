"""``SecureAggregator``: the synchronous aggregator interface (see flotilla/core/aggregate.py) run
through the secure-aggregation protocol, with every party simulated in this process.

The cohort size is fixed up front: on the first ``add`` of a round the key rounds (0 and 1) run for
``cohort`` protocol slots, as a deployment would run them before training.  The i-th ``add`` of a
round is the client in slot i: it clips and encodes ``weight * delta`` (plus the weight itself as an
extra coordinate), masks it and sends it.  The server only ever holds the running sum of masked
vectors.  ``result()`` runs the unmasking round and returns the weighted mean.  Slots that never
receive an ``add`` are clients that dropped before sending their masked input; their pairwise masks
are removed through the survivors' shares.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from flotilla.core.aggregate import Aggregator, UpdateRejected, check_update
from flotilla.secure.encoding import FixedPointEncoder, QuantizedEncoder
from flotilla.secure.errors import SecAggAborted
from flotilla.secure.graph import default_degree
from flotilla.secure.prg import PRG
from flotilla.secure.protocol import SecAggClient, SecAggConfig, SecAggServer

STAGES = ("advertise", "share", "mask", "unmask")


@dataclass
class DropoutSim:
    """Which protocol slots drop out, and before finishing which stage.

    The rates are fractions of the cohort (rounded to whole clients) dropping:
      advertise: before advertising keys         -> its update is lost
      share:     before sharing its secrets      -> lost
      mask:      before sending its masked input -> lost; its pairwise masks are recovered
      unmask:    after its masked input, before revealing shares -> its update IS in the sum
    ``slots`` pins stages for given slots (1-based arrival order), overriding the rates.
    """

    advertise: float = 0.0
    share: float = 0.0
    mask: float = 0.0
    unmask: float = 0.0
    seed: int = 0
    slots: dict[int, str] = field(default_factory=dict)

    def draw(self, cohort: int, round_: int) -> dict[int, str]:
        rng = np.random.default_rng([self.seed, round_])
        order = (rng.permutation(cohort) + 1).tolist()
        out: dict[int, str] = {}
        for stage in STAGES:
            for _ in range(round(getattr(self, stage) * cohort)):
                if order:
                    out[order.pop()] = stage
        for slot, stage in self.slots.items():
            if stage not in STAGES:
                raise ValueError(f"dropout stage must be one of {STAGES}, got {stage!r}")
            out[slot] = stage
        return out


def encode_input(
    encoder: FixedPointEncoder | QuantizedEncoder,
    delta: torch.Tensor,
    factor: float,
    l2_clip: float | None,
    out: np.ndarray,
    rng: np.random.Generator | None = None,
) -> tuple[int, int, int]:
    """A client's protocol input into ``out`` (``numel + 1`` ring elements): ``factor * delta`` encoded
    (first scaled to L2 norm <= ``l2_clip`` if set), then ``factor`` itself (the weight travels masked
    too).  Returns (coordinates outside [-clip, clip], 1 if the delta was L2-clipped else 0, 1 if a
    quantised encoding fell back to rounding toward zero to stay within ``l2_clip`` else 0).
    A :class:`QuantizedEncoder` rounds stochastically with ``rng``; with ``l2_clip`` what it encodes
    keeps L2 norm <= l2_clip (:meth:`QuantizedEncoder.encode_bounded`), so DP's sensitivity is unchanged."""
    d = delta.detach().cpu().numpy()
    l2_clipped = 0
    if l2_clip is not None:  # client side: bound the update's L2 norm first
        norm = float(np.linalg.norm(d.astype(np.float64)))
        if norm > l2_clip:
            d = d * np.float32(l2_clip / norm)
            l2_clipped = 1
    clipped = int(np.count_nonzero(np.abs(d) > encoder.clip))
    if isinstance(encoder, QuantizedEncoder):
        fell_back = False
        if l2_clip is not None:
            out[:-1], fell_back = encoder.encode_bounded(d, l2_clip, factor, rng)
        else:
            out[:-1] = encoder.encode(d, factor, rng)
        out[-1] = encoder.encode([encoder.clip], factor, rng)[0]
        return clipped, l2_clipped, int(fell_back)
    out[:-1] = encoder.encode(d, factor)
    out[-1] = encoder.encode([encoder.clip], factor)[0]
    return clipped, l2_clipped, 0


def rounding_rng(session_seed: int | None, round_: int, slot: int) -> np.random.Generator:
    """A client's stochastic rounding into a quantised ring: replayable from (session_seed, round, slot)
    in the simulator (any runtime draws the same), fresh entropy when session_seed is None."""
    if session_seed is None:
        return np.random.default_rng()
    return np.random.default_rng([int(session_seed) & (2**63 - 1), 0x51A6, round_, slot])


class SecureAggregator(Aggregator):
    """Weighted mean of client deltas where the server sees only masked vectors and their sum.

    numel:      model size.
    cohort:     clients per round (protocol slots); more ``add`` calls in a round are rejected.
    clip:       per-coordinate bound on each delta; larger values are clipped (counted in ``clipped``).
    max_weight: public bound on a client's weight; the weight w enters as w / max_weight <= 1.
    bits:       ring Z_{2^bits}; 32 is faster, 64 gives ~2^19 times finer quantisation.
    degree:     None: complete graph (Bonawitz); "auto": SecAgg+ with ~4 log2(cohort) neighbours; or k.
    threshold:  shares needed to recover a secret (default: strict majority of a neighbourhood).
    dropout:    simulated dropouts (DropoutSim).
    noise_fn:   optional central-DP hook: applied by the server to the unmasked weighted sum
                sum_i (w_i / max_weight) * clip(d_i) (float32 tensor) before dividing by the weight sum.
    l2_clip:    if set, each client first scales its delta to L2 norm <= l2_clip (client side, before
                encoding; user-level DP's S). Counted in ``l2_clipped``.
    denominator: if set, ``result()`` divides the (noised) sum by this public number (DP-FedAvg's
                expected cohort size) instead of the decoded weight sum.
    session_seed: simulation only: derive each round's session id from (session_seed, round) instead
                of os.urandom, so the SecAgg+ graph, and with dropouts whether a round aborts, replays
                exactly.  Keys and masks stay random (they never change the sum).  A deployment keeps
                the fresh random session.  With ``quantize_bits`` it also seeds each client's stochastic
                rounding (session_seed, round, slot).
    quantize_bits: ``channels.upload: quantize`` under secure aggregation: clients quantise to this many
                bits on the grid the clip sets (shared by all), into Z_{2^(bits + ceil(log2 cohort))}
                (:class:`~flotilla.secure.encoding.QuantizedEncoder`); ``bits`` is then that ring's width.
    stochastic: with quantize_bits: stochastic rounding (unbiased); False rounds to nearest.
    """

    def __init__(
        self,
        numel: int,
        cohort: int,
        *,
        clip: float = 1.0,
        max_weight: float = 1.0,
        bits: int = 32,
        degree: int | str | None = None,
        threshold: int | None = None,
        dropout: DropoutSim | None = None,
        noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        validate: bool = True,
        l2_clip: float | None = None,
        denominator: float | None = None,
        session_seed: int | None = None,
        quantize_bits: int | None = None,
        stochastic: bool = True,
    ):
        if not (math.isfinite(max_weight) and max_weight > 0):
            raise ValueError(f"max_weight: must be a positive finite number, got {max_weight}")
        if l2_clip is not None and not (math.isfinite(l2_clip) and l2_clip > 0):
            raise ValueError(f"l2_clip: must be a positive finite number, got {l2_clip}")
        if denominator is not None and not (math.isfinite(denominator) and denominator > 0):
            raise ValueError(f"denominator: must be a positive finite number, got {denominator}")
        self.numel = numel
        self.cohort = cohort
        self.max_weight = float(max_weight)
        self.degree = default_degree(cohort) if degree == "auto" else degree
        self.threshold = threshold
        if quantize_bits is None:
            self.encoder = FixedPointEncoder(clip, cohort, bits)
        else:
            self.encoder = QuantizedEncoder(clip, cohort, quantize_bits, stochastic)
        self.bits = self.encoder.bits
        self.dropout = dropout or DropoutSim()
        self.noise_fn = noise_fn
        self.validate = validate
        self.l2_clip = l2_clip
        self.denominator = denominator
        self.session_seed = session_seed
        self._prg = PRG(numel + 1, self.encoder.dtype)  # one keystream buffer shared by all simulated parties
        self._ring = np.empty(numel + 1, self.encoder.dtype)
        self._out = torch.zeros(numel)
        self.rounds = 0
        self.timing = {"client_s": 0.0, "server_s": 0.0}  # cumulative protocol compute, for benchmarks
        self.reset()

    def reset(self) -> None:
        self._server: SecAggServer | None = None
        self._clients: dict[int, SecAggClient] = {}
        self._bundles = {}
        self._aborted: SecAggAborted | None = None
        self._slots: dict[int, object] = {}  # slot -> caller's client id
        self._done = False
        self.count = 0
        self.included: list = []  # client ids whose update is in the result
        self.dropped: dict = {}  # client id -> stage it dropped at
        self.clipped = 0
        self.l2_clipped = 0  # updates scaled down to l2_clip this round
        self.fallbacks = 0  # quantised updates rounded toward zero to stay within l2_clip
        self._timing0 = dict(self.timing)

    @property
    def config(self) -> SecAggConfig | None:
        return self._server.config if self._server else None

    # -- protocol plumbing --------------------------------------------------------------
    def _timed(self, side: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.timing[side] += time.perf_counter() - t0

    def _setup(self) -> None:
        """Rounds 0 and 1 for every slot (data-independent: a deployment runs them before training)."""
        session = {}
        if self.session_seed is not None:
            session["session"] = hashlib.sha256(
                b"flotilla-sim-session"
                + int(self.session_seed).to_bytes(8, "big", signed=True)
                + self.rounds.to_bytes(8, "big")
            ).digest()[:16]
        cfg = SecAggConfig(
            length=self.numel + 1,
            cohort=self.cohort,
            bits=self.bits,
            degree=self.degree,
            threshold=self.threshold,
            **session,
        )
        self._server = server = SecAggServer(cfg, self._prg)
        self._stages = self.dropout.draw(self.cohort, self.rounds)
        self.rounds += 1
        self._clients = {s: SecAggClient(s, cfg, self._prg) for s in range(1, self.cohort + 1)}
        try:
            live = [s for s in self._clients if self._stages.get(s) != "advertise"]
            for s in live:
                server.receive_advertise(self._timed("client_s", self._clients[s].advertise))
            directory = self._timed("server_s", server.close_advertise)
            live = [s for s in live if self._stages.get(s) != "share"]
            for s in live:
                server.receive_shares(self._timed("client_s", self._clients[s].share_keys, directory))
            self._bundles = self._timed("server_s", server.close_shares)
        except SecAggAborted as e:
            self._aborted = e

    # -- aggregator interface -----------------------------------------------------------
    def add(self, delta: torch.Tensor, weight: float = 1.0, client: int | str | None = None) -> None:
        where = f"update from client {client}" if client is not None else "update"
        if self._done:
            raise UpdateRejected(f"{where}: the round is finished; call reset() first")
        if self.validate:
            check_update(delta, self.numel, where)
        slot = self._admit(weight, client, where)
        if slot is None:
            return
        t0 = time.perf_counter()
        clipped, l2_clipped, fell_back = encode_input(
            self.encoder, delta, weight / self.max_weight, self.l2_clip, self._ring, self.rounding(slot)
        )
        self.clipped += clipped
        self.l2_clipped += l2_clipped
        self.fallbacks += fell_back
        msg = self._clients[slot].masked_input(self._bundles[slot], self._ring)
        self.timing["client_s"] += time.perf_counter() - t0
        self._timed("server_s", self._server.receive_masked_input, msg)
        self._include(slot)

    def _admit(self, weight: float, client, where: str) -> int | None:
        """The slot of this round's next client, or None when it drops out before sending its input."""
        if not (math.isfinite(weight) and weight > 0):
            raise UpdateRejected(f"{where}: weight must be a positive finite number, got {weight}")
        if weight > self.max_weight:
            raise UpdateRejected(
                f"{where}: weight {weight} exceeds max_weight {self.max_weight} "
                f"(secure aggregation needs a public bound on weights; raise max_weight)"
            )
        if len(self._slots) >= self.cohort:
            raise UpdateRejected(f"{where}: this round already has {self.cohort} clients (the cohort size)")
        if self._server is None:
            self._setup()
        if self._aborted is not None:
            raise self._aborted
        slot = len(self._slots) + 1
        self._slots[slot] = client
        stage = self._stages.get(slot)
        if stage in ("advertise", "share", "mask"):
            self.dropped[client] = stage  # this update never reaches the server
            return None
        return slot

    def _include(self, slot: int) -> None:
        client = self._slots[slot]
        self.count += 1
        self.included.append(client)
        if self._stages.get(slot) == "unmask":
            self.dropped[client] = "unmask"  # included, but will not help unmask

    # -- the client's part elsewhere (a runtime whose clients train in other processes) ----------
    def admit(self, weight: float, client) -> tuple[int, list[tuple[bytes, int]]] | None:
        """``add`` without the delta, for a client trained elsewhere (a Ray actor): its slot and the seeds
        of its masks (what that client alone holds), or None when it drops out before sending its input.
        The trainer then encodes with :func:`encode_input` (factor ``weight / max_weight``), masks with
        :func:`~flotilla.secure.protocol.add_masks`, and sums; :meth:`receive_masked_sum` takes the sums."""
        where = f"update from client {client}"
        if self._done:
            raise UpdateRejected(f"{where}: the round is finished; call reset() first")
        slot = self._admit(weight, client, where)
        if slot is None:
            return None
        return slot, self._timed("client_s", self._clients[slot].mask_seeds, self._bundles[slot])

    def drop(self, slot: int, stage: str = "mask") -> None:
        """An admitted client whose input never came (its training failed): a dropout before sending."""
        self.dropped[self._slots[slot]] = stage

    def receive_masked_sum(
        self, slots: list[int], total: np.ndarray, clipped: int = 0, l2_clipped: int = 0, fallbacks: int = 0
    ) -> None:
        """The sum mod 2^bits of the masked inputs of the admitted ``slots``, with the clients' clip counts."""
        self._timed("server_s", self._server.receive_masked_sum, self._server.config.session, slots, total)
        for slot in sorted(slots):
            self._include(slot)
        self.clipped += clipped
        self.l2_clipped += l2_clipped
        self.fallbacks += fallbacks

    def rounding(self, slot: int) -> np.random.Generator | None:
        """The stochastic rounding of the client in ``slot`` this round (quantised rings only)."""
        if not isinstance(self.encoder, QuantizedEncoder) or not self.encoder.stochastic:
            return None
        return rounding_rng(self.session_seed, self.rounds, slot)

    @property
    def upload_bytes(self) -> int:
        """Bytes of one masked input on the wire: numel + 1 ring elements of ``bits`` bits, packed."""
        return -(-(self.numel + 1) * self.bits // 8)

    def result(self) -> torch.Tensor:
        if self._done:
            return self._out
        if self._aborted is not None:
            raise self._aborted
        if self.count == 0:
            raise RuntimeError("no updates to aggregate")
        server = self._server
        try:
            request = self._timed("server_s", server.close_masked_input)
            for slot in sorted(request.survivors):
                if self._stages.get(slot) != "unmask":
                    server.receive_unmask(self._timed("client_s", self._clients[slot].unmask, request))
            t0 = time.perf_counter()
            total = server.finish()
        except SecAggAborted as e:
            self._aborted = e  # every later call reports the same abort
            self._clients, self._bundles = {}, {}
            raise
        dec = self.encoder.decode_sum(total, self.count)
        weight_sum = dec[-1] / self.encoder.clip  # sum_i w_i / max_weight
        if self.denominator is None and not weight_sum > 0:  # (quantised weights far below max_weight)
            raise SecAggAborted(
                "secure aggregation: the unmasked weight sum is not positive (raise the weights' share of max_weight)"
            )
        s = torch.from_numpy(dec[:-1]).to(torch.float32)
        if self.noise_fn is not None:
            s = self.noise_fn(s)
        torch.div(s, weight_sum if self.denominator is None else self.denominator, out=self._out)
        self.timing["server_s"] += time.perf_counter() - t0
        self.weight_sum = weight_sum * self.max_weight
        self._done = True
        self._clients, self._bundles = {}, {}  # secrets of the finished round are gone
        return self._out

    def error_bound(self) -> float:
        """Worst-case per-coordinate error of the last result() against the exact weighted mean of the
        clipped deltas: fixed-point quantisation plus float32 rounding of the output."""
        n, step, clip = self.count, self.encoder.step, self.encoder.clip
        if self.denominator is not None:  # S' / m: only the sum's error, |dS| <= n*step
            return n * step / self.denominator + clip * n / self.denominator * 2.0**-22
        wn = self.weight_sum / self.max_weight  # decoded sum of w_i / max_weight
        # Sum S and weight sum W decode with |dS| <= n*step and |dW| <= n*step/clip (module encoding).
        # S/W is a weighted mean of values in [-clip, clip], so |S'/W' - S/W| <= (|dS| + clip*|dW|) / W'.
        return 2 * n * step / wn + clip * 2.0**-22

    # -- what a round loop records and checkpoints ---------------------------------------
    def round_metrics(self) -> dict[str, int]:
        """This round's protocol outcome and compute for the metrics record.  ``secagg_clipped`` (coordinates
        outside [-clip, clip]) and ``secagg_l2_clipped`` are simulator diagnostics: in a deployment
        they are known only to each client."""
        out = {
            "secagg_updates": self.count,
            "secagg_dropped": len(self.dropped),
            "secagg_clipped": self.clipped,
            # protocol compute this round (all simulated clients together / the server), seconds
            "secagg_client_s": round(self.timing["client_s"] - self._timing0["client_s"], 4),
            "secagg_server_s": round(self.timing["server_s"] - self._timing0["server_s"], 4),
        }
        if self.l2_clip is not None:
            out["secagg_l2_clipped"] = self.l2_clipped
        if isinstance(self.encoder, QuantizedEncoder):  # channels.upload: quantize, in the ring
            out["secagg_ring_bits"] = self.bits
            out["secagg_upload_bytes"] = self.upload_bytes  # one masked input, packed
            if self.l2_clip is not None:
                out["secagg_ring_fallbacks"] = self.fallbacks
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The round counter that seeds the simulated dropouts (so a resumed run draws the same ones)."""
        return {"rounds": torch.tensor(self.rounds)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.rounds = int(state["rounds"])
