"""THOR's map arithmetic on batched tensors: anomaly maps, the harmonization mask, blending, and
the harmonic mean over steps. Every function takes and returns (B, 1, H, W) tensors with images in
[0, 1]; nothing here touches the network or the schedule.

The official code computes these in numpy/scipy one image at a time; these torch versions give the
same values (checked against scipy in the tests) for a whole batch at once:
- the LPIPS blur is a 2D Gaussian per image (scipy's ``gaussian_filter`` on the (B, 1, H, W)
  array of the reference would also blur across the batch axis when B > 1),
- max-normalisation is per image (the reference divides by the batch maximum),
- grey closing and dilation use a flat square window and edge replication (scipy mode 'nearest').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def residual(x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|x̂0 - x| per pixel."""
    return (x0 - x).abs()


def _symmetric_pad(m: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    # scipy's 'reflect' mode mirrors about the edge including the edge pixel (d c b a | a b c d),
    # which torch's 'reflect' padding does not; index with folded positions instead.
    if r == 0:
        return m
    n = m.shape[dim]
    idx = torch.arange(-r, n + r, device=m.device) % (2 * n)  # period 2n also handles r > n
    idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
    return m.index_select(dim, idx)


def gaussian_blur(m: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable 2D Gaussian blur of each (H, W) plane, as scipy's ``gaussian_filter``
    (kernel radius ``int(truncate * sigma + 0.5)``, mode 'reflect')."""
    if sigma <= 0:
        return m
    r = int(truncate * sigma + 0.5)
    xs = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    k = (k / k.sum()).to(m.dtype).to(m.device)
    b, c, h, w = m.shape
    planes = m.reshape(b * c, 1, h, w)
    planes = _symmetric_pad(planes, r, 3)
    planes = F.conv2d(planes, k.view(1, 1, 1, -1))
    planes = _symmetric_pad(planes, r, 2)
    planes = F.conv2d(planes, k.view(1, 1, -1, 1))
    return planes.reshape(b, c, h, w)


def normalize_max(m: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Divide each image's map by its own maximum, then clip to [0, 1]."""
    peak = m.amax(dim=(1, 2, 3), keepdim=True)
    return (m / (peak + eps)).clamp(0.0, 1.0)


def anomaly_map(
    x0: torch.Tensor,
    x: torch.Tensor,
    perceptual: torch.Tensor | None = None,
    sigma: float = 2.0,
) -> torch.Tensor:
    """One step's anomaly map: |x̂0 - x| × clip(blur_σ(LPIPS), 0, 1), max-normalised per image.

    ``perceptual`` is the spatial LPIPS map of (x̂0, x), (B, 1, H, W); None gives the
    residual-only map (LPIPS switched off).
    """
    m = residual(x0, x)
    if perceptual is not None:
        m = m * gaussian_blur(perceptual, sigma).clamp(0.0, 1.0)
    return normalize_max(m)


def grey_dilation(m: torch.Tensor, size: int) -> torch.Tensor:
    """Flat square grey dilation (running max over size×size), edges replicated."""
    if size <= 1:
        return m
    # scipy places an even window's centre one pixel early for dilation (and late for erosion,
    # its reflected footprint); these pads reproduce both.
    lo = (size - 1) // 2
    hi = size - 1 - lo
    padded = F.pad(m, (lo, hi, lo, hi), mode="replicate")
    return F.max_pool2d(padded, size, stride=1)


def grey_erosion(m: torch.Tensor, size: int) -> torch.Tensor:
    """Flat square grey erosion (running min over size×size), edges replicated."""
    if size <= 1:
        return m
    hi = (size - 1) // 2
    lo = size - 1 - hi
    padded = F.pad(-m, (lo, hi, lo, hi), mode="replicate")
    return -F.max_pool2d(padded, size, stride=1)


def grey_closing(m: torch.Tensor, size: int) -> torch.Tensor:
    """Dilation then erosion: fills dark gaps smaller than the window inside bright regions."""
    return grey_erosion(grey_dilation(m, size), size)


def harmonization_mask(m: torch.Tensor, size: int = 13) -> torch.Tensor:
    """THOR's refined mask m' = clip((dilate(close(m)) + m) / 2, 0, 1).

    Closing joins nearby detections into regions, dilation grows them so the lesion border is
    also regenerated; averaging with m keeps the original map's strength inside.
    """
    return ((grey_dilation(grey_closing(m, size), size) + m) / 2.0).clamp(0.0, 1.0)


def harmonize(x0: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """m'·x̂0 + (1 - m')·x, clipped to [0, 1]: regenerate where anomalous, keep the input elsewhere."""
    return (mask * x0 + (1.0 - mask) * x).clamp(0.0, 1.0)


def harmonic_mean(maps: torch.Tensor) -> torch.Tensor:
    """Per-pixel harmonic mean over the first axis of ``maps`` (K, B, 1, H, W).

    n / Σ 1/m_k; a pixel that is zero in any map gets 0 (the limit, and scipy's ``hmean``).
    """
    k = maps.shape[0]
    zero = (maps <= 0).any(dim=0)
    safe = torch.where(maps > 0, maps, torch.ones_like(maps))
    out = k / (1.0 / safe).sum(dim=0)
    return torch.where(zero, torch.zeros_like(out), out)
