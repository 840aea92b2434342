"""Frozen DINO ViT embedding: the CLS token of each patch.

Paper A embeds every patch with DINO ViT-B/8 and clusters the CLS tokens. Here the network comes
from timm: ``vit_base_patch8_224`` with the ``timm/vit_base_patch8_224.dino`` weights (hub id) or a
local checkpoint, or, for tests and the tiny preset, a small ViT built from config with random
weights. Inputs are resized to ``image_size`` (224 for DINO) and normalised with ImageNet
mean/std, as DINO was trained. The CLS token is taken after the final LayerNorm (what DINO's
``get_last_selfattention`` users and Hugging Face's ``last_hidden_state[:, 0]`` see).

:class:`DinoEmbedder` is a Ray Data stage: built once per actor, then called on batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddiff.config.prompts import EmbedConfig
from meddiff.errors import ModelError

if TYPE_CHECKING:
    import torch


def build_vit(cfg: EmbedConfig, seed: int = 0, key: str = "prompts.embed") -> torch.nn.Module:
    """The ViT in eval mode with frozen weights, from the hub, a local file, or random (seeded).
    ``key`` is where ``cfg`` sits in the config, for error messages.

    Raises:
        ModelError: the weights file does not exist, cannot be loaded into the architecture, or
            the hub cannot be reached.
    """
    import timm
    import torch

    kwargs: dict[str, Any] = {"num_classes": 0, "img_size": cfg.image_size}
    for name in ("patch_size", "embed_dim", "depth", "num_heads"):
        value = getattr(cfg, name)
        if value is not None:
            kwargs[name] = value
    weights = cfg.weights
    try:
        if weights is None:
            # Random weights must be the same in every actor: seed a private RNG stream.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = timm.create_model(cfg.model, pretrained=False, **kwargs)
        elif weights.startswith("hf-hub:"):
            overlay = {"hf_hub_id": weights.removeprefix("hf-hub:")}
            model = timm.create_model(
                cfg.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
            )
        else:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise ModelError(
                    f"DINO weights file {path} ({key}.weights) does not exist; give a "
                    "timm/DINO checkpoint (.safetensors, .pth, .bin) or hf-hub:ORG/NAME"
                )
            model = timm.create_model(
                cfg.model, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )
    except ModelError:
        raise
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ModelError(f"{key}.model: unknown timm model '{cfg.model}'") from None
        if "size mismatch" in str(err) or "Missing key" in str(err):
            raise ModelError(
                f"weights {weights} do not fit {cfg.model} with {kwargs}: {str(err)[:300]}"
            ) from None
        raise
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load DINO weights {weights!r} for {cfg.model} ({type(err).__name__}: "
            f"{str(err)[:300]}); where the hub is unreachable, download the checkpoint elsewhere "
            f"and set {key}.weights to its local path"
        ) from None
    except Exception as err:  # huggingface_hub's offline/connection errors have no common base
        if type(err).__module__.startswith(("huggingface_hub", "requests", "urllib3")):
            raise ModelError(
                f"cannot download DINO weights {weights!r} ({type(err).__name__}); set "
                f"{key}.weights to a local checkpoint"
            ) from None
        raise
    model.eval().requires_grad_(False)
    return model


def describe(cfg: EmbedConfig) -> str:
    """One line naming the embedder, e.g. for reports: architecture, size overrides, weights."""
    sizes = [
        f"{name}={getattr(cfg, name)}"
        for name in ("patch_size", "embed_dim", "depth", "num_heads")
        if getattr(cfg, name) is not None
    ]
    shape = f"{cfg.image_size}px" + (", " + ", ".join(sizes) if sizes else "")
    return f"{cfg.model} ({shape}; {cfg.weights or 'random weights'})"


class DinoEmbedder:
    """Ray Data stage: adds ``embedding`` float32 (n, D), the CLS token of each patch.

    Rows whose ``reject`` column is non-empty (see :mod:`.quality`) are not run through the network
    and get NaN, so the stage keeps every row and the caller can still count rejects.

    Args:
        cfg: the ``prompts.embed`` section (object or its ``model_dump()``).
        seed: seed of the random weights when ``cfg.weights`` is None.
        key: where ``cfg`` sits in the config, for error messages.
    """

    def __init__(
        self, cfg: EmbedConfig | Mapping[str, Any], seed: int = 0, key: str = "prompts.embed"
    ):
        import torch

        self.cfg = cfg if isinstance(cfg, EmbedConfig) else EmbedConfig.model_validate(cfg)
        wants_gpu = self.cfg.num_gpus is None or self.cfg.num_gpus > 0
        self.device = torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS=1 in workers; a CPU actor should use the cores it holds.
            torch.set_num_threads(self.cfg.threads or max(1, math.ceil(self.cfg.num_cpus)))
        self.model = build_vit(self.cfg, seed, key).to(self.device)
        self.dim = int(self.model.num_features)
        self.mean = torch.tensor(self.cfg.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.cfg.std, device=self.device).view(1, 3, 1, 1)
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
        self.autocast = self.device.type == "cuda" and self.cfg.precision in dtypes
        self.amp_dtype = dtypes.get(self.cfg.precision, torch.float32)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (n, H, W, 3) → float32 (n, 3, S, S), S = ``image_size``, ImageNet-normalised."""
        import torch
        import torch.nn.functional as F

        images = np.ascontiguousarray(images)
        if not images.flags.writeable:  # Ray's zero-copy batches; torch wants writable memory
            images = images.copy()
        x = torch.from_numpy(images).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        size = self.cfg.image_size
        if x.shape[-2:] != (size, size):
            # Bilinear with antialiasing: what PIL's resize does in DINO's own transforms.
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """CLS token float32 (n, D) of preprocessed inputs (n, 3, S, S)."""
        import torch

        with torch.inference_mode(), torch.autocast("cuda", self.amp_dtype, enabled=self.autocast):
            tokens = self.model.forward_features(x)
        return tokens[:, 0].float()

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W, 3) → float32 (n, D) on the host."""
        import torch

        with torch.inference_mode():
            return self.forward(self.preprocess(images)).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        n = len(images)
        out = np.full((n, self.dim), np.nan, dtype=np.float32)
        if "reject" not in batch:
            out[:] = self.embed(images)
        else:
            keep = np.asarray([r == "" for r in batch["reject"]], dtype=bool)
            if keep.all():
                out[:] = self.embed(images)
            elif keep.any():
                out[keep] = self.embed(images[keep])
        batch["embedding"] = out
        return batch
