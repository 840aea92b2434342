"""Training pieces without Ray: batch schedule, cached vs on-the-fly batches, loss, checkpoints,
and bad model references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from meddiff.config import load_config
from meddiff.errors import DataError, ModelError
from meddiff.prompts import PromptRow, write_prompt_table
from meddiff.synthesis import cache as cache_mod
from meddiff.synthesis import components as C
from meddiff.synthesis.diffusion import CachedBatches, OnlineBatches, diffusion_loss, step_generator
from meddiff.synthesis.train import read_checkpoint_info

PROMPTS = ["Histology image of cancer tissue", "Histology image of healthy tissue"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these small models gain nothing from two, and two threads of tiny
    kernels stall badly when other processes share the cores (a 10× slowdown was measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_batch_schedule_is_a_function_of_the_step():
    n, world, batch = 50, 2, 4
    a = cache_mod.batch_indices(n, 7, world=world, rank=1, batch=batch, seed=3)
    assert (
        a.tolist()
        == cache_mod.batch_indices(n, 7, world=world, rank=1, batch=batch, seed=3).tolist()
    )
    # One epoch (6 steps of 8 rows): ranks never share a row, no row repeats.
    seen = np.concatenate(
        [
            cache_mod.batch_indices(n, s, world=world, rank=r, batch=batch, seed=3)
            for s in range(6)
            for r in range(world)
        ]
    )
    assert len(seen) == 48 and len(np.unique(seen)) == 48
    # The next epoch is a new permutation.
    nxt = cache_mod.batch_indices(n, 6, world=world, rank=0, batch=batch, seed=3)
    assert (
        nxt.tolist()
        != cache_mod.batch_indices(n, 0, world=world, rank=0, batch=batch, seed=3).tolist()
    )
    with pytest.raises(DataError, match="fewer than one global batch"):
        cache_mod.batch_indices(5, 0, world=2, rank=0, batch=4, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny components plus the same 12 images cached both ways (latents and raw images)."""
    cfg = load_config("tiny", overrides=["synthesis.model.arch.vae_warmup_steps=0"])
    comp = C.build_components(cfg.synthesis.model, PROMPTS, seed=0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(12, 96, 96, 3), dtype=np.uint8)
    ids = np.array([1, 2] * 6, dtype=np.int64)
    res = cfg.synthesis.model.resolution
    root = tmp_path_factory.mktemp("caches")
    prompts = ["", *PROMPTS]
    with torch.no_grad():
        mean, std = C.image_posterior(comp.vae, C.preprocess_images(images, res))
        table = C.encode_prompts(comp.tokenizer, comp.text_encoder, prompts).numpy()
    sets = {}
    for kind in ("latents", "images"):
        d = root / kind
        d.mkdir()
        np.save(d / "prompt_ids.npy", ids)
        np.save(d / "labels.npy", ids - 1)
        if kind == "latents":
            np.save(d / "latent_mean.npy", mean.numpy().astype(np.float16))
            np.save(d / "latent_std.npy", std.numpy().astype(np.float16))
            np.save(d / "text_embeddings.npy", table)
        else:
            np.save(d / "images.npy", images)
        info = {"format": cache_mod.FORMAT, "kind": kind, "prompts": prompts, "rows": 12}
        (d / cache_mod.INFO).write_text(json.dumps(info))
        sets[kind] = cache_mod.TrainingSet(d)
    return cfg, comp, sets


def test_cached_batches_match_on_the_fly_encoding(tiny):
    cfg, comp, sets = tiny
    scale = float(comp.vae.config.scaling_factor)
    cached = CachedBatches(sets["latents"], scale, 0.5, "cpu", torch.float32)
    online = OnlineBatches(
        sets["images"],
        comp.vae,
        comp.text_encoder,
        comp.tokenizer,
        resolution=cfg.synthesis.model.resolution,
        prompt_dropout=0.5,
        augment=False,
        device="cpu",
        dtype=torch.float32,
    )
    idx = np.array([0, 3, 4, 9, 11])
    lat_c, emb_c = cached(idx, step_generator(0, 0, 5))
    lat_o, emb_o = online(idx, step_generator(0, 0, 5))
    # Same posterior sample and the same prompts dropped; the cache stores μ, σ in fp16.
    assert lat_c.shape == lat_o.shape
    assert torch.allclose(lat_c, lat_o, atol=2e-2, rtol=1e-2)
    assert torch.allclose(emb_c, emb_o, atol=1e-5)
    # A different step draws different noise.
    lat_c2, _ = cached(idx, step_generator(0, 0, 6))
    assert not torch.allclose(lat_c, lat_c2)


def test_loss_decreases_on_a_fixed_batch(tiny):
    _, comp, sets = tiny
    unet = C.build_unet(load_config("tiny").synthesis.model.arch, 32, 4)
    batches = CachedBatches(sets["latents"], 1.0, 0.0, "cpu", torch.float32)
    latents, emb = batches(np.arange(8), step_generator(0, 0, 0))
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)

    def loss_at(seed: int, train: bool) -> float:
        loss = diffusion_loss(
            unet, comp.noise_scheduler, latents, emb, torch.Generator().manual_seed(seed)
        )
        if train:
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())

    before = np.mean([loss_at(s, False) for s in range(3)])
    for step in range(12):
        loss_at(step % 3, True)
    after = np.mean([loss_at(s, False) for s in range(3)])
    assert after < 0.8 * before


def test_half_written_checkpoint_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ModelError, match="incomplete"):
        read_checkpoint_info(tmp_path)
    (tmp_path / "meddiff_checkpoint.json").write_text('{"step": 4}')
    assert read_checkpoint_info(tmp_path)["step"] == 4


def test_unknown_registry_model_is_a_clear_error(tmp_path):
    from meddiff.synthesis.generate import generate

    table = write_prompt_table(tmp_path / "prompts.csv", [PromptRow(PROMPTS[0], 1, -1, 1)])
    with pytest.raises(ModelError, match="no-such-model.*registered models"):
        generate(load_config("tiny"), "models:/no-such-model/1", table, tmp_path / "out")
    with pytest.raises(ModelError, match="does not exist"):
        generate(load_config("tiny"), tmp_path / "no-dir", table, tmp_path / "out")


def test_bad_input_inside_a_worker_reaches_the_cli():
    from ray.train import WorkerGroupError

    from meddiff.errors import ConfigError
    from meddiff.training.driver import worker_user_error as _worker_user_error

    wrapped = WorkerGroupError("rank 1 failed", {1: ConfigError("resume with num_workers=2")})
    found = _worker_user_error(wrapped)
    assert isinstance(found, ConfigError) and "num_workers=2" in str(found)
    assert _worker_user_error(WorkerGroupError("oom", {0: MemoryError()})) is None
