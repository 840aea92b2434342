"""The Stable Diffusion components: load them, build them small, save them as one pipeline directory.

A model is always a diffusers ``save_pretrained`` pipeline directory (or a hub id of one):

    model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/

The full preset loads Stable Diffusion 1.5 from a hub id or local directory. The tiny preset builds
the same component types from :class:`~meddiff.config.synthesis.ArchConfig` with random weights and
a word-level tokenizer over the training prompts (the ``tokenizers`` library), so nothing is
downloaded; it round-trips through ``save_pretrained``/``from_pretrained`` like the real one.

Model (UNet), noise schedule (scheduler) and inference procedure (the pipeline) stay separate
objects; nothing here logs or writes outside the directory it is given.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddiff.config.synthesis import SCHEDULERS, ArchConfig, ModelConfig
from meddiff.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Written into a pipeline built from config: what it was built from (config, prompts, seed).
BASE_INFO = "meddiff_base.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# What makes each component folder loadable (any one of the names).
_COMPONENT_FILES = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer.json", "vocab.json", "tokenizer_config.json"),
    "scheduler": ("scheduler_config.json",),
}
SPECIAL_TOKENS = {
    "pad": "<|pad|>",
    "unk": "<|unk|>",
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
}

# Stable Diffusion 1.5's noise schedule (scheduler/scheduler_config.json of the released model).
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass
class Components:
    """The parts of a Stable Diffusion model. ``vae``/``text_encoder``/``tokenizer`` may be None
    when a caller only needs the UNet (training from cached latents)."""

    unet: UNet2DConditionModel | None
    vae: AutoencoderKL | None
    text_encoder: CLIPTextModel | None
    tokenizer: PreTrainedTokenizerBase | None
    noise_scheduler: DDPMScheduler


# --- model directories ---------------------------------------------------------------------


def is_local_source(source: str | Path) -> bool:
    """A local directory (or something meant as one), as opposed to a hub id ``org/name``."""
    text = str(source)
    return Path(text).expanduser().exists() or text.startswith(("/", ".", "~"))


def check_model_dir(path: str | Path) -> Path:
    """Validate a pipeline directory; returns it.

    Raises:
        ModelError: the directory, ``model_index.json`` or a component folder is missing.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelError(f"model directory {root} does not exist")
    if not (root / "model_index.json").is_file():
        raise ModelError(
            f"{root} is not a diffusers pipeline directory: no model_index.json "
            f"(expected {', '.join(COMPONENTS)} folders beside it)"
        )
    missing = [
        name
        for name in COMPONENTS
        if not any((root / name / f).is_file() for f in _COMPONENT_FILES[name])
    ]
    if missing:
        raise ModelError(
            f"model directory {root} is missing component(s) {', '.join(missing)} "
            f"(need {', '.join(f'{c}/' for c in COMPONENTS)})"
        )
    return root


def load_components(
    source: str | Path,
    *,
    revision: str | None = None,
    parts: Sequence[str] = ("unet", "vae", "text_encoder", "tokenizer"),
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Components:
    """Load the named parts of a pipeline from a local directory or hub id, plus the training
    noise scheduler (always: it is a few numbers). Frozen parts come back in eval mode.

    Raises:
        ModelError: a missing directory/component, or a hub id that cannot be fetched.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    local = is_local_source(source)
    if local:
        source = check_model_dir(source)
    loaders = {
        "unet": UNet2DConditionModel.from_pretrained,
        "vae": AutoencoderKL.from_pretrained,
        "text_encoder": CLIPTextModel.from_pretrained,
        "tokenizer": AutoTokenizer.from_pretrained,
    }
    out: dict[str, Any] = dict.fromkeys(loaders)
    try:
        for name in parts:
            kwargs: dict[str, Any] = {"subfolder": name, "revision": revision}
            if name != "tokenizer" and dtype is not None:
                kwargs["dtype"] = dtype
            out[name] = loaders[name](str(source), **kwargs)
        scheduler = DDPMScheduler.from_pretrained(
            str(source), subfolder="scheduler", revision=revision
        )
    except (OSError, ValueError) as err:
        where = f"directory {source}" if local else f"hub id '{source}'"
        raise ModelError(
            f"cannot load Stable Diffusion from {where}: {str(err).splitlines()[0]}"
            + ("" if local else " (no network? give a local directory as synthesis.model.source)")
        ) from None
    for name in ("unet", "vae", "text_encoder"):
        if out[name] is not None:
            out[name].to(device)
    for name in ("vae", "text_encoder"):
        if out[name] is not None:
            out[name].requires_grad_(False).eval()
    return Components(out["unet"], out["vae"], out["text_encoder"], out["tokenizer"], scheduler)


def save_pipeline(
    c: Components, path: str | Path, *, unet: Any = None, extra: dict[str, dict] | None = None
) -> Path:
    """Write a complete pipeline directory, all or nothing (a temporary name, then a rename).

    ``unet`` replaces ``c.unet`` in the saved copy (e.g. a UNet holding the EMA weights);
    ``extra`` maps file names to JSON documents written beside ``model_index.json``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline(c, unet=unet).save_pretrained(str(tmp), safe_serialization=True)
    for name, doc in (extra or {}).items():
        (tmp / name).write_text(json.dumps(doc, indent=2))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def pipeline(c: Components, *, unet: Any = None, scheduler: Any = None):
    """A ``StableDiffusionPipeline`` over the components (no safety checker: histology)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    if c.vae is None or c.text_encoder is None or c.tokenizer is None:
        raise ValueError("a pipeline needs the VAE, text encoder and tokenizer")
    return StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        unet=unet if unet is not None else c.unet,
        # Saved pipelines carry SD's default inference scheduler (PNDM) on the training schedule;
        # generation swaps in the configured one with from_config.
        scheduler=scheduler
        or PNDMScheduler.from_config(c.noise_scheduler.config, skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(path: str | Path, *, device: str | torch.device = "cpu", dtype=None):
    """Load a validated pipeline directory for inference."""
    from diffusers import StableDiffusionPipeline

    root = check_model_dir(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(root), safety_checker=None, requires_safety_checker=False, **kwargs
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load pipeline from {root}: {str(err).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def inference_scheduler(name: str, config: Any):
    """The sampling scheduler ``name`` (one of SCHEDULERS) on the model's noise schedule."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    classes = {
        "ddim": DDIMScheduler,
        "dpm-solver": DPMSolverMultistepScheduler,
        "pndm": PNDMScheduler,
        "euler": EulerDiscreteScheduler,
    }
    if name not in classes:
        raise ConfigError(
            f"unknown scheduler '{name}' (synthesis.generate.scheduler); "
            f"expected one of {', '.join(SCHEDULERS)}"
        )
    extra = {"skip_prk_steps": True} if name == "pndm" else {}
    return classes[name].from_config(config, **extra)


def load_tokenizer(
    mcfg: ModelConfig,
    prompts: Iterable[str],
    *,
    source: str | Path | None = None,
    local_files_only: bool = False,
):
    """The tokenizer training uses: that of ``source`` (default ``mcfg.source``: a directory or
    hub id), or for a model built from config (source None) the word-level one over ``prompts``
    with ``arch.max_length``. ``model_max_length`` is the text encoder's limit.

    Raises:
        ModelError: the tokenizer cannot be loaded (with ``local_files_only``: a hub tokenizer
            not in the local cache).
    """
    source = mcfg.source if source is None else source
    if source is None:
        return build_tokenizer(prompts, mcfg.arch.max_length)
    from transformers import AutoTokenizer

    if is_local_source(source):
        source = check_model_dir(source)
    try:
        return AutoTokenizer.from_pretrained(
            str(source),
            subfolder="tokenizer",
            revision=mcfg.revision,
            local_files_only=local_files_only,
        )
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load the tokenizer of {source}: {str(err).splitlines()[0]}"
        ) from None


# --- building small components from config -------------------------------------------------


def prompt_vocabulary(prompts: Iterable[str]) -> list[str]:
    """The sorted word list a word-level tokenizer needs for ``prompts`` (same normalisation)."""
    tok = _word_tokenizer({SPECIAL_TOKENS["unk"]: 0})
    words: set[str] = set()
    for prompt in prompts:
        normal = tok.normalizer.normalize_str(str(prompt))
        words.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(normal))
    return sorted(words)


def build_tokenizer(prompts: Iterable[str], max_length: int):
    """A CLIP-like tokenizer (``<|startoftext|> words <|endoftext|>``, padded to ``max_length``)
    whose vocabulary is the words of ``prompts``; unseen words map to ``<|unk|>``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad", "unk", "bos", "eos")]
    vocab = {tok: i for i, tok in enumerate([*specials, *prompt_vocabulary(prompts)])}
    tok = _word_tokenizer(vocab)
    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=bos,
        eos_token=eos,
    )


def _word_tokenizer(vocab: dict[str, int]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation apart
    return tok


def build_unet(arch: ArchConfig, resolution: int, latent_factor: int):
    """A ``UNet2DConditionModel`` of ``arch``'s sizes with random weights."""
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(arch.unet_attention))
    return UNet2DConditionModel(
        sample_size=resolution // latent_factor,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(arch.unet_channels),
        layers_per_block=arch.unet_layers_per_block,
        cross_attention_dim=arch.text_hidden_size,
        attention_head_dim=arch.attention_head_dim,
        norm_num_groups=arch.norm_num_groups,
    )


def build_vae(arch: ArchConfig, resolution: int):
    from diffusers import AutoencoderKL

    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(arch.vae_channels),
        layers_per_block=arch.vae_layers_per_block,
        latent_channels=arch.latent_channels,
        norm_num_groups=arch.norm_num_groups,
        sample_size=resolution,
    )


def build_text_encoder(arch: ArchConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=arch.text_hidden_size,
            intermediate_size=arch.text_intermediate_size,
            num_attention_heads=arch.text_heads,
            num_hidden_layers=arch.text_layers,
            max_position_embeddings=arch.max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def build_components(
    cfg: ModelConfig,
    prompts: Iterable[str],
    *,
    seed: int = 0,
    images: np.ndarray | None = None,
    warmup: dict[str, Any] | None = None,
) -> Components:
    """Random-weight components of ``cfg.arch``'s sizes with a tokenizer over ``prompts``.

    With ``images`` (uint8 (n, H, W, 3)) and ``arch.vae_warmup_steps`` > 0 the VAE is first fitted
    as an autoencoder on them (:func:`meddiff.synthesis.autoencoder.fit_vae`, with the
    perceptual term of ``arch.vae_perceptual``; ``warmup`` adds keyword arguments such as a
    resumable ``state`` file), and the latent scaling factor is set to 1/std of their latents, as
    the latent-diffusion recipe does (SD's 0.18215 is that number for SD's own VAE).
    """
    import torch
    from diffusers import DDPMScheduler

    arch = cfg.arch
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(prompts, arch.max_length)
    vae = build_vae(arch, cfg.resolution)
    factor = 2 ** (len(arch.vae_channels) - 1)
    unet = build_unet(arch, cfg.resolution, factor)
    text_encoder = build_text_encoder(arch, tokenizer)
    if images is not None and len(images):
        if arch.vae_warmup_steps:
            from meddiff.synthesis.autoencoder import fit_vae

            fit_vae(
                vae,
                images,
                cfg.resolution,
                arch.vae_warmup_steps,
                batch_size=arch.vae_warmup_batch_size,
                crop=arch.vae_warmup_crop,
                perceptual=arch.vae_perceptual,
                perceptual_weight=arch.vae_perceptual_weight,
                seed=seed,
                **(warmup or {}),
            )
        vae.register_to_config(scaling_factor=latent_scale(vae, images, cfg.resolution))
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    return Components(unet, vae, text_encoder, tokenizer, DDPMScheduler.from_config(SD_SCHEDULE))


def latent_scale(vae: AutoencoderKL, images: np.ndarray, resolution: int, n: int = 256) -> float:
    """1 / std of the VAE latents of up to ``n`` images, so the UNet sees unit-variance latents."""
    import torch

    with torch.inference_mode():
        x = preprocess_images(images[:n], resolution)
        std = float(vae.encode(x).latent_dist.mean.std())
    return 1.0 / max(std, 1e-6)


# --- tensors in and out ----------------------------------------------------------------------


def preprocess_images(images: np.ndarray, resolution: int, device=None, dtype=None) -> torch.Tensor:
    """uint8 (n, H, W, 3) → float (n, 3, R, R) in [-1, 1], resized (antialiased) to R."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device=device)
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True)
        x = x.clamp_(-1.0, 1.0)
    return x if dtype is None else x.to(dtype)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random dihedral transform (90° rotations × flips) per image of ``x`` (n, C, H, W):
    histology patches have no preferred orientation."""
    import torch

    k = torch.randint(0, 4, (len(x),), generator=generator).tolist()
    flip = torch.randint(0, 2, (len(x),), generator=generator).tolist()
    out = [torch.rot90(xi, ki, dims=(1, 2)) for xi, ki in zip(x, k, strict=True)]
    out = [xi.flip(2) if f else xi for xi, f in zip(out, flip, strict=True)]
    return torch.stack(out)


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (n, max_length), padded and truncated as SD's text encoder expects."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Prompts → the text encoder's last hidden state (n, max_length, hidden), what the UNet's
    cross-attention reads."""
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids)[0]


def image_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of ``pixels`` (n, 3, R, R): mean and std, each (n, C, R/f, R/f),
    unscaled. A cached posterior is sampled fresh each step, as on-the-fly encoding would be."""
    dist = vae.encode(pixels).latent_dist
    return dist.mean, dist.std
