"""The main job: every stage of the platform end to end on the embedded default.

``meddiff demo`` (preset ``tiny`` unless told otherwise) builds real sample data, runs each stage on
it through the same library calls a cluster job makes, records everything in MLflow as one parent run
with a child run per stage, and prints where the outputs are. Steps whose outputs are already
complete are skipped, so an interrupted demo resumes where it stopped (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meddiff.config import Config

log = logging.getLogger(__name__)


@dataclass
class Demo:
    """What the steps share: the config, the output root and each finished step's summary."""

    cfg: Config
    out: Path
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)


def _sample_data(demo: Demo) -> dict[str, Any]:
    from meddiff.data import pcam
    from meddiff.data.samples import sample_pcam

    root = demo.path("data", "pcam")
    if pcam.available_splits(root) != list(pcam.SPLITS):
        sample_pcam(root, seed=demo.cfg.runtime.seed, patch_size=demo.cfg.data.pcam.patch_size)
    return {"pcam": str(root)}


def _ingest(demo: Demo) -> dict[str, Any]:
    from meddiff.data import shards
    from meddiff.data.ingest import ingest

    out = demo.path("shards", "pcam-train")
    if shards.is_shard_dir(out):
        manifest = shards.read_manifest(out)
    else:
        manifest = ingest(demo.cfg, demo.path("data", "pcam"), out, split="train", overwrite=True)
    return {"shards": str(out), "rows": manifest["rows"], "labels": manifest["labels"]}


def _evaluate(demo: Demo) -> dict[str, Any]:
    from meddiff.evaluation.experiment import evaluate_demo

    return evaluate_demo(demo.cfg, demo.path("data", "pcam"), demo.results, demo.path("evaluation"))


# The stages in order; each returns a small JSON-able summary of what it made.
STEPS: list[tuple[str, Callable[[Demo], dict[str, Any]]]] = [
    ("sample-data", _sample_data),
    ("ingest", _ingest),
    ("evaluate", _evaluate),  # keep last: judges the synthetic set the steps before it made
]


def run_demo(cfg: Config, out: str | Path, *, fresh: bool = False) -> dict[str, dict[str, Any]]:
    """Run every step under one parent MLflow run; returns the step summaries."""
    import mlflow

    from meddiff import runtime, tracking

    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(cfg, out)
    runtime.connect(cfg.runtime)
    with tracking.start_run(cfg, "demo"):
        for name, step in STEPS:
            start = time.perf_counter()
            log.info("demo step %s ...", name)
            demo.results[name] = step(demo)
            seconds = time.perf_counter() - start
            mlflow.log_metric(f"seconds_{name.replace('-', '_')}", seconds)
            log.info("demo step %s done in %.1f s", name, seconds)
        (out / "summary.json").write_text(json.dumps(demo.results, indent=2))
        mlflow.log_dict(demo.results, "summary.json")
    return demo.results


def register(sub: argparse._SubParsersAction) -> None:
    from meddiff.cli import add_config_arguments

    parser = sub.add_parser(
        "demo", help="run the main job end to end on sample data (preset tiny by default)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output root")
    parser.add_argument("--fresh", action="store_true", help="delete --out and start over")
    add_config_arguments(parser)
    parser.set_defaults(handler=_main, preset=None)


def _main(args: argparse.Namespace) -> int:
    from meddiff.cli import config_from_args
    from meddiff.tracking import tracking_uri

    if args.preset is None and args.config is None:
        args.preset = "tiny"
    cfg = config_from_args(args)
    results = run_demo(cfg, args.out, fresh=args.fresh)
    print(json.dumps(results, indent=2))
    print(f"\nOutputs under {args.out.resolve()}; summary in {args.out / 'summary.json'}")
    report = results.get("evaluate", {}).get("report")
    if report:
        print(f"Evaluation report: {Path(report).resolve()}")
    print(
        f"MLflow store: {tracking_uri(cfg.tracking)}  (browse: mlflow ui --backend-store-uri <it>)"
    )
    return 0
