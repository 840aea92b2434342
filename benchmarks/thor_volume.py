"""Seconds per volume: a DICOM series of ``--slices`` slices through ``thor detect`` end to end
(read and check the series, slice, THOR on every slice through Ray Data, maps back onto the
series' grid, NIfTI + DICOM SEG + Parametric Map written), beside the same slices as a PNG
folder through the PNG detect path (THOR and PNG maps only), on the embedded default (local Ray),
with the shipped tiny model in the recommended fast setting (stride 25, mean of 3 draws).

The two arms alternate, in swapped order each round, so load from other processes on a shared
machine hits both alike; medians over ``--rounds``. The volume arm's own stages (reading,
slicing, putting back, writing DICOM) are also timed alone, outside Ray, to show where its extra
time goes. With ``--overlay PNG`` the last SEG is drawn over its source slices, placed as a
viewer places it (each SEG frame on the instance its Derivation Image Sequence names).

    python benchmarks/thor_volume.py --slices 150 --rounds 2 --overlay runs/seg_overlay.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from meddiff.commands import add_config_arguments, config_from_args
from meddiff.data import dicom, dicom_results
from meddiff.data.images import write_png
from meddiff.data.volume_samples import brain_volume, draw_lesion, mr_series, write_series
from meddiff.data.volumes import Volume, slice_volume, unslice
from meddiff.thor.shipped import SHIPPED_DIR


def series_volume(slices: int) -> Volume:
    """The MNI152 template, 1 mm in plane, resampled to ``slices`` axial slices over its height,
    with a hypo-intense lesion (meddiff.data.volume_samples)."""
    from meddiff.data.brain import mni152

    height = mni152()[0].shape[2]  # 1 mm slices
    return draw_lesion(brain_volume((1.0, 1.0, height / slices)), radius_mm=14.0)[0]


def stage_seconds(series_dir: Path, cfg) -> dict[str, float]:
    """The volume arm's own work, outside Ray: what it adds to THOR."""
    t = {}
    start = time.perf_counter()
    series = dicom.read_series(series_dir, cfg.data.dicom.spacing_tolerance)
    t["read and check series"] = time.perf_counter() - start
    start = time.perf_counter()
    sl, geometry = slice_volume(series.volume, cfg.data.mri)
    t["slice (data.mri)"] = time.perf_counter() - start
    start = time.perf_counter()
    amap = unslice(sl.images, geometry)
    t["maps back onto the grid"] = time.perf_counter() - start
    start = time.perf_counter()
    algorithm = dicom_results.Algorithm("benchmark", "benchmark", 0.5)
    frames = series.to_frames(amap)
    dicom_results.segmentation(series.sources, frames > 0.5, algorithm)
    dicom_results.parametric_map(series.sources, frames, algorithm)
    t["DICOM SEG + parametric map"] = time.perf_counter() - start
    t["kept slices"] = float(len(geometry.z))
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=150, help="instances in the DICOM series")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=str(SHIPPED_DIR), help="default: the shipped model")
    parser.add_argument("--overlay", type=Path, help="draw the last SEG over its slices here")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.preset is None and args.config is None:
        args.preset = "tiny"
    args.overrides = ["thor.infer.stride=25", "thor.infer.draws=3", "runtime.progress=false",
                      *args.overrides]  # fmt: skip
    cfg = config_from_args(args)

    from meddiff import runtime
    from meddiff.thor.detect import detect_folder
    from meddiff.thor.volumes import detect_volume

    work = Path(tempfile.mkdtemp(prefix="meddiff-bench-volume-"))
    series_dir, png_dir = work / "series", work / "png"
    volume = series_volume(args.slices)
    write_series(mr_series(volume), series_dir)
    slices, geometry = slice_volume(dicom.read_series(series_dir).volume, cfg.data.mri)
    for z, image in zip(geometry.z, slices.images, strict=True):
        write_png(png_dir / f"z{int(z):04d}.png", image, 16)
    print(f"series: {args.slices} instances {volume.data.shape[0]}x{volume.data.shape[1]}, "
          f"{len(geometry.z)} slices kept; model {args.model}; fast setting (stride 25, 3 draws)",
          flush=True)  # fmt: skip
    runtime.connect(cfg.runtime)
    times: dict[str, list[float]] = {"volume (DICOM series -> SEG)": [], "PNG folder": []}
    arms = {
        "volume (DICOM series -> SEG)": lambda out: detect_volume(cfg, args.model, series_dir, out),
        "PNG folder": lambda out: detect_folder(cfg, args.model, png_dir, out),
    }
    stages = []
    for r in range(args.rounds):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))
        for arm in order:
            start = time.perf_counter()
            arms[arm](work / f"out-{r}-{arm.split()[0]}")
            times[arm].append(time.perf_counter() - start)
            print(f"round {r + 1}: {arm}: {times[arm][-1]:.1f} s", flush=True)
        stages.append(stage_seconds(series_dir, cfg))
    report(times, stages, len(geometry.z), args.json)
    if args.overlay:
        seg = work / f"out-{args.rounds - 1}-volume" / "dicom" / "seg.dcm"
        print(f"SEG frames drawn: {draw_overlay(series_dir, seg, args.overlay)} -> {args.overlay}")
    return 0


def report(times, stages, kept: int, json_path: Path | None) -> None:
    vol, png = (statistics.median(v) for v in times.values())
    print(f"\n{'arm':<32} {'median s/volume':>16} {'s/slice':>8} {'rounds':>30}")
    for arm, values in times.items():
        med = statistics.median(values)
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"{arm:<32} {med:>16.1f} {med / kept:>8.2f} {shown:>30}")
    print(f"ratio volume / PNG folder: {vol / png:.2f}")
    print("\nvolume arm's own stages, median s (outside Ray):")
    stage = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    for k, v in stage.items():
        print(f"  {k:<30} {v:8.2f}")
    if json_path:
        json_path.write_text(
            json.dumps({"seconds": times, "stages": stage, "kept": kept}, indent=2)
        )


def draw_overlay(series_dir: Path, seg_path: Path, out: Path) -> int:
    """The SEG over its source slices, as a viewer places it: each frame on the instance its
    Derivation Image Sequence names (checked against the frame's plane position)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pydicom

    sources = {}
    for path in sorted(series_dir.iterdir()):
        ds = pydicom.dcmread(path)
        sources[ds.SOPInstanceUID] = ds
    seg = pydicom.dcmread(seg_path)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    shown = []
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        src = sources[
            item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ]
        pos = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        assert np.allclose(pos, np.asarray(src.ImagePositionPatient, float), atol=1e-3)
        shown.append((int(src.InstanceNumber), src.pixel_array, frame))
    shown.sort(key=lambda s: s[0])
    shown = shown[:: max(1, len(shown) // 24)]  # at most about 24 panels
    cols = min(6, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (number, image, frame) in zip(axes.ravel(), shown, strict=False):
        ax.imshow(image, cmap="gray")
        ax.imshow(np.ma.masked_where(frame == 0, frame), cmap="autumn", alpha=0.55)
        ax.set_title(f"instance {number}", fontsize=8)
    fig.suptitle(f"DICOM SEG over its source slices ({len(frames)} frames)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return len(frames)


if __name__ == "__main__":
    sys.exit(main())
