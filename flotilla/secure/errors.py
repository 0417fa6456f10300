"""Errors raised by secure aggregation.

Every rejection leaves the receiver's state exactly as it was before the bad message, so an honest
retry (or simply carrying on without the bad party) still gives the right aggregate.  Rejections of
a single message also subclass ``UpdateRejected`` so aggregator callers can catch one type.
"""

from __future__ import annotations

from flotilla.core.aggregate import RoundAborted, UpdateRejected


class SecAggError(Exception):
    """Base class of every secure-aggregation error."""


class SecAggAborted(SecAggError, RoundAborted):
    """Too few parties survived to finish the round; nothing about any input was disclosed.

    A :class:`flotilla.core.aggregate.RoundAborted`: round loops (``flotilla.sim.sync.SyncFedAvg``)
    make no server step and the round's metrics record says so.
    """


class ProtocolError(SecAggError, UpdateRejected):
    """A message was malformed, out of order, from an unexpected party, or for another round."""


class TamperedMessage(ProtocolError):
    """Authentication failed: a ciphertext, share or commitment does not verify."""


class ReplayedMessage(ProtocolError):
    """The same message (or nonce) was already accepted once."""


class DuplicateContribution(SecAggError, UpdateRejected):
    """The secure buffer already holds an update from this client (``one_per_client``)."""


class BufferNotReady(SecAggError):
    """The secure buffer holds fewer than K updates and will not release their sum."""
