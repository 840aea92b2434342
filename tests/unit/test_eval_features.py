"""Feature extractors: shapes, honest names, weight loading and fallback, reading sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eval_helpers import make_synthetic
from meddiff.config.evaluation import FeaturesConfig
from meddiff.config.prompts import RANDOM_TINY_VIT, EmbedConfig
from meddiff.errors import DataError, ModelError
from meddiff.evaluation.features import (
    DinoExtractor,
    InceptionExtractor,
    check_same_size,
    dino_name,
    extract_features,
    resolve_features,
)

TINY_VIT = EmbedConfig.model_validate(RANDOM_TINY_VIT)  # the tiny evaluation's fallback ViT
TINY_DINO = dict(network="dino", dino=TINY_VIT)


def images(n: int, size: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def random_inception() -> InceptionExtractor:
    return InceptionExtractor("random")


def test_inception_random_weights_shapes_and_name(random_inception):
    # Random weights test the plumbing only; the name says so.
    feats = random_inception(images(2))
    assert feats.shape == (2, 2048) and feats.dtype == np.float32
    assert random_inception.name == "inception_random"


def test_inception_local_file_that_is_not_the_fid_weights(tmp_path: Path):
    # A file with the right keys but not pytorch-fid's weights (its SHA-256 does not start with
    # 6726825d) loads, but its distances are not called FID.
    from unittest import mock

    import torch
    import torchvision
    from pytorch_fid import inception as pfi

    with (
        mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(torchvision.models.Inception3, "load_state_dict", lambda *a, **k: None),
    ):
        arch = pfi.fid_inception_v3()  # the FID architecture, randomly initialised
    path = tmp_path / "weights.pth"
    torch.save(arch.state_dict(), path)
    extractor = InceptionExtractor(str(path))
    assert extractor.name == "inception_nonstandard"
    assert extractor(images(1)).shape == (1, 2048)


def test_inception_missing_file_falls_back_to_dino_and_says_so(tmp_path: Path):
    cfg = FeaturesConfig(
        inception_weights=str(tmp_path / "nope.pth"),
        **{k: v for k, v in TINY_DINO.items() if k != "network"},
    )
    resolved = resolve_features(cfg)
    assert resolved.network == "vit_base_patch8_224_dino_random"
    assert "FID Inception weights unavailable" in resolved.note and "nope.pth" in resolved.note
    with pytest.raises(ModelError, match="nope.pth does not exist"):
        resolve_features(cfg.model_copy(update={"fallback": "error"}))


def test_dino_extractor_is_the_embedding_stage_and_named_honestly():
    from meddiff.morphology.embed import DinoEmbedder

    ex = DinoExtractor(TINY_VIT)
    x = images(3)  # 96 px in, resized to 64
    feats = ex(x)
    assert feats.shape == (3, 128) and np.isfinite(feats).all()
    np.testing.assert_array_equal(feats, DinoEmbedder(TINY_VIT).embed(x))
    assert ex.name == "vit_base_patch8_224_dino_random"
    full = EmbedConfig()
    assert dino_name(full) == "dino"
    assert dino_name(full.model_copy(update={"weights": "/w/dino.pth"})) == "dino"


def test_dino_missing_local_weights_and_unknown_model(tmp_path: Path):
    missing = TINY_VIT.model_copy(update={"weights": str(tmp_path / "w.pth")})
    with pytest.raises(ModelError, match=r"\(evaluation\.features\.dino\.weights\) does not exist"):
        DinoExtractor(missing)
    with pytest.raises(ModelError, match="evaluation.features.dino.model: unknown timm model"):
        DinoExtractor(TINY_VIT.model_copy(update={"model": "not_a_model"}))


def test_extract_features_locally_with_meta_and_subset(sample_pcam_dir: Path, tmp_path: Path):
    synth = make_synthetic(sample_pcam_dir, tmp_path / "s", shift=10, n=40)
    resolved = resolve_features(FeaturesConfig(**TINY_DINO, batch_size=16))
    fs = extract_features(
        synth, "train", resolved, max_images=25, seed=1, use_ray=False, progress=False
    )
    assert fs.features.shape == (25, 128) and len(fs.labels) == 25
    assert np.all(np.diff(fs.index) > 0) and fs.index.max() < 40
    assert fs.prompts is not None and fs.prompts[0].startswith("Histology image of")
    assert fs.meta["cluster"][0] in ("0", "1")
    real = extract_features(sample_pcam_dir, "test", resolved, use_ray=False, progress=False)
    assert real.prompts is None and len(real) == 32


def test_sets_of_different_sizes_and_empty_sets(sample_pcam_dir: Path, tmp_path: Path):
    small = make_synthetic(sample_pcam_dir, tmp_path / "small", n=8, size=64)
    with pytest.raises(DataError, match="different sizes"):
        check_same_size({"real": (sample_pcam_dir, "train"), "synthetic": (small, "train")})
    from meddiff.data import pcam

    pcam.write_pcam(
        tmp_path / "empty", "train", np.zeros((0, 96, 96, 3), np.uint8), np.zeros(0, np.uint8)
    )
    with pytest.raises(DataError, match="empty"):
        check_same_size({"real": (sample_pcam_dir, "train"), "x": (tmp_path / "empty", "train")})
    with pytest.raises(DataError, match="does not exist"):
        check_same_size({"real": (tmp_path / "missing", "train")})


def test_random_networks_are_the_same_in_every_process():
    # Ray actors build their own copy: random weights must not differ between them.
    x = images(2, seed=5)
    a, b = DinoExtractor(TINY_VIT), DinoExtractor(TINY_VIT)
    np.testing.assert_array_equal(a(x), b(x))
