"""Build an algorithm with privacy and secure aggregation composed in (the only place both meet).

Privacy first (it decides clipping, noise, sampling and the DP-SGD client update), then secure
aggregation (it may take over the aggregator or the buffer, moving the DP noise inside the
protocol).  Both read the algorithm's declared :class:`~flotilla.core.protocols.Shape` and refuse
what cannot work before anything is built; the algorithm's constructor then calls their factories.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flotilla.core.protocols import Components
from flotilla.privacy import PrivacyParts, PrivacySpec, prepare_model
from flotilla.secure.wiring import SecureParts


def build_algorithm(algorithm_class, kwargs: Mapping[str, Any], *, privacy=None, secure_aggregation=None,
                    rounds: int, eval_every: int = 1):
    """``(algorithm, rounds)``: ``algorithm_class(**kwargs)`` with DP and/or secure aggregation composed in.
    ``rounds`` comes back smaller when the privacy budget ends first."""
    kwargs = dict(kwargs)
    shape = algorithm_class.shape(**kwargs)
    private = None
    if privacy is not None:
        private = PrivacyParts(PrivacySpec.from_dict(privacy), shape, rounds=rounds, eval_every=eval_every)
    secure = SecureParts(secure_aggregation, shape, private) if secure_aggregation is not None else None
    components = Components()
    if private is not None:
        components = components.merged(private.components)
        prepare_model(kwargs["model"], private.spec)      # DPLSTM swap, before the algorithm binds the model
    if secure is not None:
        components = components.merged(secure.components)
    algorithm = algorithm_class(**kwargs, components=components) if components.given() else algorithm_class(**kwargs)
    if private is None:
        return algorithm, rounds
    wrapped = private.wrap(algorithm)
    return wrapped, wrapped.rounds
