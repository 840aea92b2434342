"""What a synthesis model costs to generate from: the demo's synthetic set and a `/synthesis` call.

    OMP_NUM_THREADS=1 python benchmarks/synth_generation_cost.py \\
        --model old=OLD_PIPELINE_DIR --model new=NEW_PIPELINE_DIR --rounds 3

Both ``meddiff synth generate`` (the demo's synthetic set) and the Serve ``/synthesis``
deployment generate through :class:`meddiff.synthesis.stages.ImageGenerator` with the
``synthesis.generate`` section of the preset (tiny: DPM-Solver, 10 steps, guidance 7.5, CPU,
fp32), at the resolution the model was trained at. This times that stage alone, without Ray:
one call on ``--batch`` rows (the tiny preset's generation batch, 32) and one on ``--request``
rows (the demo's ``/synthesis`` request asks for 2), prompts taken in order from each model's
``prompts.csv``, seeds 0..n-1. The models alternate within each round (interleaved) after one
untimed warm-up call each; the table gives the median over ``--rounds`` and the ratio of each
model's median to the first model's, measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import numpy as np


def rows(model_dir: Path, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` prompts of the model's ``prompts.csv`` (cycled), seeds 0..n-1."""
    with (model_dir / "prompts.csv").open(newline="") as f:
        prompts = [r["prompt"] for r in csv.DictReader(f)]
    return {
        "prompt": np.array([prompts[i % len(prompts)] for i in range(n)], dtype=object),
        "seed": np.arange(n, dtype=np.int64),
    }


def main() -> None:
    import torch

    from meddiff.config import load_config
    from meddiff.synthesis.stages import ImageGenerator

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=pipeline directory")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=32, help="rows per generation call")
    ap.add_argument("--request", type=int, default=2, help="rows per /synthesis request")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen_cfg = load_config(args.preset).synthesis.generate.model_dump(mode="json")
    models = {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        g = ImageGenerator(path, gen_cfg)
        models[name] = (g, {n: rows(Path(path), n) for n in (args.batch, args.request)})
        g(models[name][1][args.request])  # warm-up (allocator, first-call overheads)
    times: dict[tuple[str, int], list[float]] = {
        (m, n): [] for m in models for n in (args.batch, args.request)
    }
    for _ in range(args.rounds):
        for n in (args.batch, args.request):
            for name, (g, batches) in models.items():
                t = time.perf_counter()
                out = g(batches[n])
                times[name, n].append(time.perf_counter() - t)
                assert out["image"].shape[0] == n
    first = next(iter(models))
    b, r = args.batch, args.request
    print(f"{args.preset} preset, {args.threads} thread(s), median of {args.rounds} rounds\n")
    print(
        f"| model | px | s per {b} images | images/s | × {first} | s per request of {r} | × {first} |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (g, _) in models.items():
        tb, tr = (statistics.median(times[name, n]) for n in (b, r))
        tb0, tr0 = (statistics.median(times[first, n]) for n in (b, r))
        print(
            f"| {name} | {g.resolution} | {tb:.2f} | {b / tb:.1f} | {tb / tb0:.2f} | {tr:.2f} | {tr / tr0:.2f} |"
        )


if __name__ == "__main__":
    main()
