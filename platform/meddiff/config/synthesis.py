"""Stable Diffusion fine-tuning and generation configuration (paper A)."""

from __future__ import annotations

from meddiff.config.base import Section


class SynthesisConfig(Section):
    """Filled in by the synthesis issue."""


TINY: dict = {}
