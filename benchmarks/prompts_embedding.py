"""Benchmark: the Ray Data embedding pipeline against the same model's forward pass alone.

    python benchmarks/prompts_embedding.py                      # tiny and ViT-B/8, memory 10k/100k
    python benchmarks/prompts_embedding.py --models tiny --memory 10000

For each model, in one run and one process:

- **pipeline**: pass 1 of ``meddiff prompts build`` exactly as the job runs it (read a PCam file
  in Ray tasks, quality filter, DINO actor, encode and write Parquet shards), timed end to end on
  N and 2N patches. End-to-end includes the actor's start (model build); the *marginal* rate
  N / (T(2N) - T(N)) is the steady state that a large input sees.
- **forward alone**: the same model object (``DinoEmbedder``), same batch size and torch threads,
  on inputs already resized and normalised in memory: the upper bound for the pipeline. Timed
  before and after the 2N pipeline (the machine is shared) and averaged; rates count the patches
  the model ran on (the filter removes a few before the model sees them).

Then the peak memory (PSS summed over the driver and every Ray process) of the tiny pipeline on
10k and 100k patches, to show it does not grow with the input. Random weights (timing only).
The machine is shared: absolute rates are noisy, ratios are measured side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MODELS = {
    "tiny": {"preset": "tiny", "overrides": [], "n": 8192},
    # ViT-B/8 at 224 px, DINO's architecture, random weights (nothing can be downloaded here).
    "vitb8": {
        "preset": "full",
        "overrides": [
            "prompts.embed.weights=null",
            "prompts.embed.num_gpus=0",
            "prompts.embed.batch_size=8",
            "prompts.embed.threads=2",
        ],
        "n": 16,
    },
}


def make_input(root: Path, n: int, seed: int = 0) -> Path:
    """A PCam-format train split of ``n`` patches: 1024 real IHC patches, repeated with random
    90° rotations and flips (written in chunks, so 100k patches cost little memory)."""
    from meddiff.data.pcam import PCamWriter, open_pcam, read_rows
    from meddiff.data.samples import SampleSizes, sample_pcam

    base_dir = root / "base"
    if not (base_dir / "camelyonpatch_level_2_split_train_x.h5").is_file():
        sample_pcam(base_dir, SampleSizes(1024, 0, 0), seed=seed)
    base = read_rows(open_pcam(base_dir, "train"), 0, 1024)
    out = root / f"pcam{n}"
    if (out / "camelyonpatch_level_2_split_train_x.h5").is_file():
        return out
    rng = np.random.default_rng(seed)
    with PCamWriter(out, "train", patch_size=96) as writer:
        for lo in range(0, n, 4096):
            m = min(4096, n - lo)
            pick = rng.integers(0, 1024, size=m)
            imgs = np.rot90(base["image"][pick], int(rng.integers(4)), axes=(1, 2))
            if rng.integers(2):
                imgs = imgs[:, :, ::-1]
            writer.write(np.ascontiguousarray(imgs), base["label"][pick])
    return out


class PeakMemory:
    """Peak of the summed PSS of this process and all its descendants (Ray's raylet, workers,
    object store), sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.25):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += p.memory_full_info().pss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.baseline = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def time_pipeline(cfg, src: Path, work: Path) -> tuple[float, int]:
    """Seconds for pass 1 over ``src``, and how many patches the model embedded (the quality
    filter removes a few before the model sees them)."""
    from meddiff.data.datasets import patch_dataset
    from meddiff.morphology.pipeline import check_and_embed, reject_counts

    out = work / "checked"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    ds = patch_dataset(src, cfg.data, "train")
    check_and_embed(cfg, ds, out, cfg.prompts.embed)
    elapsed = time.perf_counter() - start
    embedded = reject_counts(out).get("", 0)
    shutil.rmtree(out, ignore_errors=True)
    return elapsed, embedded


def time_forward(cfg, src: Path, n: int) -> float:
    """Seconds for the forward pass alone over ``n`` pre-loaded, preprocessed patches (the
    first ``n`` of ``src``: the same kind of content the pipeline embedded)."""
    import torch

    from meddiff.data.pcam import open_pcam, read_rows
    from meddiff.morphology.embed import DinoEmbedder

    stage = DinoEmbedder(cfg.prompts.embed, seed=cfg.runtime.seed)
    images = read_rows(open_pcam(src, "train"), 0, n)["image"]
    bs = cfg.prompts.embed.batch_size
    with torch.inference_mode():
        batches = [stage.preprocess(images[i : i + bs]) for i in range(0, n, bs)]
        stage.forward(batches[0][:2])  # warm-up (allocator, kernels) outside the timing
        start = time.perf_counter()
        for x in batches:
            stage.forward(x)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,vitb8", help="comma list of: tiny, vitb8")
    parser.add_argument("--n", type=int, help="patches N (default: 8192 tiny, 16 vitb8)")
    parser.add_argument("--memory", default="10000,100000", help="sizes for peak memory; '' skips")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from meddiff import runtime
    from meddiff.config import load_config

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="meddiff-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    import torch

    print(f"torch threads in this process: {torch.get_num_threads()}; cpus: {os.cpu_count()}")
    try:
        runtime.connect(load_config("tiny", overrides=["runtime.progress=false"]).runtime)
        for name in [m for m in args.models.split(",") if m]:
            spec = MODELS[name]
            cfg = load_config(
                spec["preset"], overrides=[*spec["overrides"], "runtime.progress=false"]
            )
            n = args.n or spec["n"]
            src1, src2 = make_input(work, n), make_input(work, 2 * n)
            # Forward alone before and after the pipelines: the machine is shared, so the two
            # bracket the load the pipelines ran under; their mean is the reference.
            t1, e1 = time_pipeline(cfg, src1, work)
            fwd_before = time_forward(cfg, src2, 2 * n)
            t2, e2 = time_pipeline(cfg, src2, work)
            fwd_after = time_forward(cfg, src2, 2 * n)
            fwd = (fwd_before + fwd_after) / 2 * e2 / (2 * n)
            # Rates count the patches the model ran on, in the pipeline and alone alike.
            pipe_e2e = e2 / t2
            pipe_marginal = (e2 - e1) / max(t2 - t1, 1e-9)
            forward = e2 / fwd
            results[name] = {
                "n": [n, 2 * n],
                "embedded": [e1, e2],
                "pipeline_seconds": [round(t1, 2), round(t2, 2)],
                "forward_alone_seconds_before_after": [round(fwd_before, 2), round(fwd_after, 2)],
                "pipeline_end_to_end_patches_per_s": round(pipe_e2e, 2),
                "pipeline_marginal_patches_per_s": round(pipe_marginal, 2),
                "forward_alone_patches_per_s": round(forward, 2),
                "ratio_end_to_end": round(pipe_e2e / forward, 3),
                "ratio_marginal": round(pipe_marginal / forward, 3),
            }
            print(f"\n[{name}] {json.dumps(results[name])}")
        sizes = [int(s) for s in args.memory.split(",") if s]
        if sizes:
            cfg = load_config("tiny", overrides=["runtime.progress=false"])
            mem = {}
            for n in sizes:
                src = make_input(work, n)
                with PeakMemory() as pm:
                    t, _ = time_pipeline(cfg, src, work)
                mem[n] = {
                    "seconds": round(t, 1),
                    "patches_per_s": round(n / t, 1),
                    "peak_pss_mib": round(pm.peak / 2**20),
                    "idle_pss_mib": round(pm.baseline / 2**20),
                    "input_mib": round(n * 96 * 96 * 3 / 2**20),
                }
                print(f"\n[memory tiny {n}] {json.dumps(mem[n])}")
            results["memory"] = mem
    finally:
        runtime.shutdown()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
