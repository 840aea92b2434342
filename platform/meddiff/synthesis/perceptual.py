"""A perceptual loss over a trained trunk, for fitting the tiny preset's from-scratch VAE.

An autoencoder fitted by pixel MSE alone averages what it cannot place exactly: edges, nuclei
and membranes come back as blur (the latent-diffusion autoencoders add a perceptual term for this
reason: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
§3.1 and appendix G, trained with L1 + LPIPS + KL + a patch adversary). Here the features are
EfficientNet-Lite0's, trained on ImageNet-1k, from the weight file that installs offline
(:func:`meddiff.weights.weight_file`, ``efficientnet-lite0``), in timm's
``tf_efficientnet_lite0`` architecture (TF "same" padding, BN eps 1e-3: the file's weights were
ported from the TensorFlow release).

The distance is LPIPS's construction without its learned per-channel weights (Zhang et al. 2018,
"The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", eq. 1): at each of the
trunk's first four stages (strides 2, 4, 8, 16; 16/24/40/112 channels) the activations are
normalised to unit length along channels, and the squared difference is averaged over space and
summed over channels; the stages are added with equal weight. The paper reports that such
unweighted deep-feature distances already agree with human judgements far better than pixel
metrics, across trunks (AlexNet, VGG, SqueezeNet).

Why EfficientNet-Lite0 rather than the VGG16 trunk also available (``hed-vgg16``), the usual
perceptual-loss trunk: up to its stride-16 stage it costs 0.13 GFLOP per 96-px patch (torch's FLOP
counter) against 3.4 GFLOP for VGG16 up to conv3_3, and the term runs on the CPU in every
tiny-preset run. What it buys the VAE is measured in docs/synthesis.md (The shipped model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The trunk stages whose outputs are compared (timm feature indices: strides 2, 4, 8, 16).
STAGES = (0, 1, 2, 3)
NETWORKS = ("efficientnet-lite0",)


def efficientnet_lite0_trunk():
    """EfficientNet-Lite0 (ImageNet-1k weights) as a frozen feature pyramid in eval mode: a module
    mapping float (n, 3, H, W), normalised as TF-Lite's EfficientNet expects ((RGB 0..255 − 127) /
    128, i.e. about [-1, 1]), to the list of the four stage outputs in :data:`STAGES`.

    Raises:
        ModelError: the weight file is missing or differs from the pinned one
            (:func:`meddiff.weights.weight_file`).
    """
    import timm
    import torch

    from meddiff.weights import weight_file

    path = weight_file("efficientnet-lite0")
    net = timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=STAGES
    )
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    src = torch.load(path, map_location="cpu", weights_only=True)
    # The file uses the EfficientNet-PyTorch names (_conv_stem, _blocks.N._expand_conv, ...) in
    # the same order and shapes as timm's state dict; map them by position, then keep the trunk.
    names = list(full.state_dict())
    if len(names) != len(src) or any(
        tuple(src[a].shape) != tuple(full.state_dict()[b].shape)
        for a, b in zip(src, names, strict=True)
    ):
        from meddiff.errors import ModelError

        raise ModelError(f"{path}: not the EfficientNet-Lite0 layout (tensor names or shapes)")
    full.load_state_dict(dict(zip(names, src.values(), strict=True)))
    trunk = {k: v for k, v in full.state_dict().items() if k in net.state_dict()}
    net.load_state_dict(trunk)
    return net.eval().requires_grad_(False)


class PerceptualDistance:
    """Unweighted LPIPS-style distance over a frozen trunk (module docstring).

    ``__call__(a, b)``: float (n, 3, H, W) in [-1, 1] each → float (n,), 0 for identical images.
    Gradients flow to both inputs; the trunk's weights stay frozen.
    """

    def __init__(self, network: str = "efficientnet-lite0"):
        if network not in NETWORKS:
            from meddiff.errors import ConfigError

            raise ConfigError(
                f"unknown perceptual network '{network}' (synthesis.model.arch.vae_perceptual); "
                f"expected one of {', '.join(NETWORKS)}"
            )
        self.network = network
        self.trunk = efficientnet_lite0_trunk()

    def to(self, device) -> PerceptualDistance:
        self.trunk.to(device)
        return self

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        import torch

        fa, fb = self.trunk(self._input(a)), self.trunk(self._input(b))
        total = torch.zeros(a.shape[0], device=a.device, dtype=torch.float32)
        for x, y in zip(fa, fb, strict=True):
            diff = _unit(x.float()) - _unit(y.float())
            total = total + diff.pow(2).sum(dim=1).mean(dim=(1, 2))
        return total

    @staticmethod
    def _input(x: torch.Tensor) -> torch.Tensor:
        # [-1, 1] → TF-Lite's (RGB 0..255 − 127) / 128.
        return (x * 127.5 + 0.5) / 128.0


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each spatial position's feature vector scaled to unit length (LPIPS's normalisation)."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
