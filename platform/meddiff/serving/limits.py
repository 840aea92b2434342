"""Request limits: body size (413), content type (415) and PNG decoding (422), checked in the
ingress before anything reaches a model. Only PNG bytes are decoded (by Pillow, header first);
nothing a client sends reaches a pickle loader."""

from __future__ import annotations

import numpy as np
from fastapi import HTTPException, Request

from meddiff.config.data import ImageConfig
from meddiff.data.images import decode_png
from meddiff.errors import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing more than ``max_bytes`` (413) without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, "Content-Length is not a number") from None
        if size > max_bytes:
            raise HTTPException(413, f"request body of {size} bytes exceeds {max_bytes} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise HTTPException(413, f"request body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def require_png(request: Request, body: bytes) -> None:
    """415 unless the request says ``Content-Type: image/png`` and the bytes start like a PNG."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "image/png":
        raise HTTPException(
            415, f"Content-Type must be image/png (the slice as PNG bytes), got '{ctype or 'none'}'"
        )
    if not body:
        raise HTTPException(422, "body: empty; expected a PNG image")
    if not body.startswith(PNG_MAGIC):
        raise HTTPException(415, "body: not a PNG file (no PNG signature)")


def decode_slice(body: bytes, size: int, images: ImageConfig | None = None) -> np.ndarray:
    """PNG bytes → float32 (size, size) in [0, 1] (8- or 16-bit grayscale, scaled by
    ``images`` = ``data.images`` as ``thor detect`` scales files), else 422."""
    try:
        return decode_png(body, "body", size, images)
    except DataError as err:
        raise HTTPException(422, str(err)) from None
