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

Duplicate patches (copies of one image) have identical embeddings. K-means cannot place more
distinct centroids than there are distinct points, so k is checked against the number of
distinct embeddings (:func:`count_distinct`), not of patches: ``cluster.few_distinct`` either
refuses or lowers k to it, and a fit never keeps duplicate centroids. Identical embeddings always
get the same type (:meth:`MorphologyModel.nearest` decides each distinct row once).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.config.prompts import ClusterConfig
from meddiff.errors import DataError, ModelError
from meddiff.files import read_format_json

log = logging.getLogger(__name__)

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
        """Nearest centroid int64 (n,) of normalised embeddings float32 (n, D); identical rows
        get the same centroid (each distinct row is decided once, in float64)."""
        if len(z) == 0:
            return np.empty(0, dtype=np.int64)
        rows, inverse = np.unique(z, axis=0, return_inverse=True)
        c = self.centroids.astype(np.float64)
        # |z - c|^2 = |z|^2 - 2 z.c + |c|^2; |z|^2 is the same for every centroid.
        dist = (c * c).sum(axis=1)[None, :] - 2.0 * rows.astype(np.float64) @ c.T
        return dist.argmin(axis=1).astype(np.int64)[inverse.reshape(-1)]

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


def count_distinct(batches: Iterable[np.ndarray]) -> tuple[int, int]:
    """(distinct rows, rows) over batches of embeddings float (b, D), NaN rows ignored.

    Rows are compared by a 64-bit hash of their float32 bytes (8 bytes per row held, so millions
    of rows fit; two distinct rows share a hash with probability about 2**-64).
    """
    hashes, total, mult = [], 0, None
    for batch in batches:
        batch = np.ascontiguousarray(batch[~np.isnan(batch).any(axis=1)], dtype=np.float32)
        if not len(batch):
            continue
        if mult is None:  # odd 64-bit multipliers, one per 32-bit word: a linear hash mod 2**64
            rng = np.random.default_rng(0x5EED)
            mult = rng.integers(0, 2**63, batch.shape[1], dtype=np.uint64) * 2 + 1
        words = batch.view(np.uint32).astype(np.uint64)
        with np.errstate(over="ignore"):
            hashes.append(np.unique((words * mult).sum(axis=1, dtype=np.uint64)))
        total += len(batch)
    distinct = len(np.unique(np.concatenate(hashes))) if hashes else 0
    return distinct, total


def resolve_k(
    cfg: ClusterConfig, distinct: int, total: int
) -> tuple[ClusterConfig, dict[str, Any]]:
    """The cluster config to fit with, given ``distinct`` distinct embeddings among ``total``,
    and what to report: ``distinct_embeddings``, ``duplicate_patches`` and (when k was lowered)
    ``k_requested``.

    Raises:
        DataError: more patches than k are needed (``k > total``), or fewer distinct embeddings
            than k with ``few_distinct = error``.
    """
    check_k(cfg, total)
    info: dict[str, Any] = {"distinct_embeddings": distinct, "duplicate_patches": total - distinct}
    if total > distinct:
        log.warning(
            "%d of %d patches duplicate another patch's embedding (%d distinct); duplicates "
            "share a morphology type and weigh more in K-means",
            total - distinct,
            total,
            distinct,
        )
    if distinct >= cfg.k:
        return cfg, info
    why = (
        f"prompts.cluster.k = {cfg.k} but the {total} patches to cluster hold only {distinct} "
        f"distinct embeddings ({total - distinct} are duplicates)"
    )
    if cfg.few_distinct == "error":
        raise DataError(
            f"{why}; lower k, remove the duplicates, or set prompts.cluster.few_distinct=lower_k"
        )
    log.warning("%s: fitting k = %d instead (prompts.cluster.few_distinct=lower_k)", why, distinct)
    info["k_requested"] = cfg.k
    return cfg.model_copy(update={"k": distinct}), info


def check_distinct_centroids(centroids: np.ndarray) -> None:
    """Refuse a fit whose centroids coincide (two morphology types for one point).

    Raises:
        DataError: naming the count and the way out.
    """
    distinct = len(np.unique(centroids, axis=0))
    if distinct < len(centroids):
        raise DataError(
            f"K-means gave {len(centroids) - distinct} duplicate centroid(s) of {len(centroids)}; "
            "the embeddings have too few distinct values for prompts.cluster.k (lower k)"
        )


def fit_exact(x: np.ndarray, cfg: ClusterConfig) -> tuple[MorphologyModel, np.ndarray, float]:
    """K-means on all raw embeddings float (n, D) in memory.

    Returns the model, the labels int64 (n,) and the inertia (sum of squared distances in the
    normalised space).
    """
    from sklearn.cluster import KMeans

    x = np.asarray(x, dtype=np.float32)
    cfg, counts = resolve_k(cfg, *count_distinct([x]))
    low, high = x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64)
    z = minmax_scale(x, low, high)
    km = KMeans(n_clusters=cfg.k, n_init=cfg.n_init, random_state=cfg.seed).fit(z)
    check_distinct_centroids(km.cluster_centers_.astype(np.float32))
    model = MorphologyModel(km.cluster_centers_.astype(np.float32), low, high)
    model.info.update({"mode": "exact", "n_fit": len(x), "inertia": float(km.inertia_), **counts})
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
    cfg, counts = resolve_k(cfg, *count_distinct(batches() if callable(batches) else batches))

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
    seeds, _ = count_distinct([sample])
    if seeds < cfg.k:
        raise DataError(
            f"only {seeds} distinct embeddings among the {len(sample)} sampled rows to seed "
            f"{cfg.k} centroids; raise prompts.cluster.init_size or lower k"
        )
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
    check_distinct_centroids(mbk.cluster_centers_.astype(np.float32))
    model = MorphologyModel(mbk.cluster_centers_.astype(np.float32), low, high)
    model.info.update({"mode": "streaming", "n_fit": n, "epochs": cfg.epochs, **counts})
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
