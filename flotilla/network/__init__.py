"""Flotilla over a real network: a gRPC server (coordinator + aggregator) and the device SDK.

* :mod:`~flotilla.network.coordinator` — who trains, which uploads count, when the server steps
  (sync rounds or buffered async), on the simulator's aggregators and server optimizers.
* :mod:`~flotilla.network.server` — TLS, tokens, rate limits and chunked streaming around it.
* :mod:`~flotilla.network.store` — snapshot, pending updates and the accepted-update ledger on disk.
* :mod:`~flotilla.network.client` — :class:`Connection` (one RPC per method) and :class:`Device`.
* :mod:`~flotilla.network.certs` — a CA, certificates and device tokens for a test deployment.
* ``flotilla.proto`` / ``flotilla_pb2.py`` / :mod:`~flotilla.network.wire` — the protocol.
"""
