"""The main job: every stage of the platform end to end on the embedded default.

``meddiff demo`` (preset ``tiny`` unless told otherwise) builds real sample data, runs each stage on
it through the same library calls a cluster job makes, records everything in MLflow as one parent run
with a child run per stage, and prints where the outputs are. Steps whose outputs are already
complete are skipped, so an interrupted demo resumes where it stopped (``--fresh`` starts over).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddiff.config import Config

if TYPE_CHECKING:
    from meddiff.tracking import RunLogger

log = logging.getLogger(__name__)


@dataclass
class Demo:
    """What the steps share: the config, the output root, each finished step's summary and the
    demo's parent MLflow run (None outside :func:`run_demo`)."""

    cfg: Config
    out: Path
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    run: RunLogger | None = None

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
    from meddiff.morphology.layout import SUMMARY
    from meddiff.morphology.pipeline import build_prompts

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


# Slide tiles captioned per demo: enough to carry unlabelled prompts through training, cheap.
DEMO_WSI_TILES = 64


def _prompts_wsi(demo: Demo) -> dict[str, Any]:
    """Caption a few whole-slide tiles (label -1: unknown) with the prompts step's morphology
    model (no refit), so slide tiles go through prompts into synthesis on every demo."""
    from meddiff.config import Config
    from meddiff.morphology.layout import MODEL_DIR, SUMMARY
    from meddiff.morphology.pipeline import build_prompts

    out = demo.path("prompts", "wsi")
    if (out / SUMMARY).is_file():
        summary = json.loads((out / SUMMARY).read_text())
    else:
        dump = demo.cfg.model_dump(mode="json")
        model = Path(demo.results["prompts"]["out"]) / MODEL_DIR
        if model.is_dir():  # the baseline strategy fits no model: label-only prompts
            dump["prompts"]["cluster"]["model"] = str(model)
        summary = build_prompts(
            Config.model_validate(dump),
            demo.path("shards", "wsi-tiles"),
            out,
            overwrite=True,
            limit=DEMO_WSI_TILES,
        )
    return {
        "out": str(out),
        "tiles": summary["rows_in"],
        "kept": summary["kept"],
        "prompts": summary["prompts"],
        "gallery": str(out / "gallery.html"),
    }


def _training_set(demo: Demo) -> tuple[Path, Path]:
    """The synthesis step's pairs and prompt table: the PCam pairs and the slide-tile pairs
    together (the tiles' unlabelled prompts are trained; generation leaves them out)."""
    from meddiff.data.shards import concat_shards, is_shard_dir
    from meddiff.morphology.layout import PAIRS, PROMPTS_CSV
    from meddiff.prompts import merge_tables, read_prompt_table, write_prompt_table

    parts = [Path(demo.results[s]["out"]) for s in ("prompts", "prompts-wsi")]
    out = demo.path("prompts", "combined")
    if not is_shard_dir(out / PAIRS):
        concat_shards(
            [p / PAIRS for p in parts],
            out / PAIRS,
            rows_per_file=demo.cfg.data.shards.rows_per_file,
            info={"stage": "prompts", "combined": [str(p) for p in parts]},
            overwrite=True,
            run_id=demo.run.run_id if demo.run else None,
        )
    pcfg = demo.cfg.prompts
    table = merge_tables(*(read_prompt_table(p / PROMPTS_CSV, pcfg) for p in parts))
    return out / PAIRS, write_prompt_table(out / PROMPTS_CSV, table, pcfg)


def _synthesis(demo: Demo) -> dict[str, Any]:
    """Fine-tune the tiny Stable Diffusion briefly on the prompted PCam patches and slide tiles
    (to show training runs), then generate a few patches per labelled prompt from the shipped
    model, registered with its provenance (a few CPU minutes leave a from-scratch model that
    paints colour blurs; the shipped one was trained longer by the same command, docs/synthesis.md)."""
    from meddiff.synthesis.generate import generate
    from meddiff.synthesis.train import train_synthesis

    root = demo.path("synthesis")
    pairs, table = _training_set(demo)
    done = root / "train" / "summary.json"  # written last: present means training finished
    train = (
        json.loads(done.read_text())
        if done.is_file()
        else train_synthesis(demo.cfg, pairs, root / "train")
    )
    shipped = _synthesis_shipped(demo)
    done = root / "synthetic" / "summary.json"
    gen = (
        json.loads(done.read_text())
        if done.is_file()
        else generate(demo.cfg, shipped["uri"], table, root / "synthetic")
    )
    print(
        f"\nSynthesis: brief demo training ran {train['steps']} steps (final loss "
        f"{_fmt(train['final_loss'])}); the synthetic set and /synthesis come from the shipped "
        f"model {shipped['uri']} ({shipped['steps']} steps of `meddiff synth train` on the same "
        f"sample data; provenance on the model version). Grids: {gen['grids']}"
    )
    return {
        "model": train["model"],
        "trained_model_uri": train["model_uri"],
        # The model the synthetic set came from and the serve step deploys.
        "model_uri": shipped["uri"],
        "generated_by": f"shipped model {shipped['uri']} ({shipped['steps']} training steps)",
        "shipped_steps": shipped["steps"],
        "train_steps": train["steps"],
        "final_loss": train["final_loss"],
        "synthetic": gen["out"],
        "split": gen["split"],
        "x": gen["x"],
        "images": gen["images"],
        "unlabelled_prompts_left_out": gen.get("unlabelled_prompts_left_out", 0),
        "grids": gen["grids"],
    }


def _synthesis_shipped(demo: Demo) -> dict[str, Any]:
    """Register the shipped synthesis model once per demo folder; its URI and training steps."""
    from meddiff.synthesis.shipped import provenance, register_shipped

    return _register_once(
        demo.path("synthesis", "shipped.json"), demo, register_shipped, provenance
    )


def _register_once(done: Path, demo: Demo, register, provenance) -> dict[str, Any]:
    """``register(cfg)`` once per demo folder (recorded in ``done``); URI and training steps."""
    if done.is_file():
        return json.loads(done.read_text())
    info = {"uri": register(demo.cfg), "steps": provenance()["training"]["steps"]}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(info))
    return info


# THOR's share of the demo. A few CPU minutes of training show that training runs, but cannot
# teach a DDPM what a brain looks like, so the metric table is measured on the model meddiff ships
# (made by `meddiff thor train` on the same bundled data; its command and provenance are in
# docs/thor.md and on the registered model version). Inference is the recommended fast setting of
# docs/thor.md: DDIM stride 25, the mean of 3 noise draws per image, for THOR and the DDPM baseline
# alike. AnoDDPM is left out: it needs a model trained on simplex noise (docs/thor.md).
DEMO_THOR_STEPS = 120
DEMO_THOR_MINUTES = 3.0  # cap on a busy machine
DEMO_THOR_STRIDE = 25
DEMO_THOR_DRAWS = 3
DEMO_THOR_METHODS = ("thor", "ddpm")


def _thor(demo: Demo) -> dict[str, Any]:
    from meddiff.data.brain import BrainSampleSizes, is_complete, sample_brain
    from meddiff.thor.evaluate import evaluate_folder, method_config, metric_table

    cfg = demo.cfg
    data = demo.path("data", "brain")
    if not is_complete(data):
        sizes = BrainSampleSizes(lesion=24, normal=8)
        sample_brain(data, cfg.data.mri, sizes, seed=cfg.runtime.seed, overwrite=True)
    train = _thor_brief_training(demo, data / "train")
    shipped = _thor_shipped(demo)
    ev = demo.path("thor", "eval")
    if (ev / "metrics.json").is_file():
        result = json.loads((ev / "metrics.json").read_text())
    else:
        setting = {"stride": DEMO_THOR_STRIDE, "draws": DEMO_THOR_DRAWS}
        methods = {m: method_config(cfg, m, **setting) for m in DEMO_THOR_METHODS}
        result = evaluate_folder(
            cfg,
            shipped["uri"],
            data / "test" / "images",
            data / "test" / "masks",
            methods,
            out_dir=ev,
            title=f"THOR demo: shipped model ({shipped['steps']} training steps), fast mode",
        )
    losses = train.get("loss_first_last") or [None, train.get("final_loss")]
    print(
        f"\nTHOR: brief demo training ran {train['steps']} steps (loss {_fmt(losses[0])} -> "
        f"{_fmt(losses[1])}); too brief to detect anything, so the table below is measured on "
        f"the shipped model {shipped['uri']} ({shipped['steps']} steps of `meddiff thor train` on "
        f"the same data; provenance on the model version). Fast mode: stride {DEMO_THOR_STRIDE}, "
        f"mean of {DEMO_THOR_DRAWS} noise draws per image:"
    )
    print(metric_table(result))
    return {
        "model": train["model"],
        "registered": train.get("model_uri"),
        "train_steps": train["steps"],
        "train_loss_first_last": losses,
        "evaluated_model": shipped["uri"],
        "evaluated_model_steps": shipped["steps"],
        "report": str(ev / "report.html"),
        "metrics": {m: r["metrics"]["pixel"] for m, r in result["methods"].items()},
    }


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.3f}"


def _thor_brief_training(demo: Demo, data: Path) -> dict[str, Any]:
    """A few minutes of `thor train` (to show it runs); adds the first and last logged loss."""
    from meddiff.thor.train import train_thor
    from meddiff.tracking import RunLogger, tracking_uri
    from meddiff.training import read_summary

    run = demo.path("thor", "train")
    done = run / "train_summary.json"
    if done.is_file():
        train = read_summary(done)
    else:
        dump = demo.cfg.model_dump(mode="json")
        steps = min(demo.cfg.thor.train.max_steps, DEMO_THOR_STEPS)
        dump["thor"]["train"].update(
            max_steps=steps,
            time_limit_min=DEMO_THOR_MINUTES,
            checkpoint_every=steps // 2,
            sample_every=steps,
            log_every=10,
        )
        train = train_thor(Config.model_validate(dump), data, run)
    run_id = train["mlflow_run_id"]
    history = RunLogger(tracking_uri(demo.cfg.tracking), run_id).metric_history("loss")
    if history:
        train["loss_first_last"] = [history[0][1], history[-1][1]]
    return train


def _thor_shipped(demo: Demo) -> dict[str, Any]:
    """Register the shipped THOR model once per demo folder; its URI and training steps."""
    from meddiff.thor.shipped import provenance, register_shipped

    return _register_once(demo.path("thor", "shipped.json"), demo, register_shipped, provenance)


def _evaluate(demo: Demo) -> dict[str, Any]:
    from meddiff.demo.evaluate_step import evaluate_demo
    from meddiff.morphology.layout import PAIRS

    synth = demo.results["synthesis"]
    summary = evaluate_demo(
        demo.cfg,
        demo.path("data", "pcam"),
        (Path(synth["synthetic"]), synth["split"]),
        Path(demo.results["prompts"]["out"]) / PAIRS,
        demo.path("evaluation"),
    )
    return {**summary, "synthetic_model": synth.get("generated_by")}


def _serve(demo: Demo) -> dict[str, Any]:
    """Deploy both HTTP services from the registry, one request each, then shut them down."""
    from meddiff.data.images import list_pngs
    from meddiff.demo.serve_step import serve_demo
    from meddiff.morphology.layout import PROMPTS_CSV
    from meddiff.prompts import read_prompt_table

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
        read_prompt_table(table, demo.cfg.prompts)[0].prompt,
    )


# The stages in order; each returns a small JSON-able summary of what it made.
STEPS: list[tuple[str, Callable[[Demo], dict[str, Any]]]] = [
    ("sample-data", _sample_data),
    ("ingest", _ingest),
    ("ingest-wsi", _ingest_wsi),
    ("prompts", _prompts),
    ("prompts-wsi", _prompts_wsi),
    ("synthesis", _synthesis),
    ("thor", _thor),
    ("evaluate", _evaluate),  # judges the synthetic set the steps before it made
    ("serve", _serve),  # last: the registered models behind HTTP, one request each
]


def _check_demo_folder(out: Path) -> None:
    """``--fresh`` deletes the demo's folder: refused for a folder the demo did not make (the
    demo writes ``index.html`` after its first step), so nobody's data goes with it."""
    from meddiff.errors import DataError

    made = (out / "index.html").is_file() or (out / "summary.json").is_file()
    if any(out.iterdir()) and not made:
        raise DataError(
            f"{out} is not a meddiff demo folder (no index.html or summary.json): --fresh "
            "deletes only a demo's own folder; choose another --out"
        )


def run_demo(cfg: Config, out: str | Path, *, fresh: bool = False) -> dict[str, dict[str, Any]]:
    """Run every step under one parent MLflow run; returns the step summaries."""
    from meddiff import runtime, tracking
    from meddiff.demo.index import write_demo_index
    from meddiff.files import write_json

    out = Path(out)
    if fresh and out.exists():
        _check_demo_folder(out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(cfg, out)
    runtime.connect(cfg.runtime)
    names = [name for name, _ in STEPS]
    records: dict[str, dict[str, Any]] = {}
    with tracking.start_run(cfg, "demo") as run:
        demo.run = run
        for name, step in STEPS:
            start = time.perf_counter()
            log.info("demo step %s ...", name)
            try:
                demo.results[name] = step(demo)
            except BaseException as err:  # the index shows how far the run got, then it fails
                seconds = time.perf_counter() - start
                records[name] = {"status": "failed", "seconds": seconds, "error": str(err)[:300]}
                write_demo_index(cfg, out, names, demo.results, records)
                raise
            seconds = time.perf_counter() - start
            records[name] = {"status": "done", "seconds": seconds}
            write_demo_index(cfg, out, names, demo.results, records)
            run.log_metrics({f"seconds_{name.replace('-', '_')}": seconds})
            log.info("demo step %s done in %.1f s", name, seconds)
        write_json(out / "summary.json", demo.results)
        run.log_dict(demo.results, "summary.json")
        run.log_artifact(str(out / "index.html"))
    return demo.results
