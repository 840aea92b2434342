"""The one place that connects to Ray.

Jobs call :func:`connect` and then run the same code whether Ray is an embedded local instance
(the default on a laptop or in tests) or a cluster reached through ``--address``/``RAY_ADDRESS``
(``ray job submit`` sets ``RAY_ADDRESS`` for the job's driver).
"""

from __future__ import annotations

import logging
import os

from meddiff.config import RuntimeConfig

log = logging.getLogger(__name__)


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
    address = ray_address(cfg)
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        store = cfg.object_store_memory_mb * 2**20 if cfg.object_store_memory_mb else None
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            object_store_memory=store,
            include_dashboard=False,
            log_to_driver=True,
        )
    _configure_data(cfg)


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


def _configure_data(cfg: RuntimeConfig) -> None:
    from ray.data import DataContext

    quiet_user_errors()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    # Errors in user data should stop the job with the first message, not after retries, and
    # keep their type (a DataError naming the bad file) instead of a generic UserCodeException.
    ctx.max_errored_blocks = 0
    ctx.raise_original_map_exception = True
    if cfg.data_memory_mb:
        limits = ctx.execution_options.resource_limits
        ctx.execution_options.resource_limits = limits.copy(
            object_store_memory=cfg.data_memory_mb * 2**20
        )


def shutdown() -> None:
    """Disconnect (and stop an embedded Ray)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
