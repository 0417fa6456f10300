"""Opacus' grad-sample modes (privacy.sample_level.grad_sample_mode) give DP-SGD the same clipped,
noised update and the same epsilon as the default hooks path."""

import pytest
import torch
from torch.nn import functional as F

from flotilla.config import ConfigError, validate
from flotilla.core.client import ClientSpec
from flotilla.core.dataset import FederatedDataset
from flotilla.core.flat import FlatModel
from flotilla.privacy import DPLocalTrainer, PrivacyError, SampleLevelSpec, make_dp_compatible
from flotilla.privacy.sample import choose_mode
from flotilla.tasks.models import CharLSTM, SmallCNN

FAST = ("functorch", "ew", "ghost")


def _images(n=24):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return FederatedDataset("img", lambda i: (x[i], y[i]), [torch.arange(n)], [torch.arange(n)])


def _text(n=24, vocab=12, seq=6):
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, vocab, (n, seq + 1), generator=g)
    # inputs sliced from the fetched windows: non-contiguous, as flotilla.data.shakespeare's are
    return FederatedDataset("txt", lambda i: (codes[i][:, :-1], codes[i][:, -1]), [torch.arange(n)], [torch.arange(n)])


def _cnn():
    torch.manual_seed(0)
    return SmallCNN()


def _lstm():
    torch.manual_seed(0)
    return make_dp_compatible(CharLSTM(vocab_size=12, embed_dim=4, hidden=8, layers=1))


def _delta(make, ds, mode, sigma, C=0.05):
    flat = FlatModel(make())
    t = DPLocalTrainer(
        flat,
        F.cross_entropy,
        ClientSpec(steps=2, batch_size=8, lr=0.5),
        SampleLevelSpec(noise_multiplier=sigma, max_grad_norm=C, grad_sample_mode=mode),
    )
    start, d = flat.flat.clone(), torch.empty(flat.numel)
    r = t.train(ds, 0, start, 3, d)
    assert t.mode == mode
    t.close()
    return d, r


@pytest.mark.parametrize("make,data", [(_cnn, _images), (_lstm, _text)], ids=["smallcnn", "dplstm"])
def test_fast_modes_match_hooks_with_and_without_noise(make, data):
    ds = data()
    # sigma 0: the clipped (C small enough that every example is clipped), averaged gradient steps agree
    ref, r_ref = _delta(make, ds, "hooks", 0.0)
    assert ref.abs().sum() > 0 and ref.norm() <= 2 * 0.5 * 0.05 * 24 / 8 * 1.001  # 2 steps of lr * mean clipped
    # sigma 1: the same seeded noise is added to the same clipped sum; epsilon from the same (sigma, q, steps)
    noisy_ref, r_noisy = _delta(make, ds, "hooks", 1.0)
    assert (noisy_ref - ref).norm() > 3 * ref.norm()  # the noise dominates: its std is sigma C lr / B per step
    for mode in FAST:
        d, r = _delta(make, ds, mode, 0.0)
        torch.testing.assert_close(d, ref, rtol=1e-4, atol=1e-6, msg=f"{mode}: clipped gradient differs from hooks")
        noisy, rn = _delta(make, ds, mode, 1.0)
        torch.testing.assert_close(noisy, noisy_ref, rtol=1e-4, atol=1e-6, msg=f"{mode}: noised update differs")
        assert (rn.epsilon, rn.sample_rate, rn.steps) == (r_noisy.epsilon, r_noisy.sample_rate, r_noisy.steps)
        assert r.examples_seen == r_ref.examples_seen


def test_mode_choice_and_bad_values():
    assert choose_mode(SmallCNN()) == "direct"  # auto: the mode measured fastest for this model (docs/privacy.md)
    assert choose_mode(SmallCNN(), "ew") == "ew"
    with pytest.raises(PrivacyError, match="grad_sample_mode"):
        SampleLevelSpec(grad_sample_mode="fast")
    with pytest.raises(PrivacyError, match="ghost needs a loss function with a reduction"):
        DPLocalTrainer(
            FlatModel(_cnn()),
            lambda out, y: F.cross_entropy(out, y),
            ClientSpec(),
            SampleLevelSpec(grad_sample_mode="ghost"),
        )
    with pytest.raises(ConfigError, match="privacy.sample_level.grad_sample_mode"):
        validate({"task": "synthetic", "privacy": {"sample_level": {"grad_sample_mode": "fast"}}})
