"""The DINO embedding stage, called directly (no Ray), with a small ViT built from config."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff.config import load_config
from meddiff.data.samples import ihc_tissue
from meddiff.errors import ModelError
from meddiff.morphology.embed import DinoEmbedder, build_vit


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny").prompts.embed


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    img = ihc_tissue()
    return np.stack([img[i * 40 : i * 40 + 96, i * 30 : i * 30 + 96] for i in range(6)])


def test_stage_emits_cls_embeddings(cfg, patches):
    stage = DinoEmbedder(cfg.model_dump(), seed=0)
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
    again = DinoEmbedder(cfg, seed=0).embed(patches[:2])
    assert np.allclose(again, emb[:2], atol=1e-5)
    other = DinoEmbedder(cfg, seed=1).embed(patches[:2])
    assert not np.allclose(other, emb[:2], atol=1e-3)


def test_preprocess_resizes_and_normalises_like_dino(cfg):
    stage = DinoEmbedder(cfg, seed=0)
    grey = np.full((2, 96, 96, 3), 128, np.uint8)
    x = stage.preprocess(grey).numpy()
    assert x.shape == (2, 3, cfg.image_size, cfg.image_size)
    expect = (128 / 255 - np.array(cfg.mean)) / np.array(cfg.std)
    assert np.allclose(x.mean(axis=(0, 2, 3)), expect, atol=1e-4)


def test_cls_token_is_the_normed_first_token(cfg, patches):
    import torch

    stage = DinoEmbedder(cfg, seed=0)
    x = stage.preprocess(patches[:2])
    with torch.inference_mode():
        tokens = stage.model.forward_features(x)
        pooled = stage.model.forward_head(tokens, pre_logits=True)
    assert torch.allclose(stage.forward(x), tokens[:, 0])
    assert torch.allclose(pooled, tokens[:, 0])  # timm's own CLS pooling agrees


def test_local_weights_file_is_loaded(tmp_path, cfg, patches):
    from safetensors.torch import save_file

    trained = build_vit(cfg, seed=5)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    loaded = DinoEmbedder(cfg.model_copy(update={"weights": str(path)}), seed=0)
    reference = DinoEmbedder(cfg, seed=5)
    assert np.allclose(loaded.embed(patches[:2]), reference.embed(patches[:2]), atol=1e-5)


def test_missing_weights_path_is_a_model_error(cfg, tmp_path):
    missing = tmp_path / "nope" / "dino_vitbase8.pth"
    with pytest.raises(ModelError, match=r"nope/dino_vitbase8\.pth.*does not exist"):
        build_vit(cfg.model_copy(update={"weights": str(missing)}))
