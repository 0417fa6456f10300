"""Flotilla over a real network: a gRPC server (coordinator + aggregator) and the device SDK.

* :mod:`~flotilla.network.coordinator` — which uploads count and when the server steps (sync
  rounds or buffered async), on the simulator's aggregators and core's server step.
* :mod:`~flotilla.network.tickets` — signed assignment tickets and the per-device assignment table.
* :mod:`~flotilla.network.selection` — which devices train (the sync cohort draw, async slots).
* :mod:`~flotilla.network.secagg` — sync secure aggregation: the device's side and the server's relay.
* :mod:`~flotilla.network.dp` — user-level DP wired into the coordinator.
* :mod:`~flotilla.network.refusals` — refusals and what a device should do after each.
* :mod:`~flotilla.network.server` — TLS, tokens, rate limits and chunked streaming around it.
* :mod:`~flotilla.network.store` — snapshot, pending updates and the accepted-update ledger on disk.
* :mod:`~flotilla.network.client` — :class:`Connection` (one RPC per method) and :class:`Device`.
* :mod:`~flotilla.network.certs` — a CA, certificates and device tokens for a test deployment.
* ``flotilla.proto`` / ``flotilla_pb2.py`` / :mod:`~flotilla.network.wire` — the protocol.
"""
