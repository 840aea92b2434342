"""``meddiff thor``: train the DDPM, detect anomalies in a folder or a volume (NIfTI, DICOM,
a PACS), evaluate against masks, calibrate the SEG threshold."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from meddiff.storage import path_arg

METHODS = ("thor", "ddpm", "anoddpm")


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser(
        "thor", help="THOR diffusion anomaly detection (train, detect, evaluate)"
    )
    cmds = group.add_subparsers(dest="thor_command", required=True, metavar="ACTION")
    for add in (_add_train, _add_detect, _add_evaluate, _add_calibrate, _add_ship):
        add(cmds)


def _add_train(cmds: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_training_arguments

    train = cmds.add_parser(
        "train", help="train the DDPM on healthy slices with Ray Train; registers the model"
    )
    train.add_argument(
        "--data", required=True, type=path_arg,
        help="healthy training data: a PNG folder, a NIfTI volume, or a folder of NIfTI volumes "
        "(local, or an s3:// object or complete prefix)",
    )  # fmt: skip
    train.add_argument(
        "--out", required=True, type=path_arg,
        help="run folder (checkpoints, model) or an s3:// prefix (checkpoints written there as "
        "training goes, the rest uploaded at the end); rerun to resume",
    )  # fmt: skip
    add_training_arguments(train)
    train.set_defaults(handler=_train)


def _add_detect(cmds: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    detect = cmds.add_parser(
        "detect", help="write an anomaly map PNG per image and a CSV of image scores"
    )
    _model_args(detect)
    detect.add_argument(
        "--out", required=True, type=location_arg,
        help="output folder or s3:// prefix, or a PACS (dicomweb://HOST:PORT/PREFIX) to store a "
        "DICOM input's SEG and map in (kept locally too)",
    )  # fmt: skip
    detect.add_argument(
        "--overwrite",
        action="store_true",
        help="replace meddiff's earlier output at --out (files meddiff did not write stay)",
    )
    detect.add_argument("--method", choices=METHODS, help="default: thor.infer.method (thor)")
    add_config_arguments(detect)
    detect.set_defaults(handler=_detect)


def _add_evaluate(cmds: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    evaluate = cmds.add_parser(
        "evaluate", help="metrics (JSON) against same-named masks; HTML report with --out"
    )
    _model_args(evaluate)
    evaluate.add_argument(
        "--masks", required=True, type=path_arg,
        help="PNG masks, same file names (or s3://); for a volume, a NIfTI mask on its voxel grid",
    )  # fmt: skip
    evaluate.add_argument(
        "--method", action="append", choices=METHODS,
        help="method to evaluate (repeat for several; default thor)",
    )  # fmt: skip
    evaluate.add_argument(
        "--out", type=path_arg, help="folder or s3:// prefix for metrics.json and report.html"
    )
    evaluate.add_argument(
        "--overwrite",
        action="store_true",
        help="replace meddiff's earlier output at --out (files meddiff did not write stay)",
    )
    evaluate.add_argument(
        "--box-protocol", choices=("auto", "on", "off"), default="auto",
        help="5%%-FPR box protocol: auto applies it when every mask is made of rectangles",
    )  # fmt: skip
    add_config_arguments(evaluate)
    evaluate.set_defaults(handler=_evaluate)


def _add_calibrate(cmds: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    calibrate = cmds.add_parser(
        "calibrate",
        help="measure the SEG threshold on healthy slices and store it with the model",
    )
    _model_args(calibrate)
    calibrate.add_argument(
        "--quantile", type=float, default=0.95,
        help="threshold = this quantile of the map over healthy brain pixels (0.95: at most 5%% "
        "of them exceed it)",
    )  # fmt: skip
    add_config_arguments(calibrate)
    calibrate.set_defaults(handler=_calibrate)


def _add_ship(cmds: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    ship = cmds.add_parser(
        "ship", help="copy a finished training run's model with its provenance (the demo's model)"
    )
    ship.add_argument("--run", required=True, type=Path, help="`thor train --out` folder")
    ship.add_argument(
        "--data", required=True, type=Path, help="the `data sample-brain` folder it trained on"
    )
    ship.add_argument("--out", required=True, type=Path, help="model folder to write")
    ship.add_argument(
        "--command", required=True, dest="made_by", metavar="COMMAND",
        help="the commands that made the data and the model (recorded as provenance)",
    )  # fmt: skip
    add_config_arguments(ship)
    ship.set_defaults(handler=_ship)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True,
        help="model directory or s3:// prefix, or registry URI models:/NAME/VERSION or "
        "models:/NAME@ALIAS",
    )  # fmt: skip
    parser.add_argument(
        "--images", required=True, type=location_arg,
        help="folder of grayscale PNGs (or s3://), a NIfTI volume, a folder holding one DICOM "
        "series, or a series on a PACS: dicomweb://HOST:PORT/PREFIX/studies/UID/series/UID",
    )  # fmt: skip
    parser.add_argument(
        "--stride", type=int,
        help="fast mode: visit every STRIDE-th step with DDIM updates (thor.infer.stride)",
    )  # fmt: skip


def location_arg(text: str) -> str | Path:
    """A path, an object-store URI, or a DICOMweb location (kept as text: ``Path`` would fold
    ``dicomweb://`` to ``dicomweb:/``)."""
    return (
        text if text.startswith(("dicomweb://", "dicomwebs://", "dicomweb:/")) else path_arg(text)
    )


def _config(args: argparse.Namespace):
    from meddiff.commands import config_from_args

    if getattr(args, "stride", None) is not None:
        args.overrides.append(f"thor.infer.stride={args.stride}")
    return config_from_args(args)


def _train(args: argparse.Namespace) -> int:
    from meddiff import storage
    from meddiff.thor.train import train_thor

    cfg = _config(args)
    data = storage.local_input(args.data)
    # Ray Train's checkpoints go straight to --out's ray/ (from every node; kept by an object
    # store's upload), so a rerun resumes from them.
    with storage.OutputLocation.open(args.out, keep=("ray",), resume=True) as loc:
        summary = loc.rebase(train_thor(cfg, data, loc, fresh=args.fresh))
    print(json.dumps(summary, indent=2))
    return 0


def _detect(args: argparse.Namespace) -> int:
    from meddiff import storage
    from meddiff.thor import volumes
    from meddiff.thor.detect import detect_folder
    from meddiff.thor.evaluate import method_config

    cfg = _config(args)
    if args.method:
        cfg = method_config(cfg, args.method)
    if volumes.is_volume_input(args.images) or volumes.dicomweb.is_dicomweb(args.out):
        summary = volumes.detect(cfg, args.model, args.images, args.out, overwrite=args.overwrite)
        print(json.dumps(summary, indent=2))
        return 0
    images = storage.local_input(args.images)
    with storage.OutputLocation.open(args.out, overwrite=args.overwrite) as loc:
        summary = loc.rebase(detect_folder(cfg, args.model, images, loc))
    print(json.dumps(summary, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import contextlib

    from meddiff import storage
    from meddiff.thor.evaluate import evaluate_folder
    from meddiff.thor.volumes import local_source

    cfg = _config(args)
    methods = args.method or [cfg.thor.infer.method]
    box = {"auto": None, "on": True, "off": False}[args.box_protocol]
    images, masks = local_source(args.images), storage.local_input(args.masks)
    with (
        storage.OutputLocation.open(args.out, overwrite=args.overwrite)
        if args.out
        else contextlib.nullcontext()
    ) as loc:  # fmt: skip
        summary = evaluate_folder(
            cfg, args.model, images, masks, list(dict.fromkeys(methods)), loc and loc.staging, box
        )
        summary = loc.rebase(summary) if loc else summary
    print(json.dumps(summary, indent=2))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from meddiff import storage
    from meddiff.thor.calibrate import calibrate

    cfg = _config(args)
    command = shlex.join(["meddiff", *sys.argv[1:]])
    record = calibrate(cfg, args.model, storage.local_input(args.images), args.quantile, command)
    print(json.dumps(record, indent=2))
    return 0


def _ship(args: argparse.Namespace) -> int:
    from meddiff.thor.shipped import ship
    from meddiff.tracking.runs import configure

    configure(_config(args).tracking)  # the training run's store, for its code version
    print(json.dumps(ship(args.run, args.data, args.out, args.made_by), indent=2))
    return 0
