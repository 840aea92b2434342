"""Fidelity and diversity of a synthetic set against a real one: overall and per stratum
(prompt, label), each metric with a bootstrap confidence interval.

The Fréchet distance's interval is corrected for the bootstrap's bias
(:func:`meddiff.evaluation.metrics.fd_interval`): a plain percentile interval of a set against
itself would exclude its own value 0.

Strata: per label always (both sets carry labels); per prompt when both sets carry one prompt per
image (a synthetic set's ``..._meta.csv``; for the real set its own meta or a prompts CSV from the
prompt-building stage, columns ``index,prompt``).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.config.evaluation import MemorizationConfig, MetricsConfig
from meddiff.errors import DataError
from meddiff.evaluation import metrics as M
from meddiff.evaluation.features import FeatureSet, metric_prefix

log = logging.getLogger(__name__)


def compute_metrics(
    real: np.ndarray,
    fake: np.ndarray,
    cfg: MetricsConfig,
    network: str,
    seed: int = 0,
) -> dict[str, Any]:
    """All metrics of real (n, d) vs synthetic (m, d) features.

    Returns ``{metric: {"value", "ci": [lo, hi] | None, ...}}`` plus ``n_real``/``n_synthetic``;
    the Fréchet and kernel distances are keyed after ``network`` (``fid`` only for Inception).

    Raises:
        DataError: an empty set, or too few samples for the k-NN metrics (n <= k).
    """
    real, fake = M._check_pair(real, fake)
    with M.blas_threads(real.shape[1]):
        return _compute_metrics(real, fake, cfg, network, seed)


def _compute_metrics(real, fake, cfg: MetricsConfig, network: str, seed: int) -> dict[str, Any]:
    k = cfg.nearest_k
    for name, x in (("real", real), ("synthetic", fake)):
        if len(x) <= k:
            raise DataError(
                f"the {name} set has {len(x)} images; the k-NN metrics need more than "
                f"k={k} (evaluation.metrics.nearest_k)"
            )
    fd_key, kd_key = metric_prefix(network)
    out: dict[str, Any] = {"n_real": len(real), "n_synthetic": len(fake)}
    conf, boot = cfg.confidence, cfg.bootstrap

    value = M.fd(real, fake)
    interval = (
        M.fd_interval(value, M.bootstrap_fd(real, fake, boot, seed), conf) if boot else {"ci": None}
    )
    out[fd_key] = {
        "value": value,
        **interval,
        **fd_reliability(len(real), len(fake), real.shape[1]),
    }

    subsets = M.kid_subsets(real, fake, cfg.kid_subsets, cfg.kid_subset_size, seed)
    ci = M.percentile_ci(M.bootstrap_means(subsets, boot, seed), conf) if boot else None
    out[kd_key] = {
        "value": float(subsets.mean()),
        "std": float(subsets.std()),
        "ci": ci,
        "subset_size": M.kid_subset_size(cfg.kid_subset_size, len(real), len(fake)),
    }

    rng = np.random.default_rng(seed)
    r = _subsample(real, cfg.prdc_max_samples, rng)
    f = _subsample(fake, cfg.prdc_max_samples, rng)
    samples = M.prdc_samples(r, f, k)
    for name, value in samples.means().items():
        per = getattr(samples, name)
        ci = M.percentile_ci(M.bootstrap_means(per, boot, seed), conf) if boot else None
        out[name] = {"value": value, "ci": ci}
    return out


def fd_reliability(n_real: int, n_synthetic: int, dim: int) -> dict[str, Any]:
    """``{"reliable": bool, "warning": str}`` for a Fréchet distance on these set sizes.

    Each set's covariance is estimated from its samples; with no more samples than feature
    dimensions it is singular (rank <= n - 1), the matrix square root is ill-defined, and the
    distance is dominated by estimation error (pytorch-fid warns likewise and recommends at least
    2048 samples for its 2048-d features). Logged as a warning when unreliable.
    """
    n = min(n_real, n_synthetic)
    if n > dim:
        return {"reliable": True}
    warning = (
        f"Fréchet distance on {n} samples of {dim}-dimensional features: with no more samples "
        "than dimensions the covariance is singular, so the value is unreliable (use more "
        "images than feature dimensions)"
    )
    log.warning("%s", warning)
    return {"reliable": False, "warning": warning}


def _subsample(x: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(x) <= limit:
        return x
    return x[np.sort(rng.choice(len(x), limit, replace=False))]


def evaluate_sets(
    real: FeatureSet,
    fake: FeatureSet,
    cfg: MetricsConfig,
    seed: int = 0,
    note: str = "",
    memorization: MemorizationConfig | None = None,
) -> dict[str, Any]:
    """Overall and stratified metrics of two feature sets (see :func:`compute_metrics`).

    With ``memorization`` (enabled), also the memorization audit
    (:mod:`meddiff.evaluation.memorization`, which reads the sets' images): ``memorization`` in
    the report, and its copy rates in ``overall`` as ``copy_rate`` (feature space) and
    ``copy_rate_pixels``.
    """
    if real.network != fake.network:
        raise DataError(f"feature networks differ: real {real.network}, synthetic {fake.network}")
    fd_key, kd_key = metric_prefix(real.network)
    report: dict[str, Any] = {
        "network": real.network,
        "fd_metric": fd_key,
        "kd_metric": kd_key,
        "is_fid": fd_key == "fid",
        "note": note,
        "real": real.source,
        "synthetic": fake.source,
        "model": generator_model(fake.source),
        "overall": compute_metrics(real.features, fake.features, cfg, real.network, seed),
    }
    if memorization is not None and memorization.enabled:
        from meddiff.evaluation.memorization import audit_sets

        audit = audit_sets(real, fake, memorization, seed).summary(
            cfg.confidence, memorization.pairs_shown
        )
        report["memorization"] = audit
        report["overall"]["copy_rate"] = audit["copy_rate"]
        report["overall"]["copy_rate_pixels"] = audit["copy_rate_pixels"]
    if "label" in cfg.stratify:
        report["by_label"] = _strata(real, fake, real.labels, fake.labels, cfg, seed)
    if "prompt" in cfg.stratify:
        if fake.prompts is None:
            report["by_prompt"] = {"skipped": "the synthetic set has no prompt column in its meta"}
        elif real.prompts is None:
            report["by_prompt"] = {
                "skipped": "the real set has no prompt per image (give a prompts CSV for it)"
            }
        else:
            report["by_prompt"] = _strata(real, fake, real.prompts, fake.prompts, cfg, seed)
    return report


def _strata(real, fake, real_keys, fake_keys, cfg: MetricsConfig, seed: int) -> dict[str, Any]:
    real_keys = np.asarray([str(v) for v in real_keys])
    fake_keys = np.asarray([str(v) for v in fake_keys])
    out: dict[str, Any] = {}
    for key in sorted(set(real_keys) | set(fake_keys)):
        r = real.features[real_keys == key]
        f = fake.features[fake_keys == key]
        need = max(cfg.min_stratum, cfg.nearest_k + 1)
        if len(r) < need or len(f) < need:
            out[key] = {
                "n_real": len(r),
                "n_synthetic": len(f),
                "skipped": f"fewer than {need} real or synthetic images",
            }
            continue
        out[key] = compute_metrics(r, f, cfg, real.network, seed)
    return out


def read_prompts_csv(path: str | Path, n: int) -> list[str]:
    """Prompts of a set's rows from a CSV with columns ``index`` and ``prompt`` (one row per
    image, any order); DataError when a row is missing or the columns are wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        if "index" not in cols or "prompt" not in cols:
            raise DataError(f"{path}: needs columns 'index' and 'prompt', found {cols}")
        prompts: dict[int, str] = {}
        for line, row in enumerate(reader, start=2):
            try:
                prompts[int(row["index"])] = row["prompt"]
            except ValueError:
                raise DataError(
                    f"{path}:{line}: index {row['index']!r} is not an integer"
                ) from None
    missing = [i for i in range(n) if i not in prompts]
    if missing:
        raise DataError(
            f"{path}: no prompt for {len(missing)} of {n} images (first missing index {missing[0]})"
        )
    return [prompts[i] for i in range(n)]


def flat_metrics(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The overall values (and CI bounds) of a report as flat ``name -> float`` (for MLflow)."""
    out: dict[str, float] = {}
    for name, item in report["overall"].items():
        if isinstance(item, dict):
            out[f"{prefix}{name}"] = float(item["value"])
            if item.get("ci"):
                out[f"{prefix}{name}_ci_low"] = float(item["ci"][0])
                out[f"{prefix}{name}_ci_high"] = float(item["ci"][1])
    return out


def generator_model(synthetic: str) -> str | None:
    """The model version that generated the synthetic set at ``synthetic``, as its generation
    summary (``summary.json``, written by ``meddiff synth generate``) names it: a registry
    reference ``models:/NAME/VERSION`` (an alias resolved at generation time) or a directory."""
    import json
    from pathlib import Path

    path = Path(synthetic) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary.get("model_version") or summary.get("model")
