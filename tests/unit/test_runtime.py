"""The runtime's settings for Ray Data (no Ray started: they live in the driver's DataContext)."""

from __future__ import annotations

import pytest
from ray.data import DataContext

from meddiff import runtime
from meddiff.config import RuntimeConfig


@pytest.fixture
def fresh_context():
    saved = DataContext.get_current()
    DataContext._set_current(DataContext())
    yield DataContext.get_current()
    DataContext._set_current(saved)


def test_data_settings_bound_memory_and_fail_fast(fresh_context):
    runtime._configure_data(RuntimeConfig(data_memory_mb=128, progress=False))
    ctx = DataContext.get_current()
    assert ctx.execution_options.resource_limits.object_store_memory == 128 * 2**20
    assert not ctx.enable_progress_bars
    assert ctx.max_errored_blocks == 0 and ctx.raise_original_map_exception


def test_no_data_budget_keeps_rays_default(fresh_context):
    default = DataContext().execution_options.resource_limits.object_store_memory
    runtime._configure_data(RuntimeConfig())
    limits = DataContext.get_current().execution_options.resource_limits
    assert limits.object_store_memory == default


def test_ray_address_from_config_or_environment(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runtime.ray_address(RuntimeConfig()) is None
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert runtime.ray_address(RuntimeConfig()) == "ray://head:10001"
    assert runtime.ray_address(RuntimeConfig(address="auto")) == "auto"


def test_embedded_start_retries_with_backoff_then_one_line_error(monkeypatch):
    """Ray's raylet misses its fixed 30 s start bound on a loaded machine: retry, then a
    one-line ClusterError (no Ray is started here: ray.init is replaced)."""
    import ray

    from meddiff.errors import ClusterError

    calls, sleeps = [], []

    def flaky_init(**kwargs):
        calls.append(kwargs)
        if len(calls) < 3:
            raise Exception(
                "The current node timed out during startup. This could happen because some "
                "of the raylet failed to startup or the GCS has become overloaded."
            )

    monkeypatch.setattr(ray, "init", flaky_init)
    runtime.start_embedded(RuntimeConfig(start_timeout_s=100), sleep=sleeps.append)
    assert len(calls) == 3 and sleeps == [2.0, 4.0]
    # Each try passes its own address on to every worker of the job.
    env = calls[-1]["runtime_env"]["env_vars"]["RAY_ADDRESS"]
    assert env.rsplit(":", 1)[1].isdigit() and calls[-1]["address"] == "local"

    # Always failing: tries until the bound (a fake clock advanced by the fake sleep).
    now = [0.0]

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    def dead_init(**kwargs):
        now[0] += 30.0  # Ray's own bound per try
        raise Exception("The current node timed out during startup.")

    sleeps.clear()
    monkeypatch.setattr(ray, "init", dead_init)
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])
    with pytest.raises(ClusterError) as err:
        runtime.start_embedded(RuntimeConfig(start_timeout_s=120), sleep=sleep)
    msg = str(err.value)
    assert "\n" not in msg and "runtime.start_timeout_s=120" in msg and "timed out" in msg
    # Tries end at 30, 62, 96 and 134 s; the next wait (16 s) would pass the 120 s bound.
    assert sleeps == [2.0, 4.0, 8.0] and msg.startswith("the embedded Ray did not start: 4 tries")


def test_shutdown_restores_the_address_connect_exported(monkeypatch):
    import ray

    # Isolated from a Ray this test process may already run (the integration tier's shared one):
    # no saved address yet, and nothing to shut down.
    monkeypatch.setattr(runtime, "_saved_address", runtime._UNSET)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "")
    runtime._export_address("10.0.0.1:6379")
    assert __import__("os").environ["RAY_ADDRESS"] == "10.0.0.1:6379"
    runtime.shutdown()
    assert __import__("os").environ["RAY_ADDRESS"] == ""


def test_unreachable_cluster_address_is_a_one_line_error(caplog):
    import socket

    from meddiff.errors import ClusterError, ConfigError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClusterError) as err:
        runtime.check_reachable(f"127.0.0.1:{port}", attempts=2, delay_s=0.01)
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "2 attempts" in message and "\n" not in message
    assert "attempt 1 of 2" in caplog.text and "attempt 2 of 2" in caplog.text
    runtime.check_reachable("auto")  # left to Ray
    with pytest.raises(ConfigError, match="not host:port"):
        runtime.check_reachable("head:port")


def test_reachable_address_passes():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        runtime.check_reachable(f"ray://127.0.0.1:{s.getsockname()[1]}", attempts=1)


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:  # pragma: no cover - nothing is printed here
        return len(text)


@pytest.mark.parametrize(("stdout", "stderr", "bars"), [(True, True, True), (False, True, False)])
def test_progress_bars_default_to_a_terminal_only(monkeypatch, stdout, stderr, bars):
    monkeypatch.setattr("sys.stdout", _Stream(stdout))
    monkeypatch.setattr("sys.stderr", _Stream(stderr))
    assert RuntimeConfig().progress is bars
    assert RuntimeConfig(progress=True).progress is True  # an explicit setting wins
    assert RuntimeConfig(progress=False).progress is False


def test_progress_off_a_terminal_logs_a_line_at_start_and_end(capsys, caplog):
    caplog.set_level("INFO", logger="meddiff.runtime")
    items = list(runtime.progress(range(7), total=7, desc="encode", show=False))
    assert items == list(range(7))
    lines = [r.getMessage() for r in caplog.records if r.name == "meddiff.runtime"]
    assert lines[0] == "encode: started (7 batches)"
    assert lines[1].startswith("encode: 7 batches in ") and len(lines) == 2
    out, err = capsys.readouterr()
    assert "\r" not in out + err


def test_embedded_workers_drop_only_the_state_api_warning():
    """The setup hook an embedded Ray gives its workers drops Ray Train's state-API warning (no
    dashboard there) and nothing else from that logger; installing it twice adds one filter."""
    import logging

    runtime.quiet_embedded_workers()
    runtime.quiet_embedded_workers()
    logger = logging.getLogger(runtime.PG_CLEANER_LOGGER)
    assert sum(isinstance(f, runtime.StateApiNoiseFilter) for f in logger.filters) == 1

    def record(msg: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, (), None)

    noise = record("Failed to query Ray Train Controller actor state. State API may be "
                   "temporarily unavailable. Continuing to monitor.")  # fmt: skip
    kept = record("Detected that the Ray Train controller actor (x) is dead.")
    assert not logger.filter(noise) and logger.filter(kept)


def test_a_quiet_run_keeps_ray_data_and_ray_train_info_out_of_the_console(monkeypatch):
    """Off a terminal (runtime.progress false) Ray Data's console shows warnings only and Ray
    Train gets a WARNING log level and bar-less workers; on a terminal both stay as Ray sets
    them."""
    import logging

    from meddiff.training.driver import _log_settings

    monkeypatch.setattr(runtime, "_progress", True)
    assert _log_settings() == {}
    monkeypatch.setattr(runtime, "_progress", False)
    settings = _log_settings()
    assert settings["logging_config"].log_level == "WARNING"
    assert settings["worker_runtime_env"]["env_vars"]["TQDM_DISABLE"] == "1"

    runtime.quiet_ray_data()
    [console] = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    assert console.level == logging.WARNING
    console.setLevel(logging.INFO)  # as Ray Data configured it, for the tests after this one


def test_quiet_workers_configure_ray_data_from_the_shipped_logging_file():
    """A worker of a quiet run imports Ray Data with the console at WARNING and its file
    handler intact (the YAML given as RAY_DATA_LOGGING_CONFIG)."""
    import os
    import subprocess
    import sys

    code = (
        "import logging, ray.data\n"
        "print(sorted((h.get_name(), h.level) for h in logging.getLogger('ray.data').handlers))"
    )
    env = {**os.environ, **runtime.QUIET_WORKER_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[('console', 30), ('file', 0)]"
