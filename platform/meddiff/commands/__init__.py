"""The commands: one module per ``meddiff`` subcommand group (``meddiff data ...`` is
:mod:`meddiff.commands.data`), each a thin layer that parses options, builds the config and calls
the library. :mod:`meddiff.cli` assembles them; ``jobs/`` call it.

Nothing in the library imports from here: commands sit on top of every area.
"""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every job takes to build its config (see :mod:`meddiff.config`)."""
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "--preset", help="named preset: full (paper sizes, default) or tiny (2-core CPU)"
    )
    group.add_argument("--config", metavar="FILE", help="YAML config file (may set 'preset:')")
    group.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one key, e.g. --set thor.train.max_steps=200 (repeatable; value parsed as YAML)",
    )
    group.add_argument(
        "--address", help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)"
    )


def config_from_args(args: argparse.Namespace):
    """The validated :class:`meddiff.config.Config` the options describe."""
    from meddiff.config import load_config

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"runtime.address={args.address}")
    cfg = load_config(args.preset, args.config, overrides)
    from meddiff import storage

    storage.configure(cfg.storage)
    return cfg


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every training command: ``--fresh`` and the configuration options."""
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="delete what meddiff wrote at --out (checkpoints, model and the rest; also an "
        "s3:// one; files meddiff did not write stay) and start over instead of resuming",
    )
    add_config_arguments(parser)
