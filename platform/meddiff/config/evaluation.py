"""Configuration for judging synthetic data (paper A's evaluation)."""

from __future__ import annotations

from meddiff.config.base import Section


class EvaluationConfig(Section):
    """Filled in by the evaluation issue."""


TINY: dict = {}
