"""THOR inference: noise the input to level T, denoise, and at chosen steps blend the input back in
where the anomaly map says the tissue is healthy (harmonization). Also the two baselines on the same
network: plain DDPM reconstruction from T (Gaussian) and AnoDDPM (simplex noise), both without
harmonization. The inferer owns the loop; the network (any ``(x_t, t) → ε̂`` callable) and the
schedule are passed in, and the sampler (``DDPMScheduler`` or ``DDIMScheduler``) takes each step.

Per visited step t (from T down to 0), with x the input in [0, 1] and ε the noise drawn once:

1. ε̂ = UNet(x_t, t); x̂0 from ε̂ (clipped); x_{t'} from the DDPM step (full schedule, t' = t-1) or
   the DDIM update (fast mode, t' = the next visited step; deterministic at ``eta`` 0, the
   strided DDPM posterior at ``eta`` 1).
2. At map steps (multiples of ``map_every`` and the harmonization steps) the anomaly map
   m_t = normmax(|x̂0 - x| · clip(blur₂(LPIPS(x̂0, x)), 0, 1)) is recorded.
3. At harmonization steps m' = clip((dilate₁₃(close₁₃(m_t)) + m_t) / 2, 0, 1), the blend
   x̂0ʰ = m'·x̂0 + (1-m')·x, and x_{t'} = q(x̂0ʰ, ε, t') replaces the step's result.

THOR's map is the per-pixel harmonic mean of the recorded (unrefined) maps, clipped to
[0, 0.999]; the image score is its mean. The baselines' map is |x̂ - x| of the final reconstruction.
With ``draws`` > 1 the whole loop runs once per independent noise draw and the final maps are
averaged (one draw's residual map is noisy in healthy tissue; the draws agree on the lesion).

One deliberate difference from the reference code: it re-noises the blended image to level t and
then denoises it as if it were at t-1; here it is noised to t', the level the next step expects
(the same thing within one step of 1000 on the full schedule, and necessary in fast mode where the
next visited step can be 25 or 50 steps lower).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from meddiff import precision as amp
from meddiff.config.thor import InferConfig, SimplexConfig
from meddiff.errors import ConfigError, DataError
from meddiff.thor import maps
from meddiff.thor.noise import make_noise
from meddiff.thor.perceptual import Perceptual, load_perceptual, map_kind
from meddiff.thor.schedule import DDIMScheduler, DDPMSchedule, DDPMScheduler, Scheduler

MAP_CLIP = 0.999

# The network as the inferer sees it: x_t (B, C, H, W) float32 in model space and t (B,) int64
# → predicted noise ε̂ (B, C, H, W).
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Detection:
    """The result for a batch of B images."""

    anomaly_map: torch.Tensor  # (B, 1, H, W) in [0, 0.999]
    score: torch.Tensor  # (B,) mean of the map
    reconstruction: torch.Tensor  # (B, 1, H, W) pseudo-healthy image in [0, 1]
    step_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # t → (B, 1, H, W)
    precision: str = "fp32"  # the UNet's and LPIPS trunk's autocast (meddiff.precision)


def draw_seed(seed: int, k: int) -> int:
    """The seed of an image's ``k``-th noise draw (draw 0 uses the image's own seed)."""
    return seed if k == 0 else (seed * 1_000_003 + k * 7_919) & 0x7FFFFFFF


class ThorInferer:
    """Anomaly detection by THOR (or a baseline) with a fixed plan of visited steps.

    Raises:
        ConfigError: T above the schedule's last step, or a harmonization step above T or below 0.
    """

    def __init__(
        self,
        schedule: DDPMSchedule,
        cfg: InferConfig,
        simplex: SimplexConfig,
        perceptual: Perceptual | None = None,
    ):
        self.schedule = schedule
        self.cfg = cfg
        self.simplex = simplex
        self.perceptual = perceptual
        self.method = cfg.method
        self.noise = cfg.noise_kind
        self.level = cfg.level
        self.harmonization = tuple(sorted(set(cfg.harmonization), reverse=True))
        last = schedule.last_step
        if self.level > last:
            raise ConfigError(
                f"thor.infer.noise_level T={self.level} is larger than the schedule allows: the "
                f"last step is {last} (thor.schedule.num_train_timesteps="
                f"{schedule.num_steps})"
            )
        for t in self.harmonization:
            if t > self.level:
                raise ConfigError(
                    f"thor.infer.harmonization_steps has step {t}, above the noise level "
                    f"T={self.level}; harmonization steps must lie in [0, T]"
                )
            if t < 0:
                raise ConfigError(f"thor.infer.harmonization_steps has negative step {t}")
        self.map_steps = sorted(
            {t for t in range(self.level + 1) if t % cfg.map_every == 0} | set(self.harmonization),
            reverse=True,
        )
        self.scheduler: Scheduler
        if cfg.stride == 1:
            self.scheduler = DDPMScheduler(schedule, range(self.level, -1, -1))
        else:
            strided = set(range(self.level, -1, -cfg.stride)) | {0}
            steps = sorted(strided | set(self.map_steps), reverse=True)
            self.scheduler = DDIMScheduler(schedule, steps, cfg.eta)

    @property
    def steps(self) -> list[int]:
        """The visited timesteps, T first, 0 last."""
        return self.scheduler.timesteps

    @classmethod
    def from_config(
        cls, schedule: DDPMSchedule, cfg: InferConfig, simplex: SimplexConfig
    ) -> ThorInferer:
        """Build the inferer and load the LPIPS module that ``cfg.lpips`` names (THOR only)."""
        perceptual = load_perceptual(cfg.lpips) if cfg.method == "thor" else None
        return cls(schedule, cfg, simplex, perceptual)

    @property
    def map_kind(self) -> str:
        """How the anomaly map is computed (stated in every output)."""
        if self.method != "thor":
            return "residual |x - reconstruction| (baseline)"
        return self.perceptual.kind if self.perceptual is not None else map_kind("off")

    @property
    def residual_only(self) -> bool:
        return self.method != "thor" or self.perceptual is None

    def describe(self) -> dict[str, Any]:
        """The plan in plain values, for logs, CSV headers, JSON and reports."""
        schedule = "full DDPM"
        if self.cfg.stride > 1:
            schedule = f"fast DDIM, stride {self.cfg.stride}, eta {self.cfg.eta:g}"
        if self.cfg.draws > 1:
            schedule += f", mean of {self.cfg.draws} draws"
        return {
            "method": self.method,
            "noise": self.noise,
            "noise_level": self.level,
            "harmonization_steps": list(self.harmonization),
            "map_steps": list(self.map_steps) if self.method == "thor" else [],
            "schedule": schedule,
            "draws": self.cfg.draws,
            "forwards_per_image": len(self.steps) * self.cfg.draws,
            "map_kind": self.map_kind,
            "residual_only": self.residual_only,
        }

    @staticmethod
    def check_images(images: torch.Tensor, image_shape: tuple[int, int, int] | None) -> None:
        """Raises DataError unless ``images`` is a 4-D batch of ``image_shape`` (C, H, W)."""
        if images.ndim == 4 and (image_shape is None or tuple(images.shape[1:]) == image_shape):
            return
        want = "(B, C, H, W)" if image_shape is None else "(B, {}, {}, {})".format(*image_shape)
        raise DataError(f"images must be {want} for this model, got {tuple(images.shape)}")

    @torch.inference_mode()
    def __call__(
        self,
        denoiser: Denoiser,
        images: torch.Tensor,
        seeds: Sequence[int] | None = None,
        keep_step_maps: bool = False,
        *,
        image_shape: tuple[int, int, int] | None = None,
        device: str | torch.device | None = None,
    ) -> Detection:
        """Detect anomalies in ``images`` (B, C, H, W) in [0, 1] with ``denoiser`` (x_t, t) → ε̂.

        ``image_shape`` (C, H, W), when given, is the shape the denoiser was trained on (a
        different one raises DataError); the loop runs on ``device`` (default: the images').
        ``seeds`` (one per image) make each image's noise, and so its result, independent of the
        batch it is in; None draws from torch's global generator. With ``draws`` > 1 the map and
        score are the mean over that many independent noise draws; the reconstruction and step
        maps are the first draw's. Results are on the CPU.
        """
        self.check_images(images, image_shape)
        x = images.to(device=device or images.device, dtype=torch.float32)
        precision = amp.resolve(self.cfg.precision, x.device.type, "thor-inference")
        if self.perceptual is not None:
            self.perceptual.to(device)
        results = []
        for k in range(self.cfg.draws):
            gens = None
            if seeds is not None:
                gens = [torch.Generator().manual_seed(draw_seed(int(s), k)) for s in seeds]
            results.append(self._detect(denoiser, x, gens, keep_step_maps and k == 0, precision))
        first = results[0]
        if len(results) == 1:
            return first
        amap = torch.stack([r.anomaly_map for r in results]).mean(dim=0)
        return Detection(
            amap, amap.mean(dim=(1, 2, 3)), first.reconstruction, first.step_maps, precision
        )

    def _detect(
        self,
        denoiser: Denoiser,
        x: torch.Tensor,
        gens: list[torch.Generator] | None,
        keep_step_maps: bool,
        precision: str = "fp32",
    ) -> Detection:
        """One noise draw: the loop of the module docstring; the networks under ``precision``'s
        autocast, everything else in fp32."""
        device = x.device
        shape = tuple(x.shape)
        eps = make_noise(self.noise, shape, self.level, self.simplex, gens).to(device)
        x_t = self.schedule.add_noise(x * 2 - 1, eps, self.level)
        recorded: list[torch.Tensor] = []
        step_maps: dict[int, torch.Tensor] = {}
        # The input is the same at every map step: its LPIPS features are computed once.
        with amp.autocast(precision, device.type):
            ref = self.perceptual.features(x) if self.perceptual is not None else None
        harmonize = set(self.harmonization)
        record = set(self.map_steps) if self.method == "thor" else set()
        for t in self.steps:
            with amp.autocast(precision, device.type):
                eps_hat = denoiser(
                    x_t, torch.full((x.shape[0],), t, device=device, dtype=torch.long)
                )
            eps_hat = eps_hat.float().contiguous()

            # The posterior draw uses the method's noise kind too (simplex for AnoDDPM); the
            # scheduler draws it only for a step with a variance term.
            def draw(t: int = t) -> torch.Tensor:
                return make_noise(self.noise, shape, t, self.simplex, gens).to(device)

            x_t, x0 = self.scheduler.step(eps_hat, t, x_t, draw)
            if t not in record:
                continue
            x0_img = ((x0 + 1) / 2).clamp(0.0, 1.0)
            lp = None
            if self.perceptual is not None:
                with amp.autocast(precision, device.type):
                    feats = self.perceptual.features(x0_img)
                lp = self.perceptual.distance(feats, ref, tuple(x.shape[-2:]))
            m = maps.anomaly_map(x0_img, x, lp, self.cfg.lpips_sigma)
            recorded.append(m)
            if keep_step_maps:
                step_maps[t] = m.cpu()
            if t in harmonize:
                mask = maps.harmonization_mask(m, self.cfg.morph_kernel)
                blended = maps.harmonize(x0_img, x, mask)
                x_t = self.schedule.add_noise(blended * 2 - 1, eps, self.scheduler.prev_timestep(t))
        reconstruction = ((x_t + 1) / 2).clamp(0.0, 1.0)
        if self.method == "thor":
            amap = maps.harmonic_mean(torch.stack(recorded)).clamp(0.0, MAP_CLIP)
        else:
            amap = maps.residual(reconstruction, x).clamp(0.0, MAP_CLIP)
        return Detection(
            anomaly_map=amap.cpu(),
            score=amap.mean(dim=(1, 2, 3)).cpu(),
            reconstruction=reconstruction.cpu(),
            step_maps=step_maps,
            precision=precision,
        )
