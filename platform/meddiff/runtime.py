"""The one place that connects to Ray.

Jobs call :func:`connect` and then run the same code whether Ray is an embedded local instance
(the default on a laptop or in tests) or a cluster reached through ``--address``/``RAY_ADDRESS``
(``ray job submit`` sets ``RAY_ADDRESS`` for the job's driver).

Every process meddiff's work starts uses the instance the driver started or joined: the driver
exports its address as ``RAY_ADDRESS`` (for its own child processes), and an embedded Ray is
started on a GCS port chosen here, so its address can go into the job's runtime environment and
reach every worker. Without it, Ray components that look the cluster up by themselves (Ray
Train's state actors, Ray Data's hang detector) fail with "Found multiple active Ray instances"
when another Ray runs on the same machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from meddiff.config import RuntimeConfig
from meddiff.errors import ClusterError, ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

# RAY_ADDRESS as it was before connect() exported one; restored by shutdown().
_UNSET = object()
_saved_address: object = _UNSET
# Whether this process shows progress bars (``runtime.progress`` of the config it connected with).
_progress = True

# What a quiet run (runtime.progress false: off a terminal) sets in its Ray workers' environment:
# no tqdm bars (the libraries' own, e.g. diffusers saving a model in a training worker), Ray
# Data's console at WARNING (its per-dataset start/plan/finish lines; ray-data.log keeps them),
# and MEDDIFF_QUIET for the embedded Ray's worker setup hook.
QUIET_WORKER_ENV = {
    "TQDM_DISABLE": "1",
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_quiet_logging.yaml")),
    "MEDDIFF_QUIET": "1",
}


def ray_address(cfg: RuntimeConfig) -> str | None:
    """The cluster to join, or None for an embedded local Ray."""
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def connect(cfg: RuntimeConfig) -> None:
    """Start or join Ray once per process; later calls are no-ops.

    An embedded Ray is started with ``address="local"`` so that it never attaches by accident to
    some other cluster left running on the machine.
    """
    import ray

    if ray.is_initialized():
        return
    global _progress
    _progress = bool(cfg.progress)
    if not _progress:
        # MLflow reads it at each download ("Downloading artifacts" bars in a log file).
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    address = ray_address(cfg)
    if address:
        log.info("joining Ray cluster at %s", address)
        check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    else:
        start_embedded(cfg)
    if not (address or "").startswith("ray://"):  # a Ray Client keeps its own address
        _export_address(_gcs_address())
    _configure_data(cfg)


def start_embedded(cfg: RuntimeConfig, sleep=time.sleep) -> None:
    """Start a local Ray (without Ray's metrics exporter), retrying with exponential backoff (2 s, 4 s, ... 30 s) for up to
    ``cfg.start_timeout_s``: on a loaded machine Ray's raylet can miss its fixed 30 s startup
    bound. Processes a failed try left behind are stopped before the next (by PID).

    Raises:
        ClusterError: every try failed within the bound (one line, with what to do).
    """
    import ray

    store = cfg.object_store_memory_mb * 2**20 if cfg.object_store_memory_mb else None
    start = time.monotonic()
    delay, attempt = 2.0, 0
    while True:
        attempt += 1
        port = free_port()
        address = f"{_node_ip()}:{port}"
        before = _child_pids()
        try:
            with _environ(RAY_GCS_SERVER_PORT=str(port)):
                ray.init(
                    address="local",
                    num_cpus=cfg.num_cpus,
                    num_gpus=cfg.num_gpus,
                    object_store_memory=store,
                    include_dashboard=False,
                    log_to_driver=True,
                    runtime_env={
                        "env_vars": {
                            "RAY_ADDRESS": address,
                            **({} if cfg.progress else QUIET_WORKER_ENV),
                        },
                        "worker_process_setup_hook": "meddiff.runtime.quiet_embedded_workers",
                    },
                    # Ray's metrics exporter listens on every interface without auth, and
                    # nothing scrapes an embedded Ray (no dashboard): it is not started. The
                    # services' own metrics are on a port of their own (docs/serving.md).
                    _system_config={"enable_metrics_collection": False},
                )
            return
        except Exception as err:  # Ray raises bare Exception on a startup timeout
            ray.shutdown()
            _stop_children(_child_pids() - before)
            if isinstance(err, (TypeError, ValueError)):
                raise  # wrong arguments: no retry fixes them
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
            elapsed = time.monotonic() - start
            if elapsed + delay > cfg.start_timeout_s:
                raise ClusterError(
                    f"the embedded Ray did not start: {attempt} tries in {elapsed:.0f} s "
                    f"(runtime.start_timeout_s={cfg.start_timeout_s:g}); last: {reason}. The "
                    "machine may be overloaded: retry, raise runtime.start_timeout_s, or join a "
                    "running cluster with --address"
                ) from None
            log.warning("embedded Ray did not start (try %d: %s); retrying in %.0f s",
                        attempt, reason, delay)  # fmt: skip
            sleep(delay)
            delay = min(delay * 2, 30.0)


def free_port() -> int:
    """A TCP port free at the time of asking (a race that a retried start absorbs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _node_ip() -> str:
    from ray.util import get_node_ip_address

    return get_node_ip_address()


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _gcs_address() -> str | None:
    import ray

    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # a Ray Client (ray://) connection has no GCS address of its own
        return None


def _export_address(gcs_address: str | None) -> None:
    """Make ``RAY_ADDRESS`` name the instance this process uses, for the processes it starts."""
    global _saved_address
    if not gcs_address:
        return
    if _saved_address is _UNSET:
        _saved_address = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = gcs_address


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _stop_children(pids: set[int]) -> None:
    """Stop the processes a failed start left (ours: children of this process), by PID."""
    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


class UserErrorFilter(logging.Filter):
    """Drops console records about a :class:`~meddiff.errors.MeddiffError` (bad input named by
    the error itself): Ray Data logs the failing stage's traceback, twice, before re-raising it,
    and the CLI then prints the one line that matters. The log file keeps the records.

    The exception is the record's own, else the one being handled: Ray Data logs from inside
    its ``except`` blocks, on the thread that caught it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        import sys

        from meddiff.errors import find_user_error

        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return exc is None or find_user_error(exc) is None


def quiet_user_errors() -> None:
    """Install :class:`UserErrorFilter` on Ray Data's console handlers (idempotent)."""
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console" and not any(
            isinstance(f, UserErrorFilter) for f in handler.filters
        ):
            handler.addFilter(UserErrorFilter())


class StateApiNoiseFilter(logging.Filter):
    """Drops Ray Train's "State API may be temporarily unavailable" warning.

    Ray Train's placement-group cleaner asks the state API, every few seconds, whether the
    training controller is alive; the state API is served by Ray's dashboard, which an embedded
    Ray does not start, so on one machine each training run printed the warning hundreds of
    times. Nothing is lost: an embedded Ray stops with its driver, placement groups included.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "State API may be temporarily unavailable" not in record.getMessage()


PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet() -> bool:
    """Whether this process runs without progress bars (``runtime.progress`` false: off a
    terminal), as set by :func:`connect`: libraries' INFO chatter stays out of the console too."""
    return not _progress


def quiet_embedded_workers() -> None:
    """Ray's ``worker_process_setup_hook`` for an embedded Ray: runs in each worker process
    when it starts (:class:`StateApiNoiseFilter`; in a quiet run, no per-report line either).
    Ray Data's console level comes from ``RAY_DATA_LOGGING_CONFIG`` (:data:`QUIET_WORKER_ENV`),
    applied whenever a worker imports Ray Data, so workers that never do do not pay for it."""
    logger = logging.getLogger(PG_CLEANER_LOGGER)
    if not any(isinstance(f, StateApiNoiseFilter) for f in logger.filters):
        logger.addFilter(StateApiNoiseFilter())
    if os.environ.get("MEDDIFF_QUIET") == "1":
        _quiet_train_reports()


def _quiet_train_reports() -> None:
    """Ray Train logs each worker's "Reporting training result ..." at INFO on a logger named
    by its source file (so its LoggingConfig level does not apply); a quiet worker keeps it out
    of the console. The loops log their own progress."""
    import importlib.util

    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def quiet_ray_data() -> None:
    """In this process (the driver), Ray Data's console handler at WARNING: its INFO lines
    (each dataset's start, plan and finish) stay in ``ray-data.log`` only."""
    import ray.data  # noqa: F401  (configures Ray Data's loggers, handlers included)

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)


def check_reachable(address: str, attempts: int = 3, delay_s: float = 2.0) -> None:
    """Fail fast when nothing listens at a cluster address (``ray.init`` would retry for many
    minutes). Tries ``attempts`` TCP connects ``delay_s`` apart (a head that is still starting
    gets that long), logging each failure.

    Addresses without a host:port (``auto``, a bare host) are left to Ray.

    Raises:
        ConfigError: the address is not host:port.
        ClusterError: no connection to the address's host:port, naming it and the reason.
    """
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        raise ConfigError(
            f"runtime.address={address!r} is not host:port or ray://host:port"
        ) from None
    if not host or port is None:
        return
    for attempt in range(1, attempts + 1):
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as err:
            reason = err.strerror or type(err).__name__
            log.warning(
                "Ray at %s:%d: %s (attempt %d of %d)", host, port, reason, attempt, attempts
            )
            if attempt < attempts:
                time.sleep(delay_s)
    raise ClusterError(
        f"runtime.address={address!r}: no Ray cluster answers at {host}:{port} ({reason} after "
        f"{attempts} attempts); check --address / RAY_ADDRESS and that the head node is up"
    )


def _configure_data(cfg: RuntimeConfig) -> None:
    from ray.data import DataContext

    quiet_user_errors()
    if not cfg.progress:
        quiet_ray_data()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    # Errors in user data should stop the job with the first message, not after retries, and
    # keep their type (a DataError naming the bad file) instead of a generic UserCodeException.
    ctx.max_errored_blocks = 0
    ctx.raise_original_map_exception = True
    # Ray Data retries an object-store error up to 10 times per file operation with up to 32 s
    # of back-off, logged at debug level only: a store that stopped answering kept a job
    # silent for minutes. meddiff's storage layer retries instead, storage.retries times with
    # a warning per attempt, then stops with one line naming the endpoint.
    ctx.retried_io_errors = []
    if cfg.data_memory_mb:
        limits = ctx.execution_options.resource_limits
        ctx.execution_options.resource_limits = limits.copy(
            object_store_memory=cfg.data_memory_mb * 2**20
        )


def shutdown() -> None:
    """Disconnect (and stop an embedded Ray)."""
    import ray

    global _saved_address, _progress
    _progress = True
    if ray.is_initialized():
        ray.shutdown()
    if _saved_address is not _UNSET:
        if _saved_address is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = str(_saved_address)
        _saved_address = _UNSET


def progress(
    items: Iterable[T], *, total: int | None, desc: str, show: bool, unit: str = "batches"
) -> Iterator[T]:
    """``items`` with a progress bar (``show``, i.e. ``runtime.progress``: on a terminal), else
    with one log line when the stage starts and one when it ends (count, seconds, rate), so a
    log file gets two lines instead of one per redraw."""
    if show:
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit)
        return
    log.info("%s: started (%s %s)", desc, "?" if total is None else total, unit)
    start, count = time.perf_counter(), 0
    for item in items:
        yield item
        count += 1
    seconds = time.perf_counter() - start
    log.info("%s: %d %s in %.1f s (%.2f/s)", desc, count, unit, seconds, count / max(seconds, 1e-9))
