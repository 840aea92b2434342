"""The compare-prompting experiment job on the sample data at tiny scale.

The three stages it chains (prompt building, fine-tuning, generation) belong to other areas; here
they are stand-ins with the same signatures and output layouts (pairs shards + prompts.csv, a model
directory, a PCam-layout synthetic set with its meta), so this tests the experiment's own work:
chaining, resuming, evaluating, the table, the report and the MLflow run tree.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from eval_helpers import make_synthetic
from meddiff.evaluation import experiment

TINY = ["--preset", "tiny", "--set", "runtime.progress=false"]


class FakeStages:
    def __init__(self):
        self.calls: list[str] = []

    def build_prompts(self, cfg, source, out, *, overwrite=False):
        import ray.data

        from meddiff.data import pcam, shards

        strategy = Path(out).parent.name
        self.calls.append(f"prompts:{strategy}")
        opened = pcam.open_pcam(source, "train")
        block = pcam.read_rows(opened, 0, opened.num_rows)
        keep = np.arange(opened.num_rows) % 10 != 0  # a "quality filter" drops every tenth row
        labels = block["label"][keep]
        cluster = (block["index"][keep] % 2) if strategy == "morphology" else -np.ones_like(labels)
        prompt = np.array(
            [_prompt(y, c) for y, c in zip(labels, cluster, strict=True)], dtype=object
        )
        batch = {
            "image": block["image"][keep],
            "label": labels,
            **shards.provenance(str(source), block["index"][keep]),
            "cluster": cluster,
            "prompt": prompt,
        }
        shards.write_shards(ray.data.from_items([{"i": 0}]).map_batches(lambda _: batch), Path(out) / "pairs",
                            rows_per_file=1000)  # fmt: skip
        with open(Path(out) / "prompts.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt", "label", "cluster", "count"])
            for p in sorted(set(prompt)):
                w.writerow([p, int("tumour" in p), 0, int((prompt == p).sum())])
        return {"strategy": strategy, "pairs": str(Path(out) / "pairs")}

    def train_synthesis(self, cfg, pairs, out):
        self.calls.append(f"train:{Path(out).parent.name}")
        (Path(out) / "model").mkdir(parents=True, exist_ok=True)
        return {"model": str(Path(out) / "model"), "steps": 1}

    def generate(self, cfg, model, prompts_csv, out):
        strategy = Path(out).parent.name
        self.calls.append(f"generate:{strategy}")
        real = Path(self.real)
        shift = 35 if strategy == "baseline" else 3
        make_synthetic(real, Path(out), shift=shift, noise=3, seed=len(self.calls))
        return {"out": str(out), "split": "train", "images": 128}


def _prompt(label: int, cluster: int) -> str:
    text = f"Histology image of {'tumour' if label else 'normal'} tissue"
    return text if cluster < 0 else f"{text}, morphology type {cluster}"


@pytest.fixture
def fake_stages(monkeypatch, sample_pcam_dir):
    fakes = FakeStages()
    fakes.real = sample_pcam_dir
    monkeypatch.setattr(
        experiment,
        "_stage_functions",
        lambda: {
            "prompts": fakes.build_prompts,
            "train": fakes.train_synthesis,
            "generate": fakes.generate,
        },  # fmt: skip
    )
    monkeypatch.setattr(experiment, "with_strategy", lambda cfg, strategy: cfg)
    return fakes


@pytest.mark.slow
def test_compare_prompting_job_end_to_end_and_resume(fake_stages, sample_pcam_dir, tmp_path):
    import mlflow
    from jobs.compare_prompting import main

    out = tmp_path / "exp"
    # The experiment's plumbing on the tiny stand-in ViT (the Inception's FID: test_eval_cli.py).
    args = ["--data", str(sample_pcam_dir), "--out", str(out), "--json", str(tmp_path / "r.json"),
            *TINY, "--set", "evaluation.classifier.max_steps=20",
            "--set", "evaluation.features.network=dino"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    fd = "fd_vit_base_patch8_224_dino_random"
    table = result["table"]
    assert set(table[fd]) == {"baseline", "morphology"}
    assert table[fd]["morphology"] < table[fd]["baseline"]  # the milder stand-in is closer
    for metric in ("precision", "recall", "density", "coverage", "copy_rate",
                   "classifier_synthetic_auc", "classifier_real_auc"):  # fmt: skip
        assert set(table[metric]) == {"baseline", "morphology"}, metric
    with open(result["table_csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["metric", "baseline", "morphology"] and len(rows) >= 8
    page = Path(result["report"]).read_text()
    assert "Metric × strategy" in page and "Downstream classifier" in page
    assert "Per prompt" in page and "morphology type 1" in page  # real prompts from the pairs
    assert "Memorization audit: morphology" in page
    assert Path(result["umap"]).is_file() and Path(result["roc"]).is_file()
    for study in result["reader_studies"].values():
        assert Path(study).is_file() and (Path(study).parent / "key.json").is_file()
    assert sorted(fake_stages.calls) == sorted(
        f"{step}:{s}"
        for step in ("prompts", "train", "generate")
        for s in ("baseline", "morphology")
    )

    # One parent run with a child per strategy and an evaluate child.
    parent = mlflow.search_runs(
        experiment_names=["meddiff"], filter_string="tags.`meddiff.job` = 'compare-prompting'",
        output_format="list",
    )[-1]  # fmt: skip
    children = mlflow.search_runs(
        experiment_names=["meddiff"],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        output_format="list",
    )
    assert sorted(r.info.run_name for r in children) == [
        "evaluate", "strategy-baseline", "strategy-morphology"
    ]  # fmt: skip
    assert f"morphology/{fd}" in parent.data.metrics
    assert "baseline/classifier_real_plus_synthetic_auc" in parent.data.metrics

    # A rerun skips every finished stage and only re-evaluates.
    fake_stages.calls.clear()
    assert main([*args, "--no-classifier"]) == 0
    assert fake_stages.calls == []


def test_compare_prompting_bad_input(fake_stages, tmp_path, capsys):
    from jobs.compare_prompting import main

    assert main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--strategies", "fancy",
                 *TINY]) == 2  # fmt: skip
    assert "unknown strategies ['fancy']" in capsys.readouterr().err
