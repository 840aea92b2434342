"""Benchmark: the Ray Data embedding pipeline against the same model's forward pass alone.

    python benchmarks/prompts_embedding.py                      # tiny and ViT-B/8, memory 10k/100k
    python benchmarks/prompts_embedding.py --models tiny_vit    # the former random tiny ViT
    python benchmarks/prompts_embedding.py --models tiny --memory 10000

For each model, in one run and one process:

- **pipeline**: pass 1 of ``meddiff prompts build`` exactly as the job runs it (read a PCam file
  in Ray tasks, quality filter, DINO actor, encode and write Parquet shards), timed end to end on
  N and 2N patches. End-to-end includes the actor's start (model build); the *steady* rate
  N / (T(2N) - T(N)) is what a large input sees.
- **forward alone**: the same model object (``PatchEmbedder``), same batch size and torch threads,
  on 2N inputs already resized and normalised in memory: the upper bound for the pipeline. Rates
  count the patches the model ran on (the filter removes a few before the model sees them).

The three are interleaved ``--repeats`` times and the best of each is kept: on a shared machine the
fastest run is the least disturbed one. The benchmark runs at niceness 15, Ray's worker niceness, so
the forward pass alone does not get a larger share of a loaded CPU than the pipeline's workers. Ratios are given in wall-clock time and, as a cross-check,
in CPU seconds summed over every process (driver, Ray workers, actor).

Then the peak memory (PSS summed over the driver and every Ray process) of the tiny pipeline on
10k and 100k patches, to show it does not grow with the input (with the small random ViT:
streaming is measured, not the model). ``tiny`` is the tiny preset's EfficientNet-Lite0,
``tiny_vit`` its former random ViT, ``vitb8`` DINO's architecture with random weights (timing
only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def tiny_vit_overrides() -> list[str]:
    """The tiny preset's former embedder (RANDOM_TINY_VIT: random weights) as ``--set`` overrides
    (JSON values are YAML)."""
    from meddiff.config.prompts import RANDOM_TINY_VIT

    return [f"prompts.embed.{k}={json.dumps(v)}" for k, v in RANDOM_TINY_VIT.items()]


MODELS = {
    "tiny": {"preset": "tiny", "overrides": [], "n": 512},  # EfficientNet-Lite0, 224 px
    "tiny_vit": {"preset": "tiny", "overrides": tiny_vit_overrides, "n": 2048},  # called in main
    # ViT-B/8 at 224 px, DINO's architecture, random weights (nothing can be downloaded here).
    "vitb8": {
        "preset": "full",
        "overrides": [
            "prompts.embed.weights=null",
            "prompts.embed.num_gpus=0",
            "prompts.embed.batch_size=8",
            "prompts.embed.threads=2",
        ],
        "n": 8,
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


class TreeMonitor:
    """Peak summed PSS and total CPU seconds of this process and all its descendants (Ray's
    raylet, workers, object store), sampled every ``interval`` seconds in a thread.

    CPU seconds make a comparison that survives a shared machine: under load, a pipeline of
    several processes gets a larger share of the cores than one process, so wall-clock ratios
    drift; CPU time per patch does not. Each process's CPU time is counted up to its last sample
    (a worker that exits between samples loses at most ``interval`` seconds).
    """

    def __init__(self, interval: float = 0.25):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._cpu: dict[int, float] = {}
        self._start_cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, memory: bool = True) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    self._cpu[p.pid] = t.user + t.system
                    if memory:
                        total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample(self.memory))
            self._stop.wait(self.interval)

    @property
    def cpu_seconds(self) -> float:
        return sum(v - self._start_cpu.get(pid, 0.0) for pid, v in self._cpu.items())

    def __call__(self, memory: bool = True) -> TreeMonitor:
        self.memory = memory
        return self

    def __enter__(self) -> TreeMonitor:
        self.baseline = self._sample()
        self._start_cpu = dict(self._cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(memory=False)


def time_pipeline(cfg, src: Path, work: Path, memory: bool = False) -> dict:
    """Pass 1 over ``src``: wall seconds, CPU seconds of every process, peak memory, and how
    many patches the model embedded (the quality filter removes a few before the model)."""
    from meddiff.data.datasets import patch_dataset
    from meddiff.morphology.columns import reject_counts
    from meddiff.morphology.stages import check_and_embed

    out = work / "checked"
    shutil.rmtree(out, ignore_errors=True)
    with TreeMonitor()(memory=memory) as mon:
        start = time.perf_counter()
        ds = patch_dataset(src, cfg.data, "train")
        check_and_embed(cfg, ds, out, cfg.prompts.embed)
        wall = time.perf_counter() - start
    embedded = reject_counts(out).get("", 0)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "wall": wall,
        "cpu": mon.cpu_seconds,
        "peak": mon.peak,
        "idle": mon.baseline,
        "embedded": embedded,
    }


def time_forward(cfg, src: Path, n: int) -> dict:
    """The forward pass alone over ``n`` pre-loaded, preprocessed patches (the first ``n`` of
    ``src``): wall and CPU seconds."""
    import torch

    from meddiff.data.pcam import open_pcam, read_rows
    from meddiff.morphology.embed import PatchEmbedder

    stage = PatchEmbedder(cfg.prompts.embed, seed=cfg.runtime.seed)
    images = read_rows(open_pcam(src, "train"), 0, n)["image"]
    bs = cfg.prompts.embed.batch_size
    with torch.inference_mode():
        batches = [stage.preprocess(images[i : i + bs]) for i in range(0, n, bs)]
        stage.forward(batches[0][:2])  # warm-up (allocator, kernels) outside the timing
        with TreeMonitor()(memory=False) as mon:
            start = time.perf_counter()
            for x in batches:
                stage.forward(x)
            wall = time.perf_counter() - start
    return {"wall": wall, "cpu": mon.cpu_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="tiny,vitb8", help="comma list of: tiny, tiny_vit, vitb8"
    )
    parser.add_argument(
        "--n", type=int, help="patches N (default: 512 tiny, 2048 tiny_vit, 8 vitb8)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats (best of)")
    parser.add_argument("--memory", default="10000,100000", help="sizes for peak memory; '' skips")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from meddiff import runtime
    from meddiff.config import load_config

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Ray runs its workers at niceness 15. On a shared machine a forward pass timed at niceness 0
    # would win CPU from everyone else that the pipeline's workers cannot: run everything (this
    # process, and the Ray it starts) at the workers' niceness so both compete on equal terms.
    os.nice(max(0, 15 - os.nice(0)))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="meddiff-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    import torch

    print(f"torch threads in this process: {torch.get_num_threads()}; cpus: {os.cpu_count()}")
    try:
        runtime.connect(load_config("tiny", overrides=["runtime.progress=false"]).runtime)
        for name in [m for m in args.models.split(",") if m]:
            spec = MODELS[name]
            extra = spec["overrides"]() if callable(spec["overrides"]) else spec["overrides"]
            cfg = load_config(spec["preset"], overrides=[*extra, "runtime.progress=false"])
            n = args.n or spec["n"]
            src1, src2 = make_input(work, n), make_input(work, 2 * n)
            # Interleaved repeats, best of each: on a shared machine the fastest run is the one
            # least disturbed by other people's work.
            p1s, p2s, fs = [], [], []
            for _ in range(args.repeats):
                p1s.append(time_pipeline(cfg, src1, work))
                fs.append(time_forward(cfg, src2, 2 * n))
                p2s.append(time_pipeline(cfg, src2, work))
            e1, e2 = p1s[0]["embedded"], p2s[0]["embedded"]
            p1w, p2w = min(r["wall"] for r in p1s), min(r["wall"] for r in p2s)
            p1c, p2c = min(r["cpu"] for r in p1s), min(r["cpu"] for r in p2s)
            # Rates count the patches the model ran on, in the pipeline and alone alike.
            fwd_wall = min(r["wall"] for r in fs) / (2 * n)  # seconds per patch
            fwd_cpu = min(r["cpu"] for r in fs) / (2 * n)
            steady_wall = (p2w - p1w) / max(e2 - e1, 1)
            steady_cpu = (p2c - p1c) / max(e2 - e1, 1)
            results[name] = {
                "n": [n, 2 * n],
                "embedded": [e1, e2],
                "repeats": args.repeats,
                "pipeline_wall_s": [
                    [round(r["wall"], 1) for r in p1s],
                    [round(r["wall"], 1) for r in p2s],
                ],
                "forward_wall_s": [round(r["wall"], 1) for r in fs],
                "pipeline_cpu_s": [
                    [round(r["cpu"], 1) for r in p1s],
                    [round(r["cpu"], 1) for r in p2s],
                ],
                "forward_cpu_s": [round(r["cpu"], 1) for r in fs],
                "forward_alone_patches_per_s": round(1 / fwd_wall, 2),
                "pipeline_end_to_end_patches_per_s": round(e2 / p2w, 2),
                "pipeline_steady_patches_per_s": round(1 / steady_wall, 2),
                "ratio_end_to_end": round(fwd_wall * e2 / p2w, 3),
                "ratio_steady": round(fwd_wall / steady_wall, 3),
                "ratio_cpu_end_to_end": round(fwd_cpu * e2 / p2c, 3),
                "ratio_cpu_steady": round(fwd_cpu / steady_cpu, 3),
            }
            print(f"\n[{name}] {json.dumps(results[name])}")
        sizes = [int(s) for s in args.memory.split(",") if s]
        if sizes:  # streaming, not the model, is measured: the small random ViT
            cfg = load_config("tiny", overrides=[*tiny_vit_overrides(), "runtime.progress=false"])
            mem = {}
            for n in sizes:
                src = make_input(work, n)
                run = time_pipeline(cfg, src, work, memory=True)
                mem[n] = {
                    "seconds": round(run["wall"], 1),
                    "patches_per_s": round(n / run["wall"], 1),
                    "peak_pss_mib": round(run["peak"] / 2**20),
                    "idle_pss_mib": round(run["idle"] / 2**20),
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
