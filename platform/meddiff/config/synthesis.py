"""Stable Diffusion fine-tuning and generation configuration (paper A).

Defaults are the paper's full-size setting: Stable Diffusion 1.5 at 512 px, lr 1e-5, 50 sampling steps,
guidance 7.5, on GPU workers with DeepSpeed ZeRO-2 in bf16. The ``tiny`` preset (``TINY`` below)
builds the same component types from :class:`ArchConfig` with random weights at 32 px so a 2-core
CPU trains it in seconds, nothing downloaded.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from meddiff.config.base import Section
from meddiff.config.training import ModelTrainingSection, Precision

SCHEDULERS = ("ddim", "dpm-solver", "pndm", "euler")


class ArchConfig(Section):
    """Component sizes used when ``model.source`` is None (random initialisation).

    The defaults are Stable Diffusion 1.5's own architecture, so ``model.source=null`` with the
    defaults builds an SD-1.5-sized model with random weights (throughput benchmarks); the ``tiny``
    preset shrinks every size.
    """

    unet_channels: list[int] = Field(default=[320, 640, 1280, 1280], min_length=1)
    unet_attention: list[bool] = Field(
        default=[True, True, True, False],
        description="Per UNet resolution level: cross-attention blocks (True) or plain ResNet ones.",
    )
    unet_layers_per_block: int = Field(default=2, ge=1)
    attention_head_dim: int = Field(default=8, ge=1)
    vae_channels: list[int] = Field(
        default=[128, 256, 512, 512],
        min_length=1,
        description="VAE levels; the latent is 2**(len-1) times smaller than the image.",
    )
    vae_layers_per_block: int = Field(default=2, ge=1)
    latent_channels: int = Field(default=4, ge=1)
    vae_scaling_factor: float = Field(default=0.18215, gt=0)
    norm_num_groups: int = Field(default=32, ge=1)
    text_hidden_size: int = Field(default=768, ge=8)
    text_layers: int = Field(default=12, ge=1)
    text_heads: int = Field(default=12, ge=1)
    text_intermediate_size: int = Field(default=3072, ge=8)
    max_length: int = Field(default=77, ge=4, description="Prompt length in tokens (CLIP: 77).")
    vae_warmup_steps: int = Field(
        default=0,
        ge=0,
        description="Autoencoder steps on the training images before the VAE is frozen, so a "
        "randomly initialised VAE decodes to tissue colours rather than noise (tiny runs only).",
    )
    vae_perceptual: Literal["efficientnet-lite0"] | None = Field(
        default=None,
        description="Trained trunk of the perceptual term in the VAE warm-up (an unweighted "
        "LPIPS-style distance on its ImageNet features; None: pixel MSE only). Without it the "
        "warm-up VAE reconstructs blur where nuclei and membranes were.",
    )
    vae_perceptual_weight: float = Field(
        default=0.5, ge=0, description="Weight of the perceptual term against the pixel MSE."
    )
    vae_warmup_crop: int | None = Field(
        default=None,
        ge=8,
        description="Warm up on random square crops of this many pixels (of the model's "
        "resolution) instead of whole images: cheaper steps; the VAE is convolutional and "
        "encodes whole images afterwards. None: whole images.",
    )
    vae_warmup_batch_size: int = Field(default=16, ge=1, description="Images per warm-up step.")

    @model_validator(mode="after")
    def _check(self) -> ArchConfig:
        if len(self.unet_attention) != len(self.unet_channels):
            raise ValueError(
                f"unet_attention has {len(self.unet_attention)} entries but unet_channels has "
                f"{len(self.unet_channels)}; give one per UNet level"
            )
        for name in ("unet_channels", "vae_channels"):
            bad = [c for c in getattr(self, name) if c % self.norm_num_groups]
            if bad:
                raise ValueError(
                    f"{name} {bad} not divisible by norm_num_groups={self.norm_num_groups}"
                )
        factor = 2 ** (len(self.vae_channels) - 1)
        if self.vae_warmup_crop is not None and self.vae_warmup_crop % factor:
            raise ValueError(
                f"vae_warmup_crop {self.vae_warmup_crop} must be divisible by the VAE's "
                f"downsampling {factor}"
            )
        if self.text_hidden_size % self.text_heads:
            raise ValueError(
                f"text_hidden_size={self.text_hidden_size} not divisible by "
                f"text_heads={self.text_heads}"
            )
        return self


class ModelConfig(Section):
    """Which Stable Diffusion to fine-tune."""

    source: str | None = Field(
        default="stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Hugging Face hub id or local diffusers directory (unet/, vae/, text_encoder/, "
        "tokenizer/, scheduler/); None builds the components from `arch` with random weights "
        "and a word-level tokenizer over the training prompts (offline).",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag, commit).")
    resolution: int = Field(
        default=512,
        ge=8,
        description="Training/generation size in pixels; 96-px PCam patches are resized to it.",
    )
    arch: ArchConfig = ArchConfig()

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        crop = self.arch.vae_warmup_crop
        if self.source is None and crop is not None and crop > self.resolution:
            raise ValueError(
                f"arch.vae_warmup_crop {crop} is larger than the resolution {self.resolution}"
            )
        if self.source is None:
            factor = 2 ** (len(self.arch.vae_channels) - 1)
            unet_factor = 2 ** (len(self.arch.unet_channels) - 1)
            if self.resolution % (factor * unet_factor):
                raise ValueError(
                    f"resolution {self.resolution} must be divisible by {factor * unet_factor} "
                    f"(VAE downsampling {factor} × UNet downsampling {unet_factor})"
                )
        elif self.resolution % 64:
            raise ValueError(
                f"resolution {self.resolution} must be a multiple of 64 for Stable Diffusion"
            )
        return self


class TrainConfig(ModelTrainingSection):
    """Fine-tuning the UNet with Ray Train (VAE and text encoder frozen)."""

    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: int = Field(default=2, ge=0, le=2, description="DeepSpeed ZeRO stage 0-2.")
    precision: Precision = Field(default="auto", description="auto: bf16 on GPU, fp32 on CPU.")
    num_workers: int = Field(default=4, ge=1, description="Ray Train workers (one per GPU).")
    use_gpu: bool = Field(default=True, description="One GPU per worker.")
    cpus_per_worker: float = Field(default=4.0, gt=0, description="CPUs each worker reserves.")
    batch_size: int = Field(default=8, ge=1, description="Images per worker per step.")
    max_steps: int = Field(default=15000, ge=1, description="Optimizer steps of the whole run.")
    learning_rate: float = Field(default=1e-5, gt=0, description="AdamW's peak rate.")
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = (
        "constant_with_warmup"
    )
    warmup_steps: int = Field(default=500, ge=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    weight_decay: float = Field(default=1e-2, ge=0)
    adam_epsilon: float = Field(default=1e-8, gt=0)
    max_grad_norm: float | None = Field(
        default=1.0, gt=0, description="Clip the gradients' global L2 norm (None: no clipping)."
    )
    ema: bool = True
    ema_decay: float = Field(default=0.9999, gt=0, lt=1)
    gradient_checkpointing: bool = True
    prompt_dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Probability of training on the empty prompt instead (keeps the "
        "unconditional branch that classifier-free guidance needs).",
    )
    cache_latents: bool = Field(
        default=True,
        description="Encode images (VAE) and prompts (text encoder) once in a Ray Data stage and "
        "train from the cache; False encodes every batch on the fly (needed for augmentation).",
    )
    augment: bool = Field(
        default=False,
        description="Random 90° rotations and flips (histology has no orientation); needs "
        "cache_latents=False since the VAE must see each augmented image.",
    )
    encode_batch_size: int = Field(default=32, ge=1)
    encode_concurrency: int = Field(default=1, ge=1, description="Encoder actors (Ray Data).")
    sample_every: int = Field(
        default=2500,
        ge=0,
        description="Steps between sample grids logged to MLflow (0: only at end).",
    )
    sample_prompts: int = Field(default=8, ge=1, description="Prompts shown in a sample grid.")
    sample_images: int = Field(default=4, ge=1, description="Images per prompt in a sample grid.")
    sample_steps: int = Field(default=25, ge=1)
    max_failures: int = Field(
        default=3,
        ge=-1,
        description="Worker-group restarts (from the last checkpoint); -1: no limit.",
    )
    registered_name: str | None = Field(
        default="meddiff-sd-histology",
        description="MLflow registered model name for the final model; None skips registration.",
    )
    fail_rank: int = Field(default=1, ge=0, description="Fault drill: the rank that is killed.")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.augment and self.cache_latents:
            raise ValueError(
                "augment=true needs cache_latents=false: cached latents were encoded from "
                "unaugmented images"
            )
        return self


class GenerateConfig(Section):
    """Synthesis as Ray Data batch inference."""

    plan: Literal["per_prompt", "proportional"] = Field(
        default="per_prompt",
        description="per_prompt: images_per_prompt for every prompt (balanced); proportional: "
        "total_images split by the prompt table's count column.",
    )
    images_per_prompt: int = Field(default=500, ge=1)
    total_images: int | None = Field(default=None, ge=1)
    label_only: bool = Field(
        default=False,
        description="Baseline: replace the table by one label-only prompt per label it holds "
        "(prompts.baseline_template and prompts.label_words).",
    )
    scheduler: Literal["ddim", "dpm-solver", "pndm", "euler"] = "dpm-solver"
    steps: int = Field(default=50, ge=1)
    guidance_scale: float = Field(default=7.5, ge=0)
    seed: int = Field(default=0, ge=0, description="Image i gets seed `seed + i` (recorded).")
    batch_size: int = Field(default=16, ge=1, description="Images per pipeline call.")
    concurrency: int = Field(default=1, ge=1, description="Generator actors (one per GPU).")
    use_gpu: bool = True
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto: fp16 on GPU, fp32 on CPU."
    )
    output_size: int = Field(default=96, ge=8, description="Saved patch size (PCam: 96).")
    split: Literal["train", "valid", "test"] = "train"
    grid_images: int = Field(default=16, ge=1, description="Images per prompt in the PNG grids.")

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        if self.plan == "proportional" and self.total_images is None:
            raise ValueError("plan=proportional needs total_images")
        return self


class SynthesisConfig(Section):
    """Stable Diffusion fine-tuning on (image, prompt) pairs and synthesis of new patches."""

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()


TINY: dict = {
    "model": {
        "source": None,
        "resolution": 32,
        "arch": {
            "unet_channels": [32, 64],
            "unet_attention": [True, True],
            "unet_layers_per_block": 1,
            "attention_head_dim": 8,
            "vae_channels": [32, 32, 64],
            "vae_layers_per_block": 1,
            "norm_num_groups": 8,
            "text_hidden_size": 32,
            "text_layers": 2,
            "text_heads": 4,
            "text_intermediate_size": 64,
            "max_length": 16,
            "vae_warmup_steps": 60,
            "vae_perceptual": "efficientnet-lite0",
        },
    },
    "train": {
        "num_workers": 2,
        "use_gpu": False,
        "cpus_per_worker": 1,
        "batch_size": 8,
        "max_steps": 60,
        "learning_rate": 1e-3,
        "warmup_steps": 5,
        "ema_decay": 0.99,
        "gradient_checkpointing": False,
        "prompt_dropout": 0.1,
        "encode_batch_size": 64,
        "checkpoint_every": 20,
        "log_every": 5,
        "sample_every": 0,
        "sample_prompts": 4,
        "sample_images": 2,
        "sample_steps": 10,
        "registered_name": "meddiff-sd-tiny",
    },
    "generate": {
        "images_per_prompt": 4,
        "steps": 10,
        "batch_size": 32,
        "use_gpu": False,
        "grid_images": 4,
    },
}
