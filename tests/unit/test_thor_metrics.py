"""Evaluation metrics on small hand-made maps and masks, and the LPIPS switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff.config.thor import ThorEvalConfig
from meddiff.errors import ModelError
from meddiff.thor.metrics import (
    best_dice,
    box_metrics,
    evaluate_maps,
    image_auroc,
    is_box_mask,
    pixel_metrics,
    strata_bounds,
    summary_row,
)
from meddiff.thor.perceptual import load_perceptual, map_kind


def test_pixel_metrics_by_hand():
    # 4 pixels: lesion scores .9 and .4, healthy .6 and .1
    maps = np.array([[[0.9, 0.6], [0.4, 0.1]]])
    masks = np.array([[[True, False], [True, False]]])
    m = pixel_metrics(maps, masks)
    assert m["auroc"] == pytest.approx(0.75)  # 3 of 4 (lesion, healthy) pairs ordered right
    assert m["auprc"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # precision at each lesion pixel
    # Thresholds: >0.35 → TP 2, FP 1 → Dice 0.8; >0.6 → TP 1 → 2/3; >0.1 → TP 2, FP 1 again.
    assert m["best_dice"] == pytest.approx(0.8)
    assert 0.1 <= m["best_dice_threshold"] < 0.4


def test_best_dice_finds_a_perfect_threshold():
    scores = np.array([0.05, 0.2, 0.31, 0.7, 0.9])
    labels = np.array([False, False, False, True, True])
    dice, th = best_dice(scores, labels)
    assert dice == pytest.approx(1.0)
    assert 0.31 <= th < 0.7


def test_strata_scale_with_image_area():
    cfg = ThorEvalConfig()
    assert strata_bounds(cfg, 128)["small"] == (3, 71)
    lo, hi = strata_bounds(cfg, 64)["medium"]
    assert (lo, hi) == (pytest.approx(71 / 4), pytest.approx(570 / 4))


def test_evaluate_maps_strata_and_image_auroc():
    size = 64
    rng = np.random.default_rng(0)
    masks = np.zeros((4, size, size), dtype=bool)
    masks[0, 10:13, 10:13] = True  # 9 px: small at 64x64 (0.75, 17.75]
    masks[1, 10:20, 10:20] = True  # 100 px: medium (17.75, 142.5]
    masks[2, 0:20, 0:20] = True  # 400 px: large
    maps = rng.random((4, size, size)) * 0.5
    maps[masks] += 0.5  # lesions stand out perfectly
    scores = np.array([0.3, 0.3, 0.4, 0.1])
    out = evaluate_maps(maps, masks, scores, ThorEvalConfig())
    assert out["images"] == {"lesion": 3, "normal": 1}
    assert out["pixel"]["auprc"] == pytest.approx(1.0)
    assert {k: v["images"] for k, v in out["strata"].items()} == {
        "small": 1,
        "medium": 1,
        "large": 1,
    }
    assert out["image_auroc"] == pytest.approx(1.0)
    assert "box" in out  # every lesion is a rectangle: the box protocol applies
    row = summary_row(out)
    assert row["pixel_auprc"] == pytest.approx(1.0) and row["box_recall"] == pytest.approx(1.0)
    assert image_auroc(scores, np.array([True, True, True, True])) is None


def test_box_protocol_threshold_hits_and_false_regions():
    maps = np.zeros((3, 20, 20))
    masks = np.zeros((3, 20, 20), dtype=bool)
    masks[0, 2:6, 2:6] = True  # found: 8 of 16 pixels above
    maps[0, 2:4, 2:6] = 1.0
    masks[0, 12:16, 12:16] = True  # missed: 1 of 16 pixels above (not > 10 %)
    maps[0, 12, 12] = 1.0
    maps[1, 8:10, 8:10] = 1.0  # a false region on a lesion image
    maps[2] = np.linspace(0, 0.9, 400).reshape(20, 20)  # the lesion-free image
    out = box_metrics(maps, masks, max_fpr=0.05, hit_fraction=0.1)
    assert out["normal_pixel_fpr"] <= 0.05
    assert out["boxes"] == 2 and out["found"] == 1
    assert out["recall"] == pytest.approx(0.5)
    # False regions: the square on image 1 and the top of the lesion-free ramp.
    assert out["false_regions"] == 2
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(2 * 0.5 / 3 / (0.5 + 1 / 3))
    ell = np.zeros((5, 5), dtype=bool)
    ell[1:4, 1] = ell[3, 1:4] = True
    assert is_box_mask(masks[0]) and not is_box_mask(ell)


def test_pixel_auprc_comes_with_its_chance_level():
    """A map that knows nothing scores the lesion pixel fraction, which is reported beside it."""
    rng = np.random.default_rng(0)
    masks = np.zeros((8, 64, 64), dtype=bool)
    masks[:, 20:28, 30:40] = True  # 80 of 4096 pixels: 1.95 %
    maps = rng.random(masks.shape)
    out = evaluate_maps(maps, masks, maps.mean(axis=(1, 2)), ThorEvalConfig())
    assert out["pixel"]["chance_auprc"] == pytest.approx(80 / 4096)
    assert out["pixel"]["auprc"] == pytest.approx(80 / 4096, abs=0.003)
    assert summary_row(out)["pixel_auprc_chance"] == pytest.approx(80 / 4096)
    assert out["strata"]["medium"]["chance_auprc"] == pytest.approx(80 / 4096)


def test_lpips_off_random_and_local_weights(tmp_path):
    import torchvision

    assert load_perceptual("off") is None
    assert "residual-only" in map_kind("off")
    rand = load_perceptual("random")
    assert "RANDOM" in rand.kind
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    with torch.inference_mode():
        out = rand(a, b)
        same = rand(a, a)
    assert out.shape == (2, 1, 32, 32)
    assert float(same.abs().max()) < 1e-6 < float(out.mean())
    path = tmp_path / "squeezenet1_1.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    local = load_perceptual(str(path))
    assert local.kind == map_kind(str(path)) and "RANDOM" not in local.kind
    with pytest.raises(ModelError, match="do not exist"):
        load_perceptual(str(tmp_path / "missing.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ModelError, match="not squeezenet1_1 weights"):
        load_perceptual(str(tmp_path / "bad.pth"))


def test_metric_table_keeps_columns_aligned_for_long_schedules():
    from meddiff.thor.evaluate import metric_table

    plans = {"thor": "fast DDIM, stride 25, eta 0, mean of 3 draws", "ddpm": "full DDPM"}
    summary = {
        "methods": {
            k: {
                "metrics": {"image_auroc": 0.6, "strata": {}},
                "plan": {"schedule": s, "precision": p},
                "images_per_s": 0.5,
            }
            for (k, s), p in zip(plans.items(), ("bf16", "fp32"), strict=True)
        }
    }
    head, rule, *rows = metric_table(summary).splitlines()
    assert len({len(head), len(rule), *map(len, rows)}) == 1
    assert all(row.index("0.600") == rows[0].index("0.600") for row in rows)
    # The networks' precision (meddiff.precision) follows the schedule.
    assert "mean of 3 draws, bf16" in rows[0] and "full DDPM, fp32" in rows[1]
