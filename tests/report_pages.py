"""Every kind of meddiff page, built from small made-up inputs through the real page code.

Shared by the unit tests of each page and the headless-browser layout checks. Returns what each
page must show, so a test can look for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from meddiff.reports import IndexStep, Provenance, Section, write_index

PROV = Provenance(
    command="meddiff demo --out runs/demo --set a.very.long.override.key=" + "x" * 120,
    config_digest="0123456789ab",
    model="models:/meddiff-thor/3",
    code_version="0.1.0+git.abc1234",
    time="2026-11-30T03:00:00+00:00",
)
RNG = np.random.default_rng(0)


def thor_inputs(n: int = 6, size: int = 32) -> dict[str, Any]:
    images = RNG.random((n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), bool)
    for i in range(n - 2):  # the last two slices are lesion-free
        masks[i, 4 : 8 + 3 * i, 4 : 8 + 3 * i] = True
    metrics = {
        "pixel": {"auprc": 0.4321, "chance_auprc": 0.0234, "auroc": 0.9012, "best_dice": 0.3456},
        "image_auroc": 0.777,
        "strata": {
            s: {"auprc": 0.1 * (k + 1), "best_dice": 0.05}
            for k, s in enumerate(("small", "medium", "large"))
        },  # fmt: skip
    }
    results, outputs = {}, {}
    for method, residual in (("thor", True), ("ddpm", False)):
        results[method] = {
            "metrics": metrics,
            "plan": {
                "method": method,
                "schedule": "linear, very long schedule description " * 3,
                "map_kind": "residual" if residual else "residual x lpips",
                "noise_level": 350,
                "noise": "gaussian",
                "harmonization_steps": [300, 150, 50] if method == "thor" else [],
                "residual_only": residual,
                "intensity": {"scaling": "significant_bits", "read_as": {"type: 16-bit": 6}},
            },
            "images_per_s": 12.5,
        }
        outputs[method] = {
            "maps": RNG.random((n, size, size)).astype(np.float32),
            "reconstructions": RNG.random((n, size, size)).astype(np.float32),
            "scores": RNG.random(n),
        }
    names = [f"slice_{i:03d}.png" for i in range(n)]
    return {"results": results, "outputs": outputs, "images": images, "masks": masks,
            "names": names}  # fmt: skip


def thor_page(out: Path) -> Path:
    from meddiff.thor.report import render_report

    t = thor_inputs()
    notes = ["thor: anomaly maps are residual-only: the LPIPS perceptual term is off"]
    html = render_report(
        "THOR <report>", t["results"], t["names"], t["images"], t["masks"], t["outputs"],
        rows=6, notes=notes, provenance=PROV,
    )  # fmt: skip
    path = out / "thor" / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html)
    return path


def gallery_page(out: Path, labels: int = 2, clusters: int = 4) -> Path:
    from meddiff.morphology.gallery import write_gallery

    cells, counts, prompts = {}, {}, {}
    for c in range(clusters):
        for lab in range(labels):
            if (c, lab) == (0, 1):
                continue  # an empty cell: "none"
            cells[(c, lab)] = RNG.integers(0, 256, (6, 96, 96, 3), dtype=np.uint8)
            counts[(c, lab)] = 10 + c + lab
            prompts[(c, lab)] = (
                f"Histology image of {'cancer' if lab else 'healthy'} tissue, type {c}"
            )
    return write_gallery(
        out / "prompts",
        title="Morphology types (morphology prompts)",
        stats={"source": "/data/pcam", "kept": 120, "silhouette": 0.123456, "k": [3, 4]},
        label_names={0: "healthy", 1: "cancer"},
        cells=cells,
        counts=counts,
        prompts=prompts,
        rejected={"blank": RNG.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)},
        rejected_counts={"blank": 7, "blurry": 2},
        thumb=96,
        provenance=PROV,
    )


FD = "fd_vit_base_patch8_224_dino_random"


def fidelity_report(name: str) -> dict[str, Any]:
    def cell(v: float) -> dict[str, Any]:
        return {"value": v, "ci": [v * 0.9, v * 1.1]}

    fd = {
        **cell(123.456),
        "reliable": False,
        "warning": "Fréchet distance on 64 samples in 768 dimensions",
    }
    overall = {FD: fd, "kd_vit": cell(0.0123), "precision": cell(0.61),
               "recall": cell(0.42), "n_real": 128, "n_synthetic": 64}  # fmt: skip
    strata = {"0": {"n_real": 64, "n_synthetic": 32, FD: cell(150.0), "kd_vit": cell(0.02),
                    "precision": cell(0.5), "recall": cell(0.4)},
              "1": {"n_real": 64, "n_synthetic": 2, "skipped": "fewer than 10 images"}}  # fmt: skip
    return {"network": "vit_base_patch8_224_dino_random", "fd_metric": FD, "kd_metric": "kd_vit",
            "is_fid": False, "real": "/data/pcam", "synthetic": f"/runs/{name}/synthetic",
            "overall": overall, "by_label": strata,
            "by_prompt": {"skipped": "the synthetic set has no prompt column in its meta"}}  # fmt: skip


def evaluation_page(out: Path) -> Path:
    from meddiff.evaluation import report as R
    from meddiff.evaluation.judge import comparison_html

    reports = {s: fidelity_report(s) for s in ("baseline", "morphology")}
    table = R.comparison_table(reports)
    # A long table: one row per made-up prompt with a wide name.
    wide = {f"classifier_{'very_long_arm_name_' * 3}{i}_auc": {"baseline": 0.5, "morphology": 0.6}
            for i in range(3)}  # fmt: skip
    blocks = [
        R.note("Features from a RANDOM network: distances are not FID"),
        R.heading("Metric × strategy"),
        comparison_html({**table, **wide}, list(reports)),
        R.figure(RNG.integers(0, 256, (490, 490, 3), dtype=np.uint8), "real: 25 random images"),
        R.figure(RNG.integers(0, 256, (490, 490, 3), dtype=np.uint8), "baseline: 25 random"),
    ]
    for name, rep in reports.items():
        blocks += R.fidelity_blocks(name, rep)
    return R.write_html(out / "evaluation" / "report.html", "Judging <synthetic>", blocks, PROV)


def study_page(out: Path, n: int = 8) -> Path:
    from meddiff.evaluation.reader_study import study_html
    from meddiff.reports import encode_png

    images = [(f"img-{i:04d}", encode_png(RNG.integers(0, 256, (96, 96, 3), dtype=np.uint8)))
              for i in range(1, n + 1)]  # fmt: skip
    path = out / "evaluation" / "reader_study" / "study.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        study_html(
            "abcd1234abcd1234",
            images,
            title="Real or synthetic?",
            display_size=288,
            provenance=PROV,
        )  # fmt: skip
    )
    return path


def index_page(out: Path) -> Path:
    pages = [thor_page(out), gallery_page(out), evaluation_page(out), study_page(out)]
    steps = [
        IndexStep(
            "prompts",
            "done",
            12.3,
            {"prompts found": 8, "silhouette": 0.2},
            {"morphology gallery": pages[1]},
        ),  # fmt: skip
        IndexStep("thor", "done", 95.0, {"training steps": 120}, {"THOR report": pages[0]}),
        IndexStep(
            "evaluate",
            "failed",
            3.2,
            {f"FD ({FD})": {"value": 123.4, "ci": [110, 130]}},
            {
                "evaluation report": pages[2],
                "reader study": pages[3],
                "missing page": out / "nope.html",
            },
            error="DataError: " + "y" * 200,
        ),  # fmt: skip
        IndexStep("later-step", "not run"),
    ]
    section = Section("THOR vs DDPM", ["method", "pixel_auprc", "image_auroc"],
                      [["thor", 0.43, 0.78], ["ddpm", 0.21, None]], "brief demo training")  # fmt: skip
    return write_index(out, "meddiff demo", steps, sections=[section], prov=PROV)


def all_pages(out: Path) -> dict[str, Path]:
    """Every page kind under ``out``; the index links the others."""
    index = index_page(out)
    return {
        "index": index,
        "thor": out / "thor" / "report.html",
        "gallery": out / "prompts" / "gallery.html",
        "evaluation": out / "evaluation" / "report.html",
        "study": out / "evaluation" / "reader_study" / "study.html",
    }
