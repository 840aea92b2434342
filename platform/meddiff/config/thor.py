"""THOR anomaly-detection configuration (paper B)."""

from __future__ import annotations

from meddiff.config.base import Section


class ThorConfig(Section):
    """Filled in by the THOR issue."""


TINY: dict = {}
