"""A team's MLflow tracking server, and the reachability check every job makes before using one.

``meddiff tracking server`` runs ``mlflow server`` with a database backend (PostgreSQL for a team,
``postgresql://user:password@host:5432/db``; a SQLite file for one user) and artifacts proxied
(``--serve-artifacts``) to an object store (``s3://bucket/prefix``) or a directory. Clients then
send params, metrics, artifacts and models over HTTP only, so nodes need neither a shared
filesystem nor object-store credentials for tracking.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from meddiff.errors import ConfigError

log = logging.getLogger(__name__)


def server_command(
    backend_store_uri: str,
    artifacts_destination: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 2,
    allowed_hosts: str | None = None,
) -> list[str]:
    """The ``mlflow server`` command line for a proxied-artifact server.

    MLflow answers only requests addressed to localhost unless ``allowed_hosts`` lists the names
    the nodes use (e.g. ``mlflow.internal,mlflow.internal:5000``)."""
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    return [
        mlflow,
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        *(["--allowed-hosts", allowed_hosts] if allowed_hosts else []),
    ]


def check_backend(uri: str) -> str:
    """``uri`` if it names a database backend MLflow can use, with a local directory created for a
    SQLite file. Raises ConfigError naming the URI otherwise."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    if scheme == "sqlite":
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return uri
    if scheme in ("postgresql", "mysql", "mssql"):
        return uri
    raise ConfigError(
        f"backend store {uri!r}: expected postgresql://user:password@host:port/db (a team) or "
        "sqlite:///path/mlruns.db (one user)"
    )


def artifacts_location(dest: str) -> str:
    """``dest`` as MLflow takes it: a URI unchanged, a local directory (created) as file:// URI."""
    from meddiff import storage

    storage.make_dirs(dest)
    return storage.as_uri(dest)


def server_env(artifacts_destination: str, endpoint_url: str | None) -> dict[str, str]:
    """The server's environment: for an S3 destination, MLflow's boto3 client is pointed at the
    configured endpoint (``MLFLOW_S3_ENDPOINT_URL``); credentials come from the AWS variables."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    if artifacts_destination.startswith("s3://") and endpoint:
        env.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)
    return env


def start_server(
    backend_store_uri: str,
    artifacts_destination: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 2,
    allowed_hosts: str | None = None,
    endpoint_url: str | None = None,
    log_path: str | Path | None = None,
    timeout_s: float = 120.0,
    extra_env: Mapping[str, str] | None = None,
) -> subprocess.Popen:
    """Start the server and return its process once ``/health`` answers.

    Raises:
        ConfigError: bad backend URI, or the server exited or did not answer within
            ``timeout_s`` (the message has the last line of its log).
    """
    backend = check_backend(backend_store_uri)
    artifacts = artifacts_location(artifacts_destination)
    cmd = server_command(
        backend, artifacts, host=host, port=port, workers=workers, allowed_hosts=allowed_hosts
    )
    env = {**server_env(artifacts, endpoint_url), **(extra_env or {})}
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (kept open)
    # Its own session, so the server and its workers can be stopped together (os.killpg).
    proc = subprocess.Popen(
        cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(
                f"MLflow server exited with code {proc.returncode}: {_last_line(log_path)}"
            )
        if _healthy(url):
            log.info(
                "MLflow server at %s (backend %s, artifacts %s)", url, _redact(backend), artifacts
            )
            return proc
        time.sleep(1.0)
    stop_server(proc)
    raise ConfigError(f"MLflow server at {url} did not answer /health within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a server from :func:`start_server` and its worker processes (its process group)."""
    import signal

    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _healthy(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _last_line(path: str | Path | None) -> str:
    if not path or not Path(path).is_file():
        return "(no log)"
    lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(empty log)"


def _redact(uri: str) -> str:
    """``uri`` without its password, for logs."""
    if "@" not in uri or "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    cred, host = rest.rsplit("@", 1)
    return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"


def check_reachable(uri: str, attempts: int = 3) -> None:
    """For an ``http(s)://`` tracking URI, make sure the server answers ``/health``.

    Tried ``attempts`` times with a short back-off (each failed attempt logged), so a server that
    is still starting is waited for, but a wrong address fails in seconds with one line instead
    of MLflow's own minutes of silent retries.

    Raises:
        ConfigError: the server did not answer.
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/")
    for attempt in range(1, attempts + 1):
        if _healthy(url):
            return
        if attempt < attempts:
            log.warning(
                "MLflow server %s: no answer on /health; attempt %d of %d", url, attempt, attempts
            )
            time.sleep(min(4.0, 1.0 * 2 ** (attempt - 1)))
    raise ConfigError(
        f"MLflow server {url} unreachable (no answer on /health after {attempts} attempts); "
        "check tracking.uri / MLFLOW_TRACKING_URI or start one with `meddiff tracking server`"
    )
