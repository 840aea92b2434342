"""The latent-diffusion training objective and the two ways of preparing its inputs.

Per step, from rows of a :class:`~meddiff.synthesis.cache.TrainingSet`:

- :class:`CachedBatches`: latents sampled from the cached VAE posterior and text embeddings looked
  up from the cached table (no VAE, no text encoder);
- :class:`OnlineBatches`: the images pushed through the VAE and the prompts through the text
  encoder every step (what the usual example scripts do; needed for augmentation).

Both draw their randomness from a ``torch.Generator`` the caller seeds from the step, so resuming
at step s replays exactly what an uninterrupted run would do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from meddiff.synthesis import components as C
from meddiff.training.context import step_generator

__all__ = ["CachedBatches", "OnlineBatches", "diffusion_loss", "step_generator"]

if TYPE_CHECKING:
    import torch

    from meddiff.synthesis.cache import TrainingSet


def diffusion_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Noise-prediction MSE at random timesteps.

    latents (B, C, h, w) already scaled by the VAE scaling factor; text_embeddings (B, L, D).
    The target follows the scheduler's ``prediction_type`` (SD 1.5: epsilon; SD 2.x: v).
    """
    import torch
    import torch.nn.functional as F

    b = latents.shape[0]
    # Drawn on the CPU and moved: the same numbers on any device, so runs are reproducible.
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator).to(
        latents.device
    )
    noisy = noise_scheduler.add_noise(latents, noise, t)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    pred = unet(noisy, t, text_embeddings).sample
    # The loss in fp32: under bf16 autocast an MSE of small residuals loses most of its bits.
    return F.mse_loss(pred.float(), target.float())


def _dropout_ids(ids: np.ndarray, p: float, generator) -> np.ndarray:
    """Replace each prompt id by 0 (the empty prompt) with probability ``p``."""
    import torch

    if p <= 0:
        return ids
    drop = (torch.rand(len(ids), generator=generator) < p).numpy()
    return np.where(drop, 0, ids)


class CachedBatches:
    """Rows → (latents, text embeddings) from the cache: z = (μ + σ·ε)·scale, a fresh posterior
    sample each step as on-the-fly encoding would draw."""

    def __init__(
        self, data: TrainingSet, scaling_factor: float, prompt_dropout: float, device, dtype
    ):
        import torch

        if data.kind != "latents":
            raise ValueError(f"cache {data.root} holds {data.kind}, not latents")
        self.data, self.scale, self.p = data, scaling_factor, prompt_dropout
        self.device, self.dtype = device, dtype
        # The whole prompt table is small (P × L × D): keep it on the device.
        self.table = torch.from_numpy(data.text_embeddings).to(device, dtype)

    def __call__(self, idx: np.ndarray, generator) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        # Same draw order as OnlineBatches (dropout, then ε): both give the same batch.
        ids = _dropout_ids(np.asarray(self.data.prompt_ids[idx]), self.p, generator)
        mean = torch.from_numpy(np.asarray(self.data.latent_mean[idx], dtype=np.float32))
        std = torch.from_numpy(np.asarray(self.data.latent_std[idx], dtype=np.float32))
        eps = torch.randn(mean.shape, generator=generator)
        latents = ((mean + std * eps) * self.scale).to(self.device, self.dtype)
        return latents, self.table[torch.from_numpy(ids).to(self.device)]


class OnlineBatches:
    """Rows → (latents, text embeddings) by running the frozen VAE and text encoder each step."""

    def __init__(
        self,
        data: TrainingSet,
        vae,
        text_encoder,
        tokenizer,
        *,
        resolution: int,
        prompt_dropout: float,
        augment: bool,
        device,
        dtype,
    ):
        if data.kind != "images":
            raise ValueError(f"cache {data.root} holds {data.kind}, not images")
        self.data, self.vae, self.text_encoder, self.tokenizer = data, vae, text_encoder, tokenizer
        self.resolution, self.p, self.augment = resolution, prompt_dropout, augment
        self.device, self.dtype = device, dtype
        self.scale = float(vae.config.scaling_factor)

    def __call__(self, idx: np.ndarray, generator) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        images = np.asarray(self.data.images[idx])
        ids = _dropout_ids(np.asarray(self.data.prompt_ids[idx]), self.p, generator)
        prompts = [self.data.prompts[i] for i in ids]
        with torch.no_grad():
            pixels = C.preprocess_images(images, self.resolution)
            if self.augment:
                pixels = C.augment(pixels, generator)
            pixels = pixels.to(self.device, self.vae.dtype)
            mean, std = C.image_posterior(self.vae, pixels)
            eps = torch.randn(mean.shape, generator=generator).to(mean.device, mean.dtype)
            latents = ((mean + std * eps) * self.scale).to(self.dtype)
            emb = C.encode_prompts(self.tokenizer, self.text_encoder, prompts).to(self.dtype)
        return latents, emb
