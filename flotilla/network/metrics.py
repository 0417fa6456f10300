"""Prometheus metrics of a running ``flotilla serve`` (``--metrics-port``; off by default).

Every value is read from the server's latest snapshot (:mod:`flotilla.network.observe`) when
Prometheus scrapes, so serving metrics adds no work to the upload path; only the server step's
latency is a real histogram, observed as each step finishes.  Names (docs/deployment.md):

  flotilla_devices_seen                      devices that have called the server (distinct tokens)
  flotilla_uploads_accepted_total            accepted updates
  flotilla_uploads_refused_total{reason}     refused requests, by the refusal's reason
  flotilla_updates_dropped_total{reason}     accepted updates dropped later (lost on restart, ...)
  flotilla_trips_in_flight                   live assignments (devices training or uploading)
  flotilla_uploads_in_progress               upload streams open now
  flotilla_buffered_updates                  updates in the buffer / this round so far
  flotilla_model_version                     server steps taken
  flotilla_training_done                     1 once the last step is taken
  flotilla_server_step_seconds               histogram: one server step, its durable write included
  flotilla_bytes_in_total / _out_total       upload bodies received / model bytes sent
  flotilla_epsilon_spent, flotilla_epsilon_budget   user-level DP (absent without it)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class _SnapshotCollector:
    def __init__(self, server):
        self.server = server

    def collect(self):
        snap = self.server.observed.snapshot()
        st = snap.get("status")
        if not st:
            return
        g = GaugeMetricFamily
        yield g("flotilla_devices_seen", "devices that have called the server", value=snap["devices_seen"])
        yield CounterMetricFamily("flotilla_uploads_accepted", "accepted updates", value=st["accepted"])
        refused = CounterMetricFamily("flotilla_uploads_refused", "refused requests by reason", labels=["reason"])
        for reason, n in sorted(st["rejected_by_reason"].items()):
            refused.add_metric([reason], n)
        yield refused
        dropped = CounterMetricFamily(
            "flotilla_updates_dropped", "accepted updates dropped, by reason", labels=["reason"]
        )
        for reason, n in sorted(st["dropped_by_reason"].items()):
            dropped.add_metric([reason], n)
        yield dropped
        yield g("flotilla_trips_in_flight", "live assignments", value=st["in_flight"])
        yield g("flotilla_uploads_in_progress", "upload streams open now", value=st["uploading"])
        yield g("flotilla_buffered_updates", "updates waiting for the next step", value=st["buffered"])
        yield g("flotilla_model_version", "server steps taken", value=st["version"])
        yield g("flotilla_training_done", "1 once the last step is taken", value=int(st["done"]))
        yield CounterMetricFamily("flotilla_bytes_in", "upload bytes received", value=snap["bytes_in"])
        yield CounterMetricFamily("flotilla_bytes_out", "model bytes sent", value=snap["bytes_out"])
        dp = st.get("privacy")
        if dp is not None:
            if dp["epsilon"] is not None:
                yield g("flotilla_epsilon_spent", "user-level DP epsilon spent so far", value=dp["epsilon"])
            if dp["budget"] is not None:
                yield g("flotilla_epsilon_budget", "user-level DP epsilon budget", value=dp["budget"])


def start_exporter(server, port: int, host: str = "127.0.0.1"):
    """Serve ``/metrics`` on ``host:port`` in a background thread; returns (http server, thread)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(server))
    steps = Histogram(
        "flotilla_server_step_seconds",
        "one server step, its durable write included",
        registry=registry,
        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    server.observed.step_observers.append(steps.observe)
    server.watched = True
    return start_http_server(port, addr=host, registry=registry)
