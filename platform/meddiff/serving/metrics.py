"""meddiff's own Prometheus metrics of a service, and the audit log line of a request.

Every replica (ingresses and models) records *events* into a :class:`Recorder`; deployed, each
recorder sends its events about once a second to the application's ``Monitor`` deployment
(:mod:`meddiff.serving.deployments`), which applies them to one :class:`Metrics` and serves it
in the Prometheus text format on ``args.metrics_port`` (bound to ``args.metrics_host``,
127.0.0.1 by default). In unit tests a recorder applies its events to a :class:`Metrics`
directly.

Metric names follow Prometheus' conventions (``_total`` counters, base units: seconds):

- ``meddiff_serve_requests_total{service, route, status, model_version}``
- ``meddiff_serve_request_duration_seconds{service, route}`` (histogram)
- ``meddiff_serve_batch_size{service, model_version}`` (histogram, one sample per batch)
- ``meddiff_serve_queue_depth{service, replica}``: requests inside a model replica (waiting for
  a batch or running), as each replica last reported
- ``meddiff_serve_inflight_requests{service, replica}``: requests inside an ingress replica
- ``meddiff_serve_model_events_total{service, event, model_version}``: ``load``, ``swap``,
  ``load_failed``, ``registry_missing``, ``canary_on``, ``canary_off``
- ``meddiff_serve_model_in_registry{service, replica}``: 1 while the served reference still
  resolves in the registry to what the replica serves, 0 once it does not (the served version
  was deleted, the alias removed, the new version cannot be loaded: the service is not ready)
- ``meddiff_serve_anomaly_score{model_version}`` (histogram of image scores, in [0, 1])

No label holds anything a client sent except the route (a fixed set) and the status code.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)
audit_log = logging.getLogger("meddiff.serving.audit")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256)
SCORE_BUCKETS = tuple(round(0.01 * i, 2) for i in range(1, 10)) + (0.15, 0.2, 0.3, 0.5, 0.75, 1)


class Metrics:
    """One service's metrics in their own registry (never the process-wide default one, which
    Ray's own metrics use)."""

    def __init__(self, service: str):
        self.service = service
        r = self.registry = CollectorRegistry()
        svc = ["service"]
        self.requests = Counter("meddiff_serve_requests", "HTTP requests answered",
                                [*svc, "route", "status", "model_version"], registry=r)  # fmt: skip
        self.latency = Histogram("meddiff_serve_request_duration_seconds",
                                 "time from request to answer, in the ingress", [*svc, "route"],
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch = Histogram("meddiff_serve_batch_size", "items per model batch",
                               [*svc, "model_version"], buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.queue = Gauge("meddiff_serve_queue_depth", "requests inside a model replica",
                           [*svc, "replica"], registry=r)  # fmt: skip
        self.inflight = Gauge("meddiff_serve_inflight_requests",
                              "requests inside an ingress replica", [*svc, "replica"],
                              registry=r)  # fmt: skip
        self.events = Counter("meddiff_serve_model_events", "model loads, swaps, registry events",
                              [*svc, "event", "model_version"], registry=r)  # fmt: skip
        self.in_registry = Gauge("meddiff_serve_model_in_registry",
                                 "1 while the served version resolves in the registry",
                                 [*svc, "replica"], registry=r)  # fmt: skip
        self.scores = Histogram("meddiff_serve_anomaly_score", "image anomaly scores",
                                ["model_version"], buckets=SCORE_BUCKETS, registry=r)  # fmt: skip

    def apply(self, events: list[tuple]) -> None:
        """Apply events as :class:`Recorder` makes them (unknown kinds are ignored)."""
        s = self.service
        for kind, *v in events:
            if kind == "request":
                route, status, version, latency_s, score = v
                self.requests.labels(s, route, str(status), version).inc()
                self.latency.labels(s, route).observe(latency_s)
                if score is not None:
                    self.scores.labels(version).observe(score)
            elif kind == "batch":
                self.batch.labels(s, v[0]).observe(v[1])
            elif kind == "queue":
                self.queue.labels(s, v[0]).set(v[1])
            elif kind == "inflight":
                self.inflight.labels(s, v[0]).set(v[1])
            elif kind == "event":
                self.events.labels(s, v[0], v[1]).inc()
            elif kind == "in_registry":
                self.in_registry.labels(s, v[0]).set(1 if v[1] else 0)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class Recorder:
    """A replica's event buffer: cheap to record into (a list append), drained by
    :meth:`take` (deployed: sent to the Monitor once a second) or applied to ``sink`` at once."""

    def __init__(self, sink: Metrics | None = None):
        self.sink = sink
        self._events: list[tuple] = []

    def add(self, *event) -> None:
        if self.sink is not None:
            self.sink.apply([event])
        else:
            self._events.append(event)

    def take(self) -> list[tuple]:
        out, self._events = self._events, []
        return out


def serve_metrics(metrics: Metrics, host: str, port: int) -> int:
    """Serve ``metrics`` in the Prometheus text format at ``http://HOST:PORT/metrics`` (a
    daemon thread of prometheus_client); a port that is taken falls back to a free one, with a
    warning. Returns the port."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as err:
        if port == 0:
            raise
        log.warning("metrics port %s:%d is taken (%s); serving on a free port instead",
                    host, port, err.strerror)  # fmt: skip
        server, _ = start_http_server(0, addr=host, registry=metrics.registry)
    actual = int(server.server_address[1])
    log.info("meddiff metrics of the %s service at http://%s:%d/metrics", metrics.service, host,
             actual)  # fmt: skip
    return actual


def version_label(version: Any) -> str:
    return "none" if version is None else str(version)


def audit(record: dict[str, Any]) -> None:
    """One JSON line per request on the ``meddiff.serving.audit`` logger: request id, token
    name, method, route, status, latency, model version, seed, canary (never a body, pixel data,
    a prompt or a file name)."""
    audit_log.info(json.dumps(record, sort_keys=True))


def add_audit_file(path: str) -> None:
    """Append the audit lines to ``path`` too (JSON lines; idempotent per path)."""
    from pathlib import Path

    p = Path(path).expanduser()
    for h in audit_log.handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == p.resolve():
            return
    p.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(p, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    audit_log.addHandler(handler)
    audit_log.setLevel(logging.INFO)
