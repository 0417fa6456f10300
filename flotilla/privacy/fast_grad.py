"""Flotilla's own per-example clipping for DP-SGD (``grad_sample_mode: direct``).

One forward, one backward, no per-parameter hooks and no second backward:

- each layer that owns parameters (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``, Opacus'
  ``DPLSTM``) has its ``forward`` replaced, on the instance, by an autograd function that computes
  the same output and whose backward returns the input gradient only, recording the layer's input
  ``a`` and output gradient ``g`` instead of a parameter gradient (the weight gradient of the
  plain backward is never computed: the clipped sum below replaces it); the DPLSTM runs torch's
  fused LSTM forward and the backward of :mod:`flotilla.privacy.fast_lstm`;
- after the backward, every example's gradient norm comes from these: for a weight used at
  ``T`` positions (time steps, pixels) the example's gradient is ``G_b = sum_t g_bt a_bt^T``; with
  ``T = 1`` its norm is ``|g_b| |a_b|`` (nothing materialised), otherwise ``G_b`` is formed by one
  batched matmul (the same FLOPs as the weight gradient the plain backward would have computed), or,
  where the ``B`` matrices would not fit ``MATERIALISE_BYTES``, its squared norm is
  ``sum_{t,s} (g_t.g_s)(a_t.a_s)`` (ghost norm); a convolution's ``G_b`` come from one grouped
  convolution backward (the batch as groups; cheaper here than im2col or ghost norms over 196-784
  pixels); embeddings use the Gram form with a same-token mask;
- each example's clip factor ``min(1, C / (|grad_b| + 1e-6))`` is Opacus' formula, and the clipped
  sum ``sum_b factor_b grad_b`` is written into ``p.grad``; Opacus' ``DPOptimizerFastGradientClipping``
  (:class:`DirectOptimizer`) then adds the same seeded ``N(0, (sigma C)^2)`` noise, divides by the
  expected batch size and steps, exactly as on the hooks path.

Loss reduction is "mean" over the batch, as in :mod:`flotilla.privacy.sample`: the recorded output
gradients carry a ``1/B`` that is multiplied back (an example's gradient is that of its own loss).
"""

from __future__ import annotations

import types

import torch
from opacus.layers import DPLSTM
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.autograd import Function
from torch.nn import functional as F

from flotilla.privacy.fast_lstm import LSTMLayerFn

# Per-example weight gradients of one layer are materialised (B copies of the weight) up to this size;
# above it the squared norms come from Gram matrices over positions instead.
MATERIALISE_BYTES = 256 * 2**20


class Site:
    """One parameter-owning layer: what its backward recorded this step."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.records: list[tuple] = []

    def record(self, *tensors) -> None:
        self.records.append(tensors)

    def terms(self) -> list[_Term]:
        """This step's per-example gradient terms, one per parameter (or weight/bias group)."""
        raise NotImplementedError


# --- terms: one parameter's per-example gradients in a compact form ---------------------------------
class _Term:
    def norm2(self) -> torch.Tensor:  # (B,) squared per-example norms
        raise NotImplementedError

    def write(self, weights: torch.Tensor) -> None:  # p.grad <- sum_b weights_b grad_b
        raise NotImplementedError


class _Weight(_Term):
    """``grad_b = sum_t g[b,t] a[b,t]^T`` for ``p`` viewed as ``(out, in)``."""

    def __init__(self, p, a, g):
        self.p, self.a, self.g = p, a, g
        B, T, n_in = a.shape
        n_out = g.shape[2]
        self.G = None
        if T > 1 and B * n_in * n_out * a.element_size() <= MATERIALISE_BYTES:
            self.G = torch.einsum("bto,bti->boi", g, a)  # (B, out, in)

    def norm2(self):
        a, g = self.a, self.g
        if self.G is not None:
            return torch.linalg.vector_norm(self.G.flatten(1), dim=1).square()
        if a.shape[1] == 1:
            return g.square().sum((1, 2)) * a.square().sum((1, 2))
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))

    def write(self, w):
        if self.G is not None:
            out = (w @ self.G.flatten(1)).view(self.G.shape[1:])
        else:
            g = self.g * w[:, None, None]
            out = g.reshape(-1, g.shape[2]).t() @ self.a.reshape(-1, self.a.shape[2])
        _put(self.p, out)


class _Materialised(_Term):
    def __init__(self, p, G):  # G: (B, numel), each example's gradient of p
        self.p, self.G = p, G

    def norm2(self):
        return torch.linalg.vector_norm(self.G, dim=1).square()

    def write(self, w):
        if self.p.grad is not None and self.p.grad.is_contiguous():
            torch.mv(self.G.t(), w, out=self.p.grad.view(-1))  # straight into the (flat-bound) grad
        else:
            _put(self.p, w @ self.G)


class _Bias(_Term):
    def __init__(self, p, gb):  # gb: (B, out), each example's bias gradient
        self.p, self.gb = p, gb

    def norm2(self):
        return self.gb.square().sum(1)

    def write(self, w):
        _put(self.p, w @ self.gb)


class _Rows(_Term):
    """Embedding: ``grad_b = sum_t e_{ids[b,t]} g[b,t]^T``; squared norm ``sum_{t,s} [id_t = id_s] g_t.g_s``."""

    def __init__(self, p, ids, g):
        self.p, self.ids, self.g = p, ids, g

    def norm2(self):
        same = (self.ids[:, :, None] == self.ids[:, None, :]).to(self.g.dtype)
        return (torch.bmm(self.g, self.g.transpose(1, 2)) * same).sum((1, 2))

    def write(self, w):
        grad = torch.zeros_like(self.p)
        grad.index_add_(0, self.ids.reshape(-1), (self.g * w[:, None, None]).reshape(-1, self.g.shape[2]))
        _put(self.p, grad)


def _put(p: torch.Tensor, value: torch.Tensor) -> None:
    """Write ``value`` into ``p.grad``, keeping ``p.grad``'s storage."""
    if p.grad is None:
        p.grad = value.reshape(p.shape).clone()
    else:
        p.grad.copy_(value.reshape(p.shape))


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Several calls of one layer in a forward: their positions side by side (the gradient sums over them)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


# --- layers ---------------------------------------------------------------------------------------
class _LinearFn(Function):
    @staticmethod
    def forward(ctx, x, w, b, site):
        ctx.site = site
        ctx.save_for_backward(x, w)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        ctx.site.record(x, g)
        return (g @ w if ctx.needs_input_grad[0] else None), None, None, None


class LinearSite(Site):
    def forward(self, x):
        m = self.module
        return _LinearFn.apply(x, m.weight, m.bias, self)

    def terms(self):
        m = self.module
        B = self.records[0][0].shape[0]
        a = _cat([x.reshape(B, -1, x.shape[-1]) for x, _ in self.records])
        g = _cat([g.reshape(B, -1, g.shape[-1]) for _, g in self.records])
        out = [_Weight(m.weight, a, g)] if m.weight.requires_grad else []
        if m.bias is not None and m.bias.requires_grad:
            out.append(_Bias(m.bias, g.sum(1)))
        return out


class _ConvFn(Function):
    @staticmethod
    def forward(ctx, x, w, b, site):
        m = site.module
        ctx.site = site
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        m = ctx.site.module
        ctx.site.record(x, g)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.nn.grad.conv2d_input(x.shape, w, g, m.stride, m.padding, m.dilation, m.groups)
        return dx, None, None, None


class ConvSite(Site):
    _zeros: torch.Tensor | None = None

    def _placeholder(self, batch: int) -> torch.Tensor:
        """The grouped weight argument: only its shape matters for a weight gradient (kept between steps)."""
        w = self.module.weight
        rows = batch * w.shape[0]
        if self._zeros is None or len(self._zeros) < rows or self._zeros.device != w.device:
            self._zeros = w.new_zeros((rows, *w.shape[1:]))  # Poisson batches vary: keep the largest, use a prefix
        return self._zeros[:rows]

    def forward(self, x):
        m = self.module
        return _ConvFn.apply(x, m.weight, m.bias, self)

    def terms(self):
        m = self.module
        out = []
        if m.weight.requires_grad:
            # Per-example weight gradients in one grouped convolution backward (the batch as groups): the
            # same kernel as the plain weight gradient, without im2col.
            G = [
                torch.ops.aten.convolution_backward(
                    g.reshape(1, -1, *g.shape[2:]),
                    x.reshape(1, -1, *x.shape[2:]),
                    self._placeholder(x.shape[0]),
                    None,
                    m.stride,
                    m.padding,
                    m.dilation,
                    False,
                    [0, 0],
                    x.shape[0],
                    [False, True, False],
                )[1].view(x.shape[0], -1)
                for x, g in self.records
            ]
            out.append(_Materialised(m.weight, G[0] if len(G) == 1 else torch.stack(G).sum(0)))
        if m.bias is not None and m.bias.requires_grad:
            gb = [g.sum((2, 3)) for _, g in self.records]
            out.append(_Bias(m.bias, gb[0] if len(gb) == 1 else torch.stack(gb).sum(0)))
        return out


class _EmbeddingFn(Function):
    @staticmethod
    def forward(ctx, ids, w, site):
        ctx.site = site
        ctx.save_for_backward(ids)
        return F.embedding(ids, w, site.module.padding_idx)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        ctx.site.record(ids, g)
        return None, None, None


class EmbeddingSite(Site):
    def forward(self, ids):
        return _EmbeddingFn.apply(ids, self.module.weight, self)

    def terms(self):
        m = self.module
        if not m.weight.requires_grad:
            return []
        B = self.records[0][0].shape[0]
        ids = _cat([i.reshape(B, -1) for i, _ in self.records])
        g = _cat([g.reshape(B, -1, g.shape[-1]) for _, g in self.records])
        if m.padding_idx is not None:  # the padding row gets no gradient
            g = g * (ids != m.padding_idx).unsqueeze(-1).to(g.dtype)
        return [_Rows(m.weight, ids, g)]


class LSTMSite(Site):
    """Opacus' ``DPLSTM`` (unidirectional, no dropout): every layer through :class:`LSTMLayerFn`."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.layers = [_LSTMLayerSite(module, cell) for cell in module.cells]

    def forward(self, input, state_init=None):
        m = self.module
        if not isinstance(input, torch.Tensor):
            raise TypeError(
                "grad_sample_mode direct: DPLSTM input must be a padded tensor (PackedSequence unsupported)"
            )
        x = input.transpose(0, 1) if m.batch_first else input  # (T, B, D)
        L, B, H = m.num_layers, x.shape[1], m.hidden_size
        h0s, c0s = state_init if state_init is not None else (None, None)
        if h0s is None:
            h0s = x.new_zeros(L, B, H)
        if c0s is None:
            c0s = x.new_zeros(L, B, H)
        hs, cs = [], []
        for layer, site in enumerate(self.layers):
            ih, hh = site.cell.ih, site.cell.hh
            x, h, c = LSTMLayerFn.apply(x, h0s[layer], c0s[layer], ih.weight, hh.weight, ih.bias, hh.bias, site)
            hs.append(h)
            cs.append(c)
        out = x.transpose(0, 1) if m.batch_first else x
        return out, (torch.stack(hs), torch.stack(cs))

    def terms(self):
        return [t for layer in self.layers for t in layer.terms()]

    @property
    def records(self):  # noqa: D401  (the layers hold them)
        return [r for layer in self.layers for r in layer.records]

    @records.setter
    def records(self, value):
        for layer in getattr(self, "layers", []):
            layer.records = list(value)


class _LSTMLayerSite(Site):
    def __init__(self, module, cell):
        super().__init__(module)
        self.cell = cell

    def record_lstm(self, x, h_prev, dgates):
        # time-major (T, B, .) -> batch-major views
        self.records.append((x.transpose(0, 1), h_prev.transpose(0, 1), dgates.transpose(0, 1)))

    def terms(self):
        ih, hh = self.cell.ih, self.cell.hh
        x, h_prev, dg = (_cat([r[i] for r in self.records]) for i in range(3))
        out = []
        if ih.weight.requires_grad:
            out.append(_Weight(ih.weight, x, dg))
        if hh.weight.requires_grad:
            out.append(_Weight(hh.weight, h_prev, dg))
        gb = dg.sum(1)
        out += [_Bias(b, gb) for b in (ih.bias, hh.bias) if b is not None and b.requires_grad]
        return out


# --- the engine -----------------------------------------------------------------------------------
def _site_for(module: nn.Module) -> type[Site] | str | None:
    """The site class for ``module``, a reason it is unsupported, or None (no parameters of its own)."""
    if isinstance(module, DPLSTM):
        if module.bidirectional or module.dropout or getattr(module, "proj_size", 0):
            return "DPLSTM with bidirectional/dropout/proj_size"
        return LSTMSite
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if not own:
        return None
    if type(module) is nn.Linear:
        return LinearSite
    if type(module) is nn.Conv2d:
        if module.padding_mode != "zeros" or isinstance(module.padding, str) or module.groups != 1:
            return "Conv2d with groups/padding_mode/padding string"
        return ConvSite
    if type(module) is nn.Embedding:
        if module.max_norm is not None or module.sparse:
            return "Embedding with max_norm/sparse"
        return EmbeddingSite
    return type(module).__name__


def unsupported(model: nn.Module) -> list[str]:
    """``"name (Type)"`` of every layer the direct mode cannot handle (empty: it can)."""
    bad, skip = [], set()
    for name, m in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        kind = _site_for(m)
        if isinstance(kind, str):
            bad.append(f"{name or '<model>'} ({kind})")
        elif kind is LSTMSite:
            skip.add(name)
    return bad


def _patched_forward(module: nn.Module, *args, **kwargs):
    """A patched layer's forward: the recording one inside DP steps and for evaluation, its own otherwise."""
    site = module.__dict__["_direct_site"]
    if site.clipper.armed or not torch.is_grad_enabled():
        return site.forward(*args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


class DirectOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' optimizer for already-clipped sums (same noise, scaling and step), without its deep copy of
    every gradient: ``p.grad`` was written by :class:`DirectClipper` for this step."""

    def accumulate(self):
        for p in self.params:
            p.summed_grad = p.grad


class DirectClipper:
    """Patches ``model``'s layers (see the module docstring); :meth:`clip_into_grads` after each backward.

    While ``armed`` is False a patched layer runs its own forward when gradients are on (anything else
    training the model gets ordinary parameter gradients); without gradients (evaluation) it always runs
    the fast forward, which records nothing.
    """

    def __init__(self, model: nn.Module, armed: bool = True):
        bad = unsupported(model)
        if bad:
            raise ValueError(f"layers the direct mode cannot handle: {', '.join(bad)}")
        patched = [n for n, m in model.named_modules() if "forward" in vars(m)]
        if patched:
            raise ValueError(f"layers {patched} already have a patched forward (another private trainer?)")
        self.model = model
        self.armed = armed
        self.sites: list[Site] = []
        skip: set[str] = set()
        for name, m in model.named_modules():
            if any(name == s or name.startswith(s + ".") for s in skip):
                continue
            kind = _site_for(m)
            if kind is None:
                continue
            if kind is LSTMSite:
                skip.add(name)
            site = kind(m)
            site.clipper = self
            # Instance attributes (nn.Module.__call__ finds them first); a method bound to the module itself,
            # so that a deep copy of the model gets a forward bound to the copy (and a copy of the site).
            m._direct_site = site
            m.forward = types.MethodType(_patched_forward, m)
            self.sites.append(site)
        covered = {id(p) for s in self.sites for p in s.module.parameters()}
        stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if stray:
            self.close()
            raise ValueError(f"parameters outside supported layers: {stray}")

    @torch.no_grad()
    def clip_into_grads(self, batch_size: int, max_grad_norm: float) -> torch.Tensor:
        """Write ``sum_b min(1, C/|grad_b|) grad_b`` into every parameter's ``.grad``; returns the per-example
        gradient norms.  ``grad_b`` is example b's gradient of its own loss (the mean loss's ``1/B`` undone)."""
        terms = []
        for site in self.sites:
            if site.records:
                B = site.records[0][0].shape[0]
                if B != batch_size:
                    raise ValueError(f"{type(site.module).__name__}: batch dimension {B}, expected {batch_size}")
                terms += site.terms()
            site.records = []
        if not terms:
            return torch.zeros(batch_size)
        norms = torch.stack([t.norm2() for t in terms]).sum(0).sqrt() * batch_size
        factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        weights = factor * batch_size
        done = set()
        for t in terms:
            t.write(weights)
            done.add(id(t.p))
        for site in self.sites:  # a layer not used in this forward: zero gradient
            for p in site.module.parameters():
                if p.requires_grad and id(p) not in done and p.grad is not None:
                    p.grad.zero_()
        return norms

    def discard(self) -> None:
        for site in self.sites:
            site.records = []

    def close(self) -> None:
        """Give every patched layer its own forward back."""
        for site in self.sites:
            site.module.__dict__.pop("forward", None)
            site.module.__dict__.pop("_direct_site", None)
        self.sites = []
