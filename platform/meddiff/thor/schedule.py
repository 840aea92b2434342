"""The DDPM noise schedule (forward noising, x̂0 from ε̂) and the two samplers that step backwards
along it: the stochastic DDPM step and the DDIM update. No network, no loop: the inferer owns the
loop and calls one ``step`` whatever the sampler (MONAI's scheduler/inferer split, the interface
of MONAI's ``networks/schedulers`` and diffusers' ``SchedulerOutput``).

Timesteps index the schedule from 0 (least noise) to ``num_train_timesteps - 1``. Images live in
model space [-1, 1]; predicted x0 is clipped there when ``clip_sample`` is set.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from meddiff.config.thor import ScheduleConfig
from meddiff.errors import ConfigError


class DDPMSchedule:
    """Betas, alphas and cumulative products (float64 internally, float32 when applied)."""

    def __init__(self, cfg: ScheduleConfig):
        self.cfg = cfg
        n = cfg.num_train_timesteps
        if cfg.beta_schedule == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
        else:  # scaled_linear
            betas = (
                torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float64) ** 2
            )
        if cfg.beta_start >= cfg.beta_end:
            raise ConfigError(
                f"thor.schedule.beta_start={cfg.beta_start} must be below beta_end={cfg.beta_end}"
            )
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @property
    def num_steps(self) -> int:
        return self.cfg.num_train_timesteps

    @property
    def last_step(self) -> int:
        return self.cfg.num_train_timesteps - 1

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t, with ᾱ_{-1} = 1 (the clean image)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def add_noise(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int
    ) -> torch.Tensor:
        """q(x_t | x0) = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε for x0, ε (B, C, H, W) and t int or (B,).

        ``t = -1`` returns x0 unchanged (used after the last denoising step).
        """
        if isinstance(t, int):
            ab = torch.tensor(self.alpha_bar(t), dtype=x0.dtype, device=x0.device)
        else:
            ab = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype)[:, None, None, None]
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def predict_x0(self, eps: torch.Tensor, t: int, x_t: torch.Tensor) -> torch.Tensor:
        """x̂0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t), clipped to [-1, 1] when configured."""
        ab = self.alpha_bar(t)
        x0 = (x_t - (1.0 - ab) ** 0.5 * eps) / ab**0.5
        return x0.clamp(-1.0, 1.0) if self.cfg.clip_sample else x0


# The standard normal draw of a step's variance term: a tensor, or a function called only when the
# step has a variance term (so a seeded generator advances exactly as often as noise is used).
Noise = torch.Tensor | Callable[[], torch.Tensor] | None


class SchedulerOutput(NamedTuple):
    """One reverse step: the sample at the previous timestep and the predicted clean image, both
    shaped like the sample (diffusers' ``prev_sample`` and ``pred_original_sample``)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class Scheduler(ABC):
    """A reverse sampler over a ``DDPMSchedule`` that visits ``timesteps`` (descending, ≥ 0).

    ``prev_timestep(t)`` is the step after ``t`` (-1: the clean image) and ``step`` moves a sample
    there from the network's noise prediction.
    """

    def __init__(self, schedule: DDPMSchedule, timesteps: Sequence[int]):
        self.schedule = schedule
        self.timesteps = [int(t) for t in timesteps]
        self._next = dict(zip(self.timesteps, [*self.timesteps[1:], -1], strict=True))

    def prev_timestep(self, t: int) -> int:
        """The timestep ``step`` goes to from ``t`` (-1 after the last visited step)."""
        return self._next[t]

    @abstractmethod
    def step(
        self, model_output: torch.Tensor, t: int, sample: torch.Tensor, noise: Noise = None
    ) -> SchedulerOutput:
        """x_t → x_{prev_timestep(t)} from ε̂ = ``model_output`` (all (B, C, H, W) float).

        ``noise`` is the standard normal draw of the variance term (drawn with ``torch.randn``
        when None and the step needs one).
        """


def _draw(noise: Noise, like: torch.Tensor) -> torch.Tensor:
    if noise is None:
        return torch.randn_like(like)
    z = noise() if callable(noise) else noise
    return z.to(like.device, like.dtype)


class DDPMScheduler(Scheduler):
    """The ancestral DDPM sampler (Ho et al. 2020, eq. 6-7): posterior mean plus the fixed-small
    variance β̃_t, one step at a time. ``timesteps`` defaults to the whole schedule.

    Raises:
        ValueError: ``timesteps`` that are not consecutive (use ``DDIMScheduler`` to skip steps).
    """

    def __init__(self, schedule: DDPMSchedule, timesteps: Sequence[int] | None = None):
        if timesteps is None:
            timesteps = range(schedule.last_step, -1, -1)
        super().__init__(schedule, timesteps)
        if any(a - b != 1 for a, b in zip(self.timesteps, self.timesteps[1:], strict=False)):
            raise ValueError("DDPMScheduler visits consecutive timesteps; got a gap")

    def step(
        self, model_output: torch.Tensor, t: int, sample: torch.Tensor, noise: Noise = None
    ) -> SchedulerOutput:
        """One stochastic step x_t → x_{t-1}; at t = 0 the posterior has no variance, no noise is
        drawn and x_{-1} = x̂0."""
        s = self.schedule
        x0 = s.predict_x0(model_output, t, sample)
        ab_t, ab_prev = s.alpha_bar(t), s.alpha_bar(t - 1)
        beta_t, alpha_t = float(s.betas[t]), float(s.alphas[t])
        coef_x0 = ab_prev**0.5 * beta_t / (1.0 - ab_t)
        coef_xt = alpha_t**0.5 * (1.0 - ab_prev) / (1.0 - ab_t)
        mean = coef_x0 * x0 + coef_xt * sample
        if t == 0:
            return SchedulerOutput(mean, x0)
        variance = max((1.0 - ab_prev) / (1.0 - ab_t) * beta_t, 1e-20)
        return SchedulerOutput(mean + variance**0.5 * _draw(noise, sample), x0)


class DDIMScheduler(Scheduler):
    """The DDIM update (Song et al. 2021, eq. 12 and 16) between visited steps: deterministic at
    ``eta`` = 0, the strided DDPM posterior at ``eta`` = 1.

    The noise direction is recomputed from the clipped x̂0 so that x_{t'} stays on the schedule's
    marginal.
    """

    def __init__(self, schedule: DDPMSchedule, timesteps: Sequence[int], eta: float = 0.0):
        super().__init__(schedule, timesteps)
        self.eta = eta

    def step(
        self, model_output: torch.Tensor, t: int, sample: torch.Tensor, noise: Noise = None
    ) -> SchedulerOutput:
        """x_t → x_{t'} with t' = ``prev_timestep(t)``; noise is drawn only when σ > 0 (``eta`` > 0
        and t' ≥ 0)."""
        s = self.schedule
        x0 = s.predict_x0(model_output, t, sample)
        ab_t, ab_prev = s.alpha_bar(t), s.alpha_bar(self.prev_timestep(t))
        eps_hat = (sample - ab_t**0.5 * x0) / (1.0 - ab_t) ** 0.5
        sigma = self.eta * ((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)) ** 0.5
        x_prev = ab_prev**0.5 * x0 + max(1.0 - ab_prev - sigma**2, 0.0) ** 0.5 * eps_hat
        if sigma > 0:
            x_prev = x_prev + sigma * _draw(noise, sample)
        return SchedulerOutput(x_prev, x0)
