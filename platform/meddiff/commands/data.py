"""``meddiff data``: build sample data, ingest sources into shards, inspect datasets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from meddiff.storage import path_arg


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("data", help="sample data, ingest and inspection")
    cmds = group.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    _add_sample_pcam(cmds)
    _add_sample_wsi(cmds)
    _add_sample_brain(cmds)
    _add_sample_volume(cmds)
    _add_ingest(cmds)
    _add_inspect(cmds)


def _add_sample_pcam(cmds: argparse._SubParsersAction) -> None:
    pcam = cmds.add_parser(
        "sample-pcam", help="write a PCam-format train/valid/test set cut from real IHC tissue"
    )
    pcam.add_argument("out", type=Path, help="output directory")
    pcam.add_argument("--train", type=int, default=1024, help="patches in the train split")
    pcam.add_argument("--valid", type=int, default=256, help="patches in the valid split")
    pcam.add_argument("--test", type=int, default=256, help="patches in the test split")
    pcam.add_argument("--patch-size", type=int, default=96)
    pcam.add_argument("--seed", type=int, default=0)
    pcam.set_defaults(handler=_sample_pcam)


def _add_sample_wsi(cmds: argparse._SubParsersAction) -> None:
    slide = cmds.add_parser(
        "sample-wsi",
        help="write a pyramidal whole-slide image (SVS or DICOM) of real IHC tissue on glass",
    )
    slide.add_argument("out", type=Path, help="output directory")
    slide.add_argument("--width", type=int, default=4096, help="level-0 width in pixels")
    slide.add_argument("--height", type=int, default=3072, help="level-0 height in pixels")
    slide.add_argument(
        "--magnification", type=float, default=20.0, help="level-0 objective (mpp = 10/mag)"
    )
    slide.add_argument("--seed", type=int, default=0)
    slide.add_argument("--name", default="sample_slide.svs", help="file name of the slide")
    slide.add_argument(
        "--pen-strokes", type=int, default=0, help="marker-ink strokes drawn over the tissue"
    )
    slide.add_argument(
        "--format",
        choices=("svs", "dicom"),
        default="svs",
        help="svs: one TIFF file; dicom: a DICOM whole-slide image, a folder named after --name "
        "(without its suffix) of one VL Whole Slide Microscopy instance per level",
    )
    slide.set_defaults(handler=_sample_wsi)


def _add_sample_brain(cmds: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    brain = cmds.add_parser(
        "sample-brain",
        help="write healthy MRI training slices and a lesion benchmark (PNG folders) from the "
        "bundled MNI152 T1 brain",
    )
    brain.add_argument("out", type=Path, help="output directory (train/, test/images, test/masks)")
    brain.add_argument("--lesion", type=int, default=48, help="test slices with a lesion")
    brain.add_argument("--normal", type=int, default=16, help="lesion-free test slices")
    brain.add_argument(
        "--test-every", type=int, default=4, help="hold out every N-th axial slice for testing"
    )
    brain.add_argument(
        "--image-size", type=int, help="slice size in pixels (default: data.mri.image_size)"
    )
    brain.add_argument("--seed", type=int, default=0)
    brain.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    brain.add_argument(
        "--test-volume", type=Path,
        help="T1 NIfTI of another brain: cut the test slices from it instead of the template "
        "(e.g. Colin27 from Debian's mricron-data: /usr/share/mricron/templates/ch2bet.nii.gz)",
    )  # fmt: skip
    brain.add_argument(
        "--test-mask", type=Path, help="brain mask of --test-volume (default: voxels above "
        "data.mri.brain_threshold, i.e. a skull-stripped volume)",
    )  # fmt: skip
    add_config_arguments(brain)
    brain.set_defaults(handler=_sample_brain)


def _add_sample_volume(cmds: argparse._SubParsersAction) -> None:
    volume = cmds.add_parser(
        "sample-volume",
        help="write a brain volume with a drawn lesion as NIfTI and as a synthetic DICOM MR "
        "series (oblique, anisotropic), to try volume detection on",
    )
    volume.add_argument("out", type=Path, help="output directory (volume.nii.gz, dicom/, ...)")
    volume.add_argument(
        "--voxel-size", type=float, nargs=3, default=(2.5, 3.0, 8.0), metavar=("X", "Y", "Z"),
        help="voxel edges in mm (default 2.5 3 8)",
    )  # fmt: skip
    volume.add_argument("--oblique", type=float, default=15.0, help="rotation in degrees")
    volume.add_argument(
        "--lesion-radius", type=float, default=16.0, help="lesion radius in mm (0: no lesion)"
    )
    volume.add_argument(
        "--enhanced", action="store_true", help="one enhanced multi-frame DICOM instance"
    )
    volume.set_defaults(handler=_sample_volume)


def _add_ingest(cmds: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    ingest = cmds.add_parser(
        "ingest",
        help="stream a PCam directory, shard directory, slide or slide directory into Parquet "
        "shards (Ray Data; slides are tiled at data.wsi.magnification)",
    )
    ingest.add_argument(
        "--input",
        required=True,
        type=path_arg,
        help="PCam dir, shards, slide or slide dir (local, or s3:// gs:// abfs://)",
    )
    ingest.add_argument(
        "--out", required=True, type=path_arg, help="shard directory or s3:// prefix to create"
    )
    ingest.add_argument("--split", default="train", help="PCam split to read (train/valid/test)")
    ingest.add_argument("--limit", type=int, help="read at most this many patches")
    ingest.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_config_arguments(ingest)
    ingest.set_defaults(handler=_ingest)


def _add_inspect(cmds: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    inspect = cmds.add_parser(
        "inspect", help="summarise a PCam directory, shard directory, slide or slide directory"
    )
    inspect.add_argument("path", type=path_arg)
    add_config_arguments(inspect)
    inspect.set_defaults(handler=_inspect)


def _sample_pcam(args: argparse.Namespace) -> int:
    from meddiff.data.samples import SampleSizes, sample_pcam

    counts = sample_pcam(
        args.out, SampleSizes(args.train, args.valid, args.test), args.patch_size, args.seed
    )
    print(json.dumps({"out": str(args.out), "labels": counts}, indent=2))
    return 0


def _sample_wsi(args: argparse.Namespace) -> int:
    import tempfile

    from meddiff.data.samples import sample_wsi
    from meddiff.data.slide_dicom import write_dicom_wsi
    from meddiff.data.slides import open_slide

    sizes = {"width": args.width, "height": args.height, "magnification": args.magnification}
    kw = dict(sizes, seed=args.seed, name=args.name, pen_strokes=args.pen_strokes)
    if args.format == "svs":
        path = sample_wsi(args.out, **kw)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.out, prefix=".sample-wsi-") as tmp:
            path = write_dicom_wsi(sample_wsi(tmp, **kw), args.out / Path(args.name).stem)
    with open_slide(path) as slide:
        levels = [list(d) for d in slide.level_dimensions]
        power, mpp = slide.property("objective-power"), slide.property("mpp-x")
        reader = slide.version
    summary = {"slide": str(path), "reader": reader, "levels": levels}
    print(json.dumps(summary | {"objective_power": power, "mpp": mpp}))
    return 0


def _sample_brain(args: argparse.Namespace) -> int:
    from meddiff.commands import config_from_args
    from meddiff.data.brain import BrainSampleSizes, sample_brain

    if args.image_size is not None:
        args.overrides.append(f"data.mri.image_size={args.image_size}")
    cfg = config_from_args(args)
    manifest = sample_brain(
        args.out,
        cfg.data.mri,
        BrainSampleSizes(lesion=args.lesion, normal=args.normal, test_every=args.test_every),
        seed=args.seed,
        overwrite=args.overwrite,
        test_volume=args.test_volume,
        test_mask=args.test_mask,
    )
    keys = ("image_size", "train", "test_lesion", "test_normal", "test_source", "strata")
    print(json.dumps({"out": str(args.out), **{k: manifest[k] for k in keys}}, indent=2))
    return 0


def _sample_volume(args: argparse.Namespace) -> int:
    from meddiff.data.volume_samples import sample_volume

    manifest = sample_volume(
        args.out, tuple(args.voxel_size), args.oblique, args.lesion_radius, args.enhanced
    )
    print(json.dumps({"out": str(args.out), **manifest}, indent=2))
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from meddiff import storage
    from meddiff.commands import config_from_args
    from meddiff.data.ingest import ingest

    cfg = config_from_args(args)
    # Opened before any work: a missing bucket, refused credentials or an existing --out fail
    # now. The shard manifest is the output's marker.
    with storage.OutputLocation.open(args.out, overwrite=args.overwrite, marker=None) as loc:
        manifest = ingest(
            cfg, args.input, loc, split=args.split, limit=args.limit, overwrite=args.overwrite
        )
    print(
        json.dumps({"out": str(args.out), "rows": manifest["rows"], "labels": manifest["labels"]})
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from meddiff import storage
    from meddiff.commands import config_from_args
    from meddiff.data import pcam, shards, wsi
    from meddiff.errors import DataError

    wsi_cfg = config_from_args(args).data.wsi
    if shards.is_shard_dir(args.path):
        summary = shards.read_manifest(args.path)
        shards.check_files(args.path, summary)  # the rows are there only if the files are
    elif pcam.available_splits(args.path):
        summary = {}
        for split in pcam.available_splits(args.path):
            opened = pcam.open_pcam(args.path, split, patch_size=None)
            summary[split] = {"rows": opened.num_rows, "patch_size": opened.patch_size}
    elif storage.is_vouched(args.path) and wsi.is_slide_input(
        local := storage.local_input(args.path), wsi_cfg
    ):
        summary = {
            str(p): wsi.plan_slide(p, wsi_cfg).summary() for p in wsi.slide_files(local, wsi_cfg)
        }
    else:
        raise DataError(f"{args.path}: not a PCam directory, a meddiff shard directory nor a slide")
    print(json.dumps(summary, indent=2))
    return 0
