"""The embedding stage, called directly (no Ray): the tiny preset's trained EfficientNet-Lite0
(checked by classifying real photographs) and a small random ViT built from config."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff.config import load_config
from meddiff.config.prompts import RANDOM_TINY_VIT, EmbedConfig
from meddiff.data.samples import ihc_tissue
from meddiff.errors import ModelError
from meddiff.morphology.embed import PatchEmbedder, build_network, packaged_state_dict


@pytest.fixture(scope="module")
def cfg() -> EmbedConfig:
    return EmbedConfig.model_validate(RANDOM_TINY_VIT)


@pytest.fixture(scope="module")
def trained() -> PatchEmbedder:
    return PatchEmbedder(load_config("tiny").prompts.embed)


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    img = ihc_tissue()
    return np.stack([img[i * 40 : i * 40 + 96, i * 30 : i * 30 + 96] for i in range(6)])


def _imagenet_classifier():
    """The packaged EfficientNet-Lite0 with its ImageNet classifier (as the tiny preset's stage
    builds it, plus the head the stage drops)."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(packaged_state_dict("efficientnet-lite0", model), strict=True)
    return model.eval()


def _centre_crop(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    return img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]


def test_packaged_efficientnet_classifies_photographs(trained):
    """A wrong key mapping, padding or normalisation gives wrong or unsure classes."""
    import torch
    from skimage import data
    from timm.data import ImageNetInfo

    names = ImageNetInfo()
    model = _imagenet_classifier()
    cats = {"tabby, tabby cat", "tiger cat", "Egyptian cat"}
    # image: (its ImageNet classes, least probability on them; chance is 0.001 a class)
    expected = {
        "chelsea": (cats, 0.6),
        "coffee": ({"espresso"}, 0.6),
        "rocket": ({"missile", "projectile, missile"}, 0.25),
    }
    images = np.stack([_resize(_centre_crop(getattr(data, name)()), 224) for name in expected])
    x = trained.preprocess(images)  # the stage's own preprocessing (224 px, (x - 127) / 128)
    with torch.inference_mode():
        probs = model(x).softmax(1)
    for (name, (want, least)), p in zip(expected.items(), probs, strict=True):
        top = names.index_to_description(int(p.argmax()))
        assert top in want, f"{name}: top-1 {top!r}"
        in_class = sum(float(p[i]) for i in range(1000) if names.index_to_description(i) in want)
        assert in_class > least, f"{name}: only {in_class:.2f} in {want}"
    # The stage's embedding is the classifier's input: the pooled 1280-d pre-logits.
    with torch.inference_mode():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert np.allclose(trained.embed(images), pooled.numpy(), atol=1e-4)
    assert trained.dim == 1280


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))


def test_trained_features_separate_tissue_from_glass(trained, patches):
    """Trained features of tissue patches lie closer to each other than to blank glass."""
    glass = np.full((2, 96, 96, 3), (238, 236, 240), np.uint8)
    emb = trained.embed(np.concatenate([patches, glass]))
    assert emb.shape == (8, 1280) and np.isfinite(emb).all()
    tissue, blank = emb[:6], emb[6:]
    within = np.linalg.norm(tissue[:, None] - tissue[None], axis=2)[np.triu_indices(6, 1)]
    across = np.linalg.norm(tissue[:, None] - blank[None], axis=2)
    assert within.mean() < across.mean()


def test_packaged_weights_refuse_a_model_they_do_not_fit(cfg):
    with pytest.raises(ModelError, match="tf_efficientnet_lite0"):
        build_network(cfg.model_copy(update={"weights": "meddiff:efficientnet-lite0"}))
    with pytest.raises(ModelError, match="unknown weight file 'nope'"):
        build_network(
            EmbedConfig(model="tf_efficientnet_lite0", weights="meddiff:nope", image_size=224)
        )
    bad = EmbedConfig(model="tf_efficientnet_lite0", weights=None, embed_dim=64)
    with pytest.raises(ModelError, match="ViT size keys"):
        build_network(bad)


def test_stage_emits_pooled_embeddings(cfg, patches):
    stage = PatchEmbedder(cfg.model_dump(), seed=0)
    batch = {
        "image": patches,
        "label": np.arange(6) % 2,
        "reject": np.array(["", "", "dark", "", "", ""], dtype=object),
    }
    out = stage(batch)
    emb = out["embedding"]
    assert emb.shape == (6, cfg.embed_dim) and emb.dtype == np.float32
    assert np.isnan(emb[2]).all() and np.isfinite(np.delete(emb, 2, axis=0)).all()
    assert out["label"] is batch["label"]  # other columns pass through
    # Same seed, same weights: a second actor embeds identically; rows are independent of batching.
    again = PatchEmbedder(cfg, seed=0).embed(patches[:2])
    assert np.allclose(again, emb[:2], atol=1e-5)
    other = PatchEmbedder(cfg, seed=1).embed(patches[:2])
    assert not np.allclose(other, emb[:2], atol=1e-3)


@pytest.mark.parametrize("preset", ["random_vit", "tiny"])
def test_preprocess_resizes_and_normalises(cfg, preset):
    cfg = cfg if preset == "random_vit" else load_config("tiny").prompts.embed
    stage = PatchEmbedder(cfg, seed=0)
    grey = np.full((2, 96, 96, 3), 128, np.uint8)
    x = stage.preprocess(grey).numpy()
    assert x.shape == (2, 3, cfg.image_size, cfg.image_size)
    expect = (128 / 255 - np.array(cfg.mean)) / np.array(cfg.std)
    assert np.allclose(x.mean(axis=(0, 2, 3)), expect, atol=1e-4)
    if preset == "tiny":  # EfficientNet-Lite's (x - 127) / 128 on the 0-255 scale
        assert np.allclose(x, (128 - 127) / 128, atol=1e-5)


def test_cls_token_is_the_normed_first_token(cfg, patches):
    import torch

    stage = PatchEmbedder(cfg, seed=0)
    x = stage.preprocess(patches[:2])
    with torch.inference_mode():
        tokens = stage.model.forward_features(x)
    assert torch.allclose(stage.forward(x), tokens[:, 0])  # timm's token pooling is the CLS


def test_local_weights_file_is_loaded(tmp_path, cfg, patches):
    from safetensors.torch import save_file

    trained = build_network(cfg, seed=5)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    loaded = PatchEmbedder(cfg.model_copy(update={"weights": str(path)}), seed=0)
    reference = PatchEmbedder(cfg, seed=5)
    assert np.allclose(loaded.embed(patches[:2]), reference.embed(patches[:2]), atol=1e-5)


def test_missing_weights_path_is_a_model_error(cfg, tmp_path):
    missing = tmp_path / "nope" / "dino_vitbase8.pth"
    with pytest.raises(ModelError, match=r"nope/dino_vitbase8\.pth.*does not exist"):
        build_network(cfg.model_copy(update={"weights": str(missing)}))
