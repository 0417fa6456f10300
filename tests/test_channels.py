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
    draws = torch.stack([quantize(x, 2, generator=g) for _ in range(4000)])
    step = (x.max() - x.min()) / 3
    # mean over many draws approaches x (standard error <= step / 2 / sqrt(4000) ~ 0.008 step)
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
