"""Benchmark: the sample slide through each reader: tiffslide and OpenSlide on the SVS file, and
OpenSlide on the same slide converted to DICOM-WSI; agreement of the tiles and reading time.

    python benchmarks/slide_readers.py                          # the sample slide, 4096 x 3072
    python benchmarks/slide_readers.py --width 2048 --height 1536 --seed 3   # the unit test's

Each arm plans the slide at 10x (tissue mask, kept tiles) and reads every kept tile, as
``data ingest`` does; the arms alternate for ``--rounds`` rounds and the medians of their
wall-clock seconds are printed side by side. Agreement is against tiffslide on the SVS file:
grid tiles whose keep/drop decision differs (with both tissue fractions), and on the tiles both
keep, mean and largest absolute pixel difference (grey levels) and the lowest per-tile PSNR.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def run_arm(path: Path, reader: str):
    from meddiff.config.data import WsiConfig
    from meddiff.data.wsi import plan_slide, read_tiles

    plan = plan_slide(path, WsiConfig(reader=reader))
    images = np.concatenate([b["image"] for b in read_tiles(plan)])
    return plan, images


def fractions(path: Path, plan) -> np.ndarray:
    from meddiff.config.data import WsiConfig
    from meddiff.data.slides import open_slide
    from meddiff.data.wsi import tissue_fraction

    with open_slide(path, plan.reader) as slide:
        args = (plan.level, plan.read_size, plan.cols, plan.rows, WsiConfig())
        return tissue_fraction(slide, *args)[0].reshape(-1)


def agreement(ref, other, ref_path: Path, other_path: Path) -> str:
    (pa, ia), (pb, ib) = ref, other
    ka = {int(i): k for k, i in enumerate(pa.tiles[:, 0])}
    kb = {int(i): k for k, i in enumerate(pb.tiles[:, 0])}
    flips = sorted(set(ka) ^ set(kb))
    both = sorted(set(ka) & set(kb))
    a = ia[[ka[i] for i in both]].astype(np.float64)
    b = ib[[kb[i] for i in both]].astype(np.float64)
    diff = np.abs(a - b)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    psnr = float((10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))).min())
    text = (
        f"decisions differ on {len(flips)} of {pa.rows * pa.cols} grid tiles; on {len(both)} "
        f"common tiles mean |diff| {diff.mean():.3f}, max {diff.max():.0f}, min PSNR "
        f"{'identical' if diff.max() == 0 else f'{psnr:.1f} dB'}"
    )
    if flips:
        fa, fb = fractions(ref_path, pa), fractions(other_path, pb)
        text += "".join(f"\n      tile {i}: tissue {fa[i]:.3f} vs {fb[i]:.3f}" for i in flips)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--height", type=int, default=3072)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from meddiff.data.samples import sample_wsi
    from meddiff.data.slide_dicom import write_dicom_wsi

    out = Path(tempfile.mkdtemp(prefix="slide-readers-"))
    svs = sample_wsi(out, width=args.width, height=args.height, seed=args.seed)
    start = time.perf_counter()
    dicom = write_dicom_wsi(svs, out / "sample_slide_dicom")
    print(f"{svs.name} {args.width}x{args.height}: DICOM-WSI written in ", end="")
    print(f"{time.perf_counter() - start:.1f} s")
    arms = {
        "tiffslide, SVS": (svs, "tiffslide"),
        "openslide, SVS": (svs, "openslide"),
        "openslide, DICOM-WSI": (dicom, "openslide"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    results = {}
    for _ in range(args.rounds):
        for name, (path, reader) in arms.items():
            start = time.perf_counter()
            results[name] = run_arm(path, reader)
            seconds[name].append(time.perf_counter() - start)
    ref = results["tiffslide, SVS"]
    for name, (path, _) in arms.items():
        plan, images = results[name]
        med = float(np.median(seconds[name]))
        print(f"  {name:<22} {len(images):4d} tiles  median {med:6.2f} s  ({plan.reader_version})")
        if name != "tiffslide, SVS":
            print(f"    vs tiffslide, SVS: {agreement(ref, results[name], svs, path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
