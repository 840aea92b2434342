"""Fréchet distance on 50,000 × 2048 features: ours vs pytorch-fid's on the same features, and
feature-extraction throughput of the networks the metrics use.

    python benchmarks/eval_frechet.py                 # 50,000 × 2048 (the paper's feature size)
    python benchmarks/eval_frechet.py --rows 10000 --skip-extract

Prints, in one run: both distances and their relative difference (target: the same value to
1e-3 relative), each one's time split into statistics (mean, covariance) and distance, and the
speed ratio (target ≥ 1×: ours at least as fast). pytorch-fid computes the statistics with
``np.mean``/``np.cov`` (what ``calculate_activation_statistics`` does) and the distance with
``scipy.linalg.sqrtm``; ours accumulates the covariance in float64 row chunks and takes
``Tr sqrt(Σ1 Σ2)`` from two single-threaded symmetric eigendecompositions (divide and conquer).

Features: non-negative, correlated, 2048-d like Inception's pool features (|z A| + noise with a
512-d latent), the synthetic set with a different mixing and a shift so the distance is far from
zero. Then images/s of the FID Inception-v3 (299 px; random weights, which cost the same as the
real ones), DINO ViT-B/8 (224 px) and the tiny preset's ViT on 96-px patches, batch 32 on CPU.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def make_features(rows: int, dim: int, seed: int, shift: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = 512
    mix = rng.normal(size=(latent, dim)).astype(np.float32) / np.sqrt(latent)
    out = np.empty((rows, dim), dtype=np.float32)
    for lo in range(0, rows, 10_000):
        z = rng.normal(size=(min(10_000, rows - lo), latent)).astype(np.float32)
        out[lo : lo + len(z)] = np.abs(z @ mix) + 0.1 * rng.random((len(z), dim), dtype=np.float32)
    return out + shift


def bench_fd(rows: int, dim: int) -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance

    from meddiff.evaluation import metrics as M

    print(f"making 2 × {rows:,} × {dim} float32 features ...", flush=True)
    real = make_features(rows, dim, 0, 0.0)
    fake = make_features(rows, dim, 1, 0.05)

    t0 = time.perf_counter()
    s_real, s_fake = M.feature_stats(real), M.feature_stats(fake)
    t1 = time.perf_counter()
    ours = M.frechet_distance(*s_real, *s_fake)
    t2 = time.perf_counter()
    ours_stats, ours_dist = t1 - t0, t2 - t1

    t0 = time.perf_counter()
    lib_stats_real = (np.mean(real, axis=0), np.cov(real, rowvar=False))
    lib_stats_fake = (np.mean(fake, axis=0), np.cov(fake, rowvar=False))
    t1 = time.perf_counter()
    lib = float(calculate_frechet_distance(*lib_stats_real, *lib_stats_fake))
    t2 = time.perf_counter()
    lib_stats, lib_dist = t1 - t0, t2 - t1

    rel = abs(ours - lib) / abs(lib)
    ours_total, lib_total = ours_stats + ours_dist, lib_stats + lib_dist
    print(f"\nFréchet distance, {rows:,} × {dim} features per set")
    print(f"  {'':12s} {'value':>14s} {'stats s':>9s} {'distance s':>11s} {'total s':>9s}")
    print(f"  {'meddiff':12s} {ours:14.6f} {ours_stats:9.2f} {ours_dist:11.2f} {ours_total:9.2f}")
    print(f"  {'pytorch-fid':12s} {lib:14.6f} {lib_stats:9.2f} {lib_dist:11.2f} {lib_total:9.2f}")
    print(f"  relative difference {rel:.2e} (target ≤ 1e-3: {'met' if rel <= 1e-3 else 'NOT met'})")
    print(
        f"  speed ratio (pytorch-fid time / ours) {lib_total / ours_total:.2f}× "
        f"(target ≥ 1×: {'met' if lib_total >= ours_total else 'NOT met'}); "
        f"distance alone {lib_dist / ours_dist:.1f}×, statistics alone {lib_stats / ours_stats:.2f}×"
    )


def bench_extract(batch: int, reps: int) -> None:
    import torch

    from meddiff.config.prompts import RANDOM_TINY_VIT, EmbedConfig
    from meddiff.evaluation.features import DinoExtractor, InceptionExtractor

    threads = torch.get_num_threads()
    vit_b8 = EmbedConfig(weights=None, threads=threads)  # random weights: timing only
    tiny_vit = EmbedConfig.model_validate({**RANDOM_TINY_VIT, "threads": threads})

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 96, 96, 3), dtype=np.uint8)
    nets = [
        ("FID Inception-v3, 299 px", lambda: InceptionExtractor("random")),
        ("DINO ViT-B/8, 224 px", lambda: DinoExtractor(vit_b8)),
        ("tiny ViT (tiny preset), 64 px", lambda: DinoExtractor(tiny_vit)),
    ]
    print(f"\nFeature extraction on CPU ({torch.get_num_threads()} torch threads), batch {batch}")
    for name, build in nets:
        ex = build()
        ex(images[:2])  # warm-up
        n = reps if "ViT-B/8" not in name else 1
        t0 = time.perf_counter()
        for _ in range(n):
            feats = ex(images)
        dt = time.perf_counter() - t0
        print(f"  {name:32s} {n * batch / dt:8.1f} images/s  ({feats.shape[1]}-d)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-extract", action="store_true")
    args = parser.parse_args()
    bench_fd(args.rows, args.dim)
    if not args.skip_extract:
        bench_extract(args.batch, args.reps)


if __name__ == "__main__":
    main()
