"""Request limits: body size (413), content type (415) and PNG decoding (422), checked in the
ingress before anything reaches a model. Only PNG bytes, DICOM files and JSON are decoded (PNG
by Pillow, header first; DICOM by pydicom, :mod:`meddiff.serving.clinical`); nothing a client
sends reaches a pickle loader. The token and a declared
``Content-Length`` are checked earlier still, before any body is read
(:class:`meddiff.serving.api.Guard`)."""

from __future__ import annotations

import numpy as np
from fastapi import HTTPException, Request

from meddiff.config.data import ImageConfig
from meddiff.data.images import decode_png
from meddiff.errors import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing more than ``max_bytes`` (413) without reading it all: by the
    declared ``Content-Length`` first, then while a chunked body streams."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, "Content-Length is not a number") from None
        if size > max_bytes:
            raise HTTPException(413, f"request body exceeds {max_bytes} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise HTTPException(413, f"request body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def require_content_type(request: Request, *expected: str) -> str:
    """The request's ``Content-Type`` (parameters aside, lower case); 415 unless it is one of
    ``expected``. Checked before the body is read."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in expected:
        shown = ctype if ctype and len(ctype) <= 60 and ctype.isprintable() else "none or invalid"
        raise HTTPException(415, f"Content-Type must be {' or '.join(expected)}, got '{shown}'")
    return ctype


def require_png(body: bytes) -> None:
    """422 for an empty body, 415 for bytes that do not start like a PNG."""
    if not body:
        raise HTTPException(422, "body: empty; expected a PNG image")
    if not body.startswith(PNG_MAGIC):
        raise HTTPException(415, "body: not a PNG file (no PNG signature)")


def decode_slice(body: bytes, size: int, images: ImageConfig | None = None) -> np.ndarray:
    """PNG bytes → float32 (size, size) in [0, 1] (8- or 16-bit grayscale, scaled by
    ``images`` = ``data.images`` as ``thor detect`` scales files), else 422."""
    from meddiff.serving.api import clean

    try:
        return decode_png(body, "body", size, images)
    except DataError as err:
        raise HTTPException(422, clean(err)) from None
