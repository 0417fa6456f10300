"""Build an algorithm with a client algorithm, privacy and secure aggregation composed in (the only
place they meet).

The client algorithm first (FedProx, SCAFFOLD: flotilla.algorithms; it may bring a client update, an
aggregator or a buffer, which nothing after it may replace), then privacy (it decides clipping,
noise, sampling and the DP-SGD client update), then secure aggregation (it may take over the
aggregator or the buffer, moving the DP noise inside the protocol).  All read the algorithm's
declared :class:`~flotilla.core.protocols.Shape` and refuse what cannot work before anything is
built; the algorithm's constructor then calls their factories.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flotilla.algorithms import Setting, algorithm_parts
from flotilla.core.protocols import Components

# flotilla.privacy (Opacus: ~1.5 s of imports) and flotilla.secure are imported only by runs that use them.


def _no_clash(mine: Components, theirs: Components, who: str, name: str) -> None:
    both = [k for k in mine.given() if k in theirs.given()]
    if both:
        raise ValueError(
            f"client.algorithm: {name}'s {', '.join(both)} would be replaced by {who}'s; they do not compose"
        )


def build_algorithm(
    algorithm_class,
    kwargs: Mapping[str, Any],
    *,
    privacy=None,
    secure_aggregation=None,
    client_algorithm=None,
    rounds: int,
    eval_every: int = 1,
    tiers: Components | None = None,
    channels=None,
    embedding_rows: str = "dense",
):
    """``(algorithm, rounds)``: ``algorithm_class(**kwargs)`` with a client algorithm (the ``client.algorithm``
    section), DP and/or secure aggregation composed in.  ``rounds`` comes back smaller when the privacy
    budget ends first."""
    kwargs = dict(kwargs)
    shape = algorithm_class.shape(**kwargs)
    algo = None
    if client_algorithm is not None:
        algo = algorithm_parts(client_algorithm, shape, Setting.of(shape, privacy, secure_aggregation))
    private = None
    if privacy is not None:
        from flotilla.privacy import PrivacyParts, PrivacySpec, prepare_model

        private = PrivacyParts(PrivacySpec.from_dict(privacy), shape, rounds=rounds, eval_every=eval_every)
    secure = None
    if secure_aggregation is not None:
        from flotilla.secure.wiring import SecureParts

        secure = SecureParts(secure_aggregation, shape, private, channels=channels)
    components = algo.components if algo is not None else Components()
    if embedding_rows != "dense":  # sparse embedding uploads, per-row mean (flotilla/algorithms/rowwise.py)
        from flotilla.algorithms.rowwise import embedding_rows_components

        rows = embedding_rows_components(embedding_rows, shape, kwargs["model"], channels=channels is not None)
        if algo is not None:
            _no_clash(components, rows, "server.embedding_rows", algo.name)
        components = components.merged(rows)
    if private is not None:
        if algo is not None:
            _no_clash(components, private.components, "privacy", algo.name)
        components = components.merged(private.components)
        prepare_model(kwargs["model"], private.spec)  # DPLSTM swap, before the algorithm binds the model
    if secure is not None:
        if algo is not None:
            _no_clash(algo.components, secure.components, "secure aggregation", algo.name)
        components = components.merged(secure.components)
    wrap_channels = None
    if channels is not None:  # upload/download compression around whichever client update (flotilla/channels)
        from flotilla.channels.sim import compose as channel_parts

        components, wrap_channels = channel_parts(
            channels,
            shape,
            components,
            privacy=privacy,
            secure=secure is not None,
            embedding_rows=embedding_rows,  # row-sparse uploads through the chain (flotilla/channels/rows.py)
            model=kwargs["model"],
        )
    if tiers is not None:  # tier-aware selection, compression, HeteroFL (flotilla/fairness/parts.py)
        clash = [k for k in tiers.given() if k in components.given()]
        if clash:
            raise ValueError(f"tiers: the tier optimisations' {', '.join(clash)} would replace another's; remove one")
        components = components.merged(tiers)
    algorithm = algorithm_class(**kwargs, components=components) if components.given() else algorithm_class(**kwargs)
    if algo is not None:
        algorithm = algo.wrap(algorithm)  # state the client algorithm checkpoints (SCAFFOLD's c, c_i)
    if wrap_channels is not None:
        algorithm = wrap_channels(algorithm)  # byte metrics, checkpointed error-feedback residuals
    if private is None:
        return algorithm, rounds
    wrapped = private.wrap(algorithm)
    return wrapped, wrapped.rounds
