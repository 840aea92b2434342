"""Measurement: how good are the morphology types that each embedding network gives?

    python benchmarks/morphology_features.py                    # the sample PCam set, all splits
    python benchmarks/morphology_features.py --input runs/demo/pcam --rounds 5

Arms, side by side on the same patches (the quality filter's kept patches of every split):

- ``random-vit``: the tiny preset's former embedder, a small ViT with random weights
  (:data:`meddiff.config.prompts.RANDOM_TINY_VIT`);
- ``efficientnet-lite0``: the tiny preset's embedder, EfficientNet-Lite0 trained on ImageNet-1k,
  fed as trained (224 px, (x - 127) / 128);
- ``efficientnet-lite0-96px``: the same network on the 96-px patches without resizing (not as it
  was trained: a check of the preprocessing choice).

For each arm, with the pipeline's own functions (min-max range, exact K-means, k and n_init of
the tiny preset):

- **silhouette** of K-means on all patches (the number ``summary.json`` reports; sample of
  ``silhouette_sample`` rows), in each arm's own feature space;
- **split agreement**: the patches are shuffled into three disjoint thirds A, B, C; one model is
  fitted on A, another on B, and both assign C; the adjusted Rand index of the two assignments
  says whether the types are a property of the tissue (1) or of the sample that was clustered
  (0 = chance). Repeated over ``--rounds`` shuffles; median and range are printed;
- **turn agreement**: the share of ``--turned`` patches (a seeded sample) that keep their type
  when turned 90° and mirrored. Tissue has no orientation (the sample set itself is cut in random
  turns and flips), so a morphology type that changes with it describes the network's view, not
  the tissue;
- **colour ARI**: adjusted Rand index of the types with a K-means (same k) of each patch's mean
  and standard deviation of R, G and B alone: near 1, the "morphology types" are colour bins.

``--cache DIR`` keeps each arm's embeddings (``DIR/<arm>.npz``) so a rerun only recomputes the
statistics.

Prints one table and writes it as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def arms() -> dict[str, dict]:
    from meddiff.config import load_config
    from meddiff.config.prompts import RANDOM_TINY_VIT

    trained = load_config("tiny").prompts.embed.model_dump()
    return {
        "random-vit": dict(RANDOM_TINY_VIT),
        "efficientnet-lite0": trained,
        "efficientnet-lite0-96px": {**trained, "image_size": 96},
    }


def load_patches(root: Path | None) -> tuple[np.ndarray, np.ndarray, Path]:
    """All splits of a PCam directory (written with ``sample_pcam``'s defaults when None)."""
    from meddiff.data.pcam import available_splits, open_pcam, read_rows
    from meddiff.data.samples import sample_pcam

    if root is None:
        root = Path(tempfile.mkdtemp(prefix="morph-features-")) / "pcam"
        sample_pcam(root)
    images, labels = [], []
    for split in available_splits(root):
        handle = open_pcam(root, split)
        block = read_rows(handle, 0, handle.num_rows)
        images.append(block["image"])
        labels.append(block["label"])
    return np.concatenate(images), np.concatenate(labels), root


def embed(cfg: dict, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, float]:
    from meddiff.morphology.embed import PatchEmbedder

    stage = PatchEmbedder(cfg, seed=0)
    start = time.perf_counter()
    out = np.concatenate([stage.embed(images[i : i + batch]) for i in range(0, len(images), batch)])
    return out, time.perf_counter() - start


def split_agreement(x: np.ndarray, ccfg, rounds: int) -> list[float]:
    """ARI of the assignments of a shared third by models fitted on two disjoint thirds."""
    from sklearn.metrics import adjusted_rand_score

    from meddiff.morphology import cluster

    scores = []
    for r in range(rounds):
        order = np.random.default_rng(1000 + r).permutation(len(x))
        a, b, c = np.array_split(order, 3)
        model_a = cluster.fit_exact(x[np.sort(a)], ccfg)[0]
        model_b = cluster.fit_exact(x[np.sort(b)], ccfg)[0]
        held_out = x[np.sort(c)]
        scores.append(
            float(adjusted_rand_score(model_a.assign(held_out), model_b.assign(held_out)))
        )
    return scores


def turn_agreement(model, x: np.ndarray, turned: np.ndarray, pick: np.ndarray) -> float:
    """Share of the patches ``pick`` whose type is the same as that of their turned copy."""
    return float((model.assign(x[pick]) == model.assign(turned)).mean())


def colour_agreement(images: np.ndarray, labels: np.ndarray, ccfg) -> float:
    """ARI of ``labels`` with a K-means of per-patch RGB means and standard deviations."""
    from sklearn.metrics import adjusted_rand_score

    from meddiff.morphology import cluster

    px = images.reshape(len(images), -1, 3).astype(np.float32)
    colour = np.concatenate([px.mean(axis=1), px.std(axis=1)], axis=1)
    return float(adjusted_rand_score(labels, cluster.fit_exact(colour, ccfg)[1]))


def embeddings(name: str, cfg: dict, images: np.ndarray, turned: np.ndarray, cache: Path | None):
    """The arm's embeddings of ``images`` and of ``turned`` and the seconds the first took
    (from ``cache`` when it holds them for the same number of patches)."""
    path = cache / f"{name}.npz" if cache else None
    if path is not None and path.is_file():
        saved = np.load(path)
        if len(saved["x"]) == len(images) and len(saved["y"]) == len(turned):
            return saved["x"], saved["y"], float(saved["seconds"])
    x, seconds = embed(cfg, images)
    y, _ = embed(cfg, turned)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=x, y=y, seconds=seconds)
    return x, y, seconds


def measure(name: str, cfg: dict, images: np.ndarray, ccfg, args) -> dict:
    from meddiff.config.prompts import EmbedConfig
    from meddiff.morphology import cluster
    from meddiff.morphology.embed import describe

    pick = np.sort(np.random.default_rng(7).permutation(len(images))[: args.turned])
    turned = np.ascontiguousarray(np.rot90(images[pick], 1, axes=(1, 2))[:, :, ::-1])
    x, y, seconds = embeddings(name, cfg, images, turned, args.cache)
    model, labels, _ = cluster.fit_exact(x, ccfg)
    sil = cluster.silhouette(model.normalise(x), labels, ccfg.silhouette_sample, ccfg.seed)
    ari = split_agreement(x, ccfg, args.rounds)
    return {
        "arm": name,
        "embedder": describe(EmbedConfig.model_validate(cfg)),
        "dim": int(x.shape[1]),
        "patches": len(x),
        "embed_s": round(seconds, 1),
        "silhouette": round(float(sil), 4),
        "split_ari_median": round(float(np.median(ari)), 4),
        "split_ari_min": round(min(ari), 4),
        "split_ari_max": round(max(ari), 4),
        "turn_agreement": round(turn_agreement(model, x, y, pick), 4),
        "colour_ari": round(colour_agreement(images, labels, ccfg), 4),
        "largest_type_share": round(float(np.bincount(labels).max() / len(labels)), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, help="PCam directory (default: a fresh sample set)")
    parser.add_argument("--rounds", type=int, default=5, help="shuffles for the split agreement")
    parser.add_argument("--turned", type=int, default=512, help="patches for the turn test")
    parser.add_argument("--arms", nargs="+", help="subset of the arms (default: all)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--cache", type=Path, help="keep embeddings here between runs")
    args = parser.parse_args(argv)

    import torch

    from meddiff.config import load_config
    from meddiff.morphology.quality import reject_reasons

    torch.set_num_threads(2)
    cfg = load_config("tiny")
    images, _, root = load_patches(args.input)
    kept = reject_reasons(images, cfg.prompts.filter) == ""
    images = images[kept]
    print(
        f"{root}: {len(kept)} patches, {int(kept.sum())} kept by the quality filter; "
        f"k = {cfg.prompts.cluster.k}, n_init = {cfg.prompts.cluster.n_init}, "
        f"{args.rounds} split rounds of {len(images) // 3} patches per third"
    )
    rows = [
        measure(name, arm, images, cfg.prompts.cluster, args)
        for name, arm in arms().items()
        if not args.arms or name in args.arms
    ]
    header = (
        f"{'arm':<26}{'dim':>6}{'silhouette':>12}{'split ARI (median, range)':>28}"
        f"{'same type turned':>18}{'colour ARI':>12}{'embed s':>9}"
    )
    print(header)
    for r in rows:
        ari = f"{r['split_ari_median']:.3f} ({r['split_ari_min']:.3f}-{r['split_ari_max']:.3f})"
        print(
            f"{r['arm']:<26}{r['dim']:>6}{r['silhouette']:>12.3f}{ari:>28}"
            f"{r['turn_agreement']:>18.1%}{r['colour_ari']:>12.3f}{r['embed_s']:>9.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
