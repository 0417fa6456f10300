"""Errors raised by secure aggregation.

Every rejection leaves the receiver's state exactly as it was before the bad message, so an honest
retry (or simply carrying on without the bad party) still gives the right aggregate.  Rejections of
a single message also subclass ``UpdateRejected`` so aggregator callers can catch one type.
"""
from __future__ import annotations

from flotilla.core.aggregate import UpdateRejected


class SecAggError(Exception):
    """Base class of every secure-aggregation error."""


class SecAggAborted(SecAggError):
    """Too few parties survived to finish the round; nothing about any input was disclosed.

    ``aborts_round``: round loops (``flotilla.sim.sync.SyncFedAvg``) recognise the flag without
    importing this package: the round makes no server step and its metrics record says so.
    """
    aborts_round = True


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
