"""The DDPM noise schedule: forward noising, the stochastic DDPM step and the deterministic DDIM
step. No network, no loop: the inferer owns the loop (MONAI's scheduler/inferer split).

Timesteps index the schedule from 0 (least noise) to ``num_train_timesteps - 1``. Images live in
model space [-1, 1]; predicted x0 is clipped there when ``clip_sample`` is set.
"""

from __future__ import annotations

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

    def step(
        self,
        eps: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One stochastic DDPM step x_t → x_{t-1} (posterior mean plus fixed-small variance);
        ``noise`` is the standard normal draw for the variance term (drawn here if None).

        Returns (x_{t-1}, x̂0). At t = 0 the posterior has no variance and x_{-1} = x̂0.
        """
        x0 = self.predict_x0(eps, t, x_t)
        ab_t, ab_prev = self.alpha_bar(t), self.alpha_bar(t - 1)
        beta_t, alpha_t = float(self.betas[t]), float(self.alphas[t])
        coef_x0 = ab_prev**0.5 * beta_t / (1.0 - ab_t)
        coef_xt = alpha_t**0.5 * (1.0 - ab_prev) / (1.0 - ab_t)
        mean = coef_x0 * x0 + coef_xt * x_t
        if t == 0:
            return mean, x0
        variance = max((1.0 - ab_prev) / (1.0 - ab_t) * beta_t, 1e-20)
        z = torch.randn_like(x_t) if noise is None else noise.to(x_t.device, x_t.dtype)
        return mean + variance**0.5 * z, x0

    def ddim_step(
        self,
        eps: torch.Tensor,
        t: int,
        t_prev: int,
        x_t: torch.Tensor,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM update from step t to an earlier step ``t_prev`` (-1: clean): deterministic at
        ``eta`` = 0, the strided DDPM posterior at ``eta`` = 1 (``noise``: its standard normal
        draw, drawn here if None).

        The noise direction is recomputed from the clipped x̂0 so that x_{t_prev} stays on the
        schedule's marginal. Returns (x_{t_prev}, x̂0).
        """
        x0 = self.predict_x0(eps, t, x_t)
        ab_t, ab_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        eps_hat = (x_t - ab_t**0.5 * x0) / (1.0 - ab_t) ** 0.5
        sigma = eta * ((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)) ** 0.5
        x_prev = ab_prev**0.5 * x0 + max(1.0 - ab_prev - sigma**2, 0.0) ** 0.5 * eps_hat
        if sigma > 0:
            z = torch.randn_like(x_t) if noise is None else noise.to(x_t.device, x_t.dtype)
            x_prev = x_prev + sigma * z
        return x_prev, x0
