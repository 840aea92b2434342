"""``meddiff config``: show the resolved configuration or list presets."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from meddiff.commands import add_config_arguments

    group = sub.add_parser("config", help="show resolved configuration and presets")
    cmds = group.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = cmds.add_parser("show", help="print the resolved config as YAML")
    add_config_arguments(show)
    show.set_defaults(handler=_show)
    presets = cmds.add_parser("presets", help="list the named presets")
    presets.set_defaults(handler=_presets)


def _show(args: argparse.Namespace) -> int:
    from meddiff.commands import config_from_args
    from meddiff.config import config_to_yaml

    print(config_to_yaml(config_from_args(args)), end="")
    return 0


def _presets(args: argparse.Namespace) -> int:
    from meddiff.config import PRESETS

    for name in PRESETS:
        print(name)
    return 0
