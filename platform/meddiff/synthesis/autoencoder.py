"""Fitting a from-scratch VAE as an autoencoder (the tiny preset's ``arch.vae_warmup_steps``).

The objective is latent diffusion's autoencoder loss without its adversary (Rombach et al. 2022,
appendix G): a pixel term (MSE in [-1, 1]), a perceptual term over a trained trunk
(:mod:`meddiff.synthesis.perceptual`, ``arch.vae_perceptual``, weight
``arch.vae_perceptual_weight``) and the KL term at SD's weight 1e-6. Batches get a random
dihedral transform (histology has no orientation). The learning rate warms up linearly over the
first 5% of the steps and then follows a cosine decay to 0.

Every step's batch, augmentation and posterior sample are functions of (seed, step), and with a
``state`` file the fit saves itself every ``checkpoint_every`` steps (weights, optimizer, schedule;
written to a temporary name, then renamed), so a fit that was interrupted continues where it
stopped and ends where an uninterrupted one would have.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddiff.synthesis import components as C

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

log = logging.getLogger(__name__)

OnLog = Callable[[int, dict[str, float]], None]


def fit_vae(
    vae: AutoencoderKL,
    images: np.ndarray,
    resolution: int,
    steps: int,
    *,
    batch_size: int = 16,
    crop: int | None = None,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    perceptual: str | None = None,
    perceptual_weight: float = 1.0,
    seed: int = 0,
    state: str | Path | None = None,
    key: Any = None,
    checkpoint_every: int = 100,
    log_every: int = 50,
    on_log: OnLog | None = None,
) -> float:
    """Train ``vae`` as an autoencoder on ``images`` (uint8 (n, H, W, 3), resized to
    ``resolution``) for ``steps`` steps; returns the last step's loss. The VAE comes back frozen
    in eval mode. ``crop``: train on a random ``crop``-px square of each (resized) image.

    ``state``: a file to save the fit in and resume it from; a state saved for another ``key``
    (any JSON-able value: what the fit is for) is ignored and overwritten. ``on_log(step,
    metrics)`` gets ``vae_loss``, ``vae_mse``, ``vae_perceptual`` (mean over the last
    ``log_every`` steps).

    Raises:
        ConfigError: unknown ``perceptual`` network.
        ModelError: the perceptual network's weight file is missing or altered.
    """
    import torch
    from diffusers.optimization import get_scheduler

    from meddiff.synthesis.perceptual import PerceptualDistance

    distance = PerceptualDistance(perceptual) if perceptual and perceptual_weight > 0 else None
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = get_scheduler("cosine", opt, num_warmup_steps=steps // 20, num_training_steps=steps)
    start = _resume(state, key, vae, opt, sched)
    vae.train().requires_grad_(True)
    loss = torch.zeros(())
    sums, count = np.zeros(3), 0
    for step in range(start, steps):
        batch = _batch(images, resolution, batch_size, crop, (seed, step))
        terms = _terms(vae, *batch, distance, kl_weight)
        loss = terms[0] + perceptual_weight * terms[1] if distance else terms[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        sums += [float(loss.detach()), terms[2], float(terms[1].detach())]
        count += 1
        done = step + 1
        if done % log_every == 0 or done == steps:
            names = ("vae_loss", "vae_mse", "vae_perceptual")
            (on_log or _log)(done, dict(zip(names, (sums / count).tolist(), strict=True)))
            sums, count = np.zeros(3), 0
        if state is not None and (done % checkpoint_every == 0 or done == steps):
            _save(state, key, done, vae, opt, sched)
    vae.requires_grad_(False).eval()
    return float(loss.detach())


def _batch(images, resolution, batch_size, crop, where):
    """Step ``where``'s batch (float (b, 3, c, c) in [-1, 1], augmented) and its generator."""
    import torch

    rng = np.random.default_rng(list(where))
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    idx = np.sort(rng.choice(len(images), size=min(batch_size, len(images)), replace=False))
    x = C.preprocess_images(images[idx], resolution)
    if crop is not None and crop < resolution:
        corners = rng.integers(0, resolution - crop + 1, size=(len(x), 2))
        x = torch.stack(
            [xi[:, r : r + crop, c : c + crop] for xi, (r, c) in zip(x, corners, strict=True)]
        )
    return C.augment(x, gen), gen


def _terms(vae, x, gen, distance, kl_weight):
    """The batch's (pixel MSE + KL, perceptual, pixel MSE as a float) terms."""
    import torch
    import torch.nn.functional as F

    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator=gen)).sample
    mse = F.mse_loss(recon, x)
    base = mse + kl_weight * posterior.kl().mean()
    perc = distance(recon, x).mean() if distance is not None else torch.zeros(())
    return base, perc, float(mse.detach())


def _log(step: int, metrics: dict[str, float]) -> None:
    log.info("VAE warm-up step %d: %s", step, {k: round(v, 5) for k, v in metrics.items()})


def _resume(state, key, vae, opt, sched) -> int:
    import torch

    if state is None or not Path(state).is_file():
        return 0
    saved = torch.load(state, map_location="cpu", weights_only=False)
    if saved.get("key") != key:
        log.info("VAE warm-up state %s was saved for other settings; starting afresh", state)
        return 0
    vae.load_state_dict(saved["vae"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["schedule"])
    log.info("VAE warm-up resumed from %s at step %d", state, saved["step"])
    return int(saved["step"])


def _save(state, key, step, vae, opt, sched) -> None:
    import torch

    path = Path(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    doc = {
        "key": key,
        "step": step,
        "vae": vae.state_dict(),
        "optimizer": opt.state_dict(),
        "schedule": sched.state_dict(),
    }
    torch.save(doc, tmp)
    os.replace(tmp, path)
