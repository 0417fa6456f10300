"""Sample-level DP on the client: DP-SGD (Abadi et al. 2016) through Opacus.

:class:`DPLocalTrainer` has the interface of :class:`flotilla.core.client.LocalTrainer` and is a
drop-in replacement for it (``algorithm.trainer = DPLocalTrainer(...)``).  Every local step:

1. Poisson-samples a batch (each of the client's examples with probability ``q = 1/ceil(n/B)``,
   Opacus' ``UniformWithReplacementSampler``), so the expected batch is ~B and the schedule is
   exactly the one Opacus' ``make_private`` would build for that client's DataLoader;
2. computes per-example gradients (or, in ghost mode, only their norms) with one of Opacus'
   grad-sample modes or Flotilla's own ``direct`` mode (:mod:`flotilla.privacy.fast_grad`),
   ``privacy.sample_level.grad_sample_mode`` (see :func:`choose_mode`);
3. clips each example's gradient to ``max_grad_norm``, sums, adds N(0, (sigma C)^2) and divides by
   the expected batch size: Opacus' ``DPOptimizer`` around a plain ``torch.optim.SGD``.

The one model is made private ONCE (hooks attached, optimizer built) when the trainer is built and
reused for every client: no per-client wrapping cost and no per-client model copy.  Parameters stay
views into ``FlatModel.flat`` (the SGD update is in place), so the delta is still one subtraction.

Recurrent layers: ``nn.LSTM`` computes its gradient in one fused kernel that per-sample hooks
cannot see; :func:`make_dp_compatible` swaps it, in place and keeping the weights, for Opacus'
``DPLSTM`` (same parameter names) BEFORE the FlatModel binds the parameters.  The ``direct`` mode
keeps that layer (and so the flat layout every runtime agrees on) but runs it through torch's fused
LSTM with a hand-written backward (:mod:`flotilla.privacy.fast_lstm`).

Each result carries the client's epsilon for that participation: Opacus' accountant over that
client's ``(sigma, q, local steps)``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from flotilla.core.client import ClientResult, ClientSpec, LossFn
from flotilla.core.dataset import FederatedDataset
from flotilla.core.device import to_device
from flotilla.core.flat import FlatModel
from flotilla.privacy.accountant import PrivacyError, dpsgd_schedule, epsilon

# Opacus' grad-sample modes.  All give the same clipped sum (per-example clipping at max_grad_norm)
# and the same noise and accounting; they differ only in how the per-example gradients (or norms) are
# computed: "hooks" (module hooks), "functorch" (torch.func vmap), "ew" (torch's expanded weights),
# "ghost" (ghost clipping: per-example norms, then a second backward of the clip-weighted loss).
# "direct" is Flotilla's own (flotilla/privacy/fast_grad.py): one backward that records each layer's
# input and output gradient, per-example norms and the clipped sum from those, Opacus' noise and step.
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ew", "ghost", "direct")
# Per model class, the mode "auto" picks (anything else: hooks); docs/privacy.md has the timings.
# CharLSTM: direct (fused LSTM forward + own backward instead of DPLSTM's hooked per-step modules; ~11x faster).
# SmallCNN: direct (grouped-convolution per-example gradients, ~2x faster than hooks). Its sums differ from
# Opacus' in the last float bits (equal within 1e-5, tests/test_privacy_fast.py), so runs made with hooks
# replay with grad_sample_mode: hooks.
AUTO_MODE: dict[str, str] = {"CharLSTM": "direct", "SmallCNN": "direct"}

# Layers whose Opacus fixer is a weight-preserving drop-in replacement (nn.LSTM -> DPLSTM, ...).
_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)


@dataclass(frozen=True)
class SampleLevelSpec:
    noise_multiplier: float = 1.0  # sigma: noise std / max_grad_norm
    max_grad_norm: float = 1.0  # C: per-example gradient clip (L2)
    delta: float = 1e-5  # delta at which each client's epsilon is reported
    accountant: str = "rdp"  # "rdp" or "prv"
    secure_mode: bool = False  # Opacus' floating-point-attack-resistant noise, seeded from os.urandom
    grad_sample_mode: str = "auto"  # one of GRAD_SAMPLE_MODES; auto: per model (AUTO_MODE), else hooks

    def __post_init__(self):
        if not self.max_grad_norm > 0:
            raise PrivacyError(f"privacy.sample_level.max_grad_norm: must be > 0, got {self.max_grad_norm}")
        if not self.noise_multiplier >= 0:
            raise PrivacyError(f"privacy.sample_level.noise_multiplier: must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"privacy.sample_level.delta: must be in (0, 1), got {self.delta}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise PrivacyError(
                f"privacy.sample_level.grad_sample_mode: must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}"
            )


def choose_mode(model: nn.Module, mode: str = "auto") -> str:
    """The grad-sample mode used for ``model``: ``mode`` itself unless it is ``"auto"``; auto's ``direct``
    falls back to hooks for a model with a layer the direct mode cannot handle."""
    if mode != "auto":
        return mode
    chosen = AUTO_MODE.get(type(model).__name__, "hooks")
    if chosen == "direct":
        from flotilla.privacy.fast_grad import unsupported

        if unsupported(model):
            return "hooks"
    return chosen


def _dp_optimizer(cls, flat, spec, dp):
    """Opacus' DP optimizer ``cls`` around plain SGD on the flat parameters: clipping bound, noise, mean loss."""
    sgd = torch.optim.SGD(flat.params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return cls(
        sgd,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=spec.batch_size,
        loss_reduction="mean",
        secure_mode=dp.secure_mode,
    )


class _Criterion(nn.Module):
    """``loss_fn`` as the criterion object ghost clipping needs (a ``reduction`` attribute it flips to
    "none" to get per-example losses)."""

    def __init__(self, loss_fn: LossFn, reduction: str = "mean"):
        super().__init__()
        self.loss_fn, self.reduction = loss_fn, reduction

    def forward(self, out, y):
        return self.loss_fn(out, y, reduction=self.reduction)


@dataclass
class DPClientResult(ClientResult):
    epsilon: float = 0.0  # this participation's sample-level epsilon at ``delta``
    sample_rate: float = 0.0  # q of the local Poisson sampling


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Make ``model`` trainable by Opacus, in place: recurrent layers become Opacus' DP layers
    with the same weights and parameter names.  Anything else Opacus cannot train privately
    (e.g. BatchNorm, whose statistics mix examples) is refused with Opacus' reason.

    Call it before the algorithm binds the model to a FlatModel.
    """
    from opacus.validators import ModuleValidator

    if isinstance(model, _RECURRENT):
        raise PrivacyError(
            f"privacy.sample_level: the model itself is a bare {type(model).__name__}; wrap it in a module"
        )
    for name, sub in list(model.named_modules()):
        if isinstance(sub, _RECURRENT) and type(sub) in ModuleValidator.FIXERS:
            new = ModuleValidator.FIXERS[type(sub)](sub)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
    was_training = model.training
    model.train()
    errors = ModuleValidator.validate(model, strict=False)
    model.train(was_training)
    if errors:
        raise PrivacyError(
            "privacy.sample_level: Opacus cannot train this model privately: " + "; ".join(str(e) for e in errors)
        )
    return model


def _make_private(flat: FlatModel, loss_fn: LossFn, spec: ClientSpec, dp: SampleLevelSpec, mode: str):
    """(grad-sample module, DP optimizer, loss callable) for ``mode``; same clipping, noise and averaging in all."""
    from opacus.grad_sample.utils import get_gsm_class
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

    if mode == "direct":
        from flotilla.privacy.fast_grad import DirectClipper, DirectOptimizer

        try:
            clipper = DirectClipper(flat.model)
        except ValueError as e:
            raise PrivacyError(f"privacy.sample_level.grad_sample_mode: direct: {e}") from None
        # The clipped sum is written into p.grad by the clipper; this optimizer adds the noise, divides by the
        # expected batch size and steps, with the same code (and generator use) as DPOptimizer.
        return clipper, _dp_optimizer(DirectOptimizer, flat, spec, dp), loss_fn
    kw: dict = dict(batch_first=True, loss_reduction="mean")
    if mode != "ew":
        kw["strict"] = True
    if mode == "functorch":
        kw["force_functorch"] = True
    if mode == "ghost":
        import inspect

        try:
            takes_reduction = "reduction" in inspect.signature(loss_fn).parameters
        except (TypeError, ValueError):
            takes_reduction = False
        if not takes_reduction:
            raise PrivacyError(
                "privacy.sample_level.grad_sample_mode: ghost needs a loss function with a reduction= argument "
                f"(per-example losses); {getattr(loss_fn, '__name__', loss_fn)!r} has none"
            )
        kw.update(max_grad_norm=dp.max_grad_norm, use_ghost_clipping=True)
    module = get_gsm_class(mode)(flat.model, **kw)
    optimizer = _dp_optimizer(DPOptimizerFastGradientClipping if mode == "ghost" else DPOptimizer, flat, spec, dp)
    if mode == "ghost":
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        return module, optimizer, DPLossFastGradientClipping(module, optimizer, _Criterion(loss_fn), "mean")
    return module, optimizer, loss_fn


class DPLocalTrainer:
    """DP-SGD local training of ``flat``'s model for one client at a time (no per-client state)."""

    def __init__(self, flat: FlatModel, loss_fn: LossFn, spec: ClientSpec, dp: SampleLevelSpec):
        bad = [n for n, m in flat.model.named_modules() if isinstance(m, _RECURRENT)]
        if bad:
            raise PrivacyError(
                f"privacy.sample_level: layers {bad} need make_dp_compatible(model) before the FlatModel is built"
            )
        self.flat = flat
        self.loss_fn = loss_fn
        self.spec = spec
        self.dp = dp
        # Made private once: hooks on the one model, one optimizer over its (flat-backed) parameters.
        self.mode = choose_mode(flat.model, dp.grad_sample_mode)
        self.module, self.optimizer, self._loss = _make_private(flat, loss_fn, spec, dp, self.mode)
        self._direct = None
        if self.mode == "direct":  # the model itself runs; the clipper turns each backward into p.grad
            self._direct, self.module = self.module, flat.model
            self._direct.armed = False  # armed only inside train(): elsewhere the layers train as usual
        self._sgd = self.optimizer.original_optimizer
        self.results: list[DPClientResult] = []  # this round's results (read and cleared by the caller)
        # Opacus' full backward hooks on the first layer (whose input needs no grad) warn every step.
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs"
        )

    def train(
        self, dataset: FederatedDataset, client: int, start: torch.Tensor, seed: int, delta_out: torch.Tensor
    ) -> DPClientResult:
        """DP-SGD from global weights ``start``; write ``w_end - start`` into ``delta_out``."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        flat, spec, dp = self.flat, self.spec, self.dp
        flat.load(start)
        n = dataset.num_train(client)
        if n == 0:
            delta_out.zero_()
            return DPClientResult(client, 0, 0, 0, 0.0)
        q, steps = dpsgd_schedule(n, spec.batch_size, spec.epochs, spec.steps)
        self._sgd.state.clear()  # momentum does not leak between clients
        self.optimizer.expected_batch_size = q * n
        generator = torch.Generator().manual_seed(seed)
        # Reproducible noise from the client seed; secure_mode: an unpredictable seed (os.urandom) and Opacus'
        # floating-point-attack-resistant sampling (runs are then not reproducible).
        noise_seed = int.from_bytes(os.urandom(8), "little") >> 1 if dp.secure_mode else seed ^ 0x5A5A5A5A
        # The noise is drawn on the model's device (Opacus needs a generator of that device).
        self.optimizer.generator = torch.Generator(device=flat.device).manual_seed(noise_seed)
        torch.manual_seed(seed)  # dropout and other in-model randomness
        self.module.train()
        indices = dataset.train_indices[client]
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=generator, steps=steps)
        seen = 0
        loss_sum = torch.zeros((), device=flat.device)
        if self._direct is not None:
            self._direct.armed = True
        try:
            for batch in sampler:
                self.optimizer.zero_grad(set_to_none=False)
                if batch:
                    x, y = to_device(dataset.fetch(indices[torch.as_tensor(batch)]), flat.device)
                    if self.mode == "ghost" and isinstance(x, torch.Tensor):
                        x = x.contiguous()  # Opacus' embedding norm sampler .view()s its input ids
                    loss = self._loss(self.module(x), y)
                    loss.backward()
                    if self._direct is not None:
                        self._direct.clip_into_grads(len(batch), dp.max_grad_norm)
                    # ghost's loss is a DPTensorFastGradientClipping holding the per-example losses
                    mean_loss = loss.loss_per_sample.detach().mean() if self.mode == "ghost" else loss.detach()
                    loss_sum += mean_loss * len(batch)
                    seen += len(batch)
                else:  # an empty Poisson batch still takes a (pure-noise) step, as Opacus does
                    for p in flat.params:
                        p.grad_sample = torch.zeros((0, *p.shape), device=flat.device)
                self.optimizer.step()
        finally:
            if self._direct is not None:
                self._direct.discard()
                self._direct.armed = False
            self.optimizer.zero_grad(set_to_none=False)
            self._rebind_grads()
        flat.delta_into(start, delta_out)
        eps = epsilon(dp.noise_multiplier, q, steps, dp.delta, dp.accountant)
        result = DPClientResult(client, n, seen, steps, float(loss_sum) / max(seen, 1), epsilon=eps, sample_rate=q)
        self.results.append(result)
        return result

    def _rebind_grads(self) -> None:
        """DPOptimizer leaves fresh tensors in ``p.grad``; point them back into ``flat.grad``."""
        flat, offset = self.flat, 0
        flat.grad.zero_()
        for p in flat.params:
            k = p.numel()
            p.grad = flat.grad[offset : offset + k].view_as(p)
            offset += k

    def close(self) -> None:
        """Remove Opacus' hooks (or the direct mode's patched forwards) from the model (the user's module is
        left as a plain module)."""
        if self._direct is not None:
            self._direct.close()
        else:
            self.module.to_standard_module()
