"""channels.upload: quantize under secure aggregation (issue 19): quantised into a narrow ring shared by
every device (flotilla.secure.encoding.QuantizedEncoder, flotilla/channels/ring.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flotilla.channels.ring import masked_upload_bytes, ring_bits
from flotilla.core.client import ClientSpec
from flotilla.experiment.compose import build_algorithm
from flotilla.secure import packing
from flotilla.secure.aggregator import DropoutSim, SecureAggregator
from flotilla.secure.encoding import QuantizedEncoder
from flotilla.secure.prg import PRG
from flotilla.secure.protocol import SecAggClient, SecAggConfig, SecAggServer
from flotilla.sim.sync import SyncFedAvg
from tests.helpers import synthetic_dataset


def test_ring_width_is_bits_plus_log2_of_the_summands():
    assert ring_bits(8, 100) == 15 == QuantizedEncoder(1.0, 100, 8).ring_bits  # the example
    assert QuantizedEncoder(1.0, 100, 8).dtype == np.uint16
    assert [ring_bits(4, n) for n in (1, 2, 3, 4, 5, 128, 129)] == [4, 5, 6, 6, 7, 11, 12]
    enc = QuantizedEncoder(0.5, 129, 8)
    worst = np.full(3, enc.codes(np.full(1, enc.K))[0], np.uint64) * 129  # every summand at the top code
    assert int(worst.max()) < 2**enc.ring_bits  # the largest possible sum never wraps


@pytest.mark.parametrize("bits", [3, 8, 15, 16, 20, 25, 32, 33, 60, 64])
def test_packing_round_trips_exactly_in_the_ring_width(bits):
    rng = np.random.default_rng(bits)
    dt = packing.container(bits)
    v = (rng.integers(0, 2**63, 1001, dtype=np.uint64) & np.uint64(2**bits - 1 if bits < 64 else 2**64 - 1)).astype(dt)
    data = bytes(packing.pack(v, bits))
    assert len(data) == packing.packed_bytes(1001, bits) == -(-1001 * bits // 8)
    if bits < 64:  # the documented layout: element i in bits [i*bits, (i+1)*bits), least significant first
        planes = np.unpackbits(v.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, count=bits, bitorder="little")
        assert data == np.packbits(planes.reshape(-1), bitorder="little").tobytes()
    assert np.array_equal(packing.unpack(data, 1001, bits), v)
    with pytest.raises(ValueError, match="expected"):
        packing.unpack(data + b"\0", 1001, bits)
    if (1001 * bits) % 8:  # the padding of the last byte is part of the encoding
        with pytest.raises(ValueError, match="padding"):
            packing.unpack(data[:-1] + bytes([data[-1] | 0x80]), 1001, bits)


def _round(cfg: SecAggConfig, inputs: dict[int, np.ndarray], drop_before_mask=()):
    """One protocol round in the narrow ring; returns the unmasked sum."""
    server = SecAggServer(cfg)
    clients = {u: SecAggClient(u, cfg) for u in inputs}
    for c in clients.values():
        server.receive_advertise(c.advertise())
    directory = server.close_advertise()
    for c in clients.values():
        server.receive_shares(c.share_keys(directory))
    bundles = server.close_shares()
    for u, c in clients.items():
        if u not in drop_before_mask:
            msg = c.masked_input(bundles[u], inputs[u])
            assert int(msg.y.max()) < 2**cfg.bits  # what travels is reduced to the ring's width
            server.receive_masked_input(msg)
    request = server.close_masked_input()
    for u in sorted(request.survivors):
        server.receive_unmask(clients[u].unmask(request))
    return server.finish()


@pytest.mark.parametrize("degree", [None, 4])
def test_masks_cancel_exactly_and_the_sum_equals_the_devices_codes(degree):
    n, numel = 9, 300
    enc = QuantizedEncoder(0.1, n, 8)
    rng = np.random.default_rng(0)
    values = [rng.normal(0, 0.05, numel) for _ in range(n)]
    codes = {u + 1: enc.encode(values[u], 1.0, rng) for u in range(n)}
    cfg = SecAggConfig(length=numel, cohort=n, bits=enc.ring_bits, degree=degree)
    assert cfg.dtype == np.uint16 and cfg.bits == 12
    total = _round(cfg, codes, drop_before_mask=(3,))
    survivors = [u for u in codes if u != 3]
    exact = sum(codes[u].astype(np.int64) for u in survivors)  # integer equality, no tolerance
    assert np.array_equal(total.astype(np.int64), exact)
    dec = enc.decode_sum(total, len(survivors))
    clipped = sum(np.clip(values[u - 1], -0.1, 0.1) for u in survivors)
    assert np.abs(dec - clipped).max() < enc.error_bound(len(survivors))


def test_a_masked_input_outside_the_ring_is_refused_with_state_unchanged():
    cfg = SecAggConfig(length=4, cohort=2, bits=10)
    server, a, b = SecAggServer(cfg), SecAggClient(1, cfg), SecAggClient(2, cfg)
    for c in (a, b):
        server.receive_advertise(c.advertise())
    d = server.close_advertise()
    for c in (a, b):
        server.receive_shares(c.share_keys(d))
    bundles = server.close_shares()
    from flotilla.secure.errors import ProtocolError
    from flotilla.secure.messages import MaskedInput

    with pytest.raises(ProtocolError, match="outside Z_2\\^10"):
        server.receive_masked_input(MaskedInput(cfg.session, 1, np.full(4, 1024, np.uint16)))
    assert server.u3 == frozenset()
    server.receive_masked_input(a.masked_input(bundles[1], np.ones(4, np.uint16)))
    assert server.u3 == {1}


def test_stochastic_rounding_is_unbiased_and_each_summand_within_a_step():
    enc = QuantizedEncoder(1.0, 4, 4)  # step 1/7
    x = np.linspace(-0.99, 0.99, 50)
    rng = np.random.default_rng(1)
    draws = np.stack([enc.decode_sum(enc.encode(x, 1.0, rng), 1) for _ in range(4000)])
    assert np.abs(draws - x).max() < enc.step  # every draw within one step
    # the mean over draws approaches x (standard error <= step / 2 / sqrt(4000) ~ 0.008 step)
    assert np.abs(draws.mean(0) - x).max() < 0.05 * enc.step
    nearest = QuantizedEncoder(1.0, 4, 4, stochastic=False)
    assert np.abs(nearest.decode_sum(nearest.encode(x), 1) - x).max() <= nearest.step / 2 + 1e-12


def test_the_bounded_encoding_never_exceeds_the_dp_norm():
    enc = QuantizedEncoder(0.5, 10, 3)  # a coarse grid: rounding often grows the norm
    rng = np.random.default_rng(2)
    fell = 0
    for _ in range(50):
        x = rng.normal(0, 1, 200)
        x *= 0.5 / np.linalg.norm(x)
        codes, fell_back = enc.encode_bounded(x, 0.5, 1.0, rng)
        k = codes.astype(np.float64) - enc.K
        assert np.linalg.norm(k * enc.step) <= 0.5 + 1e-12
        fell += fell_back
    assert fell > 0  # the fallback (round toward zero) was exercised


def _secure(numel, n, **kw):
    return SecureAggregator(numel, n, clip=0.2, degree="auto", session_seed=5, quantize_bits=8, **kw)


def test_secure_aggregator_mean_within_the_rounding_bound_and_bytes_as_computed():
    n, numel = 12, 500
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(numel, generator=g) * 0.05 for _ in range(n)]
    weights = [float(w) for w in range(1, n + 1)]
    agg = _secure(numel, n, max_weight=float(n), dropout=DropoutSim(slots={4: "mask", 7: "unmask"}))
    for i, (d, w) in enumerate(zip(deltas, weights)):
        agg.add(d, w, i)
    out = agg.result()
    kept = [i for i in range(n) if i != 3]  # slot 4 dropped before its masked input
    w = torch.tensor([weights[i] for i in kept])
    exact = sum(w[k] * deltas[i].clamp(-0.2, 0.2) for k, i in enumerate(kept)) / w.sum()
    assert (out - exact).abs().max() <= agg.error_bound()
    m = agg.round_metrics()
    assert m["secagg_ring_bits"] == 8 + 4 and agg.encoder.dtype == np.uint16
    assert m["secagg_upload_bytes"] == masked_upload_bytes(numel, 8, n) == -(-(numel + 1) * 12 // 8)


def _kw(**extra):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    data = synthetic_dataset(num_clients=12, per_client=6)
    kw = dict(model=model, dataset=data, loss_fn=F.cross_entropy, cohort=4, client=ClientSpec(steps=2, batch_size=3))
    return {**kw, **extra}


Q8 = {"upload": [{"name": "quantize", "bits": 8}]}


def test_sync_rounds_quantise_into_the_ring_and_count_masked_bytes():
    algo, _ = build_algorithm(
        SyncFedAvg, _kw(), rounds=2, secure_aggregation={"clip": 0.5}, channels={**Q8, "download": [{"name": "fp16"}]}
    )
    r1, r2 = algo.step(), algo.step()
    per_upload = masked_upload_bytes(75, 8, 4)  # 76 elements of 10 bits
    assert per_upload == 95 and r1["secagg_upload_bytes"] == per_upload
    assert r1["bytes_up"] == 4 * per_upload and r2["bytes_up"] == 8 * per_upload
    assert r2["bytes_down"] == 8 * 2 * 75  # the download channel still applies


def test_dp_secure_quantised_uses_the_same_accountant():
    dp = {"user_level": {"clip_norm": 0.5, "noise_multiplier": 1.0, "delta": 1e-3}}
    plain, _ = build_algorithm(SyncFedAvg, _kw(weighting="uniform"), rounds=2, privacy=dp, secure_aggregation={})
    quant, _ = build_algorithm(
        SyncFedAvg, _kw(weighting="uniform"), rounds=2, privacy=dp, secure_aggregation={}, channels=Q8
    )
    a, b = plain.step(), quant.step()
    assert a["epsilon"] == b["epsilon"] > 0 and a["noise_multiplier"] == b["noise_multiplier"]
    assert b["secagg_ring_bits"] == 10 and b["secagg_ring_fallbacks"] >= 0
    assert b["dp_updates"] == 4


@pytest.mark.parametrize(
    "upload, match",
    [
        ([{"name": "topk", "keep": 0.5}, {"name": "quantize", "bits": 8}], "topk: a sparse upload's mask"),
        ([{"name": "random", "keep": 0.5}], "random: a sparse upload's mask"),
        ([{"name": "fp16"}], "fp16: floating-point values cannot be summed"),
        ([{"name": "bf16"}], "bf16: floating-point"),
        ([{"name": "quantize", "bits": 8, "per_channel": True}], "quantize per_channel"),
        ([{"name": "quantize", "bits": 1}], "quantize bits 1"),
    ],
)
def test_other_upload_channels_are_refused_under_secure_aggregation(upload, match):
    with pytest.raises(ValueError, match="channels.upload: not with secure_aggregation: " + match.split(":")[0]):
        build_algorithm(SyncFedAvg, _kw(), rounds=1, secure_aggregation={}, channels={"upload": upload})


def test_a_fixed_point_ring_width_with_quantize_is_refused():
    from flotilla.network.secagg import SecAggParams

    with pytest.raises(ValueError, match="secure_aggregation.bits: sets the fixed-point ring"):
        build_algorithm(SyncFedAvg, _kw(), rounds=1, secure_aggregation={"bits": 64}, channels=Q8)
    with pytest.raises(ValueError, match="secure_aggregation.bits: sets the fixed-point ring"):
        SecAggParams(bits=64, quantize_bits=8)


def test_error_feedback_and_other_runtimes_are_refused():
    from flotilla.channels.config import as_channels
    from flotilla.channels.sim import refusal

    with pytest.raises(ValueError, match="channels.error_feedback: not with secure_aggregation"):
        build_algorithm(SyncFedAvg, _kw(), rounds=1, secure_aggregation={}, channels={**Q8, "error_feedback": True})
    why = refusal(as_channels(Q8), "AsyncFleetSim(fedbuff)", secure=True, privacy=None)
    assert why.startswith("channels.upload: quantising into the secure-aggregation ring is wired for SyncFedAvg")


def test_ray_actor_masking_matches_in_process_bit_for_bit():
    from flotilla.sim.ray_secure import ActorMasking, MaskingSpec, admit_cohort, receive

    n, numel = 5, 64
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(numel, generator=g) * 0.05 for _ in range(n)]
    ref = _secure(numel, n)
    for i, d in enumerate(deltas):
        ref.add(d, 1.0, i)
    want = ref.result().clone()
    agg = _secure(numel, n)
    masks, _, aborted = admit_cohort(agg, list(range(n)), lambda c: 1.0)
    assert aborted is None
    actors = [ActorMasking(MaskingSpec.of(agg), numel) for _ in range(2)]
    for c, (slot, seeds) in masks.items():
        actors[c % 2].add(deltas[c], 1.0, slot, seeds)
    for a in actors:
        receive(agg, a.sum, a.reply(), [])
    assert torch.equal(agg.result(), want)


def test_prg_masks_in_a_narrow_container_cancel():
    prg = PRG(10, np.uint16)
    acc = np.arange(10, dtype=np.uint16)
    prg.add_into(acc, b"k" * 32, 1)
    prg.add_into(acc, b"k" * 32, -1)
    assert np.array_equal(acc, np.arange(10, dtype=np.uint16))
