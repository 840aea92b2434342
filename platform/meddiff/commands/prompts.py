"""``meddiff prompts``: build (image, prompt) pairs with morphology or baseline prompts."""

from __future__ import annotations

import argparse
import json

from meddiff.storage import path_arg


def register(sub: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    group = sub.add_parser("prompts", help="morphology-enriched prompts (DINO + K-means)")
    cmds = group.add_subparsers(dest="prompts_command", required=True, metavar="ACTION")

    build = cmds.add_parser(
        "build",
        help="filter, embed, cluster and caption patches into an (image, prompt) shard set",
        description="Input: a PCam directory, a shard directory (e.g. whole-slide tiles), a "
        "slide or a directory of slides. Output: OUT/pairs (shards), OUT/prompts.csv, "
        "OUT/morphology_model, OUT/gallery.html, OUT/summary.json.",
    )
    _io_arguments(build)
    build.add_argument(
        "--strategy",
        choices=["morphology", "baseline"],
        help="override prompts.strategy (default from the config: morphology)",
    )
    add_config_arguments(build)
    build.set_defaults(handler=_build, model=None)

    assign = cmds.add_parser(
        "assign",
        help="caption new patches with an already fitted morphology model (no refit)",
    )
    _io_arguments(assign)
    assign.add_argument(
        "--model",
        required=True,
        help="morphology model: a directory or s3:// prefix (OUT/morphology_model) or "
        "models:/NAME/VERSION",
    )
    add_config_arguments(assign)
    assign.set_defaults(handler=_build, strategy="morphology")


def _io_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        required=True,
        type=path_arg,
        help="PCam dir, shard dir, slide or slide dir (local or s3:// gs:// abfs://)",
    )
    parser.add_argument(
        "--out", required=True, type=path_arg, help="output directory or s3:// prefix to create"
    )
    parser.add_argument("--split", default="train", help="PCam split to read (train/valid/test)")
    parser.add_argument("--limit", type=int, help="read at most this many patches")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _build(args: argparse.Namespace) -> int:
    from meddiff import storage
    from meddiff.commands import config_from_args
    from meddiff.morphology.pipeline import build_prompts

    if args.strategy:
        args.overrides = [*args.overrides, f"prompts.strategy={args.strategy}"]
    if args.model:
        args.overrides = [*args.overrides, f"prompts.cluster.model={args.model}"]
    cfg = config_from_args(args)
    # With an object-store --out the Ray workers write their shards under it (from any node)
    # and the location's upload completes it; a local --out is built beside and renamed.
    with storage.OutputLocation.open(args.out, overwrite=args.overwrite) as loc:
        summary = loc.rebase(
            build_prompts(
                cfg, args.input, loc, overwrite=args.overwrite, split=args.split, limit=args.limit
            )
        )
    print(json.dumps({k: v for k, v in summary.items() if k != "cluster_sizes"}, indent=2))
    return 0
