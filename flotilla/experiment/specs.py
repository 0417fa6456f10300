"""Config sections -> the core's plain specs.  Written once; every runtime's builder calls these."""

from __future__ import annotations

from flotilla.core.client import ClientSpec
from flotilla.core.server_opt import ServerOptimizerSpec
from flotilla.core.staleness import Staleness


def client_spec(cfg) -> ClientSpec:
    c = cfg.client
    h = c.heterogeneous_epochs
    hetero = (h.fraction, h.min, h.max) if h is not None else None
    return ClientSpec(c.epochs, c.steps, c.batch_size, c.lr, c.momentum, c.weight_decay, hetero)


def server_spec(cfg) -> ServerOptimizerSpec:
    s = cfg.server
    return ServerOptimizerSpec(s.optimizer, s.lr, s.momentum, s.beta1, s.beta2, s.tau, s.initial_accumulator)


def staleness_spec(cfg) -> Staleness:
    st = cfg.async_.staleness
    return Staleness(st.kind, st.exponent, st.a, st.b, st.average)
