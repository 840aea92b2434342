"""The memorization audit: exact copies, held-out real images, a half-copied set; the recorded
audit on a registry version, `synth ship --audit`, and `serve promote`'s refusal.

The audit does not depend on the feature network, so these tests use the tiny stand-in ViT's
features (fast); tests/integration/test_eval_cli.py runs it on the TF-FID Inception.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from eval_helpers import make_synthetic
from meddiff.cli import main
from meddiff.config.evaluation import FeaturesConfig, MemorizationConfig
from meddiff.config.prompts import TINY as PROMPTS_TINY
from meddiff.errors import DataError, ModelError
from meddiff.evaluation import memorization as MZ
from meddiff.evaluation.features import extract_features, resolve_features
from meddiff.tracking import register_model, start_run

CFG = MemorizationConfig(threshold_queries=128)


@pytest.fixture(scope="module")
def resolved():
    return resolve_features(FeaturesConfig(network="dino", dino=PROMPTS_TINY["embed"]))


def _features(root, resolved, split="train"):
    return extract_features(root, split, resolved, use_ray=False, progress=False)


@pytest.fixture(scope="module")
def real(sample_pcam_dir, resolved):
    return _features(sample_pcam_dir, resolved)  # 128 real training patches


def _audit(real, root, resolved):
    return MZ.audit_sets(real, _features(root, resolved), CFG, seed=0).summary(0.95, pairs=4)


def test_exact_copies_of_training_images_are_all_copies(sample_pcam_dir, real, resolved, tmp_path):
    copies = make_synthetic(sample_pcam_dir, tmp_path / "copies", n=40)  # rows 0..39 as they are
    audit = _audit(real, copies, resolved)
    for key in ("copy_rate", "copy_rate_pixels"):
        assert audit[key]["value"] == 1.0 and audit[key]["copies"] == 40
        lo, hi = audit[key]["ci"]
        assert 0.9 < lo < 1.0 and hi == pytest.approx(1.0)
    rows = audit["per_image"]
    assert rows["nearest_real_features"] == rows["synthetic_index"] == list(range(40))
    assert rows["nearest_real_pixels"] == list(range(40))
    assert max(rows["distance_pixels"]) < 0.1  # gray levels: identical images
    assert audit["closest"][0]["copy_features"] and len(audit["closest"]) == 4
    assert audit["pixels"]["threshold"] > 1  # real patches never come that close to each other


def test_held_out_real_images_are_not_copies(sample_pcam_dir, real, resolved, tmp_path):
    held_out = make_synthetic(sample_pcam_dir, tmp_path / "test", split="test")  # 32 patches
    audit = _audit(real, held_out, resolved)
    # By construction about 1 % of fresh real images fall below the 1st percentile.
    assert audit["copy_rate"]["value"] <= 2 / 32
    assert audit["copy_rate_pixels"]["value"] <= 2 / 32
    lo, hi = audit["copy_rate"]["ci"]
    # A Wilson interval: 0 at 0 copies, just above 0 at one (1/32 gives 0.0055).
    assert lo <= audit["copy_rate"]["value"] and lo < 0.02 and hi < 0.25
    assert audit["n_real"] == 128 and audit["n_synthetic"] == 32
    assert min(audit["per_image"]["distance_pixels"]) > 0.5 * audit["pixels"]["threshold"]


def test_a_half_copied_set_scores_one_half(sample_pcam_dir, real, resolved, tmp_path):
    from meddiff.data import pcam

    train = pcam.read_rows(pcam.open_pcam(sample_pcam_dir, "train", patch_size=None), 0, 16)
    test = pcam.read_rows(pcam.open_pcam(sample_pcam_dir, "test", patch_size=None), 0, 16)
    images = np.concatenate([train["image"], test["image"]])
    pcam.write_pcam(tmp_path / "mix", "train", images, np.r_[train["label"], test["label"]])
    audit = _audit(real, tmp_path / "mix", resolved)
    copies = audit["per_image"]["copy_features"]
    assert all(copies[:16]) and sum(copies[16:]) <= 1
    lo, hi = audit["copy_rate"]["ci"]
    assert lo < 0.5 < hi


def test_nearest_matches_brute_force_and_skips_the_query_itself():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(0)
    ref, query = rng.normal(size=(300, 7)), rng.normal(size=(50, 7))
    index = np.arange(1000, 1300)

    def blocks():  # streamed in uneven blocks, as the pixel reference is
        for lo in range(0, 300, 64):
            yield ref[lo : lo + 64], index[lo : lo + 64]

    idx, dist = MZ.nearest(query, blocks)
    full = cdist(query, ref)
    assert (idx == index[full.argmin(1)]).all()
    np.testing.assert_allclose(dist, full.min(1), rtol=1e-9)
    # Queries that are reference rows: their own row is skipped.
    idx, dist = MZ.nearest(ref[:20], blocks, query_index=index[:20])
    self_excluded = cdist(ref[:20], ref)
    self_excluded[np.arange(20), np.arange(20)] = np.inf
    assert (idx == index[self_excluded.argmin(1)]).all() and (dist > 0).all()


def test_the_audit_needs_two_real_images(real, resolved, sample_pcam_dir):
    from dataclasses import replace

    one = replace(real, features=real.features[:1], labels=real.labels[:1], index=real.index[:1])
    with pytest.raises(DataError, match="needs 2\\+ real"):
        MZ.audit_sets(one, real, CFG, seed=0)


# --- the registry: recorded audits, ship, promote ---------------------------------------------


def _summary(rate: float, n: int = 40) -> dict:
    copies = round(rate * n)
    return {
        "copy_rate": {
            "value": rate,
            "ci": [max(rate - 0.1, 0), min(rate + 0.1, 1)],
            "copies": copies,
        },
        "copy_rate_pixels": {"value": rate, "ci": [0, 1], "copies": copies},
        "network": "inception",
        "percentile": 1.0,
        "n_synthetic": n,
        "reference": "/data/pcam (train)",
    }


def _register(tiny_cfg, tmp_path, name: str, job: str = "synthesis-train") -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    with start_run(tiny_cfg, job):
        return register_model(folder, name)


def _promote(name, version, *extra):
    return main(["serve", "promote", name, version, "--preset", "tiny", *extra])


def test_promote_refuses_a_model_that_copies_unless_forced(tiny_cfg, tmp_path, capsys):
    version = _register(tiny_cfg, tmp_path, "mem-copier")
    assert MZ.record_on_model(f"models:/mem-copier/{version}", _summary(1.0), tiny_cfg)
    assert _promote("mem-copier", version) == 2
    # One line (MLflow's own INFO lines about its store may precede it).
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert err.startswith("meddiff: error: models:/mem-copier/1: copy rate 1 ")
    assert "copy rate 1 [0.9,1]" in err and "max_copy_rate 0.05" in err and "--force" in err
    client = mlflow.MlflowClient()
    assert "production" not in client.get_registered_model("mem-copier").aliases
    # A looser bound, or --force, promotes it (and says why).
    assert _promote("mem-copier", version, "--set", "evaluation.memorization.max_copy_rate=1") == 0
    assert "within evaluation.memorization.max_copy_rate 1" in capsys.readouterr().out
    assert _promote("mem-copier", version, "--alias", "staging", "--force") == 0
    assert "promoted (--force)" in capsys.readouterr().out
    assert str(client.get_registered_model("mem-copier").aliases["staging"]) == version


def test_canary_of_a_model_that_copies_is_refused_unless_forced(tiny_cfg, tmp_path, capsys):
    from meddiff.tracking.aliases import canary_of

    first = _register(tiny_cfg, tmp_path, "mem-canary")
    MZ.record_on_model(f"models:/mem-canary/{first}", _summary(0.0), tiny_cfg)
    assert _promote("mem-canary", first) == 0
    (tmp_path / "v2").mkdir()
    copier = _register(tiny_cfg, tmp_path / "v2", "mem-canary")
    MZ.record_on_model(f"models:/mem-canary/{copier}", _summary(0.5), tiny_cfg)
    canary = ["serve", "canary", "mem-canary", copier, "--percent", "10", "--preset", "tiny"]
    capsys.readouterr()
    assert main(canary) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert "copy rate 0.5" in err and "not given a canary (--force overrides)" in err
    assert canary_of("mem-canary", "production", tiny_cfg.tracking) is None
    assert main([*canary, "--force"]) == 0
    assert "given a canary (--force)" in capsys.readouterr().out
    assert canary_of("mem-canary", "production", tiny_cfg.tracking) == (copier, 10.0)


def test_promote_allows_an_audited_model_and_says_when_there_is_no_audit(
    tiny_cfg, tmp_path, capsys
):
    fine = _register(tiny_cfg, tmp_path, "mem-fine")
    MZ.record_on_model(f"models:/mem-fine/{fine}", _summary(0.0), tiny_cfg)
    assert _promote("mem-fine", fine) == 0
    assert "copy rate 0" in capsys.readouterr().out
    unaudited = _register(tiny_cfg, tmp_path, "mem-unaudited")
    assert _promote("mem-unaudited", unaudited) == 0
    assert "no memorization audit recorded" in capsys.readouterr().out
    other = _register(tiny_cfg, tmp_path, "mem-thor", job="thor-train")
    assert _promote("mem-thor", other) == 0
    assert "memorization" not in capsys.readouterr().out  # not a synthesis model
    with pytest.raises(ModelError, match="does not exist"):
        MZ.check_promotion("mem-fine", "99", tiny_cfg)


def test_record_on_model_ignores_folders_and_unknown_versions(tiny_cfg):
    assert MZ.record_on_model("/runs/model", _summary(0.5), tiny_cfg) is None
    assert MZ.record_on_model(None, _summary(0.5), tiny_cfg) is None
    assert MZ.record_on_model("models:/no-such-model/3", _summary(0.5), tiny_cfg) is None


def _fidelity_json(path: Path, sets: dict) -> Path:
    path.write_text(json.dumps({"network": "inception", "sets": sets}))
    return path


def test_read_audit_picks_one_set_and_refuses_what_is_not_an_audit(tmp_path):
    audited = {"memorization": {**_summary(0.25), "per_image": {"x": [1]}}, "model": "/m"}
    one = _fidelity_json(tmp_path / "one.json", {"s": audited})
    audit = MZ.read_audit(one)
    assert audit["copy_rate"]["value"] == 0.25 and audit["model"] == "/m"
    assert "per_image" not in audit and audit["audit"] == str(one)
    two = _fidelity_json(tmp_path / "two.json", {"a": audited, "b": {"model": None}})
    assert MZ.read_audit(two, "a")["copy_rate"]["value"] == 0.25
    with pytest.raises(DataError, match="judges 2 sets \\(a, b\\); name one"):
        MZ.read_audit(two)
    with pytest.raises(DataError, match="set 'b' has no memorization audit"):
        MZ.read_audit(two, "b")
    with pytest.raises(DataError, match="no set 'c'"):
        MZ.read_audit(two, "c")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not an `meddiff eval fidelity` JSON"):
        MZ.read_audit(tmp_path / "bad.json")


def test_ship_records_the_audit_and_registering_tags_the_version(tmp_path, tiny_cfg):
    from test_synthesis_shipped import _training_run

    from meddiff.synthesis.shipped import provenance, register_shipped, ship

    run, pairs, _ = _training_run(tmp_path)
    audit = {**_summary(0.5), "model": str(run / "model"), "audit": "fidelity.json"}
    record = ship(run, pairs, tmp_path / "shipped", "cmd", memorization=audit)
    assert provenance(tmp_path / "shipped")["memorization"]["copy_rate"]["value"] == 0.5
    assert record["memorization"]["model"] == str(run / "model")
    name, version = register_shipped(tiny_cfg, tmp_path / "shipped").split("/")[-2:]
    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    assert tags["meddiff.memorization.copy_rate"] == "0.5"
    with pytest.raises(ModelError, match="copy rate 0.5.*above"):
        MZ.check_promotion(name, version, tiny_cfg)
    # An audit of another model's samples is refused.
    other = {**audit, "model": str(tmp_path / "elsewhere")}
    with pytest.raises(DataError, match="judged samples of .*elsewhere, not of"):
        ship(run, pairs, tmp_path / "shipped2", "cmd", memorization=other)
