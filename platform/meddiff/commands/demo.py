"""``meddiff demo``: the main job end to end on sample data (:mod:`meddiff.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    parser = sub.add_parser(
        "demo", help="run the main job end to end on sample data (preset tiny by default)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output root")
    parser.add_argument("--fresh", action="store_true", help="delete --out and start over")
    add_config_arguments(parser)
    parser.set_defaults(handler=_main, preset=None)


def _main(args: argparse.Namespace) -> int:
    from meddiff.commands import config_from_args
    from meddiff.demo.run import run_demo
    from meddiff.tracking import tracking_uri

    if args.preset is None and args.config is None:
        args.preset = "tiny"
    cfg = config_from_args(args)
    run_demo(cfg, args.out, fresh=args.fresh)
    print(f"\nStep summaries: {(args.out / 'summary.json').resolve()}")
    print(
        f"MLflow store: {tracking_uri(cfg.tracking)}  (browse: mlflow ui --backend-store-uri <it>)"
    )
    # Last line: the one page to open (every step, its figures, links to each report).
    print(f"Open: {(args.out / 'index.html').resolve()}")
    return 0
