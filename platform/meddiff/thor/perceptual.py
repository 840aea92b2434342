"""The perceptual term of THOR's anomaly maps: spatial LPIPS with the SqueezeNet backbone.

The ``lpips`` package bundles its learned linear layers, but builds the SqueezeNet feature trunk
from the torchvision model zoo (a download). ``thor.infer.lpips`` chooses where the trunk comes
from:

- ``download``: torchvision's ``squeezenet1_1`` ImageNet weights (downloaded once into the torch
  hub cache; works offline once cached),
- a path to a ``squeezenet1_1`` state dict (``torchvision.models.squeezenet1_1().state_dict()``
  saved with ``torch.save``; the full model's keys ``features.N.*`` or the trunk's ``N.*``),
- ``off``: no perceptual term, maps are the residual only (every output says so),
- ``random``: a randomly initialised trunk, only to exercise the code path in tests; outputs say
  it is not a perceptual metric.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from meddiff.errors import ModelError

MAP_KINDS = {
    "off": "residual-only (LPIPS off)",
    "random": "residual x LPIPS(squeeze, RANDOM backbone: test only, not perceptual)",
    "pretrained": "residual x LPIPS(squeeze, spatial)",
}


def map_kind(spec: str) -> str:
    """How anomaly maps are computed under ``thor.infer.lpips = spec`` (written into outputs)."""
    if spec in ("off", "random"):
        return MAP_KINDS[spec]
    return MAP_KINDS["pretrained"]


def is_residual_only(spec: str) -> bool:
    return spec == "off"


class Perceptual(nn.Module):
    """Spatial LPIPS distance map between two (B, 1, H, W) images in [0, 1] → (B, 1, H, W)."""

    def __init__(self, net: nn.Module, kind: str):
        super().__init__()
        self.net = net
        self.kind = kind

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # LPIPS expects 3-channel input in [-1, 1]; normalize=True maps [0, 1] there once (the
        # reference code rescales to [-1, 1] and then passes normalize=True as well).
        a3 = a.expand(-1, 3, -1, -1)
        b3 = b.expand(-1, 3, -1, -1)
        return self.net(a3, b3, normalize=True)


def load_perceptual(spec: str) -> Perceptual | None:
    """The LPIPS module ``spec`` asks for, or None for 'off'.

    Raises:
        ModelError: the weights file is missing or not a squeezenet1_1 state dict, or the download
            fails (the message says how to give a local path or switch LPIPS off).
    """
    if spec == "off":
        return None
    import lpips
    import torchvision

    trunk = torchvision.models.squeezenet1_1(weights=None).features
    if spec == "download":
        try:
            weights = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
            trunk = torchvision.models.squeezenet1_1(weights=weights).features
        except Exception as err:  # network errors come in many types (URLError, OSError, ...)
            raise ModelError(
                f"cannot download the LPIPS SqueezeNet backbone from the torchvision model zoo "
                f"({type(err).__name__}: {err}); set thor.infer.lpips to a local squeezenet1_1 "
                "weights file, or to 'off' for residual-only anomaly maps"
            ) from None
    elif spec != "random":
        _load_trunk(trunk, Path(spec))

    with warnings.catch_warnings():  # lpips calls torchvision with the deprecated `pretrained`
        warnings.simplefilter("ignore")
        net = lpips.LPIPS(net="squeeze", spatial=True, pnet_rand=True, verbose=False)
    # lpips' squeezenet slices hold the torchvision trunk's layers under their original indices.
    layers = dict(trunk.named_children())
    for slice_ in (getattr(net.net, f"slice{i}") for i in range(1, net.net.N_slices + 1)):
        for name, module in slice_.named_children():
            module.load_state_dict(layers[name].state_dict())
    net.eval().requires_grad_(False)
    return Perceptual(net, map_kind(spec))


def _load_trunk(trunk: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ModelError(
            f"LPIPS backbone weights {path} do not exist (thor.infer.lpips must be 'download', "
            "'off' or a squeezenet1_1 weights file)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(f"{path}: not a torch weights file ({err})") from None
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, got {type(state).__name__}")
    if any(k.startswith("features.") for k in state):
        state = {
            k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")
        }
    try:
        trunk.load_state_dict(state)
    except RuntimeError as err:
        raise ModelError(
            f"{path}: not squeezenet1_1 weights ({str(err).splitlines()[0]})"
        ) from None
