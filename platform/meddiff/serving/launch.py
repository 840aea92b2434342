"""Deploy a Serve config from Python (what ``serve run CONFIG`` does), wait until every
application is running, and shut it down again: used by ``meddiff serve run``, the demo, the
tests and the benchmark. On a cluster use ``serve deploy`` of ``configs/full.yaml`` instead."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


def deploy(
    config: dict[str, Any], address: str | None = None, timeout_s: float = 300.0
) -> dict[str, str]:
    """Start Serve on the connected (or embedded) Ray and deploy ``config`` (a Serve config
    mapping, already checked by :func:`meddiff.serving.check.check_config`).

    Returns {application name: base URL}.

    Raises:
        ModelError: an application failed to deploy (Serve's message, e.g. an alias that does
            not exist), or did not start within ``timeout_s``.
    """
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    from meddiff import runtime
    from meddiff.config import RuntimeConfig

    schema = ServeDeploySchema.model_validate(config)
    if address:
        runtime.connect(RuntimeConfig(address=address))
    else:
        import ray

        if not ray.is_initialized():
            runtime.connect(RuntimeConfig())
    # The same calls as Ray's `serve run CONFIG` (ray/serve/scripts.py), in this process.
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
    )
    client.deploy_apps(schema, _blocking=False)
    names = [a.name for a in schema.applications]
    wait_running(names, timeout_s)
    http = schema.http_options
    host = "127.0.0.1" if http.host in ("0.0.0.0", "127.0.0.1", None) else http.host
    return {
        a.name: f"http://{host}:{http.port}{(a.route_prefix or '').rstrip('/')}"
        for a in schema.applications
    }


def wait_running(names: list[str], timeout_s: float) -> None:
    from ray import serve

    from meddiff.errors import ModelError

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            n = failed[0]
            raise ModelError(f"Serve application '{n}' failed: {_reason(apps[n].message)}")
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise ModelError(f"Serve applications not running after {timeout_s:.0f} s: {states}")
        time.sleep(0.5)


def _reason(message: str) -> str:
    """The meddiff error line out of Serve's traceback-laden message, when there is one."""
    for line in reversed(message.splitlines()):
        if "meddiff.errors." in line or "Error:" in line:
            return line.strip()
    return message.strip().splitlines()[-1] if message.strip() else "unknown"


def metrics_urls(names: list[str]) -> dict[str, str]:
    """{application: its Prometheus metrics URL}, asked of each application's Monitor."""
    from ray import serve

    out = {}
    for n in names:
        st = serve.get_deployment_handle("Monitor", n).status.remote().result(timeout_s=30)
        out[n] = f"http://{st['host']}:{st['port']}/metrics"
    return out


def drain(names: list[str], grace_s: float, poll_s: float = 0.2) -> dict[str, int]:
    """Stop accepting and let requests in flight finish: every ingress replica of ``names``
    answers new ``/v1`` requests 503 + Retry-After (and ``/readyz`` 503) within about a second, and
    this waits until each has reported no request in flight, or ``grace_s`` passed.

    Returns {application: requests still in flight when it returned} (0 when all finished).
    """
    from ray import serve

    monitors = {n: serve.get_deployment_handle("Monitor", n) for n in names}
    since = {n: m.drain.remote().result(timeout_s=30) for n, m in monitors.items()}
    deadline = time.monotonic() + grace_s
    left: dict[str, int] = {}
    while True:
        left = {}
        for n, m in monitors.items():
            reports = m.status.remote().result(timeout_s=30)["reports"]
            # Replicas report every second: one silent for 5 s before the drain is gone.
            ingress = [r for r in reports.values()
                       if r["kind"] == "ingress" and r["at"] > since[n] - 5]  # fmt: skip
            settled = [r for r in ingress if r.get("draining") and r["at"] > since[n]]
            busy = sum(r.get("inflight", 0) for r in ingress)
            left[n] = busy if len(settled) == len(ingress) else max(busy, 1)
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(poll_s)


def shutdown(names: list[str] | None = None) -> None:
    """Delete ``names`` (or shut Serve down entirely)."""
    from ray import serve

    if names is None:
        serve.shutdown()
        return
    for n in names:
        serve.delete(n)
