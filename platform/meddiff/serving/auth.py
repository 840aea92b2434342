"""Named bearer tokens for every ``/v1`` route.

Ray's token auth (``RAY_AUTH_MODE=token``) covers the jobs API, not Serve's HTTP port, so the
ingress checks a bearer token itself. A service accepts tokens from:

- a **credentials file** (``args.credentials_file``, default ``~/.meddiff/serve_credentials.yaml``):
  a YAML mapping of name → ``sha256:<hex>``, the SHA-256 of the token (never the token). It is
  re-read when it changes (checked at most once a second), so a token is added, rotated or
  revoked without a restart (``meddiff serve token add | rotate | revoke NAME``);
- ``MEDDIFF_SERVE_CREDENTIALS``: the same mapping as YAML/JSON text (fixed for the process);
- a **token file** (``args.token_file``, default ``~/.meddiff/serve_token``): one plain token,
  name ``default`` (what ``meddiff serve run`` creates when nothing else is set); re-read on
  change too;
- ``MEDDIFF_SERVE_TOKEN``: one plain token, name ``env``.

A request's token is hashed and compared with every stored hash in constant time
(``hmac.compare_digest``, no early exit), so the answer time does not depend on which name or
how much of a hash matched. The tokens are 256-bit random strings (``secrets.token_urlsafe(32)``),
for which one SHA-256 is enough (a slow password hash is for guessable secrets). The name that
matched goes into the audit log; a token itself is never logged or printed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path

import yaml

from meddiff.errors import ConfigError

log = logging.getLogger(__name__)

ENV = "MEDDIFF_SERVE_TOKEN"
CREDENTIALS_ENV = "MEDDIFF_SERVE_CREDENTIALS"
DEFAULT_FILE = Path("~/.meddiff/serve_token")
DEFAULT_CREDENTIALS = Path("~/.meddiff/serve_credentials.yaml")
DEFAULT_TOKEN_DIR = Path("~/.meddiff/tokens")
MIN_LENGTH = 16
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def token_path(token_file: str | Path | None = None) -> Path:
    return Path(token_file or DEFAULT_FILE).expanduser()


def credentials_path(credentials_file: str | Path | None = None) -> Path:
    return Path(credentials_file or DEFAULT_CREDENTIALS).expanduser()


def digest(token: str) -> str:
    """``sha256:<hex>`` of a token, as a credentials file stores it."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def parse_credentials(text: str, source: str) -> dict[str, str]:
    """name → ``sha256:<hex>`` from YAML/JSON text.

    Raises:
        ConfigError: not a mapping, a bad name or a value that is not ``sha256:`` + 64 hex
            digits (named with ``source``; the value is never echoed).
    """
    try:
        data = yaml.safe_load(text) or {}  # empty, or comments only: no tokens
    except yaml.YAMLError:
        raise ConfigError(f"credentials {source}: not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"credentials {source}: expected a mapping of name: sha256:<hex>")
    out = {}
    for name, value in data.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"credentials {source}: bad name (letters, digits, _ . -; ≤ 64)")
        if not isinstance(value, str) or not HASH.match(value):
            raise ConfigError(
                f"credentials {source}: '{name}' is not sha256:<64 hex digits> "
                "(store the token's hash, never the token)"
            )
        out[name] = value
    return out


def _plain_token(path: Path) -> str:
    token = path.read_text().strip()
    if len(token) < MIN_LENGTH:
        raise ConfigError(f"serve token in {path} is shorter than {MIN_LENGTH} characters")
    return token


class Credentials:
    """The accepted tokens of one service: name → hash, re-read when a file changes.

    A file that becomes unreadable or invalid contributes no token until it is fixed (fail
    closed: a half-edited file never lets an old, possibly revoked token in); the error is logged
    once per change.
    """

    def __init__(
        self,
        token_file: str | Path | None = None,
        credentials_file: str | Path | None = None,
        check_every_s: float = 1.0,
    ):
        self.token_file = token_path(token_file)
        self.credentials_file = credentials_path(credentials_file)
        self.check_every_s = check_every_s
        self._fixed: dict[str, str] = {}
        token = os.environ.get(ENV, "").strip()
        if token:
            if len(token) < MIN_LENGTH:
                raise ConfigError(f"serve token from {ENV} is shorter than {MIN_LENGTH} characters")
            self._fixed["env"] = digest(token)
        if os.environ.get(CREDENTIALS_ENV, "").strip():
            self._fixed.update(
                parse_credentials(os.environ[CREDENTIALS_ENV], f"${CREDENTIALS_ENV}")
            )
        self._stamps: dict[Path, tuple | None] = {}
        self._from_files: dict[Path, dict[str, str]] = {}
        self._checked = 0.0
        self._lock = threading.Lock()
        self._refresh(force=True, strict=True)
        if not self.names():
            raise ConfigError(
                f"no serve token: set {ENV}, write {self.credentials_file} (`meddiff serve token "
                f"add NAME`) or {self.token_file} (`meddiff serve run` creates one)"
            )

    def names(self) -> list[str]:
        return sorted(self._table())

    def _table(self) -> dict[str, str]:
        out = dict(self._fixed)
        for table in self._from_files.values():
            out.update(table)
        return out

    def _refresh(self, force: bool = False, strict: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.check_every_s:
            return
        with self._lock:
            self._checked = now
            for path, reader in ((self.token_file, self._read_token),
                                 (self.credentials_file, self._read_credentials)):  # fmt: skip
                stamp = _stamp(path)
                if not force and stamp == self._stamps.get(path):
                    continue
                self._stamps[path] = stamp
                try:
                    self._from_files[path] = {} if stamp is None else reader(path)
                except (ConfigError, OSError) as err:
                    if strict:
                        raise ConfigError(str(err).splitlines()[0]) from None
                    self._from_files[path] = {}
                    log.error("serve credentials: %s; no token from it is accepted", err)
                else:
                    if not force:
                        log.info("serve credentials: re-read %s (%d names)", path,
                                 len(self._from_files[path]))  # fmt: skip

    @staticmethod
    def _read_token(path: Path) -> dict[str, str]:
        return {"default": digest(_plain_token(path))}

    @staticmethod
    def _read_credentials(path: Path) -> dict[str, str]:
        return parse_credentials(path.read_text(), str(path))

    def identify(self, header: str | None) -> str | None:
        """The name of the token an ``Authorization: Bearer <token>`` header carries, or None
        (missing header, another scheme, unknown or revoked token). The scheme is
        case-insensitive (RFC 7235); every stored hash is compared, in constant time."""
        if not header:
            return None
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        self._refresh()
        wanted = digest(given.strip()).encode()
        found = None
        for name, stored in self._table().items():
            if hmac.compare_digest(wanted, stored.encode()):
                found = name
        return found


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def has_credentials(token_file=None, credentials_file=None) -> bool:
    """Whether any token source is set (env vars, or either file exists)."""
    return bool(
        os.environ.get(ENV, "").strip()
        or os.environ.get(CREDENTIALS_ENV, "").strip()
        or token_path(token_file).is_file()
        or credentials_path(credentials_file).is_file()
    )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (mode 600) atomically: a reader sees the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def ensure_token(token_file: str | Path | None = None, credentials_file=None) -> str:
    """Where the service's tokens are, creating a random token file (mode 600) when no token
    source exists. Returns a description of the sources (never a token)."""
    path = token_path(token_file)
    if not has_credentials(token_file, credentials_file):
        _write_private(path, secrets.token_urlsafe(32) + "\n")
    where = [f"${n}" for n in (ENV, CREDENTIALS_ENV) if os.environ.get(n, "").strip()]
    where += [str(p) for p in (path, credentials_path(credentials_file)) if p.is_file()]
    return ", ".join(where)


def read_token(token_file: str | Path | None = None) -> str:
    """The plain token of a token file (for a client on this machine: tests, the demo),
    creating the file (random, mode 600) when it does not exist."""
    path = token_path(token_file)
    if not path.is_file():
        _write_private(path, secrets.token_urlsafe(32) + "\n")
    return _plain_token(path)


def set_token(name: str, credentials_file=None, token_dir=None, rotate: bool = False) -> Path:
    """Create (or, with ``rotate``, replace) the token ``name``: a new random token is written to
    ``token_dir/NAME.token`` (mode 600) and its hash to the credentials file; running services
    accept it within a second. Returns the token file's path.

    Raises:
        ConfigError: a bad name; ``name`` exists (without ``rotate``) or not (with it).
    """
    if not NAME.match(name):
        raise ConfigError(f"token name '{name}': letters, digits, _ . - only (≤ 64)")
    cred = credentials_path(credentials_file)
    table = parse_credentials(cred.read_text(), str(cred)) if cred.is_file() else {}
    if rotate and name not in table:
        raise ConfigError(f"no token named '{name}' in {cred}; known: {', '.join(table) or 'none'}")
    if not rotate and name in table:
        raise ConfigError(f"a token named '{name}' exists in {cred}; use `rotate` to replace it")
    token = secrets.token_urlsafe(32)
    out = Path(token_dir or DEFAULT_TOKEN_DIR).expanduser() / f"{name}.token"
    _write_private(out, token + "\n")
    table[name] = digest(token)
    _write_private(cred, _dump(table))
    return out


def revoke(name: str, credentials_file=None) -> Path:
    """Remove ``name`` from the credentials file (running services refuse it within a second).

    Raises:
        ConfigError: no such name.
    """
    cred = credentials_path(credentials_file)
    table = parse_credentials(cred.read_text(), str(cred)) if cred.is_file() else {}
    if name not in table:
        raise ConfigError(f"no token named '{name}' in {cred}; known: {', '.join(table) or 'none'}")
    del table[name]
    _write_private(cred, _dump(table))
    return cred


def _dump(table: dict[str, str]) -> str:
    head = "# meddiff serve credentials: name: sha256 of the token (never the token itself)\n"
    return head + "".join(f"{k}: {v}\n" for k, v in sorted(table.items()))
