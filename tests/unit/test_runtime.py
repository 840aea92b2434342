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
