"""FID and the memorization audit on the sample PCam set: real vs real, exact copies, and the test
split blurred or JPEG-compressed.

    meddiff data sample-pcam runs/pcam        # 1,024 / 256 / 256 real IHC patches, 96 px
    python benchmarks/fid_degradations.py runs/pcam [--bootstrap 20] [--cache runs/fid.npz]

Prints, in one run:

1. the input-range check of the TF-FID Inception file: the first convolution's output variance
   on these patches divided by the variance its batch norm stores, for the three usual input
   scalings (the right one is near 1);
2. per arm, against the train split: FID with the bias-corrected bootstrap interval of the
   fidelity report (``--bootstrap`` resamples), KID, and the memorization audit's copy rate in
   features and in pixels (percentile 1 of the train split's own nearest-neighbour distances).
   Arms: the test split (real vs real), 256 training patches as they are (exact copies), the test
   split with Gaussian blur (σ in pixels of the 96-px patch) and with JPEG compression (Pillow,
   quality q);
3. the extraction throughput it measured.

Every number comes from meddiff's own code (``inception_features``, ``fid``, ``fd_interval``,
``kid_subsets``, the audit's ``audit_space``) on the installed weights. ``--cache`` keeps the
features in an ``.npz`` so that a rerun skips the extraction (delete it to measure again).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from meddiff.evaluation.degradations import blur, jpeg


def input_range_check(images: np.ndarray) -> None:
    import torch

    from meddiff.evaluation.features import _to_tensor, load_inception, resize_tf_bilinear

    conv = load_inception().net.layers.conv
    x = resize_tf_bilinear(_to_tensor(images))
    print("Input range of the TorchScript (first conv output variance / stored BN variance):")
    for label, inp in (("0..255", x), ("0..1", x / 255), ("(x - 128) / 128", (x - 128) / 128)):
        with torch.inference_mode():
            y = torch.conv2d(inp, conv.weight, None, conv.stride, conv.padding)
        ratio = (y.var(dim=(0, 2, 3)) / conv.var).median().item()
        print(f"  {label:16s} median ratio {ratio:10.3f}")


def features(arms: dict[str, np.ndarray], cache: Path | None) -> tuple[dict, float | None]:
    """Inception features of every arm (from ``cache`` when it has them all), and images/s."""
    from meddiff.evaluation.features import inception_features

    if cache is not None and cache.is_file():
        stored = np.load(cache)
        if set(arms) <= set(stored.files):
            return {name: stored[name] for name in arms}, None
    t0 = time.perf_counter()
    out = {}
    for name, images in arms.items():
        out[name] = inception_features(images)
        print(f"  features of {name}: {len(images)} images", flush=True)
    rate = sum(len(x) for x in arms.values()) / (time.perf_counter() - t0)
    if cache is not None:
        np.savez(cache, **out)
    return out, rate


def copy_rates(train: np.ndarray, train_f: np.ndarray, images: np.ndarray, f: np.ndarray):
    """Copy rates (features, pixels) of one arm against the train split (all of it as threshold
    queries), as the fidelity report's audit computes them."""
    from meddiff.evaluation.memorization import _pixels, audit_space

    index = np.arange(len(train))
    rates = []
    for ref, query in ((train_f.astype(np.float64), f.astype(np.float64)),
                       (_pixels(train), _pixels(images))):  # fmt: skip
        space = audit_space(query, lambda ref=ref: [(ref, index)], ref, index, 1.0)
        rates.append(space.rate(0.95))
    return rates


def main() -> None:
    from meddiff.data import pcam
    from meddiff.evaluation import metrics as M

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="PCam-layout folder (meddiff data sample-pcam)")
    parser.add_argument("--bootstrap", type=int, default=20)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--qualities", type=int, nargs="+", default=[75, 30, 10])
    parser.add_argument("--cache", type=Path, help="an .npz for the features (reused if there)")
    args = parser.parse_args()

    def split(name: str) -> np.ndarray:
        opened = pcam.open_pcam(args.data, name, patch_size=None)
        return pcam.read_rows(opened, 0, opened.num_rows)["image"]

    train, test = split("train"), split("test")
    input_range_check(test[:32])
    arms = {"test (real vs real)": test, "train[:256] (exact copies)": train[:256]}
    arms.update({f"test, Gaussian blur σ={s:g}": blur(test, s) for s in args.sigmas})
    arms.update({f"test, JPEG quality {q}": jpeg(test, q) for q in args.qualities})
    feats, rate = features({"train": train, **arms}, args.cache)

    ref = feats["train"]
    print(f"\nAgainst the train split ({len(train)} images); each arm {len(test)} images")
    print(f"| arm | FID [{args.bootstrap}-resample interval] | KID ×1000 | copy rate, features "
          "| copy rate, pixels |")  # fmt: skip
    print("|---|---|---|---|---|")
    with M.blas_threads(2048):
        for name, images in arms.items():
            f = feats[name]
            value = M.fid(ref, f)
            ci = "–"
            if args.bootstrap:
                lo, hi = M.fd_interval(value, M.bootstrap_fd(ref, f, args.bootstrap), 0.95)["ci"]
                ci = f"[{lo:.2f}, {hi:.2f}]"
            kid = M.kid_subsets(ref, f, subsets=50, subset_size=100).mean()
            cf, cp = copy_rates(train, ref, images, f)
            rates = [f"{c['value']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]" for c in (cf, cp)]
            print(f"| {name} | {value:.2f} {ci} | {1000 * kid:.2f} | {rates[0]} | {rates[1]} |",
                  flush=True)  # fmt: skip
    if rate is not None:
        print(f"\nExtraction: {rate:.2f} images/s")


if __name__ == "__main__":
    main()
