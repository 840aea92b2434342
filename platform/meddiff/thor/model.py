"""A trained THOR model on disk: the UNet's weights plus the configs needed to rebuild it.

Layout of a model directory (what the registry stores and ``--model`` accepts)::

    thor_model.json           {"format": "meddiff-thor/1", "unet": {...}, "schedule": {...},
                              "info": {...}}
    thor_unet.safetensors     the UNet's state dict (safetensors: tensors only, no pickled code)

Directories written before safetensors hold ``thor_unet.pt`` (torch.save) instead; both load.

``save_model`` writes to a temporary directory and renames it, so a directory that has
``thor_model.json`` is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from meddiff.config.thor import ScheduleConfig, UNetConfig
from meddiff.errors import ModelError
from meddiff.files import read_format_json
from meddiff.thor.schedule import DDPMSchedule
from meddiff.thor.unet import DiffusionUNet

FORMAT = "meddiff-thor/1"
CONFIG_FILE = "thor_model.json"
WEIGHTS_FILE = "thor_unet.safetensors"
LEGACY_WEIGHTS_FILE = "thor_unet.pt"  # torch.save, written by earlier versions


@dataclass
class ThorModel:
    """The network and its schedule, ready for inference."""

    unet: DiffusionUNet
    schedule: DDPMSchedule
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.unet.cfg.image_size

    @property
    def in_channels(self) -> int:
        return self.unet.cfg.in_channels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the network was trained on."""
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def save_model(
    out_dir: str | Path,
    unet: torch.nn.Module,
    unet_cfg: UNetConfig,
    schedule_cfg: ScheduleConfig,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory (all or nothing); returns its path."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    # contiguous: a channels-last network's weights are strided views safetensors cannot store.
    state = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    meta = {
        "format": FORMAT,
        "unet": unet_cfg.model_dump(mode="json"),
        "schedule": schedule_cfg.model_dump(mode="json"),
        "info": info or {},
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_model_config(model_dir: str | Path) -> tuple[UNetConfig, ScheduleConfig, dict[str, Any]]:
    """The UNet and schedule configs and info stored in a model directory."""
    path = Path(model_dir) / CONFIG_FILE
    missing = (
        f"{model_dir} is not a THOR model directory (no {CONFIG_FILE}; expected the output of "
        "`meddiff thor train` or a registered THOR model)"
    )
    meta = read_format_json(path, FORMAT, ModelError, missing)
    try:
        return (
            UNetConfig.model_validate(meta["unet"]),
            ScheduleConfig.model_validate(meta["schedule"]),
            meta.get("info", {}),
        )
    except (KeyError, ValueError) as err:
        raise ModelError(f"{path}: invalid model config ({err})") from None


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> ThorModel:
    """Rebuild the UNet from a model directory and load its weights (eval mode).

    Raises:
        ModelError: not a model directory, or weights that do not fit the stored config.
    """
    unet_cfg, schedule_cfg, info = read_model_config(model_dir)
    weights = Path(model_dir) / WEIGHTS_FILE
    if not weights.is_file() and (Path(model_dir) / LEGACY_WEIGHTS_FILE).is_file():
        weights = Path(model_dir) / LEGACY_WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"{model_dir}: missing {WEIGHTS_FILE}")
    unet = DiffusionUNet(unet_cfg)
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        unet.load_state_dict(state)
    except Exception as err:
        raise ModelError(f"{weights}: cannot load weights ({str(err).splitlines()[0]})") from None
    unet.to(device).eval().requires_grad_(False)
    return ThorModel(unet, DDPMSchedule(schedule_cfg), info)


def resolve_model(ref: str | Path, tracking_cfg, device: str | torch.device = "cpu") -> ThorModel:
    """Load a model from a directory or a registry URI (``models:/NAME/VERSION``, ``@ALIAS``)."""
    from meddiff.tracking import fetch_model

    return load_model(fetch_model(ref, tracking_cfg), device)
