"""An LSTM layer for the ``direct`` DP-SGD mode: torch's fused forward, a hand-written backward that
yields the gate gradients of every time step, and no parameter gradient at all.

Opacus' ``DPLSTM`` runs each time step as several modules with hooks (30 ms a step for the
CharLSTM without DP, 127 ms with it).  Here the forward is the plain model's fused kernel; the
backward runs the recurrence once for ``dgates`` (all steps, all examples) with a handful of ops
per step and hands ``(x, h_prev, dgates)`` to a :class:`~flotilla.privacy.fast_grad.Site`, which
turns them into per-example gradient norms and the clipped sum (``grad_W_ih[b] = sum_t
dgates[t,b] x[t,b]^T`` and so on).  Parameter gradients are deliberately not returned: the clipped
sum replaces them.

Gates keep torch's (i, f, g, o) order: one sigmoid over all four blocks, then the g block's tanh
over it; in the backward the (i, f, g) blocks are one contiguous multiply by the cell-state gradient.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


class LSTMLayerFn(Function):
    """One unidirectional LSTM layer, time-major: ``x (T, B, I), h0, c0 (B, H)`` -> ``out (T, B, H), h_n, c_n``.

    The forward is torch's fused LSTM (the plain model's kernel).  The backward recomputes every
    step's gates at once from the stored outputs (``h_{t-1}`` of all steps are known: one matmul),
    rebuilds the cell states with one multiply-add per step, runs the recurrence for ``dgates``
    and calls ``site.record_lstm(x, h_prev, dgates)``.  No parameter gradient is returned.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, site):
        params = [w_ih, w_hh] if b_ih is None else [w_ih, w_hh, b_ih, b_hh]
        out, h_n, c_n = torch.lstm(x, (h0[None], c0[None]), params, b_ih is not None, 1, 0.0, False, False, False)
        ctx.site = site
        ctx.save_for_backward(x, h0, c0, out, w_ih, w_hh, b_ih, b_hh)
        return out, h_n[0], c_n[0]

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n):
        x, h0, c0, out, w_ih, w_hh, b_ih, b_hh = ctx.saved_tensors
        T, B, H = out.shape
        h_prev = torch.cat([h0[None], out[:-1]])  # (T, B, H)
        xh = torch.cat([x, h_prev], dim=2).view(T * B, -1)  # one matmul for both projections
        w = torch.cat([w_ih, w_hh], dim=1).t()
        z = (xh @ w if b_ih is None else torch.addmm(b_ih + b_hh, xh, w)).view(T, B, 4 * H)
        gates = torch.sigmoid(z)
        i, f, g, o = gates.view(T, B, 4, H).unbind(2)
        torch.tanh(z[..., 2 * H : 3 * H], out=g)
        c = x.new_empty(T + 1, B, H)
        c[0] = c0
        u, fs, cs = (i * g).unbind(0), f.unbind(0), c.unbind(0)
        for t in range(T):  # c_t = f_t c_{t-1} + i_t g_t
            torch.addcmul(u[t], fs[t], cs[t], out=cs[t + 1])
        tc = torch.tanh(c[1:])
        # Per-step factors, for all steps at once: dc_t += dh_t kc_t; d(i, f, g) = dc_t k[:3]; do = dh_t k[3]
        k = (gates - gates * gates).view(T, B, 4, H)  # sigmoid' (the g block is replaced by tanh' next)
        k[:, :, 2] = 1 - g * g
        k.mul_(torch.stack([g, c[:-1], i, tc], dim=2))
        kc = (1 - tc * tc).mul_(o)
        dg = x.new_empty(T, B, 4 * H)
        dgs = dg.unbind(0)
        dg3 = dg[..., : 3 * H].view(T, B, 3, H).unbind(0)
        dgo = dg[..., 3 * H :].unbind(0)
        douts, kcs, k3s, kos = dout.unbind(0), kc.unbind(0), k[:, :, :3].unbind(0), k[:, :, 3].unbind(0)
        dh = douts[T - 1] + dh_n
        dc = dc_n
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                dh = torch.addmm(douts[t], dgs[t + 1], w_hh)
            dc = torch.addcmul(dc, dh, kcs[t])
            torch.mul(dh, kos[t], out=dgo[t])
            torch.mul(k3s[t], dc.unsqueeze(1), out=dg3[t])
            dc = dc * fs[t]
        ctx.site.record_lstm(x, h_prev, dg)
        need = ctx.needs_input_grad
        dx = (dg.view(T * B, 4 * H) @ w_ih).view_as(x) if need[0] else None
        dh0 = dgs[0] @ w_hh if need[1] else None
        dc0 = dc if need[2] else None
        return dx, dh0, dc0, None, None, None, None, None
