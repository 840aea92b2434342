"""The bearer token every ``/v1`` route requires.

The token comes from ``MEDDIFF_SERVE_TOKEN``, else from a token file (default
``~/.meddiff/serve_token``). Requests are compared in constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from meddiff.errors import ConfigError

ENV = "MEDDIFF_SERVE_TOKEN"
DEFAULT_FILE = Path("~/.meddiff/serve_token")
MIN_LENGTH = 16


def token_path(token_file: str | Path | None = None) -> Path:
    return Path(token_file or DEFAULT_FILE).expanduser()


def load_token(token_file: str | Path | None = None) -> str:
    """The service token: ``MEDDIFF_SERVE_TOKEN`` if set, else the token file's content.

    Raises:
        ConfigError: neither is set, or the token is shorter than 16 characters.
    """
    token = os.environ.get(ENV, "").strip()
    source = ENV
    if not token:
        path = token_path(token_file)
        source = str(path)
        if not path.is_file():
            raise ConfigError(
                f"no serve token: set {ENV} or create {path} (`meddiff serve run` creates one)"
            )
        token = path.read_text().strip()
    if len(token) < MIN_LENGTH:
        raise ConfigError(f"serve token from {source} is shorter than {MIN_LENGTH} characters")
    return token


def ensure_token(token_file: str | Path | None = None) -> tuple[str, str]:
    """The token and where it is, creating a random token file (mode 600) when none exists."""
    if os.environ.get(ENV, "").strip():
        return load_token(token_file), f"${ENV}"
    path = token_path(token_file)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return load_token(path), str(path)


def authorized(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time compare)."""
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
