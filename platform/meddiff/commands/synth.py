"""``meddiff synth``: fine-tune Stable Diffusion on (image, prompt) pairs, generate synthetic sets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from meddiff.storage import path_arg


def register(sub: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments, add_training_arguments

    group = sub.add_parser("synth", help="Stable Diffusion fine-tuning and synthesis (paper A)")
    cmds = group.add_subparsers(dest="synth_command", required=True, metavar="ACTION")

    train = cmds.add_parser(
        "train",
        help="fine-tune the UNet on a pairs shard directory with Ray Train (DeepSpeed or DDP)",
        description="Writes OUT/base (tiny only), OUT/cache, OUT/ray/train (checkpoints), "
        "OUT/model (final pipeline) and registers it in MLflow. Running the same command again "
        "resumes from the last checkpoint.",
    )
    train.add_argument(
        "--pairs",
        required=True,
        type=path_arg,
        help="(image, prompt) shard directory or s3:// prefix",
    )
    train.add_argument(
        "--out",
        required=True,
        type=path_arg,
        help="output directory, or an s3:// prefix (checkpoints written there as training "
        "goes, the rest uploaded at the end); rerun to resume",
    )
    add_training_arguments(train)
    train.set_defaults(handler=_train)

    gen = cmds.add_parser(
        "generate",
        help="generate synthetic patches for a prompt table (Ray Data batch inference)",
        description="Writes a PCam-layout split (plus prompt/cluster/seed per image) and a PNG "
        "grid per prompt under OUT.",
    )
    gen.add_argument(
        "--model",
        required=True,
        help="pipeline directory or s3:// prefix, models:/NAME/VERSION or models:/NAME@ALIAS",
    )
    gen.add_argument("--prompts", required=True, type=path_arg, help="prompts.csv (or s3://)")
    gen.add_argument("--out", required=True, type=path_arg, help="output directory or s3:// prefix")
    gen.add_argument(
        "--overwrite",
        action="store_true",
        help="replace meddiff's earlier output at --out (files meddiff did not write stay)",
    )
    add_config_arguments(gen)
    gen.set_defaults(handler=_generate)

    ship = cmds.add_parser(
        "ship",
        help="copy a finished training run's model with its provenance (the demo's model)",
        description="Writes OUT: the run's pipeline (safetensors, prompts.csv) and "
        "provenance.json (command, data digest, steps, loss, seconds, config, code version, "
        "MLflow run), as platform/meddiff/synthesis/pretrained/pcam-tiny was made.",
    )
    ship.add_argument("--run", required=True, type=Path, help="`synth train --out` folder")
    ship.add_argument("--pairs", required=True, type=Path, help="the pairs it trained on")
    ship.add_argument("--out", required=True, type=Path, help="model folder to write")
    ship.add_argument(
        "--command", required=True, dest="made_by", metavar="COMMAND",
        help="the commands that made the data and the model (recorded as provenance)",
    )  # fmt: skip
    ship.add_argument("--source", help="where the pairs' images came from (recorded)")
    ship.add_argument(
        "--audit", type=Path, metavar="FIDELITY_JSON",
        help="`meddiff eval fidelity` JSON of this model's samples: its memorization audit (copy "
        "rate) is recorded in the provenance and on the registered version",
    )  # fmt: skip
    ship.add_argument("--audit-set", metavar="NAME", help="the set in --audit (when several)")
    add_config_arguments(ship)
    ship.set_defaults(handler=_ship)


def _train(args: argparse.Namespace) -> int:
    from meddiff import storage
    from meddiff.commands import config_from_args
    from meddiff.synthesis.train import train_synthesis

    cfg = config_from_args(args)
    # The checkpoints go straight to --out's ray/ (kept by an object store's upload), so
    # rerunning the same command resumes from them.
    with storage.OutputLocation.open(args.out, keep=("ray",), resume=True) as loc:
        summary = loc.rebase(train_synthesis(cfg, args.pairs, loc, fresh=args.fresh))
    print(json.dumps(summary, indent=2))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from meddiff import storage
    from meddiff.commands import config_from_args
    from meddiff.synthesis.generate import generate

    cfg = config_from_args(args)
    prompts = storage.local_input(args.prompts)
    with storage.OutputLocation.open(args.out, overwrite=args.overwrite) as loc:
        summary = loc.rebase(generate(cfg, args.model, prompts, loc.staging))
    print(json.dumps(summary, indent=2))
    print(f"\nSynthetic set: {summary['x']}\nGrids per prompt: {summary['grids']}")
    return 0


def _ship(args: argparse.Namespace) -> int:
    from meddiff.commands import config_from_args
    from meddiff.synthesis.shipped import ship
    from meddiff.tracking.runs import configure

    configure(config_from_args(args).tracking)  # the training run's store, for its code version
    audit = None
    if args.audit is not None:
        from meddiff.evaluation.memorization import read_audit

        audit = read_audit(args.audit, args.audit_set)
    record = ship(
        args.run, args.pairs, args.out, args.made_by, source=args.source, memorization=audit
    )
    print(json.dumps(record, indent=2))
    return 0
