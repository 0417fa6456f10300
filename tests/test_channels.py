"""Channels (issue 19): quantisation, sparsification, byte accounting, error feedback, composition."""

from __future__ import annotations

import pytest
import torch

from flotilla.channels.quantize import dequantize, quantize, quantize_codes
from flotilla.channels.sparsify import random_sparsify, topk_sparsify

# ---------------------------------------------------------------- quantize


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_error_within_one_step(bits, per_channel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g) * torch.arange(1, 7).float()[:, None]
    for stochastic in (False, True):
        y = quantize(x, bits, per_channel=per_channel, stochastic=stochastic, generator=g)
        assert y.shape == x.shape and y.dtype == torch.float32
        rows = x.reshape(6 if per_channel else 1, -1)
        step = (rows.max(1).values - rows.min(1).values) / (2**bits - 1)
        err = (y - x).abs().reshape(rows.shape)
        bound = step[:, None] * (1.0 if stochastic else 0.5) + 1e-6
        assert bool((err <= bound).all())
        # at most 2**bits distinct values per group
        for r in y.reshape(rows.shape):
            assert r.unique().numel() <= 2**bits


def test_quantize_per_channel_is_finer_than_per_tensor():
    x = torch.randn(8, 16) * torch.logspace(-3, 0, 8)[:, None]
    per_t = (quantize(x, 4, stochastic=False) - x).abs().mean()
    per_c = (quantize(x, 4, per_channel=True, stochastic=False) - x).abs().mean()
    assert per_c < per_t / 2


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, generator=g)
    draws = torch.stack([quantize(x, 2, generator=g) for _ in range(2000)])
    step = (x.max() - x.min()) / 3
    # mean over many draws approaches x (standard error <= step / 2 / sqrt(2000) ~ 0.011 step)
    assert (draws.mean(0) - x).abs().max() < 0.05 * step
    det = quantize(x, 2, stochastic=False)
    assert (det - x).abs().max() > 0.2 * step  # deterministic rounding is visibly biased per coordinate


def test_quantize_codes_roundtrip_and_constant_tensor():
    x = torch.randn(3, 4)
    codes, scale, zero = quantize_codes(x, 3, per_channel=True, stochastic=False)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 7 and scale.numel() == 3 and zero.numel() == 3
    assert torch.equal(dequantize(codes, scale, zero), quantize(x, 3, per_channel=True, stochastic=False))
    c = torch.full((5,), 0.25)
    assert torch.equal(quantize(c, 1), c)


@pytest.mark.parametrize("bad", [0, 9, 2.0, True])
def test_quantize_refuses_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.ones(3), bad)


def test_quantize_refuses_non_finite():
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([1.0, float("nan")]), 4)


# ---------------------------------------------------------------- sparsify


def test_topk_keeps_the_largest():
    x = torch.tensor([[0.1, -5.0, 0.2], [3.0, -0.05, 0.0]])
    y = topk_sparsify(x, 2 / 6)
    assert torch.equal(y, torch.tensor([[0.0, -5.0, 0.0], [3.0, 0.0, 0.0]]))


def test_random_sparsify_count_seed_and_values():
    x = torch.randn(10, 10) + 10  # no zeros, so nonzeros count the kept coordinates
    a = random_sparsify(x, 0.3, torch.Generator().manual_seed(3))
    b = random_sparsify(x, 0.3, torch.Generator().manual_seed(3))
    c = random_sparsify(x, 0.3, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int((a != 0).sum()) == 30
    kept = a != 0
    assert torch.equal(a[kept], x[kept])


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, float("nan")])
def test_sparsify_refuses_bad_fraction(bad):
    with pytest.raises(ValueError, match="keep_fraction"):
        topk_sparsify(torch.ones(4), bad)
    with pytest.raises(ValueError, match="keep_fraction"):
        random_sparsify(torch.ones(4), bad, None)


# ---------------------------------------------------------------- codec: bytes by hand, wire == simulator

from flotilla.channels.codec import Codec, Step  # noqa: E402
from flotilla.channels.config import ChannelsConfig  # noqa: E402
from flotilla.channels.device import DeviceChannels  # noqa: E402
from flotilla.channels.sparsify import topk_mask  # noqa: E402

SHAPES = [(8, 5), (8,), (3, 4, 2)]  # a weight, a bias, a 3-D weight: 72 values


@pytest.mark.parametrize(
    "steps, expected",
    [
        ([], 4 * 72),
        ([Step("fp16")], 2 * 72),
        ([Step("bf16")], 2 * 72),
        # 3 bits per tensor: ceil(40*3/8)+8+4, bias fp32 8*4, ceil(24*3/8)+8+4
        ([Step("quantize", bits=3)], (15 + 12) + 32 + (9 + 12)),
        # 4 bits per output channel: 20 + 8 groups x 12, bias 32, 12 + 3 groups x 12
        ([Step("quantize", bits=4, per_channel=True)], (20 + 96) + 32 + (12 + 36)),
        # top-10%: nnz 4 / 1 / 2; bitmaps 5 / 1 / 3 bytes beat COO 64 / 8 / 48; values 4 bytes each
        ([Step("topk", keep=0.1)], (5 + 16) + (1 + 4) + (3 + 8)),
        # random half, then fp16 values: nnz 20 / 4 / 12
        ([Step("random", keep=0.5), Step("fp16")], (5 + 40) + (1 + 8) + (3 + 24)),
        # top-k then 2-bit codes of the kept values, per channel on the 2-D+ tensors; bias kept values fp32
        (
            [Step("topk", keep=0.5), Step("quantize", bits=2, per_channel=True)],
            (5 + 5 + 96) + (1 + 16) + (3 + 3 + 36),
        ),
    ],
)
def test_message_bytes_match_hand_counts(steps, expected):
    codec = Codec(steps, SHAPES)
    assert codec.message_bytes == expected
    x = torch.randn(codec.numel)
    data, sent = codec.encode(x, torch.Generator().manual_seed(0))
    assert len(data) == expected  # the wire format is the accounted one
    assert torch.equal(codec.decode(data), sent)  # and decodes to what the simulator uses


def test_coo_chosen_when_smaller_than_the_bitmap():
    codec = Codec([Step("topk", keep=0.001)], [(100, 100)])
    # nnz 10: COO 10 x 2 x 8 = 160 < bitmap 1250; plus 10 x 4 value bytes
    assert codec.message_bytes == 160 + 40
    x = torch.randn(10_000)
    data, sent = codec.encode(x)
    assert len(data) == 200 and torch.equal(codec.decode(data), sent)
    assert torch.equal(sent != 0, torch.zeros(10_000, dtype=torch.bool).index_fill_(0, topk_mask(x, 0.001), True))
    assert Codec([Step("topk", keep=0.01)], [(100, 100)]).message_bytes == 1250 + 400  # COO 1600 > bitmap 1250


def test_malformed_payloads_are_refused():
    codec = Codec([Step("topk", keep=0.1)], SHAPES)
    data, _ = codec.encode(torch.randn(72))
    with pytest.raises(ValueError, match="bytes"):
        codec.decode(data[:-1])
    bad = bytearray(data)
    bad[0] = 0xFF  # the first tensor's bitmap now marks more than its 4 values
    with pytest.raises(ValueError, match="bitmap"):
        codec.decode(bytes(bad))
    coo = Codec([Step("topk", keep=0.001)], [(100, 100)])
    data, _ = coo.encode(torch.randn(10_000))
    bad = bytearray(data)
    bad[0:8] = (500).to_bytes(8, "little")  # a row index outside the tensor
    with pytest.raises(ValueError, match="outside"):
        coo.decode(bytes(bad))


def test_composition_order_changes_what_is_sent():
    x = torch.linspace(-1.0, 3.0, 40)[torch.randperm(40, generator=torch.Generator().manual_seed(0))].reshape(8, 5)
    mask = torch.zeros(40, dtype=torch.bool).index_fill_(0, topk_mask(x, 0.25), True)
    first = Codec([Step("topk", keep=0.25), Step("quantize", bits=2, stochastic=False)], [(8, 5)])
    second = Codec([Step("quantize", bits=2, stochastic=False), Step("topk", keep=0.25)], [(8, 5)])
    assert first.message_bytes == second.message_bytes
    a, b = first.apply(x.reshape(-1)), second.apply(x.reshape(-1))
    # sparsify first: the kept coordinates are x's top 25%, then quantised (zeros inside the range)
    assert bool((a[~mask] == 0).all())
    step = (max(x.max(), 0) - min(x.min(), 0)) / 3
    assert float((a[mask] - x.reshape(-1)[mask]).abs().max()) <= step / 2 + 1e-6
    # quantise first: 4 levels over x's range, then the 10 largest dequantised magnitudes
    levels = torch.unique(Codec([Step("quantize", bits=2, stochastic=False)], [(8, 5)]).apply(x.reshape(-1)))
    assert int((b != 0).sum()) == 10 and all(bool((levels == v).any()) for v in b[b != 0])
    assert not torch.equal(a, b)


# ---------------------------------------------------------------- device side: error feedback, DP clipping


def _device(upload, error_feedback=False, clip=None, shapes=SHAPES):
    cfg = ChannelsConfig.model_validate({"upload": upload, "error_feedback": error_feedback})
    return DeviceChannels(cfg, shapes, clip)


def test_error_feedback_sent_plus_residual_equals_the_true_updates():
    dev = _device([{"name": "topk", "keep": 0.1}, {"name": "quantize", "bits": 4}], error_feedback=True)
    g = torch.Generator().manual_seed(5)
    residual, sent_total, true_total = None, torch.zeros(72), torch.zeros(72)
    for t in range(6):
        delta = torch.randn(72, generator=g)
        _, sent, residual = dev.upload(delta, seed=t, residual=residual)
        sent_total += sent
        true_total += delta
        assert int((sent != 0).sum()) <= 8  # what travels is sparse
    assert torch.allclose(sent_total + residual, true_total, atol=1e-5)
    # without error feedback the dropped mass is simply lost
    plain = _device([{"name": "topk", "keep": 0.1}])
    _, sent, none = plain.upload(torch.ones(72), seed=0, residual=None)
    assert none is None and float(sent.sum()) < 72


def test_dp_clips_before_compressing():
    delta = torch.randn(72) * 10  # norm ~ 85, clip norm 1
    dev = _device([{"name": "topk", "keep": 0.2}], error_feedback=True, clip=1.0)
    _, sent, residual = dev.upload(delta, seed=0, residual=None)
    clipped = delta / float(torch.linalg.vector_norm(delta))
    # the residual is what compression dropped from the CLIPPED update: clip came first
    assert torch.allclose(sent + residual, clipped, atol=1e-6)
    assert float(torch.linalg.vector_norm(sent)) <= 1.0 + 1e-6


# ---------------------------------------------------------------- composition in the simulators

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from flotilla.core.client import ClientSpec  # noqa: E402
from flotilla.experiment.compose import build_algorithm  # noqa: E402
from flotilla.sim.parallel import ParallelFedAvg  # noqa: E402
from flotilla.sim.sync import SyncFedAvg  # noqa: E402
from tests.helpers import synthetic_dataset  # noqa: E402

TOPK_Q = {"upload": [{"name": "topk", "keep": 0.25}, {"name": "quantize", "bits": 4}], "download": [{"name": "fp16"}]}


def _sync_kw(**extra):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    data = synthetic_dataset(num_clients=12, per_client=6)
    kw = dict(model=model, dataset=data, loss_fn=F.cross_entropy, cohort=4, client=ClientSpec(steps=2, batch_size=3))
    return {**kw, **extra}


def test_sync_rounds_report_compressed_bytes():
    algo, _ = build_algorithm(SyncFedAvg, _sync_kw(), rounds=2, channels={**TOPK_Q, "error_feedback": True})
    r1, r2 = algo.step(), algo.step()
    shapes = [(8, 5), (8,), (3, 8), (3,)]
    up = Codec([Step("topk", keep=0.25), Step("quantize", bits=4)], shapes).message_bytes
    assert r1["bytes_up"] == 4 * up and r2["bytes_up"] == 8 * up
    assert r2["bytes_down"] == 8 * 2 * 75  # fp16 of 75 parameters, 4 clients a round
    assert up < 4 * 75 / 4  # more than 4x smaller than fp32
    # the error-feedback residuals are checkpointed: a resumed run continues with them
    state = algo.state_dict()
    assert sum(k.startswith("channels.residual.") for k in state) == r2["residual_clients"] > 0
    again, _ = build_algorithm(SyncFedAvg, _sync_kw(), rounds=3, channels={**TOPK_Q, "error_feedback": True})
    again.load_state_dict(state)
    assert torch.equal(again.step()["train_loss"] * torch.ones(1), algo.step()["train_loss"] * torch.ones(1))
    assert torch.equal(again.weights, algo.weights)


def test_channels_leave_the_dp_accountant_unchanged():
    dp = {"user_level": {"clip_norm": 0.5, "noise_multiplier": 1.0, "delta": 1e-3}}
    plain, _ = build_algorithm(SyncFedAvg, _sync_kw(weighting="uniform"), rounds=2, privacy=dp)
    packed, _ = build_algorithm(SyncFedAvg, _sync_kw(weighting="uniform"), rounds=2, privacy=dp, channels=TOPK_Q)
    assert packed.inner.trainer.channels.clip_norm == 0.5  # the device clips to S before compressing
    a, b = plain.step(), packed.step()
    assert a["epsilon"] == b["epsilon"] > 0


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: build_algorithm(ParallelFedAvg, _sync_kw(workers=2), rounds=1, channels=TOPK_Q), "ParallelFedAvg"),
        (
            lambda: build_algorithm(SyncFedAvg, _sync_kw(), rounds=1, secure_aggregation={}, channels=TOPK_Q),
            "channels.upload: not with secure_aggregation",
        ),
        (
            lambda: build_algorithm(
                SyncFedAvg,
                _sync_kw(weighting="uniform"),
                rounds=1,
                privacy={
                    "user_level": {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3, "adaptive_clipping": {}}
                },
                channels=TOPK_Q,
            ),
            "adaptive_clipping",
        ),
    ],
)
def test_unsupported_combinations_are_refused_with_the_reason(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_ray_runtime_refused_by_name():
    from flotilla.channels.config import as_channels
    from flotilla.channels.sim import refusal

    assert "RayFedAvg(actors=2)" in refusal(as_channels(TOPK_Q), "RayFedAvg(actors=2)", secure=False, privacy=None)


@pytest.mark.parametrize(
    "channels, key",
    [
        ({"upload": [{"name": "quantize", "bits": 9}]}, "channels.upload.0.quantize.bits"),
        ({"upload": [{"name": "topk", "keep": 1.5}]}, "channels.upload.0.topk.keep"),
        ({"download": [{"name": "topk"}]}, "channels.download"),
        ({"upload": [{"name": "fp16"}, {"name": "quantize"}]}, "channels.upload"),
        ({"error_feedback": True}, "channels.error_feedback"),
        ({"upload": [{"name": "zip"}]}, "channels.upload.0"),
        ({"uplaod": []}, "channels.uplaod"),
    ],
)
def test_bad_config_is_refused_with_the_key(channels, key):
    from flotilla.config import ConfigError, validate

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate({"task": {"name": "fashion-mnist"}, "rounds": 1, "channels": channels})


# ---------------------------------------------------------------- over the network: the same bytes

import threading  # noqa: E402

from tests.network_helpers import PKI, start_server  # noqa: E402


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"), devices=2)


@pytest.mark.parametrize("mode, sealed", [("sync", False), ("async", False), ("async", True)])
def test_network_wire_is_the_compressed_format_with_the_simulators_byte_counts(pki, tmp_path, mode, sealed):
    """sealed: the downloads come from the sealed-download port (network.sealed_download_port), the
    same encoded bytes, counted once each when the port sends them; the compressed uploads go over
    the same port too (network.sealed_uploads), counted as over TLS."""
    from flotilla.network.client import Device

    channels = {**TOPK_Q, "error_feedback": True}
    data = synthetic_dataset(num_clients=2, per_client=12)
    model = lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))  # noqa: E731
    torch.manual_seed(0)
    with start_server(
        pki,
        tmp_path / "s",
        model(),
        mode=mode,
        cohort=2,
        buffer_size=2,
        total_steps=2,
        linger_s=2.0,
        server={"channels": channels, "sealed_download_port": "auto" if sealed else "off", "sealed_uploads": sealed},
    ) as st:
        reports = {}

        def device(i):
            torch.manual_seed(i)
            d = Device(f"localhost:{st.port}", pki.token(i), model(), data, client=i, ca=pki.ca)
            reports[i] = (d.run(), d)

        threads = [threading.Thread(target=device, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        served = st.server.channels
        port = st.server.sealed_port
        sent = None if port is None else (port.counts["sent"], port.uploads[0].counts["used"])
        bytes_out = st.server.observed.bytes_out
    assert sent == ((4, 4) if sealed else None)
    assert bytes_out == served.bytes_down
    assert st.server.coord.version == 2
    uploads = sum(len(r.accepted) for r, _ in reports.values())
    assert uploads == 4  # FedBuff (async): two buffers of two compressed updates each
    assert all(d.residual is not None for _, d in reports.values())  # error feedback kept on the device
    # the simulator's counts for the same model and chain (2 clients x 2 rounds)
    sim, _ = build_algorithm(SyncFedAvg, _sync_kw(cohort=2), rounds=2, channels=channels)
    record = [sim.step() for _ in range(2)][-1]
    assert served.bytes_up == record["bytes_up"] == 4 * served.upload_bytes
    assert served.bytes_down == record["bytes_down"] == 4 * 2 * 75  # fp16 downloads, one per assignment


def test_network_refuses_plain_and_malformed_compressed_uploads(pki, tmp_path):
    from flotilla.network.client import Connection, Refused

    channels = {"upload": [{"name": "topk", "keep": 0.2}]}
    with start_server(pki, tmp_path / "s", cohort=1, server={"channels": channels}) as st:
        with Connection(f"localhost:{st.port}", pki.token(0), ca=pki.ca) as c:
            a = c.check_in(10).assignment
            assert a.channels["upload"][0]["name"] == "topk"
            codec = Codec([Step("topk", keep=0.2)], [(3, 5), (3,)])
            with pytest.raises(Refused, match="dtype 'float32', expected 'channels'"):
                c.upload(a, torch.zeros(18), 10)
            data, _ = codec.encode(torch.randn(18))
            bad = b"\xff" + data[1:]  # the bitmap marks more values than the chain keeps
            with pytest.raises(Refused, match="bitmap"):
                c.upload_raw(a.ticket, a.version, "channels", [18], bad, 10)
            assert c.upload_raw(a.ticket, a.version, "channels", [18], data, 10) == (0, 1)


def test_fleet_counts_compressed_bytes_and_trips_get_shorter():
    from flotilla.channels.sim import message_bytes
    from flotilla.fleet.fleet import make_fleet
    from flotilla.sim.fleet import AsyncFleetSim

    kw = _sync_kw()
    kw.pop("cohort")
    shapes = [tuple(p.shape) for p in kw["model"].parameters()]
    down, up = message_bytes(TOPK_Q, shapes)
    sizes = kw["dataset"].train_sizes.numpy()
    # 1 kbit/s links, so the 300-byte fp32 messages take seconds and compression visibly shortens trips
    slow = dict(population=50, seed=0, train_sizes=sizes, bandwidth_down_mbps=0.001, bandwidth_up_mbps=0.001)
    plain = make_fleet(model_bytes=300, **slow)
    packed = make_fleet(model_bytes=300, download_bytes=down, upload_bytes=up, **slow)
    assert bool((packed.trips(0, 20).duration < plain.trips(0, 20).duration).all())
    algo, _ = build_algorithm(
        AsyncFleetSim, dict(kw, fleet=packed, concurrency=5, buffer_size=3), rounds=1, channels=TOPK_Q
    )
    m = algo.step()
    assert m["bytes_up"] == m["uploads"] * up and m["bytes_down"] == m["trips"] * down == m["trips"] * 150
