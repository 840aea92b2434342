"""Benchmark: tiles of a single-strip (not tiled) TIFF, read region by region vs strips once.

    python benchmarks/wsi_strips.py                  # the sample slide's 20x level, 4096 x 3072
    python benchmarks/wsi_strips.py --rounds 5 --compression jpeg

A flat TIFF as image editors write it (one strip holding the whole image, deflate-compressed,
resolution tags of 0.5 µm/px) is tiled at 10x: 96-px tiles read as 192-px regions of level 0.

- **region by region**: what ``read_tiles`` did before (``whole_segments=False``): one region per
  run of up to 32 consecutive tiles of a grid row; each read decodes the whole strip;
- **strips once**: ``read_tiles`` now (auto): the strip is decoded once per block of tiles.

The two arms alternate for ``--rounds`` rounds; medians of the wall-clock seconds are printed
side by side with their ratio, and the tiles of both arms are checked to be identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def flat_tiff(out: Path, compression: str) -> Path:
    import tifffile

    from meddiff.data.samples import sample_wsi
    from meddiff.data.slides import open_slide

    with open_slide(sample_wsi(out / "pyramid")) as slide:
        w, h = slide.level_dimensions[0]
        rgb = slide.read(0, 0, 0, w, h)
    path = out / f"flat_{compression}.tif"
    tifffile.imwrite(
        path, rgb, photometric="rgb", rowsperstrip=h, compression=compression,
        resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None,
    )  # fmt: skip
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compression", default="zlib", choices=["zlib", "jpeg", "lzw"])
    args = parser.parse_args(argv)

    from meddiff.config.data import WsiConfig
    from meddiff.data.wsi import plan_slide, read_tiles

    path = flat_tiff(Path(tempfile.mkdtemp(prefix="strips-")), args.compression)
    plan = plan_slide(path, WsiConfig())
    arms = {"region by region": False, "strips once": None}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    tiles: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name, whole in arms.items():
            start = time.perf_counter()
            tiles[name] = np.concatenate(
                [b["image"] for b in read_tiles(plan, whole_segments=whole)]
            )
            seconds[name].append(time.perf_counter() - start)
    assert np.array_equal(tiles["region by region"], tiles["strips once"])
    n = len(plan.tiles)
    print(
        f"{path.name}: {n} tiles of {plan.tile_size} px (level {plan.level}, {plan.read_size}-px reads)"
    )
    med = {name: float(np.median(v)) for name, v in seconds.items()}
    for name, s in med.items():
        print(
            f"  {name:<18} median {s:8.2f} s  ({s / n * 1000:7.1f} ms per tile)  rounds {seconds[name]}"
        )
    print(f"  ratio {med['region by region'] / med['strips once']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
