"""Ray Data stages of the synthesis pipeline: plain callable classes that load their model once.

They do not import Ray: ``map_batches(ImageEncoder, fn_constructor_kwargs=..., concurrency=...,
num_gpus=...)`` runs them at scale and unit tests call them directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from meddiff.synthesis import components as C


def pick_device(use_gpu: bool) -> str:
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def torch_dtype(name: str, device: str):
    """The generation pipeline's weight dtype: ``auto`` per :mod:`meddiff.precision` (fp16 on GPU,
    fp32 on CPU: half-precision generation on a CPU is not measured faster)."""
    import torch

    from meddiff import precision as amp

    name = amp.resolve(name, "cpu" if device == "cpu" else "cuda", "generation")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class ImageEncoder:
    """Patch batches → the VAE posterior of each image, for the training cache.

    In: ``image`` uint8 (n, H, W, 3) plus any columns (passed through, except provenance).
    Out: ``latent_mean``, ``latent_std`` float16 (n, C, R/f, R/f): unscaled, the magnitudes of SD
    latents (|z| < ~50) sit well inside fp16, which halves the cache.
    """

    def __init__(
        self, source: str, resolution: int, revision: str | None = None, use_gpu: bool = False
    ):
        import torch

        self.device = pick_device(use_gpu)
        # The VAE runs in fp32 even on GPU: SD's VAE overflows in fp16 (its config says force_upcast).
        self.vae = C.load_components(
            source, revision=revision, parts=("vae",), device=self.device, dtype=torch.float32
        ).vae
        self.resolution = resolution

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            pixels = C.preprocess_images(batch["image"], self.resolution, device=self.device)
            mean, std = C.image_posterior(self.vae, pixels)
        keep = {k: v for k, v in batch.items() if k in ("prompt", "label", "cluster")}
        return {
            **keep,
            "latent_mean": mean.float().cpu().numpy().astype(np.float16),
            "latent_std": std.float().cpu().numpy().astype(np.float16),
        }


class PromptEncoder:
    """Prompts → text-encoder hidden states. In: ``prompt`` str (n,). Out: plus ``embedding``
    float32 (n, max_length, hidden)."""

    def __init__(self, source: str, revision: str | None = None, use_gpu: bool = False):
        self.device = pick_device(use_gpu)
        c = C.load_components(
            source, revision=revision, parts=("text_encoder", "tokenizer"), device=self.device
        )
        self.tokenizer, self.text_encoder = c.tokenizer, c.text_encoder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            emb = C.encode_prompts(
                self.tokenizer, self.text_encoder, [str(p) for p in batch["prompt"]]
            )
        return {"prompt": batch["prompt"], "embedding": emb.float().cpu().numpy()}


class ImageGenerator:
    """Plan rows → generated patches.

    In: ``prompt`` str, ``seed`` int64 and any other columns (passed through), n rows.
    Out: plus ``image`` uint8 (n, S, S, 3) with S = ``output_size``.

    Every image has its own ``torch.Generator`` seeded from its row, so an image does not depend on
    which batch or actor made it: any image can be regenerated alone from its recorded seed.
    """

    def __init__(
        self, model_dir: str | Path, generate: dict[str, Any], resolution: int | None = None
    ):
        from meddiff.config.synthesis import GenerateConfig

        self.cfg = GenerateConfig.model_validate(generate)
        self.device = pick_device(self.cfg.use_gpu)
        self.pipe = C.load_pipeline(
            model_dir, device=self.device, dtype=torch_dtype(self.cfg.precision, self.device)
        )
        self.pipe.scheduler = C.inference_scheduler(self.cfg.scheduler, self.pipe.scheduler.config)
        self.resolution = resolution or int(
            self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        prompts = [str(p) for p in batch["prompt"]]
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in batch["seed"]]
        latents = self._initial_latents(gens)
        with torch.inference_mode():
            out = self.pipe(
                prompts,
                height=self.resolution,
                width=self.resolution,
                num_inference_steps=self.cfg.steps,
                guidance_scale=self.cfg.guidance_scale,
                latents=latents,
                output_type="np",
            ).images
        images = to_uint8(out, self.cfg.output_size)
        return {**batch, "image": images}

    def _initial_latents(self, gens: list):
        """Starting noise drawn on the CPU per image: identical on any device and batch size."""
        import torch

        unet = self.pipe.unet
        size = self.resolution // self.pipe.vae_scale_factor
        shape = (unet.config.in_channels, size, size)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
        return noise.to(self.device, dtype=unet.dtype)


def to_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """float (n, R, R, 3) in [0, 1] → uint8 (n, size, size, 3) (bicubic when resizing)."""
    from PIL import Image

    arr = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.shape[1] == size and arr.shape[2] == size:
        return arr
    out = np.empty((len(arr), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(arr):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
    return out
