"""Deploy a Serve config from Python (what ``serve run CONFIG`` does), wait until every
application is running, and shut it down again: used by ``meddiff serve run``, the demo, the
tests and the benchmark. On a cluster use ``serve deploy serve/full.yaml`` instead."""

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


def shutdown(names: list[str] | None = None) -> None:
    """Delete ``names`` (or shut Serve down entirely)."""
    from ray import serve

    if names is None:
        serve.shutdown()
        return
    for n in names:
        serve.delete(n)
