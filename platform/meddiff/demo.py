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


def _synthesis(demo: Demo) -> dict[str, Any]:
    """Fine-tune the tiny Stable Diffusion briefly on the pairs, register it, generate from the
    registry. Pairs come from the prompts step when it ran (``pairs`` and ``prompts`` in its
    summary), else label-only pairs are made from the ingested shards (the paper's baseline)."""
    from meddiff.synthesis.generate import generate
    from meddiff.synthesis.pairs import baseline_pairs
    from meddiff.synthesis.train import train_synthesis

    root = demo.path("synthesis")
    made = demo.results.get("prompts", {})
    if "pairs" in made and "prompts" in made:
        pairs, table = Path(made["pairs"]), Path(made["prompts"])
    else:
        pairs, table = baseline_pairs(demo.cfg, demo.results["ingest"]["shards"], root / "baseline")
    done = root / "train" / "summary.json"
    train = (
        json.loads(done.read_text())
        if done.is_file()
        else train_synthesis(demo.cfg, pairs, root / "train")
    )
    done = root / "synthetic" / "summary.json"
    model = train["model_uri"] or train["model"]
    gen = (
        json.loads(done.read_text())
        if done.is_file()
        else generate(demo.cfg, model, table, root / "synthetic")
    )
    return {
        "pairs": str(pairs),
        "model": train["model"],
        "model_uri": train["model_uri"],
        "train_steps": train["steps"],
        "final_loss": train["final_loss"],
        "synthetic": gen["x"],
        "images": gen["images"],
        "grids": gen["grids"],
    }


# The stages in order; each returns a small JSON-able summary of what it made.
STEPS: list[tuple[str, Callable[[Demo], dict[str, Any]]]] = [
    ("sample-data", _sample_data),
    ("ingest", _ingest),
    ("synthesis", _synthesis),
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
    if "synthesis" in results:
        print(f"Synthetic patches: {results['synthesis']['synthetic']}")
        print(f"PNG grid per prompt: {results['synthesis']['grids']}")
    print(
        f"MLflow store: {tracking_uri(cfg.tracking)}  (browse: mlflow ui --backend-store-uri <it>)"
    )
    return 0
