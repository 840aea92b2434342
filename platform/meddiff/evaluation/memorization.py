"""Memorization audit: which synthetic images copy a real (training) image, and how many.

For each synthetic image, its nearest real image in the feature space of the fidelity metrics
(the TF-FID Inception on the default presets) and in pixels. A synthetic image counts as a copy
in a space when that distance is at most the ``percentile``-th percentile (default 1) of the real
images' own nearest-neighbour distances (each real image to the nearest *other* real image). The
reference is what "as close as two different real images ever get" looks like, in the same space
and on the same data: the idea of Alaa et al. 2022 ("How Faithful is your Synthetic Data?",
ICML; a synthetic sample closer to a training sample than training samples are to each other is
not authentic), with a low percentile instead of each sample's own radius so that one number
(the copy rate) can be compared with a bound. Pixel-space nearest neighbours are how Carlini et
al. 2023 ("Extracting Training Data from Diffusion Models") found copied training images;
features also catch copies that were shifted or recoloured slightly.

The copy rate is the share of copies among the synthetic images in the feature space (the pixel
one is reported beside it), with a Wilson score interval (Wilson 1927), which stays inside [0, 1]
and is informative at rates 0 and 1, unlike a bootstrap of a proportion. It is conditional on the
threshold (estimated from up to ``threshold_queries`` real images). Synthetic images that were
fresh draws from the real distribution would score about ``percentile / 100``.

The model-version tags (:func:`meddiff.tracking.audits.memorization_tags`, the registry's format
of an audit) carry a recorded audit to the registry, where :func:`check_promotion` refuses to
promote a synthesis model above ``evaluation.memorization.max_copy_rate``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddiff.config.evaluation import MemorizationConfig
from meddiff.errors import DataError, ModelError
from meddiff.tracking.audits import TAG_PREFIX, memorization_tags

if TYPE_CHECKING:
    from meddiff.config import Config
    from meddiff.evaluation.features import FeatureSet

log = logging.getLogger(__name__)

_QUERY_BYTES = 1 << 28  # queries compared at once: 256 MB (about 1,200 96-px images)
_BLOCK_ROWS = 256  # real images read at once
PIXEL_UNIT = "root-mean-square difference per pixel and channel, gray levels 0-255"
CI_METHOD = "Wilson score interval of a binomial proportion"

Blocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def nearest(
    query: np.ndarray, reference: Blocks, query_index: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest reference row of each query row by Euclidean distance.

    ``query`` float (q, D); ``reference()`` yields ``(rows float (b, D), their indices (b,))``
    blocks (called again for each chunk of queries, so the reference may stream from disk).
    With ``query_index`` (q,), a reference row with the same index as the query is skipped (the
    query itself). Returns ``(index (q,) int64, distance (q,) float64)``; distance ``inf`` and
    index -1 where no reference row was eligible.
    """
    index = np.full(len(query), -1, dtype=np.int64)
    best = np.full(len(query), np.inf)
    chunk = max(1, _QUERY_BYTES // max(1, query.shape[1] * query.itemsize))
    for lo in range(0, len(query), chunk):
        q = query[lo : lo + chunk]
        q_sq = np.einsum("ij,ij->i", q, q)
        for rows, idx in reference():
            d2 = q_sq[:, None] + np.einsum("ij,ij->i", rows, rows)[None, :] - 2.0 * (q @ rows.T)
            if query_index is not None:
                d2[query_index[lo : lo + chunk, None] == idx[None, :]] = np.inf
            j = np.argmin(d2, axis=1)
            d = d2[np.arange(len(q)), j]
            better = d < best[lo : lo + len(q)]
            best[lo : lo + len(q)][better] = d[better]
            index[lo : lo + len(q)][better] = idx[j[better]]
    return index, np.sqrt(np.clip(best, 0, None))


@dataclass
class Space:
    """The audit in one space: each synthetic image's nearest real image and the threshold."""

    nearest: np.ndarray  # (m,) row of the real set
    distance: np.ndarray  # (m,)
    real_nearest: np.ndarray  # (q,) real-to-real nearest distances of the threshold queries
    threshold: float

    @property
    def copies(self) -> np.ndarray:
        return self.distance <= self.threshold

    def rate(self, confidence: float) -> dict[str, Any]:
        """``{"value", "ci", "copies"}`` of the copy rate."""
        from scipy.stats import binomtest

        k, n = int(self.copies.sum()), len(self.copies)
        ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
        return {"value": k / n, "ci": [float(ci.low), float(ci.high)], "copies": k}


@dataclass
class Audit:
    """Nearest real images of every synthetic image, in the feature space and in pixels."""

    synthetic_index: np.ndarray  # (m,) rows of the synthetic set
    features: Space
    pixels: Space
    network: str
    percentile: float
    reference: str  # the real set: folder (split)
    n_real: int

    def summary(self, confidence: float, pairs: int) -> dict[str, Any]:
        """The JSON-able audit: copy rates with CIs, thresholds, the ``pairs`` closest pairs (by
        feature distance) and ``per_image``: every synthetic image's nearest real images."""
        f, p = self.features, self.pixels
        order = np.argsort(f.distance, kind="stable")[:pairs]
        return {
            "network": self.network,
            "percentile": self.percentile,
            "reference": self.reference,
            "n_real": self.n_real,
            "n_synthetic": len(self.synthetic_index),
            "threshold_queries": len(f.real_nearest),
            "confidence": confidence,
            "ci_method": CI_METHOD,
            "copy_rate": f.rate(confidence),
            "copy_rate_pixels": p.rate(confidence),
            "features": _space_summary(f),
            "pixels": {**_space_summary(p), "unit": PIXEL_UNIT},
            "closest": [self._row(int(i)) for i in order],
            "per_image": {
                key: [row[key] for row in map(self._row, range(len(self.synthetic_index)))]
                for key in self._row(0)
            },
        }

    def _row(self, i: int) -> dict[str, Any]:
        f, p = self.features, self.pixels
        return {
            "synthetic_index": int(self.synthetic_index[i]),
            "nearest_real_features": int(f.nearest[i]),
            "distance_features": float(f.distance[i]),
            "copy_features": bool(f.copies[i]),
            "nearest_real_pixels": int(p.nearest[i]),
            "distance_pixels": float(p.distance[i]),
            "copy_pixels": bool(p.copies[i]),
        }


def _space_summary(space: Space) -> dict[str, float]:
    return {
        "threshold": space.threshold,
        "median_real_to_real": float(np.median(space.real_nearest)),
        "median_synthetic_to_real": float(np.median(space.distance)),
        "min_synthetic_to_real": float(space.distance.min()),
    }


def audit_space(
    synthetic: np.ndarray,
    real: Blocks,
    real_queries: np.ndarray,
    real_query_index: np.ndarray,
    percentile: float,
) -> Space:
    """One space: ``synthetic`` (m, D) against every real row of ``real()``; the threshold is
    the ``percentile`` of ``real_queries``' (q, D) distances to their nearest other real row
    (``real_query_index`` (q,) says which rows they are)."""
    idx, dist = nearest(synthetic, real)
    _, real_nn = nearest(real_queries, real, query_index=real_query_index)
    real_nn = real_nn[np.isfinite(real_nn)]
    if len(real_nn) == 0:
        raise DataError("the memorization audit needs at least 2 real images")
    return Space(idx, dist, real_nn, float(np.percentile(real_nn, percentile)))


def audit_sets(real: FeatureSet, fake: FeatureSet, cfg: MemorizationConfig, seed: int) -> Audit:
    """The audit of a synthetic feature set against a real one: features from the sets, pixels
    read from their PCam-layout files (the same rows).

    Raises:
        DataError: fewer than 2 real images, an empty synthetic set, or images of other sizes.
    """
    if len(fake) == 0 or len(real) < 2:
        raise DataError(
            f"the memorization audit needs 2+ real and 1+ synthetic images, got {len(real)} and "
            f"{len(fake)}"
        )
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(real), min(cfg.threshold_queries, len(real)), replace=False))
    real_feats = np.asarray(real.features, np.float64)
    feature_space = audit_space(
        np.asarray(fake.features, np.float64),
        lambda: _slices(real_feats, real.index),
        real_feats[pick],
        real.index[pick],
        cfg.percentile,
    )
    fake_pixels = _pixels(read_images(fake.source, fake.split, fake.index))
    query_pixels = _pixels(read_images(real.source, real.split, real.index[pick]))
    if fake_pixels.shape[1] != query_pixels.shape[1]:
        raise DataError(
            f"the memorization audit compares pixels: real and synthetic images differ in size "
            f"({real.source}, {fake.source})"
        )
    pixel_space = audit_space(
        fake_pixels,
        lambda: _pixel_blocks(real.source, real.split, real.index),
        query_pixels,
        real.index[pick],
        cfg.percentile,
    )
    reference = f"{real.source} ({real.split})"
    return Audit(
        fake.index, feature_space, pixel_space, real.network, cfg.percentile, reference, len(real)
    )


def _slices(x: np.ndarray, index: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for lo in range(0, len(x), _BLOCK_ROWS * 8):
        yield x[lo : lo + _BLOCK_ROWS * 8], index[lo : lo + _BLOCK_ROWS * 8]


def _pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, 3) → float64 (n, H·W·3) scaled so that the Euclidean distance is the RMS
    difference per pixel and channel. Float64: with float32, |a|² + |b|² − 2ab left identical
    96-px images up to 0.4 gray levels apart."""
    flat = images.reshape(len(images), -1).astype(np.float64) - 127.5
    return flat / np.sqrt(flat.shape[1])


def _pixel_blocks(root, split: str, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    from meddiff.data import pcam

    opened = pcam.open_pcam(root, split, patch_size=None)
    keep = np.zeros(opened.num_rows, dtype=bool)
    keep[rows] = True
    for block in pcam.iter_blocks(opened, int(rows.min()), int(rows.max()) + 1, _BLOCK_ROWS):
        sel = keep[block["index"]]
        if sel.any():
            yield _pixels(block["image"][sel]), block["index"][sel]


def read_images(root, split: str, rows: np.ndarray) -> np.ndarray:
    """uint8 (len(rows), H, W, 3): the images of ``rows`` (non-empty, any order, repeats allowed)
    of a PCam-layout split, in that order."""
    from meddiff.data import pcam

    rows = np.asarray(rows, dtype=np.int64)
    unique = np.unique(rows)
    opened = pcam.open_pcam(root, split, patch_size=None)
    keep = np.zeros(opened.num_rows, dtype=bool)
    keep[unique] = True
    images = np.concatenate(
        [
            block["image"][keep[block["index"]]]
            for block in pcam.iter_blocks(opened, int(unique[0]), int(unique[-1]) + 1, _BLOCK_ROWS)
        ]
    )
    return images[np.searchsorted(unique, rows)]


# --- the registry: recorded audits and the promotion check -----------------------------------


def record_on_model(ref: str | None, summary: dict[str, Any], cfg: Config) -> str | None:
    """Tag the registry version ``ref`` (``models:/NAME/VERSION``, what generated the judged
    set) with the audit; returns the version's URI, or None when ``ref`` is not a registry
    version of the configured store (a folder, or another store's model)."""
    from meddiff.tracking import set_version_tags
    from meddiff.tracking.aliases import parse_ref

    parsed = parse_ref(ref) if ref and ref.startswith("models:/") else None
    if parsed is None or parsed[2] is None:
        return None
    name, _, version = parsed
    try:
        set_version_tags(name, version, memorization_tags(summary), cfg.tracking)
    except ModelError as err:
        log.warning("memorization audit not recorded on %s: %s", ref, str(err)[:200])
        return None
    return f"models:/{name}/{version}"


def check_promotion(
    name: str, version: str, cfg: Config, *, force: bool = False, action: str = "promoted"
) -> str:
    """Whether ``models:/NAME/VERSION`` may be promoted as far as memorization goes; returns a
    line to print ("" for a model that is not a synthesis model).

    A synthesis model (trained or shipped by meddiff's synthesis jobs, or carrying an audit)
    whose recorded copy rate is above ``evaluation.memorization.max_copy_rate`` is refused unless
    ``force``; one without a recorded audit is allowed, with a line saying so. ``action`` names
    what is refused or done in those lines (``serve canary`` passes "given a canary").

    Raises:
        ModelError: the copy rate is above the bound (and not ``force``); no such version.
    """
    from meddiff import tracking

    tags = tracking.version_tags(name, version, cfg.tracking)
    bound = cfg.evaluation.memorization.max_copy_rate
    ref = f"models:/{name}/{version}"
    raw = tags.get(TAG_PREFIX + "copy_rate")
    if raw is None:
        if not tags.get("meddiff.job", "").startswith("synthesis"):
            return ""
        return (
            f"{ref}: no memorization audit recorded (judge its samples with `meddiff eval "
            "fidelity`, which records the copy rate on the version it generated from)"
        )
    rate = float(raw)
    what = (
        f"{ref}: copy rate {rate:.3g} [{tags.get(TAG_PREFIX + 'copy_rate_ci', '?')}] (share of "
        f"{tags.get(TAG_PREFIX + 'n_synthetic', '?')} synthetic images closer to a real image "
        f"of {tags.get(TAG_PREFIX + 'reference', '?')} than percentile "
        f"{tags.get(TAG_PREFIX + 'percentile', '?')} of the real-to-real distances)"
    )
    if rate <= bound:
        return f"{what} is within evaluation.memorization.max_copy_rate {bound:g}"
    if not force:
        raise ModelError(
            f"{what} is above evaluation.memorization.max_copy_rate {bound:g}: the model copies "
            f"training images; not {action} (--force overrides)"
        )
    log.warning("%s is above %g; %s anyway (--force)", what, bound, action)
    return f"{what} is above evaluation.memorization.max_copy_rate {bound:g}; {action} (--force)"


def read_audit(path: str | Path, set_name: str | None = None) -> dict[str, Any]:
    """The audit of one synthetic set from an ``eval fidelity`` JSON (``fidelity.json`` in its
    ``--out``, or its ``--json`` output): ``sets.<name>.memorization`` without the per-image
    table, plus ``model`` (what generated the set) and ``audit`` (the file).

    Raises:
        DataError: not such a file, no audit in it, or several sets and no (known) ``set_name``.
    """
    path = Path(path)
    try:
        sets = json.loads(path.read_text())["sets"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{path}: not an `meddiff eval fidelity` JSON ({type(err).__name__})"
        ) from None
    if set_name is None and len(sets) != 1:
        raise DataError(f"{path} judges {len(sets)} sets ({', '.join(sets)}); name one")
    name = set_name or next(iter(sets))
    if name not in sets:
        raise DataError(f"{path}: no set '{name}' (sets: {', '.join(sets)})")
    audit = sets[name].get("memorization")
    if not isinstance(audit, dict) or "copy_rate" not in audit:
        raise DataError(f"{path}: set '{name}' has no memorization audit")
    audit = {k: v for k, v in audit.items() if k != "per_image"}
    return {**audit, "model": sets[name].get("model"), "audit": str(path)}
