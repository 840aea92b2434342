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
    dtype=torch.float32,
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
    """3D simplex noise in about [-1, 1] at points (x, y, z), each (N, P) float, with one
    permutation table per row: ``perm`` (N, 512) int64 (a permutation of 0..255, repeated)."""
    s = (x + y + z) * _F3
    i, j, k = torch.floor(x + s), torch.floor(y + s), torch.floor(z + s)
    t = (i + j + k) * _G3
    x0, y0, z0 = x - (i - t), y - (j - t), z - (k - t)

    # Which of the six tetrahedra of the skewed cube holds the point: the offsets of its second
    # and third corners follow from the order of x0, y0, z0.
    xy, xz, yz = x0 >= y0, x0 >= z0, y0 >= z0
    i1, j1 = xy & xz, ~xy & yz
    k1 = ~(i1 | j1)
    i2, j2, k2 = xy | xz, ~xy | yz, ~yz | ~xz

    ii, jj, kk = i.long() & 255, j.long() & 255, k.long() & 255
    gx, gy, gz = (_GRAD3[:, c].to(x.dtype).to(x.device) for c in range(3))

    def corner(di, dj, dk, cx, cy, cz):
        h = torch.gather(perm, 1, kk + dk)
        h = torch.gather(perm, 1, jj + dj + h)
        h = torch.gather(perm, 1, ii + di + h) % 12
        falloff = (0.6 - cx * cx - cy * cy - cz * cz).clamp_(min=0.0)
        falloff = falloff * falloff
        return falloff * falloff * (gx[h] * cx + gy[h] * cy + gz[h] * cz)

    n = corner(0, 0, 0, x0, y0, z0)
    f1 = (i1.to(x.dtype), j1.to(x.dtype), k1.to(x.dtype))
    n += corner(
        i1.long(), j1.long(), k1.long(), x0 - f1[0] + _G3, y0 - f1[1] + _G3, z0 - f1[2] + _G3
    )
    f2 = (i2.to(x.dtype), j2.to(x.dtype), k2.to(x.dtype))
    n += corner(
        i2.long(), j2.long(), k2.long(),
        x0 - f2[0] + 2 * _G3, y0 - f2[1] + 2 * _G3, z0 - f2[2] + 2 * _G3,
    )  # fmt: skip
    n += corner(1, 1, 1, x0 - 1 + 3 * _G3, y0 - 1 + 3 * _G3, z0 - 1 + 3 * _G3)
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
    # float32 is exact enough: coordinates stay below ~400, where its spacing is ~3e-5.
    offset = torch.stack([torch.rand(3, generator=g) for g in gens]) * 256.0
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    xx, yy = xx.reshape(1, -1), yy.reshape(1, -1)
    out = torch.zeros((n, h * w), dtype=torch.float32)
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
    return out.reshape(b, c, h, w)


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
