"""The coverage picture: one 2-D UMAP of real and synthetic features (paper A, Fig. 4).

All sets are embedded by one UMAP fitted on their union, so positions are comparable: regions
holding real points but no synthetic points of a strategy are what it fails to cover.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from meddiff.config.evaluation import UmapConfig
from meddiff.errors import DataError
from meddiff.files import save_figure

# Paper A's colours: real blue, baseline red, morphology black; others follow matplotlib's cycle.
COLOURS = {"real": "#1f77b4", "baseline": "#d62728", "morphology": "#111111"}


def umap_embedding(
    sets: Mapping[str, np.ndarray], cfg: UmapConfig, seed: int = 0
) -> dict[str, np.ndarray]:
    """2-D coordinates (n_i, 2) of at most ``cfg.max_points`` rows of each named set (n_i, d).

    Raises:
        DataError: a set is empty, or the sets have different feature dimensions.
    """
    import umap

    rng = np.random.default_rng(seed)
    parts, names = [], []
    dims = {name: np.asarray(x).shape[-1] for name, x in sets.items()}
    if len(set(dims.values())) > 1:
        raise DataError(f"feature dimensions differ between sets: {dims}")
    for name, x in sets.items():
        x = np.asarray(x, dtype=np.float32)
        if len(x) == 0:
            raise DataError(f"set '{name}' is empty; nothing to embed")
        if len(x) > cfg.max_points:
            x = x[np.sort(rng.choice(len(x), cfg.max_points, replace=False))]
        parts.append(x)
        names.append(name)
    data = np.concatenate(parts)
    n_neighbors = min(cfg.n_neighbors, len(data) - 1)
    if n_neighbors < 2:
        raise DataError(f"UMAP needs at least 3 points in all, got {len(data)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state": seeded on purpose
        reducer = umap.UMAP(
            n_neighbors=n_neighbors, min_dist=cfg.min_dist, random_state=seed, n_components=2
        )
        emb = reducer.fit_transform(data)
    out, lo = {}, 0
    for name, x in zip(names, parts, strict=True):
        out[name] = emb[lo : lo + len(x)]
        lo += len(x)
    return out


def plot_umap(embedding: Mapping[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Scatter the embedded sets (real first, underneath) into a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=120)
    cycle = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"][2:])
    for name, xy in embedding.items():
        colour = COLOURS.get(name) or next(cycle)
        ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.55, color=colour, label=f"{name} ({len(xy)})")
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title or "Real vs synthetic features (2-D UMAP)")
    ax.legend(markerscale=3, loc="best", frameon=True)
    fig.tight_layout()
    return save_figure(fig, path)
