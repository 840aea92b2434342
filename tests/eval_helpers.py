"""Helpers for the evaluation tests: synthetic-like PCam sets made from real sample patches."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meddiff.data import pcam


def make_synthetic(
    real: Path,
    out: Path,
    *,
    shift: int = 0,
    noise: int = 0,
    seed: int = 0,
    n: int | None = None,
    prompts: bool = True,
    split: str = "train",
    size: int | None = None,
) -> Path:
    """A PCam-layout set of real ``split`` patches brightened by ``shift``, with uniform noise of
    ±``noise``, optionally cropped to ``size``, plus a meta sidecar (prompt, cluster, seed)."""
    opened = pcam.open_pcam(real, split, patch_size=None)
    n = opened.num_rows if n is None else n
    block = pcam.read_rows(opened, 0, n)
    rng = np.random.default_rng(seed)
    images = block["image"].astype(np.int16) + shift
    if noise:
        images = images + rng.integers(-noise, noise + 1, images.shape)
    images = np.clip(images, 0, 255).astype(np.uint8)
    if size is not None:
        images = np.ascontiguousarray(images[:, :size, :size])
    labels = block["label"]
    meta = None
    if prompts:
        clusters = np.arange(n) % 2
        meta = {
            "prompt": [
                f"Histology image of {'tumour' if y else 'normal'} tissue, morphology type {c}"
                for y, c in zip(labels, clusters, strict=True)
            ],
            "cluster": clusters.tolist(),
            "seed": list(range(n)),
        }
    pcam.write_pcam(out, "train", images, labels, meta)
    return out
