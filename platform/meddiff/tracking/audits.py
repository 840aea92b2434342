"""A memorization audit recorded on a registry model version, as model-version tags.

The audit itself (what a copy is, the copy rate and its interval) is
:mod:`meddiff.evaluation.memorization`'s; this module owns only how the registry holds one, so
that the layers below evaluation (a shipped model registered with its recorded audit,
:mod:`meddiff.tracking.shipped`) write the same tags that ``eval fidelity`` writes and that
``serve promote``'s check reads.
"""

from __future__ import annotations

from typing import Any

TAG_PREFIX = "meddiff.memorization."  # model-version tags of a recorded audit


def memorization_tags(summary: dict[str, Any]) -> dict[str, str]:
    """Model-version tags (strings) recording an audit ``summary``: the copy rate, its CI, the
    pixel-space rate, the feature network, the reference set and the number of images judged."""
    rate, pixels = summary["copy_rate"], summary["copy_rate_pixels"]
    tags = {
        "copy_rate": f"{rate['value']:.6g}",
        "copy_rate_ci": ",".join(f"{v:.6g}" for v in rate["ci"]),
        "copy_rate_pixels": f"{pixels['value']:.6g}",
        "network": str(summary.get("network")),
        "percentile": str(summary.get("percentile")),
        "n_synthetic": str(summary.get("n_synthetic")),
        "reference": str(summary.get("reference", "")),
    }
    return {TAG_PREFIX + k: v for k, v in tags.items()}
