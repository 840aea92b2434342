"""Known image degradations, for checking that a fidelity metric orders them (the FID tests and
``benchmarks/fid_degradations.py`` use the same ones)."""

from __future__ import annotations

import io

import numpy as np


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each image over its rows and columns (not across images or channels).

    ``images``: uint8, (N, H, W, C); ``sigma`` in pixels (> 0). Returns uint8 of the same shape
    (reflected edges, rounded and clipped to 0..255).
    """
    from scipy.ndimage import gaussian_filter

    out = gaussian_filter(images.astype(np.float32), sigma=(0, sigma, sigma, 0), mode="reflect")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """Each RGB image saved as JPEG at ``quality`` (Pillow's 1..95 scale) and decoded again.

    ``images``: uint8, (N, H, W, 3). Returns uint8 of the same shape.
    """
    from PIL import Image

    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out
