"""Frozen patch embedding: one feature vector per patch from a trained image network.

Paper A embeds every patch with DINO ViT-B/8 and clusters the CLS tokens; that is the full
config's default (timm ``vit_base_patch8_224`` with the ``timm/vit_base_patch8_224.dino`` hub
weights, or a local checkpoint). Where no hub is reachable (the ``tiny`` preset), the network is
EfficientNet-Lite0 trained on ImageNet-1k, whose weight file installs offline
(``weights: meddiff:efficientnet-lite0``, see :mod:`meddiff.weights`); tests may also build a small
ViT from config with random weights. Any timm model works: the feature is the network's own pooled
pre-logits vector (``forward_head(pre_logits=True)``): for a ViT with token pooling the CLS token
after the final LayerNorm (what DINO's users and Hugging Face's ``last_hidden_state[:, 0]`` see),
for EfficientNet the global average of the last 1×1 convolution's activations (1280-d).

Inputs are resized to ``image_size`` and normalised with ``mean``/``std`` as the weights were
trained: DINO with ImageNet mean/std at 224 px; EfficientNet-Lite0 at 224 px with
(x − 127) / 128 on the 0-255 scale (the TensorFlow reference's ``MEAN_RGB``/``STDDEV_RGB`` for its
Lite models, tensorflow/tpu ``models/official/efficientnet/lite``).

:class:`PatchEmbedder` is a Ray Data stage: built once per actor, then called on batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddiff import precision as amp
from meddiff.config.prompts import EmbedConfig
from meddiff.errors import ModelError

if TYPE_CHECKING:
    import torch

# ``weights: meddiff:NAME`` names a weight file of :data:`meddiff.weights.WEIGHTS`.
PACKAGED = "meddiff:"
VIT_SIZES = ("patch_size", "embed_dim", "depth", "num_heads")

# lukemelas/EfficientNet-PyTorch parameter names → timm's EfficientNet names. Its blocks are one
# flat list (``_blocks.N``); timm groups them in stages (``blocks.S.I``). A block without an
# expansion convolution is timm's DepthwiseSeparableConv, one with it an InvertedResidual.
_LUKEMELAS_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_LUKEMELAS_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LUKEMELAS_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lukemelas_to_timm(state: Mapping[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """A state_dict in lukemelas/EfficientNet-PyTorch's layout (``_conv_stem``, ``_blocks.N``,
    ``_fc``) renamed for the timm EfficientNet ``model`` (whose stage lengths place block N).

    Raises:
        ModelError: ``model`` is not a timm EfficientNet, or has fewer blocks than ``state``.
    """
    stages = getattr(model, "blocks", None)
    if getattr(model, "conv_stem", None) is None or stages is None:
        raise ModelError(
            f"EfficientNet weights (lukemelas layout) do not fit {type(model).__name__}; use a "
            "timm EfficientNet (e.g. prompts.embed.model=tf_efficientnet_lite0)"
        )
    place = [(s, i) for s, stage in enumerate(stages) for i in range(len(stage))]
    out: dict[str, Any] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head != "_blocks":
            out[f"{_LUKEMELAS_TOP.get(head, head)}.{rest}"] = value
            continue
        number, layer, tail = rest.split(".", 2)
        n = int(number)
        if n >= len(place):
            raise ModelError(
                f"EfficientNet weights have block {n}; {type(model).__name__} has {len(place)}"
            )
        table = (
            _LUKEMELAS_INVERTED
            if f"_blocks.{n}._expand_conv.weight" in state
            else _LUKEMELAS_SEPARABLE
        )
        s, i = place[n]
        out[f"blocks.{s}.{i}.{table.get(layer, layer)}.{tail}"] = value
    return out


def packaged_state_dict(name: str, model: torch.nn.Module) -> dict[str, Any]:
    """The weights of :func:`meddiff.weights.weight_file` ``name`` (hash-checked) as a state_dict
    for the timm ``model``, converted from lukemelas' EfficientNet layout when it is in that one.

    Raises:
        ModelError: unknown name, missing or altered file, not a state_dict, layout mismatch.
    """
    import torch

    from meddiff.weights import weight_file

    path = weight_file(name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a TorchScript archive, a pickle with code, a damaged file
        raise ModelError(
            f"{path} ({PACKAGED}{name}) is not a PyTorch state_dict ({type(err).__name__})"
        ) from None
    if not isinstance(state, Mapping):
        raise ModelError(f"{path} ({PACKAGED}{name}) is not a PyTorch state_dict")
    if "_conv_stem.weight" in state:
        return lukemelas_to_timm(state, model)
    return dict(state)


def build_network(cfg: EmbedConfig, seed: int = 0, key: str = "prompts.embed") -> torch.nn.Module:
    """The network in eval mode with frozen weights and no classifier, from the hub, a local file,
    a weight file meddiff installs (``meddiff:NAME``), or random (seeded). ``key`` is where
    ``cfg`` sits in the config, for error messages.

    Raises:
        ModelError: unknown model, ViT size keys on a model that has none, the weights file does
            not exist, cannot be loaded into the architecture, or the hub cannot be reached.
    """
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0}
    for name in VIT_SIZES:
        value = getattr(cfg, name)
        if value is not None:
            kwargs[name] = value
    known = timm.models.get_pretrained_cfg(cfg.model)
    if known is None or known.fixed_input_size:
        # Position embeddings fix a ViT's input size; convolutional networks take any size.
        kwargs["img_size"] = cfg.image_size
    try:
        return _create(cfg, seed, key, kwargs).eval().requires_grad_(False)
    except ModelError:
        raise
    except TypeError as err:  # timm passes unknown keyword arguments to the model class
        sizes = {k: v for k, v in kwargs.items() if k in VIT_SIZES}
        raise ModelError(
            f"{key}: {cfg.model} does not take {sizes or kwargs} ({err}); ViT size keys "
            f"({', '.join(VIT_SIZES)}) apply to ViT models only"
        ) from None
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ModelError(f"{key}.model: unknown timm model '{cfg.model}'") from None
        if any(s in str(err) for s in ("size mismatch", "Missing key", "Unexpected key")):
            raise ModelError(
                f"weights {cfg.weights} do not fit {cfg.model} with {kwargs}: {str(err)[:300]}"
            ) from None
        raise
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load embedder weights {cfg.weights!r} for {cfg.model} "
            f"({type(err).__name__}: {str(err)[:300]}); where the hub is unreachable, download "
            f"the checkpoint elsewhere and set {key}.weights to its local path"
        ) from None
    except Exception as err:  # huggingface_hub's offline/connection errors have no common base
        if type(err).__module__.startswith(("huggingface_hub", "requests", "urllib3")):
            raise ModelError(
                f"cannot download embedder weights {cfg.weights!r} ({type(err).__name__}); set "
                f"{key}.weights to a local checkpoint"
            ) from None
        raise


def _create(cfg: EmbedConfig, seed: int, key: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    import timm
    import torch

    weights = cfg.weights
    if weights is None:
        # Random weights must be the same in every actor: seed a private RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return timm.create_model(cfg.model, pretrained=False, **kwargs)
    if weights.startswith(PACKAGED):
        model = timm.create_model(cfg.model, pretrained=False, **kwargs)
        state = packaged_state_dict(weights.removeprefix(PACKAGED), model)
        ours = model.state_dict()
        # The classifier is not part of the embedding (num_classes=0 removed it).
        state = {k: v for k, v in state.items() if k in ours or not _is_head(model, k)}
        model.load_state_dict(state, strict=True)
        return model
    if weights.startswith("hf-hub:"):
        overlay = {"hf_hub_id": weights.removeprefix("hf-hub:")}
        return timm.create_model(
            cfg.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(
            f"embedder weights file {path} ({key}.weights) does not exist; give a timm/DINO "
            f"checkpoint (.safetensors, .pth, .bin), hf-hub:ORG/NAME or {PACKAGED}NAME"
        )
    return timm.create_model(
        cfg.model, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
    )


def _is_head(model: torch.nn.Module, key: str) -> bool:
    head = getattr(model, "pretrained_cfg", {}).get("classifier") or "classifier"
    return key.startswith(head + ".")


def describe(cfg: EmbedConfig) -> str:
    """One line naming the embedder, e.g. for reports: architecture, size overrides, weights."""
    sizes = [f"{name}={getattr(cfg, name)}" for name in VIT_SIZES if getattr(cfg, name) is not None]
    shape = f"{cfg.image_size}px" + (", " + ", ".join(sizes) if sizes else "")
    return f"{cfg.model} ({shape}; {cfg.weights or 'random weights'})"


def embed_precision(cfg: EmbedConfig, device: str) -> str:
    """The autocast the embedder runs on ``device`` (``cpu``/``cuda``): ``cfg.precision`` with
    ``auto`` resolved by :func:`meddiff.precision.resolve`; fp16 runs as fp32 on a CPU (fp16
    autocast is a GPU setting: a CPU has no fast fp16)."""
    precision = amp.resolve(cfg.precision, device, "embedding")
    return "fp32" if device == "cpu" and precision == "fp16" else precision


class PatchEmbedder:
    """Ray Data stage: adds ``embedding`` float32 (n, D), the network's pooled feature of each
    patch (D = 768 for DINO ViT-B/8, 1280 for EfficientNet-Lite0).

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
        self.model = build_network(self.cfg, seed, key).to(self.device)
        self.dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        self.mean = torch.tensor(self.cfg.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.cfg.std, device=self.device).view(1, 3, 1, 1)
        self.precision = embed_precision(self.cfg, self.device.type)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (n, H, W, 3) → float32 (n, 3, S, S), S = ``image_size``, normalised by the
        config's ``mean``/``std`` (on the 0-1 scale)."""
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
        """Pooled features float32 (n, D) of preprocessed inputs (n, 3, S, S): timm's pre-logits
        (a ViT's CLS token after its final norm; a CNN's global average pool)."""
        import torch

        with torch.inference_mode(), amp.autocast(self.precision, self.device.type):
            features = self.model.forward_features(x)
            pooled = self.model.forward_head(features, pre_logits=True)
        return pooled.float()

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


# The stage's name before it ran other networks than DINO; meddiff.evaluation.features imports it.
DinoEmbedder = PatchEmbedder
