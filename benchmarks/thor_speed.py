"""THOR speed and accuracy, side by side on one model and one set of images:

- THOR with the full schedule (stochastic DDPM, every step from T to 0),
- THOR fast mode (DDIM updates every ``--stride`` steps; harmonization and map steps kept),
  deterministic (eta 0) and stochastic (eta 1, the strided DDPM posterior), and deterministic
  with the map averaged over ``--draws`` independent noise draws (``thor.infer.draws``),
- the plain DDPM reconstruction baseline (full schedule).

Methods are run batch by batch in turn (batch 1 for every method, then batch 2, ...), so load from
other processes on a shared machine hits them alike and the ratios stay meaningful. Prints images/s
and pixel AUPRC (plus AUROC, best Dice, image AUROC) and the fast mode's speed-up and AUPRC change.

    python benchmarks/thor_speed.py --model runs/thor/model \
        --images data/brain/test/images --masks data/brain/test/masks --preset tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from meddiff.commands import add_config_arguments, config_from_args
from meddiff.data.images import load_folder
from meddiff.thor.detect import image_seed
from meddiff.thor.evaluate import method_config
from meddiff.thor.inferer import ThorInferer
from meddiff.thor.metrics import evaluate_maps, summary_row
from meddiff.thor.model import resolve_model

FAST = ("thor_fast", "thor_fast_eta1", "thor_fast_draws")


def subset(masks: np.ndarray, limit: int | None) -> np.ndarray:
    """Up to ``limit`` images keeping the lesion/lesion-free mix and the spread of sizes."""
    n = len(masks)
    if not limit or limit >= n:
        return np.arange(n)
    area = masks.reshape(n, -1).sum(axis=1)
    lesion = np.flatnonzero(area > 0)
    normal = np.flatnonzero(area == 0)
    k_normal = round(limit * len(normal) / n)
    k_lesion = limit - k_normal
    by_size = lesion[np.argsort(area[lesion], kind="stable")]
    pick = by_size[np.linspace(0, len(by_size) - 1, k_lesion).round().astype(int)]
    return np.sort(np.concatenate([pick, normal[:k_normal]]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory or registry URI")
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--masks", required=True, type=Path)
    parser.add_argument("--stride", type=int, default=25, help="fast mode stride")
    parser.add_argument(
        "--draws", type=int, default=3, help="noise draws averaged in the fast-mode ensemble row"
    )
    parser.add_argument("--limit", type=int, help="use at most this many images")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    torch.set_num_threads(args.threads)

    model = resolve_model(args.model, cfg.tracking)
    model.unet.to(memory_format=torch.channels_last)
    data = load_folder(args.images, args.masks, size=model.image_size)
    idx = subset(data.masks, args.limit)
    names = [data.names[i] for i in idx]
    images = torch.from_numpy(data.images[idx])[:, None]
    masks = data.masks[idx]
    seeds = [image_seed(n, cfg.runtime.seed) for n in names]

    methods = {
        "thor_full": method_config(cfg, "thor", stride=1),
        "thor_fast": method_config(cfg, "thor", stride=args.stride, eta=0.0),
        "thor_fast_eta1": method_config(cfg, "thor", stride=args.stride, eta=1.0),
        "thor_fast_draws": method_config(
            cfg, "thor", stride=args.stride, eta=0.0, draws=args.draws
        ),
        "ddpm_full": method_config(cfg, "ddpm", stride=1),
    }
    inferers = {
        k: ThorInferer.from_config(model.schedule, c.thor.infer, c.thor.simplex)
        for k, c in methods.items()
    }
    maps = {k: [] for k in methods}
    scores = {k: [] for k in methods}
    seconds = dict.fromkeys(methods, 0.0)
    bs = cfg.thor.infer.batch_size
    print(f"{len(names)} images ({int((masks.reshape(len(masks), -1).any(1)).sum())} with lesions), "
          f"batch {bs}, {args.threads} threads, model {args.model}", flush=True)  # fmt: skip
    for start in range(0, len(names), bs):
        sl = slice(start, start + bs)
        for key, inferer in inferers.items():
            t0 = time.perf_counter()
            det = inferer(model.unet, images[sl], seeds=seeds[sl], image_shape=model.image_shape)
            seconds[key] += time.perf_counter() - t0
            maps[key].append(det.anomaly_map[:, 0].numpy())
            scores[key].append(det.score.numpy())
        done = min(start + bs, len(names))
        print(f"  {done}/{len(names)} images: " + ", ".join(
            f"{k} {done / s:.3f} img/s" for k, s in seconds.items()), flush=True)  # fmt: skip

    results = {}
    for key, inferer in inferers.items():
        m = evaluate_maps(
            np.concatenate(maps[key]), masks, np.concatenate(scores[key]), cfg.thor.eval
        )
        plan = inferer.describe()
        results[key] = {
            "schedule": plan["schedule"],
            "forwards_per_image": plan["forwards_per_image"],
            "map_kind": plan["map_kind"],
            "images_per_s": len(names) / seconds[key],
            "seconds": seconds[key],
            **summary_row(m),
        }
    full = results["thor_full"]
    comparison = {
        "thor_minus_ddpm_auprc": full["pixel_auprc"] - results["ddpm_full"]["pixel_auprc"],
        "target": "fast mode >= 5x the full schedule's images/s with AUPRC no more than 0.02 "
        "below it (a fast mode that is more accurate meets it too)",
    }
    for key in FAST:
        speedup = results[key]["images_per_s"] / full["images_per_s"]
        change = results[key]["pixel_auprc"] - full["pixel_auprc"]
        met = bool(speedup >= 5 and change >= -0.02)
        comparison[key] = {"speedup": speedup, "auprc_change": change, "target_met": met}

    cols = ["forwards_per_image", "images_per_s", "pixel_auprc", "pixel_auroc", "best_dice",
            "image_auroc"]  # fmt: skip
    print(f"\n{'method':<16} {'schedule':<44} " + " ".join(f"{c:>18}" for c in cols))
    for key, r in results.items():
        vals = " ".join(
            f"{r[c]:>18.4f}" if isinstance(r[c], float) else f"{r[c]!s:>18}" for c in cols
        )
        print(f"{key:<16} {r['schedule']:<44} {vals}")
    print(f"map: {full['map_kind']}")
    print(f"THOR - DDPM AUPRC {comparison['thor_minus_ddpm_auprc']:+.4f}")
    for key in FAST:
        c = comparison[key]
        print(
            f"{key}: {c['speedup']:.1f}x the full schedule's images/s, AUPRC change "
            f"{c['auprc_change']:+.4f}; target met: {c['target_met']}"
        )
    if args.json:
        args.json.write_text(json.dumps({"images": len(names), "results": results,
                                         "comparison": comparison}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
