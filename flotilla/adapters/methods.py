"""Fine-tuning methods over one pre-trained backbone: which parameters train, which new ones exist.

Every method returns a model whose *trainable* parameters (``requires_grad``) are exactly what
the method trains; everything else is frozen.  :class:`flotilla.core.flat.FlatModel` builds the
flat vector from trainable parameters only, so in federated rounds only these travel.

- ``full``: every backbone weight.
- ``head``: the output layer (``head``) only.
- ``bitfit``: every bias (linear layers and layer norms).
- ``lora``: rank-8, alpha-8 LoRA on the attention projections (``qkv``, ``proj``) via PEFT.
- ``adapter``: a bottleneck adapter (width -> ``adapter_dim`` -> width, GELU, residual; the up
  projection starts at zero) after every block.
- ``read``: the READ side network (:mod:`flotilla.adapters.read`), GRU hidden ``read_hidden``.

Every new module starts as the identity (LoRA's B, the adapter's up projection and READ's output
projection are zero), so each method starts from exactly the backbone's predictions.
"""

from __future__ import annotations

from torch import nn

from flotilla.adapters.backbone import CharTransformer
from flotilla.adapters.read import ReadModel

METHODS = ("read", "lora", "adapter", "bitfit", "head", "full")


class Bottleneck(nn.Module):
    def __init__(self, width: int, dim: int):
        super().__init__()
        self.down = nn.Linear(width, dim)
        self.act = nn.GELU()
        self.up = nn.Linear(dim, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return self.up(self.act(self.down(h)))


def apply_method(
    backbone: CharTransformer,
    method: str,
    read_hidden: int = 64,
    lora_rank: int = 8,
    lora_alpha: int = 8,
    adapter_dim: int = 32,
) -> nn.Module:
    """The model that fine-tunes ``backbone`` (modified in place) with ``method``."""
    if method not in METHODS:
        raise ValueError(f"method: unknown fine-tuning method {method!r} (known: {', '.join(METHODS)})")
    if method == "full":
        return backbone.requires_grad_(True)
    backbone.requires_grad_(False)
    if method == "read":
        return ReadModel(backbone, read_hidden)
    if method == "head":
        backbone.head.requires_grad_(True)
    elif method == "bitfit":
        for name, p in backbone.named_parameters():
            p.requires_grad_(name.endswith("bias"))
    elif method == "adapter":
        for block in backbone.blocks:
            block.adapter = Bottleneck(backbone.spec.width, adapter_dim)
    elif method == "lora":
        from peft import LoraConfig, inject_adapter_in_model  # imported here: PEFT takes seconds to import

        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=["qkv", "proj"])
        inject_adapter_in_model(config, backbone)  # only lora_A / lora_B are trainable afterwards
    return backbone


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
