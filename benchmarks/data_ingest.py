"""Streaming a PCam-format file through Ray Data vs a plain h5py loop over the same file.

Prints patches/s and peak memory side by side for two file lengths, in one run:

    python benchmarks/data_ingest.py                # 50,000 and 10,000 patches
    python benchmarks/data_ingest.py --rows 100000 20000

Both readers hand the consumer the same batches (uint8 (B, 96, 96, 3) plus labels) and the consumer
does the same work a training loop starts with: convert to float in [0, 1] and reduce. The consumer
runs with each of two torch thread counts (``--threads``):

- 1: the consumer holds one core and the reader has the rest. This is how meddiff lays out its own
  consumers (an embedding actor or a Ray Train worker holds its CPUs; read tasks use the others),
  and it is what a streaming reader is for: reading overlaps the consumer's work.
- all cores: the consumer takes every core, so any reading off the consumer's thread competes with
  it for CPU. On 2 cores this measures how much CPU Ray's reader costs (its own process, the copy
  into the object store, the scheduler), not how well it overlaps.

Each measurement runs in a fresh subprocess; peak memory is the largest proportional set size (PSS)
summed over the process and all its children (Ray's raylet, workers and object store included),
sampled every 50 ms, so shared memory is counted once. Start-up is not timed, for either reader:
each first streams ``WARM_BATCHES`` batches through the same consumer (torch's import and first
allocations, Ray's worker processes and the first touch of its object store: a long-lived cluster
pays these once, not per dataset), then the whole file is timed with no sampler running, then
the peak is taken over a second whole pass (sampling PSS is expensive enough to slow the reader
it watches, and Ray's reader, with a dozen processes to sample, far more than the plain loop).
Targets: Ray at ≥ 0.8× the plain loop's patches/s, peak memory under 2 GiB and independent of
the file's length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BATCH = 1024
WARM_BATCHES = 8


def make_file(root: Path, rows: int) -> Path:
    """A PCam-format train split of ``rows`` real-tissue patches (sample patches repeated)."""
    from meddiff.data import pcam
    from meddiff.data.samples import SampleSizes, sample_pcam

    if pcam.available_splits(root) == ["train"] and pcam.open_pcam(root, "train").num_rows == rows:
        return root
    seed_dir = root.parent / "seed"
    if not pcam.available_splits(seed_dir):
        sample_pcam(seed_dir, SampleSizes(train=2048, valid=0, test=0))
    base = pcam.read_rows(pcam.open_pcam(seed_dir, "train"), 0, 2048)
    with pcam.PCamWriter(root, "train", chunk_rows=256) as writer:
        for start in range(0, rows, 2048):
            n = min(2048, rows - start)
            writer.write(base["image"][:n], base["label"][:n])
    return root


def set_consumer_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def consume(images: np.ndarray, labels: np.ndarray) -> float:
    import torch

    x = torch.from_numpy(np.asarray(images)).float().div_(255.0)
    return float(x.mean()) + float(np.asarray(labels).sum())


class PeakMemory:
    """Peak PSS of this process plus all descendants, sampled in a background thread."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._root = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(interval)

    def __enter__(self) -> PeakMemory:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def timed_and_sampled(stream) -> dict:
    """Warm up, time one whole pass with nothing else running, then measure the peak memory of
    another whole pass. Sampling PSS walks every page table of every process (Ray has a dozen),
    which kept the sampler busy most of the time on 2 cores; timing under it slowed Ray's reader
    far more than the single-process loop."""
    with PeakMemory() as warm:
        stream(WARM_BATCHES * BATCH)
    cpu_before, start = cpu_seconds(), time.perf_counter()
    rows = stream(None)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_before
    with PeakMemory() as sampled:
        stream(None)
    peak = max(warm.peak, sampled.peak)
    return {"rows": rows, "seconds": seconds, "cpu_seconds": cpu, "peak_bytes": peak}


def cpu_seconds() -> float:
    """User + system CPU time of this process and its descendants (Ray's workers, raylet and
    actors live for the whole run, so the difference over a pass is that pass's CPU cost)."""
    import psutil

    root = psutil.Process()
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_plain(root: Path) -> dict:
    import h5py

    from meddiff.data import pcam

    x_path, y_path = pcam.find_split_files(root, "train")

    def stream(limit: int | None) -> int:
        rows = 0
        with h5py.File(x_path, "r") as fx, h5py.File(y_path, "r") as fy:
            n = min(fx["x"].shape[0], limit or fx["x"].shape[0])
            for lo in range(0, n, BATCH):
                images, labels = fx["x"][lo : lo + BATCH], fy["y"][lo : lo + BATCH]
                consume(images, labels)
                rows += len(images)
        return rows

    return timed_and_sampled(stream)


def run_ray(root: Path, overrides: list[str]) -> dict:
    from meddiff import runtime
    from meddiff.config import load_config
    from meddiff.data.datasets import pcam_dataset

    cfg = load_config(
        "tiny",
        overrides=["runtime.progress=false", f"data.pcam.rows_per_block={BATCH}", *overrides],
    )
    runtime.connect(cfg.runtime)

    def stream(limit: int | None) -> int:
        rows = 0
        ds = pcam_dataset(root, "train", cfg.data, limit=limit)
        for batch in ds.iter_batches(batch_size=BATCH, batch_format="numpy"):
            consume(batch["image"], batch["label"])
            rows += len(batch["label"])
        return rows

    result = timed_and_sampled(stream)
    runtime.shutdown()
    return result


def measure(mode: str, root: Path, threads: int, overrides: list[str]) -> dict:
    sets = [a for o in overrides for a in ("--set", o)]
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(root), "--threads", str(threads), *sets],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 10_000])
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "meddiff-bench"
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per reader")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the Ray reader (tiny preset), e.g. runtime.data_memory_mb=256",
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=sorted({1, os.cpu_count() or 1}),
        help="consumer torch thread counts to measure (default: 1 and all cores)",
    )
    parser.add_argument("--child", nargs=2, metavar=("MODE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, root = args.child
        set_consumer_threads(args.threads[0])
        result = run_plain(Path(root)) if mode == "plain" else run_ray(Path(root), args.set)
        print(json.dumps(result))
        return

    if args.set:
        print("Ray reader config overrides: " + " ".join(args.set))
    header = (
        f"{'patches':>8} {'threads':>7} {'reader':>10} {'patches/s':>10} {'CPU s':>6} "
        f"{'peak MiB':>9} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for rows in args.rows:
        root = make_file(args.workdir / f"pcam-{rows}", rows)
        for threads in args.threads:
            best = best_of(root, threads, args.repeats, args.set)
            plain_rate = best["plain"]["rate"]
            for mode, label in (("plain", "h5py loop"), ("ray", "Ray Data")):
                r = best[mode]
                print(
                    f"{rows:>8} {threads:>7} {label:>10} {r['rate']:>10.0f} "
                    f"{r['cpu_seconds']:>6.1f} {r['peak_bytes'] / 2**20:>9.0f} "
                    f"{r['rate'] / plain_rate:>6.2f}"
                )
    print(
        "\nthreads = the consumer's torch threads; CPU s = CPU time of the timed pass, all "
        "processes;\nratio = patches/s relative to the plain h5py loop with the same consumer "
        "(best of the\nalternating runs)."
    )


def best_of(root: Path, threads: int, repeats: int, overrides: list[str]) -> dict[str, dict]:
    """The fastest of ``repeats`` runs per reader, alternating so machine noise hits both alike."""
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for mode in ("plain", "ray"):
            result = measure(mode, root, threads, overrides)
            rate = result["rows"] / result["seconds"]
            if mode not in best or rate > best[mode]["rate"]:
                best[mode] = {**result, "rate": rate}
    return best


if __name__ == "__main__":
    main()
