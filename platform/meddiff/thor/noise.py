"""Noise for the forward process: Gaussian, and AnoDDPM's octave simplex noise.

Simplex noise here is 3D simplex noise (Gustavson's formulation of Perlin's simplex lattice)
sampled on the image grid at depth ``t / frequency`` and summed over octaves as AnoDDPM does:
octave ``o`` samples coordinates divided by ``frequency / 2**o`` with amplitude
``persistence**o``. It is vectorised over the whole batch (one random permutation table per
image), because it is drawn for every image on the inference hot path; AnoDDPM's reference loops
over pixels in numba and gives every image in a batch the same field.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meddiff.config.thor import SimplexConfig

_GRAD3 = torch.tensor(
    [
        [1, 1, 0], [-1, 1, 0], [1, -1, 0], [-1, -1, 0],
        [1, 0, 1], [-1, 0, 1], [1, 0, -1], [-1, 0, -1],
        [0, 1, 1], [0, -1, 1], [0, 1, -1], [0, -1, -1],
    ],
    dtype=torch.float64,
)  # fmt: skip
_F3 = 1.0 / 3.0
_G3 = 1.0 / 6.0


Generators = torch.Generator | Sequence[torch.Generator] | None


def _per_image(generator, n: int) -> list[torch.Generator | None]:
    # One generator per image makes an image's noise independent of what it is batched with.
    if isinstance(generator, Sequence):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for a batch of {n}")
        return list(generator)
    return [generator] * n


def gaussian_noise(shape: tuple[int, ...], generator: Generators = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...); ``generator`` one, one per image, or None."""
    gens = _per_image(generator, shape[0])
    return torch.stack([torch.randn(shape[1:], generator=g) for g in gens])


def simplex3(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """3D simplex noise in about [-1, 1] at points (x, y, z), each (N, P) float64, with one
    permutation table per row: ``perm`` (N, 512) int64 (a permutation of 0..255, repeated)."""
    s = (x + y + z) * _F3
    i, j, k = torch.floor(x + s), torch.floor(y + s), torch.floor(z + s)
    t = (i + j + k) * _G3
    x0, y0, z0 = x - (i - t), y - (j - t), z - (k - t)

    # Which of the six tetrahedra of the skewed cube holds the point: the offsets of its second
    # and third corners follow from the order of x0, y0, z0.
    xy, xz, yz = x0 >= y0, x0 >= z0, y0 >= z0
    i1 = (xy & xz).to(x.dtype)
    j1 = (~xy & yz).to(x.dtype)
    k1 = 1.0 - i1 - j1
    i2 = (xy | xz).to(x.dtype)
    j2 = (~xy | yz).to(x.dtype)
    k2 = (~yz | ~xz).to(x.dtype)

    ii = i.long() & 255
    jj = j.long() & 255
    kk = k.long() & 255
    grad = _GRAD3.to(x.device)

    def corner(di, dj, dk, cx, cy, cz):
        h = torch.gather(perm, 1, kk + dk)
        h = torch.gather(perm, 1, jj + dj + h)
        h = torch.gather(perm, 1, ii + di + h) % 12
        g = grad[h]  # (N, P, 3)
        falloff = (0.6 - cx * cx - cy * cy - cz * cz).clamp(min=0.0)
        return falloff**4 * (g[..., 0] * cx + g[..., 1] * cy + g[..., 2] * cz)

    zero = torch.zeros_like(ii)
    one = torch.ones_like(ii)
    n = corner(zero, zero, zero, x0, y0, z0)
    n = n + corner(i1.long(), j1.long(), k1.long(), x0 - i1 + _G3, y0 - j1 + _G3, z0 - k1 + _G3)
    n = n + corner(
        i2.long(), j2.long(), k2.long(), x0 - i2 + 2 * _G3, y0 - j2 + 2 * _G3, z0 - k2 + 2 * _G3
    )
    n = n + corner(one, one, one, x0 - 1 + 3 * _G3, y0 - 1 + 3 * _G3, z0 - 1 + 3 * _G3)
    return 32.0 * n


def simplex_noise(
    shape: tuple[int, ...],
    t: int,
    cfg: SimplexConfig,
    generator: Generators = None,
) -> torch.Tensor:
    """Octave simplex noise of ``shape`` (B, C, H, W), float32, one field per image and channel.

    With ``cfg.normalize`` each field is rescaled to zero mean and unit variance (the DDPM forward
    process assumes unit-variance noise).
    """
    b, c, h, w = shape
    n = b * c
    gens = [g for g in _per_image(generator, b) for _ in range(c)]
    perm = torch.stack([torch.randperm(256, generator=g) for g in gens])
    perm = torch.cat([perm, perm], dim=1)  # indices up to 511 need no wrap-around
    # A random offset per field moves each image to another part of the (infinite) noise volume.
    offset = torch.stack([torch.rand(3, generator=g, dtype=torch.float64) for g in gens]) * 256.0
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    xx, yy = xx.reshape(1, -1), yy.reshape(1, -1)
    out = torch.zeros((n, h * w), dtype=torch.float64)
    freq, amp = float(cfg.frequency), 1.0
    for _ in range(cfg.octaves):
        px = xx / freq + offset[:, :1]
        py = yy / freq + offset[:, 1:2]
        pz = torch.full_like(px, t / freq) + offset[:, 2:3]
        out += amp * simplex3(px, py, pz, perm)
        freq /= 2.0
        amp *= cfg.persistence
    if cfg.normalize:
        out = (out - out.mean(dim=1, keepdim=True)) / out.std(dim=1, keepdim=True).clamp(min=1e-8)
    return out.reshape(b, c, h, w).float()


def make_noise(
    kind: str,
    shape: tuple[int, ...],
    t: int,
    simplex: SimplexConfig,
    generator: Generators = None,
) -> torch.Tensor:
    """Gaussian or simplex noise of ``shape`` (B, C, H, W) for timestep ``t``; ``generator`` is
    one generator, one per image, or None (torch's global generator)."""
    if kind == "gaussian":
        return gaussian_noise(shape, generator)
    if kind == "simplex":
        return simplex_noise(shape, t, simplex, generator)
    raise ValueError(f"unknown noise kind '{kind}'; expected gaussian or simplex")
