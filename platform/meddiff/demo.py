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
    from meddiff.data.samples import sample_pcam, sample_wsi

    root = demo.path("data", "pcam")
    if pcam.available_splits(root) != list(pcam.SPLITS):
        sample_pcam(root, seed=demo.cfg.runtime.seed, patch_size=demo.cfg.data.pcam.patch_size)
    slides = demo.path("data", "slides")
    slide = slides / "sample_slide.svs"
    if not slide.is_file():  # written to a temporary name and renamed: present means complete
        sample_wsi(slides, seed=demo.cfg.runtime.seed, name=slide.name)
    return {"pcam": str(root), "slides": str(slides)}


def _ingest(demo: Demo) -> dict[str, Any]:
    from meddiff.data import shards
    from meddiff.data.ingest import ingest

    out = demo.path("shards", "pcam-train")
    if shards.is_shard_dir(out):
        manifest = shards.read_manifest(out)
    else:
        manifest = ingest(demo.cfg, demo.path("data", "pcam"), out, split="train", overwrite=True)
    return {"shards": str(out), "rows": manifest["rows"], "labels": manifest["labels"]}


def _ingest_wsi(demo: Demo) -> dict[str, Any]:
    from meddiff.data import shards
    from meddiff.data.ingest import ingest

    out = demo.path("shards", "wsi-tiles")
    if shards.is_shard_dir(out):
        manifest = shards.read_manifest(out)
    else:
        manifest = ingest(demo.cfg, demo.path("data", "slides"), out, overwrite=True)
    return {"shards": str(out), "tiles": manifest["rows"]}


def _prompts(demo: Demo) -> dict[str, Any]:
    from meddiff.morphology.pipeline import SUMMARY, build_prompts

    out = demo.path("prompts", "morphology")
    if (out / SUMMARY).is_file():  # `out` appears only when complete (renamed at the end)
        summary = json.loads((out / SUMMARY).read_text())
    else:
        summary = build_prompts(demo.cfg, demo.path("shards", "pcam-train"), out, overwrite=True)
    return {
        "out": str(out),
        "kept": summary["kept"],
        "removed": summary["removed"]["total"],
        "k": summary.get("k"),
        "prompts": summary["prompts"],
        "silhouette": summary.get("silhouette"),
        "gallery": str(out / "gallery.html"),
    }


def _synthesis(demo: Demo) -> dict[str, Any]:
    """Fine-tune the tiny Stable Diffusion briefly on the prompts step's (image, prompt) pairs,
    register it, and generate a few patches per prompt from the registry."""
    from meddiff.morphology.pipeline import PAIRS, PROMPTS_CSV
    from meddiff.synthesis.generate import generate
    from meddiff.synthesis.train import train_synthesis

    root = demo.path("synthesis")
    prompts = Path(demo.results["prompts"]["out"])
    pairs, table = prompts / PAIRS, prompts / PROMPTS_CSV
    done = root / "train" / "summary.json"  # written last: present means training finished
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
        "model": train["model"],
        "model_uri": train["model_uri"],
        "train_steps": train["steps"],
        "final_loss": train["final_loss"],
        "synthetic": gen["out"],
        "split": gen["split"],
        "x": gen["x"],
        "images": gen["images"],
        "grids": gen["grids"],
    }


# THOR's share of the demo: a deliberately brief training run and fast-mode evaluation, so the
# whole pipeline runs in a few minutes. The model is far from converged; docs/thor.md reports the
# 30-minute training run and the full-schedule results.
DEMO_THOR_STEPS = 120
DEMO_THOR_MINUTES = 3.0  # cap on a busy machine
DEMO_THOR_STRIDE = 25


def _thor(demo: Demo) -> dict[str, Any]:
    from meddiff.config import Config
    from meddiff.data.brain import BrainSampleSizes, is_complete, sample_brain
    from meddiff.thor.evaluate import evaluate_folder, method_config, metric_table
    from meddiff.thor.train import train_thor

    cfg = demo.cfg
    data = demo.path("data", "brain")
    if not is_complete(data):
        sizes = BrainSampleSizes(lesion=24, normal=8)
        sample_brain(data, cfg.data.mri, sizes, seed=cfg.runtime.seed, overwrite=True)
    run = demo.path("thor", "train")
    done = run / "train_summary.json"
    if done.is_file():
        train = json.loads(done.read_text())
    else:
        dump = cfg.model_dump(mode="json")
        steps = min(cfg.thor.train.steps, DEMO_THOR_STEPS)
        dump["thor"]["train"].update(
            steps=steps,
            time_limit_min=DEMO_THOR_MINUTES,
            checkpoint_every=steps // 2,
            sample_every=steps,
            log_every=10,
        )
        train = train_thor(Config.model_validate(dump), data / "train", run)
    ev = demo.path("thor", "eval")
    if (ev / "metrics.json").is_file():
        result = json.loads((ev / "metrics.json").read_text())
    else:
        methods = {
            m: method_config(cfg, m, stride=DEMO_THOR_STRIDE) for m in ("thor", "ddpm", "anoddpm")
        }
        result = evaluate_folder(
            cfg,
            str(run / "model"),
            data / "test" / "images",
            data / "test" / "masks",
            methods,
            out_dir=ev,
            title=f"THOR demo: brief training ({train['steps']} steps), fast mode",
        )
    print(
        f"\nTHOR on the lesion benchmark (BRIEF demo training: {train['steps']} steps; fast mode, "
        f"stride {DEMO_THOR_STRIDE}; see docs/thor.md for the 30-minute run):"
    )
    print(metric_table(result))
    return {
        "model": train["model"],
        "registered": train.get("registered"),
        "train_steps": train["steps"],
        "note": "brief demo training; metrics show the pipeline runs, not THOR's accuracy",
        "report": str(ev / "report.html"),
        "metrics": {m: r["metrics"]["pixel"] for m, r in result["methods"].items()},
    }


def _evaluate(demo: Demo) -> dict[str, Any]:
    from meddiff.evaluation.experiment import evaluate_demo
    from meddiff.morphology.pipeline import PAIRS

    synth = demo.results["synthesis"]
    return evaluate_demo(
        demo.cfg,
        demo.path("data", "pcam"),
        (Path(synth["synthetic"]), synth["split"]),
        Path(demo.results["prompts"]["out"]) / PAIRS,
        demo.path("evaluation"),
    )


def _serve(demo: Demo) -> dict[str, Any]:
    """Deploy both HTTP services from the registry, one request each, then shut them down."""
    from meddiff.data.images import list_pngs
    from meddiff.morphology.pipeline import PROMPTS_CSV
    from meddiff.serving.demo_step import serve_demo
    from meddiff.synthesis.prompts import read_prompt_table

    thor, sd = demo.results["thor"]["registered"], demo.results["synthesis"]["model_uri"]
    if not (thor and sd):  # registration switched off in the config: nothing to deploy from
        return {"skipped": "the serve step deploys registered models; none were registered"}
    table = Path(demo.results["prompts"]["out"]) / PROMPTS_CSV
    return serve_demo(
        demo.cfg,
        demo.path("serve"),
        thor,
        sd,
        list_pngs(demo.path("data", "brain", "test", "images"))[0],
        read_prompt_table(table)[0].prompt,
    )


# The stages in order; each returns a small JSON-able summary of what it made.
STEPS: list[tuple[str, Callable[[Demo], dict[str, Any]]]] = [
    ("sample-data", _sample_data),
    ("ingest", _ingest),
    ("ingest-wsi", _ingest_wsi),
    ("prompts", _prompts),
    ("synthesis", _synthesis),
    ("thor", _thor),
    ("evaluate", _evaluate),  # judges the synthetic set the steps before it made
    ("serve", _serve),  # last: the registered models behind HTTP, one request each
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
    where = {
        "Morphology gallery": results.get("prompts", {}).get("gallery"),
        "Synthetic patches (PCam layout)": results.get("synthesis", {}).get("synthetic"),
        "PNG grid per prompt": results.get("synthesis", {}).get("grids"),
        "THOR report": results.get("thor", {}).get("report"),
        "Evaluation report": results.get("evaluate", {}).get("report"),
    }
    for what, path in where.items():
        if path:
            print(f"{what}: {Path(path).resolve()}")
    print(
        f"MLflow store: {tracking_uri(cfg.tracking)}  (browse: mlflow ui --backend-store-uri <it>)"
    )
    return 0
