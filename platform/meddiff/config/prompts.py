"""Morphology-prompt configuration (paper A's prompt building): filter, DINO embedding, K-means."""

from __future__ import annotations

from meddiff.config.base import Section


class PromptsConfig(Section):
    """Filled in by the morphology-prompts issue."""


TINY: dict = {}
