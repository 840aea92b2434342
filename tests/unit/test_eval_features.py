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
    inception_features,
    metric_prefix,
    resize_tf_bilinear,
    resolve_features,
)

TINY_VIT = EmbedConfig.model_validate(RANDOM_TINY_VIT)  # the tiny evaluation's fallback ViT
TINY_DINO = dict(network="dino", dino=TINY_VIT)


def images(n: int, size: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_inception_is_the_installed_tf_fid_network_named_fid():
    ex = InceptionExtractor()
    x = images(3)
    feats = ex(x)
    assert ex.name == "inception" and metric_prefix(ex.name) == ("fid", "kid")
    assert feats.shape == (3, 2048) and feats.dtype == np.float32
    assert (feats >= 0).all() and feats.std() > 0  # post-ReLU average pool
    # A row does not depend on the batch it was computed in.
    np.testing.assert_allclose(ex(x[1:2])[0], feats[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="uint8"):
        ex(x.astype(np.float32))


def test_inception_features_api_batches_and_any_size():
    x = images(5, size=64)
    feats = inception_features(x, batch_size=2)
    assert feats.shape == (5, 2048)
    np.testing.assert_allclose(feats, InceptionExtractor()(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="no images"):
        inception_features(images(0))


def _tf1_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """TF 1's resize_bilinear (align_corners=False), written out: output j reads j·n/size."""

    def axis(n):
        src = np.arange(size) * n / size
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n - 1), src - i0

    r0, r1, fr = axis(img.shape[0])
    c0, c1, fc = axis(img.shape[1])
    fc = fc[None, :, None]
    top = img[r0][:, c0] * (1 - fc) + img[r0][:, c1] * fc
    bottom = img[r1][:, c0] * (1 - fc) + img[r1][:, c1] * fc
    return top * (1 - fr)[:, None, None] + bottom * fr[:, None, None]


@pytest.mark.parametrize("shape", [(96, 96), (64, 80), (299, 299)])
def test_resize_is_tensorflow_1_bilinear(shape):
    import torch

    img = np.random.default_rng(1).integers(0, 256, (*shape, 3)).astype(np.float64)
    got = resize_tf_bilinear(torch.from_numpy(img).permute(2, 0, 1)[None].float())
    assert got.shape == (1, 3, 299, 299)
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), _tf1_bilinear(img, 299), atol=0.01)


def test_inception_input_range_matches_the_files_batch_norm(sample_pcam_dir: Path):
    # The first convolution's outputs on real patches have the variance its batch norm stores
    # (within a few times) only for inputs scaled to [-1, 1], the scaling InceptionExtractor uses.
    import torch

    from meddiff.data import pcam
    from meddiff.evaluation.features import _to_tensor, load_inception

    x = pcam.read_rows(pcam.open_pcam(sample_pcam_dir, "test", patch_size=None), 0, 8)["image"]
    conv = load_inception().net.layers.conv
    t = resize_tf_bilinear(_to_tensor(x))

    def ratio(inp):
        with torch.inference_mode():
            y = torch.conv2d(inp, conv.weight, None, conv.stride, conv.padding)
        return float((y.var(dim=(0, 2, 3)) / conv.var).median())

    assert 0.1 < ratio((t - 128) / 128) < 10
    assert ratio(t) > 1000 and ratio(t / 255) < ratio((t - 128) / 128)


def test_tiny_and_full_presets_use_the_tf_fid_inception():
    from meddiff.config import load_config

    for preset in ("tiny", "full"):
        features = load_config(preset).evaluation.features
        assert resolve_features(features).network == "inception", preset


def test_altered_inception_file_falls_back_to_dino_and_says_so(tmp_path: Path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not the network")
    cfg = FeaturesConfig(inception_weights=str(bad), dino=TINY_VIT)
    resolved = resolve_features(cfg)
    assert resolved.network == "vit_base_patch8_224_dino_random"
    assert "FID Inception weights unavailable" in resolved.note and "sha256" in resolved.note
    with pytest.raises(ModelError, match="differs from the pinned"):
        resolve_features(cfg.model_copy(update={"fallback": "error"}))
    missing = cfg.model_copy(update={"inception_weights": str(tmp_path / "nope.pt")})
    assert "nope.pt: missing" in resolve_features(missing).note


def test_old_inception_weight_sources_are_config_errors():
    from pydantic import ValidationError

    for value in ("download", "random"):
        with pytest.raises(ValidationError, match="no longer a source of FID weights"):
            FeaturesConfig(inception_weights=value)


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
