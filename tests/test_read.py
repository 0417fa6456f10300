"""READ side network and the fine-tuning baselines over a frozen backbone (issue 18)."""

import copy

import pytest
import torch
from torch.nn import functional as F

from flotilla.adapters.backbone import BackboneSpec, CharTransformer
from flotilla.adapters.memory import step_memory
from flotilla.adapters.methods import apply_method
from flotilla.adapters.read import ReadModel
from flotilla.core.client import ClientSpec, LocalTrainer
from flotilla.core.dataset import FederatedDataset
from flotilla.core.flat import FlatModel

VOCAB, T = 11, 12
SPEC = BackboneSpec(width=16, layers=3, heads=2, context=32)


def tiny_backbone(seed=0) -> CharTransformer:
    torch.manual_seed(seed)
    return CharTransformer(VOCAB, SPEC)


def tiny_data() -> FederatedDataset:
    """Two clients, each a repeating code pattern; every position is a next-code target."""
    g = torch.Generator().manual_seed(1)
    stream = torch.randint(0, VOCAB, (400,), generator=g)

    def fetch(starts):
        codes = stream[starts[:, None] + torch.arange(T + 1)]
        return codes[:, :-1], codes[:, 1:].reshape(-1)

    return FederatedDataset("tiny", fetch, [torch.arange(0, 150), torch.arange(200, 350)], [torch.arange(160, 180)] * 2)


def train(model, steps=5):
    flat = FlatModel(model)
    start = flat.flat.clone()
    delta = torch.empty_like(start)
    LocalTrainer(flat, F.cross_entropy, ClientSpec(steps=steps, batch_size=8, lr=0.5)).train(
        tiny_data(), 0, start, 0, delta
    )
    return flat, delta


def test_read_trains_only_the_side_network_and_leaves_the_backbone_untouched():
    model = ReadModel(tiny_backbone(), hidden=8)
    before = copy.deepcopy(model.backbone.state_dict())
    flat, delta = train(model)
    assert flat.names and all(n.startswith("side.") for n in flat.names)
    assert flat.numel == sum(p.numel() for p in model.side.parameters())
    assert delta.abs().sum() > 0  # the side network did learn
    for name, p in model.backbone.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name


def test_zero_output_projection_reproduces_the_backbone_exactly():
    backbone = tiny_backbone()
    reference = copy.deepcopy(backbone)
    model = ReadModel(backbone, hidden=8)
    x = torch.randint(0, VOCAB, (3, T))
    assert torch.equal(model(x), reference(x))
    train(model)  # the GRU and the projection move away from their start
    assert model.side.proj.weight.abs().sum() > 0
    assert not torch.equal(model(x), reference(x))
    with torch.no_grad():
        model.side.proj.weight.zero_()
        model.side.proj.bias.zero_()
    assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("head", lambda n: n.startswith("head.")),
        ("bitfit", lambda n: n.endswith("bias")),
        ("adapter", lambda n: ".adapter." in n),
        ("read", lambda n: n.startswith("side.")),
    ],
)
def test_only_the_methods_parameters_are_in_the_flat_vector(method, expected):
    model = apply_method(tiny_backbone(), method, read_hidden=8, adapter_dim=4)
    flat = FlatModel(model)
    names = [n for n, _ in model.named_parameters()]
    assert flat.names == [n for n in names if expected(n)]
    assert len(flat.names) < len(names)
    x = torch.randint(0, VOCAB, (2, T))
    assert torch.equal(model(x), tiny_backbone()(x))  # every method starts at the backbone's predictions


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method: unknown fine-tuning method 'prompt'"):
        apply_method(tiny_backbone(), "prompt")


def test_read_keeps_no_backbone_activation_for_backward():
    x = torch.randint(0, VOCAB, (4, T))
    y = torch.randint(0, VOCAB, (4 * T,))
    full = step_memory(apply_method(tiny_backbone(), "full"), F.cross_entropy, x, y)
    read = step_memory(apply_method(tiny_backbone(), "read", read_hidden=8), F.cross_entropy, x, y)
    head = step_memory(apply_method(tiny_backbone(), "head"), F.cross_entropy, x, y)
    assert read.weights > full.weights  # the side network's weights come on top of the backbone's
    assert read.gradients < full.gradients
    # head-only saves only the head's inputs; READ adds the GRU over L layers, far below full
    assert head.activations < read.activations < full.activations
