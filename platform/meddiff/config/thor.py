"""THOR anomaly-detection configuration (paper B: Bercea et al., arXiv 2403.08464).

Field defaults are the paper's settings (from the official code, ci-ber/THOR_DDPM, brain configs);
``TINY`` holds the overrides that make the whole pipeline run on a 2-core CPU.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from meddiff.config.base import Section
from meddiff.config.training import ModelTrainingSection

NoiseKind = Literal["gaussian", "simplex"]
Method = Literal["thor", "ddpm", "anoddpm"]

# The paper's noise level T and harmonization steps per noise kind (official brain configs).
DEFAULT_NOISE_LEVEL: dict[str, int] = {"gaussian": 350, "simplex": 250}
DEFAULT_HARMONIZATION: dict[str, tuple[int, ...]] = {
    "gaussian": (300, 150, 50),
    "simplex": (200, 150, 100, 50),
}
# Each method's noise when ``infer.noise`` is not set.
METHOD_NOISE: dict[str, str] = {"thor": "gaussian", "ddpm": "gaussian", "anoddpm": "simplex"}


class UNetConfig(Section):
    """The denoising UNet (2D, ε-prediction). Defaults: THOR's brain model (18.5 M parameters)."""

    image_size: int = Field(default=128, ge=8, description="Square input size in pixels.")
    in_channels: int = Field(default=1, ge=1, description="Image channels (1: grayscale MRI).")
    channels: tuple[int, ...] = Field(
        default=(128, 256, 256), min_length=1, description="Feature channels per resolution level."
    )
    attention_levels: tuple[bool, ...] = Field(
        default=(False, True, True), description="Self-attention at each level (one per level)."
    )
    num_res_blocks: int = Field(default=1, ge=1, description="Residual blocks per level.")
    num_head_channels: int = Field(
        default=256, ge=1, description="Channels per attention head (heads = channels / this)."
    )
    norm_groups: int = Field(default=32, ge=1, description="GroupNorm groups.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries but channels has "
                f"{len(self.channels)}; give one per level"
            )
        for c in self.channels:
            if c % self.norm_groups:
                raise ValueError(
                    f"channel count {c} is not divisible by norm_groups={self.norm_groups}"
                )
        for c, attn in zip(self.channels, self.attention_levels, strict=True):
            if attn and c % self.num_head_channels:
                raise ValueError(
                    f"attention level with {c} channels is not divisible by "
                    f"num_head_channels={self.num_head_channels}"
                )
        factor = 2 ** (len(self.channels) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by {factor} "
                f"({len(self.channels)} levels halve it {len(self.channels) - 1} times)"
            )
        return self


class ScheduleConfig(Section):
    """The DDPM noise schedule (official: linear betas 1e-4..0.02 over 1000 steps)."""

    num_train_timesteps: int = Field(default=1000, ge=2)
    beta_start: float = Field(default=1e-4, gt=0)
    beta_end: float = Field(default=0.02, gt=0, lt=1)
    beta_schedule: Literal["linear", "scaled_linear"] = "linear"
    clip_sample: bool = Field(default=True, description="Clip predicted x0 to [-1, 1].")

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        if self.beta_start >= self.beta_end:
            raise ValueError(
                f"beta_start {self.beta_start} must be below beta_end {self.beta_end} "
                "(noise grows with t)"
            )
        return self


class SimplexConfig(Section):
    """AnoDDPM's octave simplex noise (6 octaves, persistence 0.8, first octave at frequency 64)."""

    octaves: int = Field(default=6, ge=1)
    persistence: float = Field(default=0.8, gt=0)
    frequency: float = Field(
        default=64.0, gt=0, description="Period in pixels of the first octave (halves per octave)."
    )
    normalize: bool = Field(
        default=True,
        description="Rescale each field to zero mean, unit variance so the DDPM forward process "
        "keeps its variance (AnoDDPM leaves the octave sum unscaled).",
    )


class AugmentConfig(Section):
    """THOR's brain augmentation of healthy training slices."""

    rotate_deg: float = Field(default=10.0, ge=0, description="Uniform rotation in ±degrees.")
    translate: float = Field(default=0.1, ge=0, lt=1, description="± fraction of the image size.")
    scale: tuple[float, float] = Field(default=(0.9, 1.1), description="Uniform zoom range.")
    hflip: bool = Field(default=True, description="Left-right flip with probability 0.5.")

    @field_validator("scale")
    @classmethod
    def _check_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0 < lo <= hi:
            raise ValueError(f"scale {list(value)} must be (low, high) with 0 < low <= high")
        return value


class TrainConfig(ModelTrainingSection):
    """DDPM training on healthy slices with Ray Train."""

    precision_path: ClassVar[str] = "thor-training"

    max_steps: int = Field(default=100_000, ge=1, description="Optimizer steps (global batches).")
    time_limit_min: float | None = Field(
        default=None,
        gt=0,
        description="Stop early (with a final checkpoint) after this many minutes of training.",
    )
    batch_size: int = Field(default=16, ge=1, description="Global batch size (split over workers).")
    noise: NoiseKind = Field(default="gaussian", description="Training noise (ε target).")
    max_timestep: int | None = Field(
        default=None,
        ge=1,
        description="Train on t < this only (None: the whole schedule). Detection starts at "
        "T <= 350, so a small compute budget is better spent below that; the model then cannot "
        "sample from pure noise.",
    )
    min_workers: int | None = Field(
        default=None,
        ge=1,
        description="Elastic training: start, and resume after a lost node, with as few as this "
        "many workers (Ray Train's (min, max) num_workers); None: always num_workers.",
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray resources each worker reserves, e.g. {worker_node: 1} to keep "
        "training on nodes that advertise it (cluster.yaml's node kinds).",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="Intra-op threads per worker (None: Ray's default)."
    )
    epoch_images: int = Field(
        default=2048,
        ge=1,
        description="Images per data epoch: a small set is repeated up to this so the Ray Data "
        "pipeline restarts rarely (each repeat gets fresh augmentation).",
    )
    min_images: int = Field(
        default=16,
        ge=1,
        description="Refuse training data with fewer slices than this: a DDPM fitted to a "
        "handful of images (each repeated hundreds of times per epoch) learns those images, "
        "not healthy anatomy.",
    )
    sample_every: int = Field(
        default=5000, ge=0, description="Steps between logged sample reconstructions (0: never)."
    )
    num_samples: int = Field(default=4, ge=1, description="Slices in each reconstruction grid.")
    sample_noise_level: int = Field(default=350, ge=1, description="T for sample grids.")
    sample_stride: int = Field(default=25, ge=1, description="DDIM stride for sample grids.")
    registered_name: str | None = Field(
        default="thor-ddpm", description="Registered MLflow model name (None: do not register)."
    )

    @model_validator(mode="after")
    def _check_workers(self) -> TrainConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(
                f"min_workers={self.min_workers} is more than num_workers={self.num_workers}"
            )
        for world in range(self.min_workers or self.num_workers, self.num_workers + 1):
            if self.batch_size % world:
                raise ValueError(
                    f"batch_size={self.batch_size} must be divisible by every worker count the "
                    f"run may have ({world} of min_workers..num_workers)"
                )
        return self


class InferConfig(Section):
    """Anomaly detection with a trained DDPM: THOR or a baseline, full or fast schedule."""

    method: Method = Field(
        default="thor",
        description="thor (harmonization), ddpm (plain reconstruction from T) or anoddpm "
        "(simplex noise, plain reconstruction).",
    )
    noise: NoiseKind | None = Field(
        default=None, description="None: the method's noise (thor/ddpm gaussian, anoddpm simplex)."
    )
    noise_level: int | None = Field(
        default=None, ge=1, description="T; None: 350 for gaussian, 250 for simplex."
    )
    harmonization_steps: tuple[int, ...] | None = Field(
        default=None,
        description="THOR harmonization steps; None: (300, 150, 50) gaussian, "
        "(200, 150, 100, 50) simplex.",
    )
    map_every: int = Field(
        default=50, ge=1, description="Anomaly maps at every step that is a multiple of this."
    )
    stride: int = Field(
        default=1,
        ge=1,
        description="1: the full stochastic DDPM schedule; >1: fast mode, deterministic DDIM "
        "updates every `stride` steps (harmonization and map steps are always visited).",
    )
    eta: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Fast mode's DDIM eta: 0 deterministic updates, 1 the strided DDPM posterior "
        "(stochastic, like the full schedule).",
    )
    draws: int = Field(
        default=1,
        ge=1,
        description="Independent noise draws per image; the anomaly map and score are their "
        "mean (each draw costs one pass of the schedule).",
    )
    batch_size: int = Field(default=16, ge=1, description="Images denoised together.")
    lpips: str = Field(
        default="download",
        description="LPIPS trunk: 'vgg16-hed' (HED's VGG16, installs offline), "
        "'vgg16-hed-lin' (the same with LPIPS's per-channel weights), 'download' (SqueezeNet "
        "from the torchvision model zoo), a local path to squeezenet1_1 weights, 'off' "
        "(residual-only maps) or 'random' (tests only).",
    )
    lpips_sigma: float = Field(default=2.0, ge=0, description="Gaussian blur of the LPIPS map.")
    morph_kernel: int = Field(
        default=13, ge=1, description="Square closing/dilation size for the harmonization mask."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="The UNet's and LPIPS trunk's autocast: auto is bf16 on CPUs with native bf16 "
        "(AVX512-BF16/AMX), fp32 on other CPUs and on GPUs (meddiff.precision).",
    )
    concurrency: int = Field(default=1, ge=1, description="Ray Data inference actors.")
    num_gpus: float | None = Field(
        default=None,
        ge=0,
        description="GPUs per inference actor; None: 1 if the cluster has GPUs now, else 0 "
        "(set it where GPU workers autoscale from zero).",
    )

    @field_validator("lpips", mode="before")
    @classmethod
    def _off_is_a_word(cls, value: object) -> object:
        # YAML (and so `--set thor.infer.lpips=off`) reads a bare off as the boolean False.
        return "off" if value is False else value

    @model_validator(mode="after")
    def _check(self) -> InferConfig:
        if self.method in ("ddpm", "anoddpm") and self.noise not in (
            None,
            METHOD_NOISE[self.method],
        ):
            raise ValueError(
                f"method '{self.method}' uses {METHOD_NOISE[self.method]} noise, got noise="
                f"'{self.noise}' (use method thor for THOR with {self.noise} noise)"
            )
        if self.method != "thor" and self.harmonization_steps:
            raise ValueError(
                f"method '{self.method}' does not harmonize; harmonization_steps "
                f"{list(self.harmonization_steps)} apply to method thor only"
            )
        return self

    @property
    def noise_kind(self) -> str:
        return self.noise or METHOD_NOISE[self.method]

    @property
    def level(self) -> int:
        return self.noise_level or DEFAULT_NOISE_LEVEL[self.noise_kind]

    @property
    def harmonization(self) -> tuple[int, ...]:
        """The steps at which THOR harmonizes (empty for the baselines)."""
        if self.method != "thor":
            return ()
        steps = self.harmonization_steps
        return tuple(DEFAULT_HARMONIZATION[self.noise_kind] if steps is None else steps)


class ThorEvalConfig(Section):
    """Evaluation protocol (official: pixel AUPRC, best Dice over 101 thresholds, size strata)."""

    dice_thresholds: int = Field(default=101, ge=2, description="Thresholds in [0, 1] for Dice.")
    size_strata: tuple[float, float, float] = Field(
        default=(3, 71, 570),
        description="Lesion pixel counts at 128x128 bounding small (a, b], medium (b, c], "
        "large > c; scaled by area to other image sizes.",
    )
    box_max_fpr: float = Field(
        default=0.05, gt=0, lt=1, description="Box protocol: pixel FPR on lesion-free images."
    )
    box_hit_fraction: float = Field(
        default=0.1, gt=0, le=1, description="A box is found when more than this share is above."
    )
    report_rows: int = Field(default=8, ge=1, description="Example rows in the HTML report.")

    @field_validator("size_strata")
    @classmethod
    def _check_strata(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        a, b, c = value
        if not 0 <= a < b < c:
            raise ValueError(f"size_strata {list(value)} must be increasing: 0 <= a < b < c")
        return value


class ThorConfig(Section):
    model: UNetConfig = UNetConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    simplex: SimplexConfig = SimplexConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    infer: InferConfig = InferConfig()
    eval: ThorEvalConfig = ThorEvalConfig()


# 2-core CPU sizes (a machine shared with other jobs): 64x64 slices and a narrow UNet with THOR's
# levels but attention only at the lowest (16x16) level, since at 32x32 it costs about 40 % of a
# training step on this CPU; batch 8 with one intra-op thread (two threads spend most of their
# time waiting for each other when the other core is busy); training on t < 500 only, the range
# detection uses. LPIPS runs over HED's VGG16 trunk, whose weights install offline (SqueezeNet's
# need a download); it lifts THOR's pixel AUPRC from 0.10 to 0.26 on the demo's test set
# (docs/thor.md, "The perceptual term offline").
TINY: dict = {
    "model": {
        "image_size": 64,
        "channels": [32, 64, 64],
        "attention_levels": [False, False, True],
        "num_head_channels": 64,
        "norm_groups": 16,
    },
    "train": {
        "max_steps": 2400,
        "batch_size": 8,
        "max_timestep": 500,
        "learning_rate": 3e-4,
        "max_grad_norm": 1.0,
        "torch_threads": 1,
        "epoch_images": 4096,
        "checkpoint_every": 400,
        "sample_every": 800,
        "log_every": 20,
    },
    "infer": {"lpips": "vgg16-hed", "batch_size": 32},
}
