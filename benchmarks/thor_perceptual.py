"""Does LPIPS over HED's VGG16 trunk behave as a perceptual distance? Known orderings on real images.

THOR's anomaly map multiplies the residual by a spatial LPIPS map (docs/thor.md). Offline, the
trunk is HED's VGG16 (``thor.infer.lpips=vgg16-hed``), which LPIPS's linear layers were not fitted
to. This script checks the orderings any perceptual distance must give, on real images: the
sample-brain training slices (64×64 MRI) and the natural photographs bundled with scikit-image
(gray, 128×128):

- more Gaussian blur (σ 0.5, 1, 2, 3 px) → larger distance; more Gaussian noise (σ 0.01, 0.03,
  0.1, 0.3) → larger distance: Kendall's τ between level and distance, mean over images
  (1.0: every image perfectly ordered);
- a 1-pixel shift is barely visible while blur of σ = 1 px is plainly visible (LPIPS's paper,
  section 5, on the insensitivity of deep features to small shifts): the share of images where
  d(shift) < d(blur σ=1), and the median of d(shift) / d(blur σ=1) (lower: more perceptual).
  Pixel MSE usually says the opposite on textured images.

Rows: pixel MSE; a randomly initialised SqueezeNet trunk with LPIPS's weights (a control: what
an untrained trunk gives); ``vgg16-hed`` (per-layer weights); ``vgg16-hed-lin`` (LPIPS's
per-channel weights on HED's channels); the same with those weights permuted at random within
each layer (mean of 5 permutations: if the per-channel weights carried over to HED's channels,
the unpermuted ones would stand out).

    python benchmarks/thor_perceptual.py --images runs/brain/train
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from scipy import ndimage, stats

NATURAL = ("astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass",
           "gravel", "horse", "moon", "page", "retina", "rocket", "text", "hubble_deep_field")  # fmt: skip
BLUR = (0.5, 1.0, 2.0, 3.0)
NOISE = (0.01, 0.03, 0.1, 0.3)


def natural_images(size: int = 128) -> list[np.ndarray]:
    """scikit-image's bundled photographs as gray [0, 1] squares (centre crop, resized)."""
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.transform import resize

    out = []
    for name in NATURAL:
        img = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
        if img.ndim == 3:
            img = rgb2gray(img[..., :3] / (255.0 if img.max() > 1 else 1.0))
        elif img.max() > 1:
            img = img / 255.0
        s = min(img.shape)
        r0, c0 = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
        out.append(resize(img[r0 : r0 + s, c0 : c0 + s], (size, size), anti_aliasing=True))
    return out


def brain_images(folder: str, n: int = 16) -> list[np.ndarray]:
    from meddiff.data.images import list_pngs, read_png

    files = list_pngs(folder)
    picks = np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)
    return [read_png(files[i]).astype(np.float64) for i in picks]


def distortions(img: np.ndarray, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    return {
        "blur": [ndimage.gaussian_filter(img, s, mode="nearest") for s in BLUR],
        "noise": [np.clip(img + rng.normal(0, s, img.shape), 0, 1) for s in NOISE],
        "shift": [ndimage.shift(img, (0, 1), order=0, mode="nearest")],
    }


def scorers() -> dict:
    from meddiff.thor.perceptual import load_perceptual

    def lpips_score(module):
        def score(a: np.ndarray, b: np.ndarray) -> float:
            ta = torch.from_numpy(a.astype(np.float32))[None, None]
            tb = torch.from_numpy(b.astype(np.float32))[None, None]
            with torch.inference_mode():
                return float(module(ta, tb).mean())

        return score

    torch.manual_seed(0)
    out = {"pixel MSE": lambda a, b: float(((a - b) ** 2).mean())}
    out["SqueezeNet RANDOM trunk (control)"] = lpips_score(load_perceptual("random"))
    hed = load_perceptual("vgg16-hed")
    lin = load_perceptual("vgg16-hed-lin")
    out["vgg16-hed (per-layer weights)"] = lpips_score(hed)
    out["vgg16-hed-lin (per-channel weights)"] = lpips_score(lin)
    perms = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        module = load_perceptual("vgg16-hed-lin")
        for name, buf in module.named_buffers():
            if name.startswith("w"):
                buf.copy_(buf.flatten()[torch.randperm(buf.numel(), generator=gen)].view_as(buf))
        perms.append(lpips_score(module))
    out["vgg16-hed, per-channel weights permuted"] = perms
    return out


def evaluate(images: list[np.ndarray], score, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    taus = {"blur": [], "noise": []}
    shift_below_blur, ratio = [], []
    for img in images:
        d = distortions(img, rng)
        fns = score if isinstance(score, list) else [score]
        per = {k: [np.mean([f(img, v) for f in fns]) for v in vs] for k, vs in d.items()}
        for k in taus:
            taus[k].append(stats.kendalltau(range(len(per[k])), per[k]).statistic)
        blur1 = per["blur"][BLUR.index(1.0)]
        shift_below_blur.append(per["shift"][0] < blur1)
        ratio.append(per["shift"][0] / max(blur1, 1e-12))
    return {
        "tau_blur": float(np.mean(taus["blur"])),
        "tau_noise": float(np.mean(taus["noise"])),
        "shift_below_blur1": float(np.mean(shift_below_blur)),
        "shift_over_blur1_median": float(np.median(ratio)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="sample-brain training slices (PNG)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sets = {"brain (MRI, 64 px)": brain_images(args.images), "natural (128 px)": natural_images()}
    results = {}
    print(
        f"{'distance':<42} {'set':<20} {'tau blur':>9} {'tau noise':>9} {'shift<blur1':>11} "
        f"{'shift/blur1':>11}"
    )
    for name, score in scorers().items():
        for set_name, images in sets.items():
            r = evaluate(images, score)
            results.setdefault(name, {})[set_name] = r
            print(
                f"{name:<42} {set_name:<20} {r['tau_blur']:>9.3f} {r['tau_noise']:>9.3f} "
                f"{r['shift_below_blur1']:>11.2f} {r['shift_over_blur1_median']:>11.3f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
