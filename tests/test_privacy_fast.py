"""grad_sample_mode "direct" (flotilla/privacy/fast_grad.py, fast_lstm.py): the same clipped, noised DP-SGD
step as Opacus' hooks path, per-example norms equal to per-example backward passes, layers restored."""

import copy

import pytest
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.nn import functional as F

from flotilla.config import validate
from flotilla.core.client import ClientSpec
from flotilla.core.dataset import FederatedDataset
from flotilla.core.flat import FlatModel
from flotilla.privacy import DPLocalTrainer, PrivacyError, SampleLevelSpec, fast_grad, make_dp_compatible
from flotilla.privacy.fast_grad import DirectClipper
from flotilla.privacy.sample import AUTO_MODE, choose_mode
from flotilla.tasks.models import CharLSTM, SmallCNN

N, BATCH, SEED = 24, 8, 3


def _images():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 1, 28, 28, generator=g), torch.randint(0, 10, (N,), generator=g)
    return FederatedDataset("img", lambda i: (x[i], y[i]), [torch.arange(N)], [torch.arange(N)])


def _text(vocab=12, seq=9):
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, vocab, (N, seq + 1), generator=g)
    # inputs sliced from the fetched windows: non-contiguous, as flotilla.data.shakespeare's are
    return FederatedDataset("txt", lambda i: (codes[i][:, :-1], codes[i][:, -1]), [torch.arange(N)], [torch.arange(N)])


def _cnn():
    torch.manual_seed(0)
    return SmallCNN(channels=(4, 8), hidden=16)


def _lstm():
    torch.manual_seed(0)
    return make_dp_compatible(CharLSTM(vocab_size=12, embed_dim=4, hidden=8, layers=2))


def _per_example_norms(make, x, y):
    """Each example's gradient norm by its own backward pass (no DP machinery)."""
    model = make()
    norms = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        norms.append(torch.sqrt(sum(p.grad.square().sum() for p in model.parameters())))
    return torch.stack(norms)


def _step(make, ds, mode, sigma, C):
    flat = FlatModel(make())
    t = DPLocalTrainer(
        flat,
        F.cross_entropy,
        ClientSpec(steps=1, batch_size=BATCH, lr=1.0),
        SampleLevelSpec(noise_multiplier=sigma, max_grad_norm=C, grad_sample_mode=mode),
    )
    assert t.mode == mode
    start, delta = flat.flat.clone(), torch.empty(flat.numel)
    r = t.train(ds, 0, start, SEED, delta)
    t.close()
    return delta, r  # lr 1, one step: -(clipped sum + noise) / expected batch


@pytest.mark.parametrize("make,data", [(_cnn, _images), (_lstm, _text)], ids=["smallcnn", "charlstm-2layers"])
def test_direct_step_equals_the_hooks_step_with_and_without_noise(make, data):
    ds = data()
    # the Poisson batch the trainer draws for this seed, and C between its examples' norms
    sampler = UniformWithReplacementSampler(
        num_samples=N, sample_rate=BATCH / N, generator=torch.Generator().manual_seed(SEED), steps=1
    )
    batch = next(iter(sampler))
    x, y = ds.fetch(torch.as_tensor(batch))
    norms = _per_example_norms(make, x, y)
    C = float(norms.median())
    assert (norms < C).any() and (norms > C * 1.01).any()  # some examples clipped, some not
    for sigma in (0.0, 1.0):
        ref, r_ref = _step(make, ds, "hooks", sigma, C)
        got, r = _step(make, ds, "direct", sigma, C)
        assert ref.abs().sum() > 0
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5, msg=f"sigma {sigma}: direct differs from hooks")
        assert (r.epsilon, r.sample_rate, r.steps, r.examples_seen) == (
            r_ref.epsilon,
            r_ref.sample_rate,
            r_ref.steps,
            r_ref.examples_seen,
        )
    # the noise is there and is the same draw: with sigma 1 the step is far from the sigma-0 step
    assert (ref - _step(make, ds, "hooks", 0.0, C)[0]).norm() > 1e-3


class _Mixed(nn.Module):
    """An embedding with a padding row, a linear layer over every position (T > 1), a weight used twice."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 5, padding_idx=0)
        self.proj = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = torch.tanh(self.proj(self.embed(ids)))  # (B, T, 6)
        return self.head(h.mean(1)) + self.head(h[:, 0])


@pytest.mark.parametrize(
    "make", [_cnn, _lstm, lambda: (torch.manual_seed(0), _Mixed())[1]], ids=["cnn", "lstm", "mixed"]
)
@pytest.mark.parametrize("gram", [False, True], ids=["materialised", "gram-norms"])
def test_per_example_norms_and_clipped_sum_equal_per_example_backward(make, gram, monkeypatch):
    if gram:  # force the Gram-matrix (ghost) norms for every weight used at several positions
        monkeypatch.setattr(fast_grad, "MATERIALISE_BYTES", 0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1, 28, 28, generator=g) if make is _cnn else torch.randint(0, 10, (6, 7), generator=g)
    x[0, :2] = 0  # padding tokens (mixed model)
    y = torch.randint(0, 3, (6,), generator=g)
    model = make()
    per_example = []
    for i in range(6):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        per_example.append([p.grad.clone() for p in model.parameters()])
    norms = torch.stack([torch.sqrt(sum(t.square().sum() for t in ex)) for ex in per_example])
    C = float(norms.median())
    factor = (C / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(factor[i] * per_example[i][k] for i in range(6)) for k in range(len(per_example[0]))]
    clipper = DirectClipper(model)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    got_norms = clipper.clip_into_grads(6, C)
    clipper.close()
    torch.testing.assert_close(got_norms, norms, rtol=1e-5, atol=1e-6)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)


def test_patched_lstm_forward_is_the_dplstm_function_and_close_restores_it():
    model = _lstm()
    x = torch.randint(0, 12, (5, 7))
    h0, c0 = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with torch.no_grad():
        ref_out, (ref_h, ref_c) = model.lstm(model.embed(x), (h0, c0))
        ref = model(x)
    clipper = DirectClipper(model)
    assert "forward" in vars(model.lstm) and "forward" in vars(model.head)
    with torch.no_grad():
        out, (h, c) = model.lstm(model.embed(x), (h0, c0))
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    for a, b in ((out, ref_out), (h, ref_h), (c, ref_c)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    clipper.close()
    assert not any("forward" in vars(m) for m in model.modules())


def test_auto_mode_choice_and_refusals():
    assert choose_mode(make_dp_compatible(CharLSTM(12, 4, 8))) == "direct"
    assert choose_mode(SmallCNN()) == "direct"
    assert choose_mode(SmallCNN(), "hooks") == "hooks"  # an explicit mode is kept
    cfg = {"task": {"name": "fashion-mnist"}, "rounds": 1, "privacy": {"sample_level": {"grad_sample_mode": "direct"}}}
    assert validate(cfg).privacy.sample_level.grad_sample_mode == "direct"
    odd = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    with pytest.raises(PrivacyError, match=r"grad_sample_mode: direct: .*1 \(LayerNorm\)"):
        DPLocalTrainer(FlatModel(odd), F.cross_entropy, ClientSpec(), SampleLevelSpec(grad_sample_mode="direct"))
    assert not any("forward" in vars(m) for m in odd.modules())  # nothing left patched
    AUTO_MODE["Sequential"] = "direct"
    try:
        assert choose_mode(odd) == "hooks"  # auto falls back where direct cannot run
        assert choose_mode(nn.Sequential(nn.Linear(3, 4))) == "direct"
    finally:
        del AUTO_MODE["Sequential"]


def test_outside_dp_steps_the_model_trains_as_usual_and_a_second_patch_is_refused():
    model, ref = _lstm(), _lstm()
    flat = FlatModel(model)
    t = DPLocalTrainer(flat, F.cross_entropy, ClientSpec(), SampleLevelSpec(grad_sample_mode="direct"))
    x, y = torch.randint(0, 12, (4, 6)), torch.randint(0, 12, (4,))
    for m in (model, ref):  # e.g. another trainer on the same module: ordinary parameter gradients
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(PrivacyError, match="already have a patched forward"):
        DPLocalTrainer(flat, F.cross_entropy, ClientSpec(), SampleLevelSpec(grad_sample_mode="direct"))
    twin = copy.deepcopy(model)  # a copy of the patched model computes with its own weights
    with torch.no_grad():
        twin.head.bias.add_(1.0)
        torch.testing.assert_close(twin(x), model(x) + 1.0, rtol=1e-5, atol=1e-5)
    t.close()


def test_a_client_with_empty_poisson_batches_gets_the_same_noisy_update():
    full = _images()
    ds = FederatedDataset("img3", full.fetch, [torch.arange(3)])
    spec = ClientSpec(epochs=2, batch_size=1, lr=1.0)  # q = 1/3, 6 steps
    sampler = UniformWithReplacementSampler(
        num_samples=3, sample_rate=1 / 3, generator=torch.Generator().manual_seed(SEED), steps=6
    )
    assert [] in list(sampler)  # this seed draws at least one empty batch (a pure-noise step)
    deltas = []
    for mode in ("hooks", "direct"):
        flat = FlatModel(_cnn())
        t = DPLocalTrainer(flat, F.cross_entropy, spec, SampleLevelSpec(noise_multiplier=1.0, grad_sample_mode=mode))
        d = torch.empty(flat.numel)
        t.train(ds, 0, flat.flat.clone(), SEED, d)
        t.close()
        deltas.append(d)
    torch.testing.assert_close(deltas[1], deltas[0], rtol=0, atol=1e-5)
