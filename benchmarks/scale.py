"""Throughput and memory of ingest → embedding → clustering at several input sizes (tiny preset).

    python benchmarks/scale.py                       # 2k, 10k, 50k, 200k; prompts build ≤ 10k
    python benchmarks/scale.py --patches 2000 --embed-upto 2000 --out runs/scale-embed.json
    python benchmarks/scale.py --patches 10000 50000 200000 --embed-upto 0 --out runs/scale-ingest.json
    python benchmarks/scale.py --show runs/scale-embed.json runs/scale-ingest.json   # one table

For each size N, a PCam-format train split of N patches is written under ``--workdir``: the
bundled sample patches (``meddiff data sample-pcam``'s real IHC tissue, 4096 of them) drawn with
replacement, each with its own random 90° rotation, flips and a circular shift of up to 8 px, so
no two patches are bit-identical and K-means sees N distinct points. Then, in a fresh process per
N and one embedded Ray (started first, timed apart), meddiff's own stages run on it as a user
runs them:

1. **ingest**: :func:`meddiff.data.ingest.ingest` (``meddiff data ingest``), PCam → Parquet
   shards;
2. **embed / cluster / write**: :func:`meddiff.morphology.pipeline.build_prompts`
   (``meddiff prompts build``) on those shards, morphology strategy, with the tiny preset's
   EfficientNet-Lite0 (224 px, fp32, one 2-thread actor) and K-means (k = 33). The three seconds
   are the job's own (its ``summary.json``): embed = pass 1 (read, quality filter, network,
   Parquet write), cluster = pass 2 (min-max and K-means in the driver), write = pass 3 (assign
   and write the pairs and prompts.csv; the gallery, timed apart, is in the JSON only).

Sizes above ``--embed-upto`` run the ingest only: on 2 shared CPU cores the embedding ran at
8 patches/s (docs/cluster.md), so 200k patches would take about 7 hours. Their embed, cluster
and write cells are extrapolated, marked ``~``, by a straight line (fixed seconds + seconds per patch) fitted to the fully measured
sizes (pass 1 streams at a constant rate; Lloyd's K-means costs O(N·k·D) per iteration).

Memory: the peak resident set size (RSS) of the driver, and the peak summed RSS of every other
process under it (the raylet, Ray workers, the embedding actor; shared pages such as the object
store are counted in each process that maps them, so the sum is an upper bound), sampled every
0.5 s over each of the two jobs. The load average (``os.getloadavg``) before and after each size
is recorded, as the machine is shared. Generated data under ``--workdir`` is deleted after each
size unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

BASE_PATCHES = 4096
CHUNK = 4096
MAX_SHIFT = 8


def make_input(root: Path, n: int, seed: int = 0) -> Path:
    """A PCam-format train split of ``n`` augmented sample patches under ``root/pcam``."""
    from meddiff.data.pcam import PCamWriter, open_pcam, read_rows
    from meddiff.data.samples import SampleSizes, sample_pcam

    base_dir = root.parent / "base"
    if not (base_dir / "camelyonpatch_level_2_split_train_x.h5").is_file():
        sample_pcam(base_dir, SampleSizes(BASE_PATCHES, 0, 0), seed=seed)
    base = read_rows(open_pcam(base_dir, "train"), 0, BASE_PATCHES)
    out = root / "pcam"
    rng = np.random.default_rng(seed)
    with PCamWriter(out, "train", patch_size=96) as writer:
        for lo in range(0, n, CHUNK):
            pick = rng.integers(0, BASE_PATCHES, size=min(CHUNK, n - lo))
            writer.write(augment(base["image"][pick], rng), base["label"][pick])
    return out


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per patch: a random rot90, horizontal flip and circular shift of at most 8 px. Labels are
    kept as drawn: the benchmark measures cost, and the shift moves PCam's labelled centre 32×32
    by at most half its width."""
    out = np.empty_like(images)
    turns = rng.integers(0, 4, size=len(images))
    flips = rng.integers(0, 2, size=len(images)).astype(bool)
    shifts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(len(images), 2))
    for i, img in enumerate(images):
        img = np.rot90(img, turns[i])
        img = img[:, ::-1] if flips[i] else img
        out[i] = np.roll(img, tuple(shifts[i]), axis=(0, 1))
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class PeakRSS:
    """Peak RSS of this process, and peak summed RSS of all its descendants (Ray's processes),
    sampled in a thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.driver = self.others = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        others = 0
        for p in self.proc.children(recursive=True):
            try:
                others += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.driver = max(self.driver, self.proc.memory_info().rss)
        self.others = max(self.others, others)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def run_stages(root: Path, n: int, embed: bool) -> dict:
    """In this (child) process: Ray start, ingest, and (if ``embed``) the prompts build."""
    from meddiff import runtime
    from meddiff.config import load_config
    from meddiff.data.ingest import ingest
    from meddiff.morphology.pipeline import build_prompts

    cfg = load_config(
        "tiny",
        overrides=["runtime.progress=false", f"tracking.uri=sqlite:///{root / 'mlruns.db'}"],
    )
    result: dict = {"patches": n}
    start = time.perf_counter()
    runtime.connect(cfg.runtime)
    result["ray_start_s"] = time.perf_counter() - start

    shards = root / "shards"
    with PeakRSS() as mem:
        start = time.perf_counter()
        manifest = ingest(cfg, root / "pcam", shards)
        seconds = time.perf_counter() - start
    result["ingest"] = {
        "seconds": seconds,
        "rows": manifest["rows"],
        "shard_bytes": dir_bytes(shards),
        "input_bytes": dir_bytes(root / "pcam"),
        "driver_rss": mem.driver,
        "ray_rss": mem.others,
    }
    if embed:
        out = root / "prompts"
        with PeakRSS() as mem:
            start = time.perf_counter()
            summary = build_prompts(cfg, shards, out)
            seconds = time.perf_counter() - start
        result["prompts"] = {
            "seconds": seconds,
            "stage_seconds": summary["seconds"],
            "kept": summary["kept"],
            "embedding_dim": summary["embedding_dim"],
            "cluster_mode": summary.get("mode"),
            "out_bytes": dir_bytes(out),
            "driver_rss": mem.driver,
            "ray_rss": mem.others,
        }
    runtime.shutdown()
    return result


def measure(workdir: Path, n: int, embed: bool, keep: bool) -> dict:
    """Write the input, then run the stages in a fresh process (its own Ray and peak RSS)."""
    root = workdir / f"n{n}"
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    make_input(root, n)
    input_s = time.perf_counter() - start
    load_before = os.getloadavg()
    log = workdir / f"n{n}.log"
    with open(log, "w") as f:
        args = [sys.executable, __file__, "--child", str(root), str(n), str(int(embed))]
        proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=f, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"N={n} failed (exit {proc.returncode}); see {log}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(input_write_s=input_s, load_before=load_before, load_after=os.getloadavg())
    if not keep:
        shutil.rmtree(root)
    return result


def extrapolate(results: list[dict]) -> dict | None:
    """Seconds = fixed + per_patch · N for each prompts stage, fitted (least squares) to the fully
    measured sizes; with one size, fixed = 0 (an upper bound: its start-up is spread per patch)."""
    full = [r for r in results if "prompts" in r]
    if not full:
        return None
    n = np.array([r["patches"] for r in full], dtype=float)
    fits = {}
    for stage in ("embed", "cluster", "write"):
        t = np.array([r["prompts"]["stage_seconds"][stage] for r in full])
        per_patch, fixed = np.polyfit(n, t, 1) if len(full) > 1 else (t[0] / n[0], 0.0)
        fits[stage] = {"fixed_s": float(fixed), "per_patch_s": float(per_patch)}
    return {"from_patches": n.astype(int).tolist(), "fits": fits}


def fmt_rate(n: int, seconds: float, estimated: bool) -> str:
    mark = "~" if estimated else ""
    return f"{mark}{seconds:.0f} s {mark}{n / seconds:.0f}/s"


def print_table(results: list[dict], per_patch: dict | None) -> None:
    gib = 2**30
    head = (
        f"{'patches':>8} | {'ingest':>15} {'shards GiB':>10} {'drv/ray GiB':>11} | "
        f"{'embed':>14} {'cluster':>12} {'write':>12} {'drv/ray GiB':>11} | {'load':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in sorted(results, key=lambda r: r["patches"]):
        n, ing = r["patches"], r["ingest"]
        cells = [
            f"{n:>8}",
            f"{fmt_rate(n, ing['seconds'], False):>15}",
            f"{ing['shard_bytes'] / gib:>10.2f}",
            f"{ing['driver_rss'] / gib:>5.2f}/{ing['ray_rss'] / gib:<5.2f}",
        ]
        if "prompts" in r:
            st, p = r["prompts"]["stage_seconds"], r["prompts"]
            stages = [fmt_rate(n, st[k], False) for k in ("embed", "cluster", "write")]
            memory = f"{p['driver_rss'] / gib:>5.2f}/{p['ray_rss'] / gib:<5.2f}"
        elif per_patch:
            fits = per_patch["fits"]
            stages = [
                fmt_rate(n, fits[k]["fixed_s"] + fits[k]["per_patch_s"] * n, True)
                for k in ("embed", "cluster", "write")
            ]
            memory = "not run"
        else:
            stages, memory = ["not run"] * 3, "not run"
        load = "{:.1f}-{:.1f}".format(r["load_before"][0], r["load_after"][0])
        print(
            " | ".join(
                [
                    " ".join(cells),
                    " ".join([*(f"{s:>14}" for s in stages), f"{memory:>11}"]),
                    f"{load:>9}",
                ]
            )
        )
    print(
        "\ncells: wall seconds and patches/s; ~ = extrapolated: fixed + per-patch seconds fitted "
        "to the measured sizes;\ndrv/ray GiB = peak RSS of the driver / summed peak RSS of the Ray "
        "processes; load = 1-min load average\nbefore-after the size's run (2-core machine)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, nargs="+", default=[2_000, 10_000, 50_000, 200_000])
    parser.add_argument(
        "--embed-upto",
        type=int,
        default=10_000,
        help="run the prompts build (embed, cluster, write) only for sizes up to this",
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/scale"))
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument(
        "--show",
        type=Path,
        nargs="+",
        help="print the table of saved --out files (their sizes together) and exit",
    )
    parser.add_argument("--child", nargs=3, metavar=("ROOT", "N", "EMBED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, n, embed = args.child
        print(json.dumps(run_stages(Path(root).resolve(), int(n), embed == "1")))
        return

    if args.show:
        results = [r for f in args.show for r in json.loads(f.read_text())["results"]]
        full = {r["patches"] for r in results if "prompts" in r}
        results = [r for r in results if "prompts" in r or r["patches"] not in full]
        print_table(results, extrapolate(results))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count()}
    results: list[dict] = []
    for n in args.patches:
        results.append(measure(args.workdir.resolve(), n, n <= args.embed_upto, args.keep))
        report.update(results=results, extrapolation=extrapolate(results))
        if args.out:  # after every size: a long run that is stopped keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(args.workdir / "base", ignore_errors=True)
    print_table(results, report["extrapolation"])


if __name__ == "__main__":
    main()
