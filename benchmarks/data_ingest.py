"""Streaming a PCam-format file through Ray Data vs a plain h5py loop over the same file.

Prints patches/s and peak memory side by side for two file lengths, in one run:

    python benchmarks/data_ingest.py                # 50,000 and 10,000 patches
    python benchmarks/data_ingest.py --rows 100000 20000

Both readers hand the consumer the same batches (uint8 (B, 96, 96, 3) plus labels) and the consumer
does the same work a training loop starts with: convert to float in [0, 1] and reduce. Each
measurement runs in a fresh subprocess; peak memory is the largest proportional set size (PSS)
summed over the process and all its children (Ray's raylet, workers and object store included),
sampled every 50 ms, so shared memory is counted once. Start-up is not timed, for either reader:
each first streams ``WARM_BATCHES`` batches through the same consumer (torch's import and first
allocations, Ray's worker processes and the first touch of its object store: a long-lived cluster
pays these once, not per dataset), then the whole file is timed. The peak covers both passes.
Targets: Ray at ≥ 0.8× the plain loop's patches/s, peak memory under 2 GiB and independent of
the file's length.
"""

from __future__ import annotations

import argparse
import json
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

    with PeakMemory() as mem:
        stream(WARM_BATCHES * BATCH)
        start = time.perf_counter()
        rows = stream(None)
        seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "peak_bytes": mem.peak}


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
        for batch in ds.iter_batches(batch_size=BATCH, batch_format="numpy", prefetch_batches=2):
            consume(batch["image"], batch["label"])
            rows += len(batch["label"])
        return rows

    with PeakMemory() as mem:
        stream(WARM_BATCHES * BATCH)
        start = time.perf_counter()
        rows = stream(None)
        seconds = time.perf_counter() - start
    runtime.shutdown()
    return {"rows": rows, "seconds": seconds, "peak_bytes": mem.peak}


def measure(mode: str, root: Path, overrides: list[str]) -> dict:
    sets = [a for o in overrides for a in ("--set", o)]
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(root), *sets],
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
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per reader")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the Ray reader (tiny preset), e.g. runtime.data_memory_mb=256",
    )
    parser.add_argument("--child", nargs=2, metavar=("MODE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, root = args.child
        result = run_plain(Path(root)) if mode == "plain" else run_ray(Path(root), args.set)
        print(json.dumps(result))
        return

    if args.set:
        print("Ray reader config overrides: " + " ".join(args.set))
    rows_hdr = f"{'patches':>8} {'reader':>10} {'patches/s':>10} {'peak MiB':>9} {'ratio':>6}"
    print(rows_hdr)
    print("-" * len(rows_hdr))
    for rows in args.rows:
        root = make_file(args.workdir / f"pcam-{rows}", rows)
        best: dict[str, dict] = {}
        for _ in range(args.repeats):  # alternate so machine noise hits both readers alike
            for mode in ("plain", "ray"):
                result = measure(mode, root, args.set)
                rate = result["rows"] / result["seconds"]
                if mode not in best or rate > best[mode]["rate"]:
                    best[mode] = {**result, "rate": rate}
        plain_rate = best["plain"]["rate"]
        for mode, label in (("plain", "h5py loop"), ("ray", "Ray Data")):
            r = best[mode]
            ratio = r["rate"] / plain_rate
            print(
                f"{rows:>8} {label:>10} {r['rate']:>10.0f} {r['peak_bytes'] / 2**20:>9.0f} {ratio:>6.2f}"
            )
    print("\nratio = patches/s relative to the plain h5py loop (best of the alternating runs).")


if __name__ == "__main__":
    main()
