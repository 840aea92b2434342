"""Outputs written all or nothing: to a temporary name beside the target, then renamed, so a
reader (or a resumed job) never takes a half-written file or directory for a complete one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def write_bytes(path: Path, data: bytes) -> None:
    """``data`` at ``path``."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) at ``path``."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``."""
    write_text(path, json.dumps(data, indent=2, default=str))


def read_format_json(path: Path, fmt: str, error: type[Exception], missing: str) -> dict[str, Any]:
    """The JSON object at ``path``, which must say ``"format": fmt``.

    Raises ``error``: with the message ``missing`` when there is no such file (callers say what
    the directory should have been), or naming the file when it is corrupt or of another format.
    """
    if not path.is_file():
        raise error(missing)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: corrupt JSON ({err})") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found != fmt:
        raise error(f"{path}: format {found!r}, expected {fmt!r}")
    return data


def copy_tree(src: Path, dst: Path) -> None:
    """A copy of directory ``src`` at ``dst``, replacing what was there."""
    tmp = dst.with_name(dst.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def save_figure(fig: Any, path: Path) -> Path:
    """A matplotlib figure as PNG at ``path``; the figure is closed."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".partial.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
