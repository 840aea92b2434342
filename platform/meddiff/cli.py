"""The ``meddiff`` command: one subcommand group per area (:mod:`meddiff.commands`), each a thin
layer over the library.

Every group module defines ``register(subparsers)``; handlers import heavy libraries (torch, Ray)
only when they run, so ``meddiff --help`` is instant. Jobs under ``jobs/`` call :func:`main` with
their group's arguments, so ``ray job submit`` and the CLI run the same code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from meddiff.errors import find_user_error, user_message

__all__ = ["find_user_error", "main", "user_message"]

# Modules that add a subcommand group (each has ``register(subparsers)``), in --help order.
GROUPS = (
    "meddiff.commands.demo",
    "meddiff.commands.data",
    "meddiff.commands.prompts",
    "meddiff.commands.config",
    "meddiff.commands.synth",
    "meddiff.commands.thor",
    "meddiff.commands.eval",
    "meddiff.commands.tracking",
    "meddiff.commands.serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meddiff",
        description="Diffusion models for medical imaging on Ray: histopathology synthesis with "
        "morphology prompts, and THOR anomaly detection.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in GROUPS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code (2 for bad input, with a one-line reason)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    words = list(sys.argv[1:] if argv is None else argv)
    start = time.time()
    try:
        _set_command(words)
        rc = int(args.handler(args) or 0)
        if rc == 0:
            index_output(args, words, time.time() - start, start)
        return rc
    except Exception as err:
        from meddiff.storage import explain_error, name_uris

        user_error = find_user_error(err) or explain_error(err)
        if user_error is None:
            raise

        print(f"meddiff: error: {name_uris(user_message(user_error))}", file=sys.stderr)
        return 2
    finally:
        _set_command(None)


def _set_command(words: list[str] | None) -> None:
    """Name this command in every page it writes (the report kit's provenance header); None
    when it is over (a process may run several: tests, jobs)."""
    import shlex

    from meddiff.reports import kit

    kit.COMMAND = None if words is None else shlex.join(["meddiff", *words])


def index_output(args: argparse.Namespace, words: list[str], seconds: float, start: float) -> None:
    """Give the job's ``--out`` folder an ``index.html`` linking its pages, unless the job wrote
    its own there (the demo's lists every step) or one meddiff did not write is there; the
    output's completion marker then lists it too."""
    out = getattr(args, "out", None)
    if not isinstance(out, Path) or not out.is_dir():
        return
    own = out / "index.html"
    if own.is_file() and (own.stat().st_mtime >= start or not _made_by_meddiff(own)):
        return
    from meddiff import storage
    from meddiff.reports import index_folder

    lead = []  # the subcommand words, before the first option
    for w in words:
        if w.startswith("-"):
            break
        lead.append(w)
    job = " ".join(["meddiff", *lead[:3]])
    index_folder(out, job, seconds=seconds, figures=_summary_figures(out))
    storage.record_files(out, [own.name])


def _made_by_meddiff(page: Path) -> bool:
    """Whether ``page`` is one of meddiff's pages (the report kit names itself the generator)."""
    with open(page, "rb") as f:
        return b'<meta name="generator" content="meddiff' in f.read(4096)


def _summary_figures(out: Path) -> dict[str, float]:
    """The plain numbers at the top of the job's ``summary.json``, if it wrote one."""
    import json

    try:
        data = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


if __name__ == "__main__":
    sys.exit(main())
