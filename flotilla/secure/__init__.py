"""Secure aggregation: the server learns only the sum of client updates.

- ``SecureAggregator``: the sync aggregator interface over Bonawitz et al.'s protocol (SecAgg+ option).
- ``SecureBuffer``: an enclave-style buffer for async (FedBuff) aggregation.
- ``SecAggClient`` / ``SecAggServer``: the protocol's message-passing state machines.
- ``flotilla.secure.wiring.make_secure`` / ``SecureAggregationSpec``: turn it on in SyncFedAvg or the
  fleet simulator's FedBuff (``flotilla.secure.fedbuff.SecureFedBuff``), with or without user-level DP;
  what the ``secure_aggregation:`` config section uses.
See docs/security.md for the threat model.
"""

from flotilla.secure.aggregator import DropoutSim, SecureAggregator
from flotilla.secure.buffer import Assignment, EncryptedUpdate, Release, SecureBuffer, seal_update
from flotilla.secure.encoding import FixedPointEncoder
from flotilla.secure.errors import (
    BufferNotReady,
    DuplicateContribution,
    ProtocolError,
    ReplayedMessage,
    SecAggAborted,
    SecAggError,
    TamperedMessage,
)
from flotilla.secure.graph import default_degree, neighbours
from flotilla.secure.protocol import SecAggClient, SecAggConfig, SecAggServer

__all__ = [
    "SecureAggregator",
    "DropoutSim",
    "SecureBuffer",
    "Assignment",
    "EncryptedUpdate",
    "Release",
    "seal_update",
    "FixedPointEncoder",
    "SecAggClient",
    "SecAggConfig",
    "SecAggServer",
    "default_degree",
    "neighbours",
    "SecAggError",
    "SecAggAborted",
    "ProtocolError",
    "TamperedMessage",
    "ReplayedMessage",
    "BufferNotReady",
    "DuplicateContribution",
]
