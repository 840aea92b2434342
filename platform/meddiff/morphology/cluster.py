"""Morphology types: K-means over min-max normalised DINO CLS embeddings.

As in paper A, each embedding dimension is scaled to [0, 1] by the minimum and maximum it takes
over the whole dataset (scikit-learn's ``MinMaxScaler``), then K-means (k = 33, n_init = 10, fixed
seed) groups the patches. The range is a dataset statistic, so it is found after the embedding pass
(one streamed reduction) and stored with the centroids: the fitted :class:`MorphologyModel` maps
any new embedding to a morphology type with no other state.

Two fitting modes give the same kind of model:

- exact: scikit-learn ``KMeans`` on all embeddings in memory (the paper's setting);
- streaming: for embeddings that do not fit (millions of slide tiles), centroids are seeded by
  K-means (n_init restarts) on a uniform sample, then refined by ``MiniBatchKMeans.partial_fit``
  over the stream of batches for a few epochs. The stream order is fixed, so a seed gives one fit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.config.prompts import ClusterConfig
from meddiff.errors import DataError, ModelError
from meddiff.files import read_format_json

MODEL_FILE = "morphology.json"
ARRAYS_FILE = "morphology.npz"
FORMAT = "meddiff-morphology/1"


@dataclass
class MinMax:
    """Running per-dimension minimum and maximum of float arrays (n, D); NaN rows are ignored."""

    low: np.ndarray | None = None
    high: np.ndarray | None = None
    count: int = 0

    def update(self, x: np.ndarray) -> None:
        x = x[~np.isnan(x).any(axis=1)]
        if len(x) == 0:
            return
        lo, hi = x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64)
        self.low = lo if self.low is None else np.minimum(self.low, lo)
        self.high = hi if self.high is None else np.maximum(self.high, hi)
        self.count += len(x)


def minmax_scale(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(x - low) / (high - low) per dimension, float32; a constant dimension maps to 0 (as
    ``MinMaxScaler`` does, rather than dividing by zero)."""
    span = high - low
    span = np.where(span > 0, span, 1.0)
    return ((x - low) / span).astype(np.float32)


@dataclass
class MorphologyModel:
    """Fitted morphology types: the min-max range and the K-means centroids.

    ``centroids`` float32 (k, D) live in the normalised space; ``low``/``high`` float64 (D,).
    ``info`` records how it was fitted (and which embedder produced the embeddings).
    """

    centroids: np.ndarray
    low: np.ndarray
    high: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def normalise(self, embeddings: np.ndarray) -> np.ndarray:
        return minmax_scale(embeddings, self.low, self.high)

    def assign(self, embeddings: np.ndarray) -> np.ndarray:
        """Morphology type int64 (n,) of raw CLS embeddings float (n, D): nearest centroid."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise DataError(
                f"embeddings of shape {embeddings.shape} do not match the morphology model "
                f"(dimension {self.dim}); was it fitted with another embedder?"
            )
        return self.nearest(self.normalise(embeddings))

    def nearest(self, z: np.ndarray) -> np.ndarray:
        """Nearest centroid int64 (n,) of normalised embeddings float32 (n, D)."""
        c = self.centroids
        # |z - c|^2 = |z|^2 - 2 z.c + |c|^2; |z|^2 is the same for every centroid.
        dist = (c * c).sum(axis=1)[None, :] - 2.0 * z @ c.T
        return dist.argmin(axis=1).astype(np.int64)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / ARRAYS_FILE, centroids=self.centroids, low=self.low, high=self.high)
        meta = {"format": FORMAT, "k": self.k, "dim": self.dim, **self.info}
        (out / MODEL_FILE).write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, path: str | Path) -> MorphologyModel:
        """Raises ModelError when ``path`` is not a saved morphology model."""
        root = Path(path)
        meta_path, arrays_path = root / MODEL_FILE, root / ARRAYS_FILE
        missing = (
            f"{root} is not a morphology model directory (needs {MODEL_FILE} and {ARRAYS_FILE})"
        )
        if not arrays_path.is_file():
            raise ModelError(missing)
        meta = read_format_json(meta_path, FORMAT, ModelError, missing)
        with np.load(arrays_path) as arrays:
            model = cls(arrays["centroids"], arrays["low"], arrays["high"])
        model.info = {k: v for k, v in meta.items() if k not in ("format", "k", "dim")}
        return model


def choose_mode(cfg: ClusterConfig, n: int, dim: int) -> str:
    """``exact`` or ``streaming`` for ``n`` embeddings of dimension ``dim``."""
    if cfg.mode != "auto":
        return cfg.mode
    return "exact" if n * dim * 4 <= cfg.max_exact_memory_mb * 2**20 else "streaming"


def check_k(cfg: ClusterConfig, n: int) -> None:
    if cfg.k > n:
        raise DataError(
            f"prompts.cluster.k = {cfg.k} is larger than the number of patches to cluster ({n}); "
            "lower k or add data"
        )


def fit_exact(x: np.ndarray, cfg: ClusterConfig) -> tuple[MorphologyModel, np.ndarray, float]:
    """K-means on all raw embeddings float (n, D) in memory.

    Returns the model, the labels int64 (n,) and the inertia (sum of squared distances in the
    normalised space).
    """
    from sklearn.cluster import KMeans

    x = np.asarray(x, dtype=np.float32)
    check_k(cfg, len(x))
    low, high = x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64)
    z = minmax_scale(x, low, high)
    km = KMeans(n_clusters=cfg.k, n_init=cfg.n_init, random_state=cfg.seed).fit(z)
    model = MorphologyModel(km.cluster_centers_.astype(np.float32), low, high)
    model.info.update({"mode": "exact", "n_fit": len(x), "inertia": float(km.inertia_)})
    return model, km.labels_.astype(np.int64), float(km.inertia_)


def fit_streaming(
    batches: Iterable[np.ndarray] | Any,
    cfg: ClusterConfig,
    n: int,
    scale: MinMax,
) -> tuple[MorphologyModel, np.ndarray]:
    """Mini-batch K-means over a re-iterable stream of raw embedding batches float (b, D).

    ``batches`` is called (if callable) or iterated once per pass, always in the same order;
    ``n`` is the total number of rows and ``scale`` their min-max range (from a first pass).
    Returns the model and the sample (normalised, float32) that seeded it, for diagnostics.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    check_k(cfg, n)
    if scale.low is None or scale.high is None:
        raise DataError("no embeddings to cluster")
    low, high = scale.low, scale.high

    def stream() -> Iterator[np.ndarray]:
        for batch in batches() if callable(batches) else batches:
            batch = batch[~np.isnan(batch).any(axis=1)]
            if len(batch):
                yield minmax_scale(batch, low, high)

    # Pass 1: a seeded Bernoulli sample of about init_size rows; fixed order keeps it reproducible.
    rng = np.random.default_rng(cfg.seed)
    rate = min(1.0, max(cfg.init_size, cfg.k) / n)
    picked = [b[rng.random(len(b)) < rate] for b in stream()]
    sample = np.concatenate(picked) if picked else np.empty((0, len(low)), np.float32)
    if len(sample) < cfg.k:
        raise DataError(f"only {len(sample)} sampled rows to seed {cfg.k} centroids")
    seed_fit = KMeans(n_clusters=cfg.k, n_init=cfg.n_init, random_state=cfg.seed).fit(sample)
    mbk = MiniBatchKMeans(
        n_clusters=cfg.k,
        init=seed_fit.cluster_centers_,
        n_init=1,
        batch_size=cfg.batch_size,
        random_state=cfg.seed,
    )
    # Passes 2..: re-chunk the stream to batch_size rows so updates do not depend on block sizes.
    for _ in range(cfg.epochs):
        for chunk in _rechunk(stream(), cfg.batch_size):
            mbk.partial_fit(chunk)
    model = MorphologyModel(mbk.cluster_centers_.astype(np.float32), low, high)
    model.info.update({"mode": "streaming", "n_fit": n, "epochs": cfg.epochs})
    return model, sample


def inertia(model: MorphologyModel, batches: Iterable[np.ndarray]) -> float:
    """Sum of squared distances to the nearest centroid over raw embedding batches."""
    total = 0.0
    for batch in batches:
        batch = batch[~np.isnan(batch).any(axis=1)]
        if len(batch):
            z = model.normalise(batch).astype(np.float64)
            c = model.centroids.astype(np.float64)
            # Expanded form: a (b, k, D) difference tensor would be gigabytes for big batches.
            d = (z * z).sum(1)[:, None] - 2.0 * z @ c.T + (c * c).sum(1)[None, :]
            total += float(np.maximum(d.min(axis=1), 0.0).sum())
    return total


def _rechunk(stream: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    buf: list[np.ndarray] = []
    have = 0
    for batch in stream:
        buf.append(batch)
        have += len(batch)
        while have >= size:
            joined = np.concatenate(buf)
            yield joined[:size]
            rest = joined[size:]
            buf, have = ([rest], len(rest)) if len(rest) else ([], 0)
    if have:
        yield np.concatenate(buf)


def silhouette(z: np.ndarray, labels: np.ndarray, sample: int, seed: int) -> float | None:
    """Silhouette score of normalised embeddings on at most ``sample`` rows (None if undefined)."""
    from sklearn.metrics import silhouette_score

    distinct = len(np.unique(labels))
    if distinct < 2 or distinct >= len(z):
        return None
    n = min(sample, len(z))
    return float(silhouette_score(z, labels, sample_size=n, random_state=seed))
