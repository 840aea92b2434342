"""Input resolution: what a job reads, as the job needs it, from a local path or a URI alike.

Formats read in place (Parquet shards, PCam's HDF5 through :func:`cached_file`) need nothing here;
libraries that want a local file or folder (OpenSlide, a model directory, a folder of PNGs) get
one from :func:`local_input`: the path itself when local, else a copy fetched once per node into
``MEDDIFF_CACHE`` (objects are atomic; a folder must be a complete upload, vouched for by its
completion marker).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from meddiff.errors import DataError
from meddiff.storage.backends import filesystem, filesystem_path, is_uri, join, name, root_uri
from meddiff.storage.operations import (
    COMPLETE,
    _download_file,
    download_dir,
    info,
    is_dir,
    is_file,
    retry,
)

if TYPE_CHECKING:
    import pyarrow.fs


# The local copies this process made of object-store inputs (copy -> URI), so messages about a
# file in one name the object, not meddiff's cache (see :func:`name_uris`).
_copies: dict[str, str] = {}


def name_uris(text: str) -> str:
    """``text`` with every local copy of an object-store input this process fetched named by
    its URI (``~/.cache/meddiff/objects/<key>-images/a.png`` -> ``s3://lab/images/a.png``)."""
    for local in sorted(_copies, key=len, reverse=True):
        text = text.replace(local, _copies[local])
    return text


def cache_dir() -> Path:
    return Path(os.environ.get("MEDDIFF_CACHE", Path.home() / ".cache" / "meddiff"))


def cached_file(
    uri: str | Path, cache: str | Path | None = None, fs: pyarrow.fs.FileSystem | None = None
) -> Path:
    """A local copy of the file ``uri`` (itself when local), fetched once per node.

    The copy is keyed by URI, size and modification time and written to a temporary name then
    renamed, so a reader on the same node never takes a partial download for the file. Formats
    read with random access by a C library (HDF5) go through this.
    """
    if not is_uri(uri):
        return Path(uri)
    if fs is None:
        fs, inner = filesystem(uri)
    else:
        inner = filesystem_path(uri)
    found = retry(str(uri), lambda: fs.get_file_info(inner))
    if found.type.name != "File":
        raise DataError(f"{uri}: no such file or object")
    key = hashlib.sha1(f"{uri}:{found.size}:{found.mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache) if cache else cache_dir() / "objects"
    out = root / f"{key}-{name(uri)}"
    _copies[str(out)] = str(uri)
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    try:
        retry(str(uri), lambda: _download_file(fs, inner, tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def local_input(path: str | Path, cache: str | Path | None = None) -> Path:
    """A local file or directory with the contents of ``path``: itself when local; for a URI
    naming one object, :func:`cached_file`; else a copy of a complete uploaded prefix (see
    :func:`~meddiff.storage.upload_dir`) or of a folder inside one (``s3://b/run/model``),
    fetched once per node and content into ``MEDDIFF_CACHE``.

    Raises DataError naming ``path`` when it does not exist, or is a prefix without its
    completion marker (an interrupted upload, or files not uploaded by meddiff).
    """
    if not is_uri(path):
        return Path(path)
    path = str(path).rstrip("/")
    if is_file(path):
        return cached_file(path, cache)  # one object: PUTs are atomic, no marker needed
    found = _completion_marker(path)
    if found is None:
        if not is_dir(path):
            raise DataError(f"{path} does not exist")
        raise DataError(f"{path} is incomplete (no {COMPLETE}; was the upload interrupted?)")
    key = hashlib.sha1(f"{path}:{found.size}:{found.mtime_ns}".encode()).hexdigest()[:16]
    out = (Path(cache) if cache else cache_dir() / "objects") / f"{key}-{name(path)}"
    _copies[str(out)] = path
    if not out.is_dir():
        if not is_dir(path):
            raise DataError(f"{path} does not exist")
        out.parent.mkdir(parents=True, exist_ok=True)
        download_dir(path, out, marker=None)  # completeness checked above
    return out


@contextlib.contextmanager
def local_copy(path: str | Path) -> Iterator[Path]:
    """The folder ``path`` as a local folder for the block's duration: itself when local, else
    a private download (no completion marker needed: the caller vouches for it), removed after.
    """
    if not is_uri(path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="meddiff-copy-") as tmp:
        yield download_dir(str(path), Path(tmp) / name(path), marker=None)


def is_vouched(path: str | Path) -> bool:
    """Whether :func:`local_input` can hand over ``path`` as it is: any local path, one object,
    or a prefix a completion marker vouches for (its own or an enclosing upload's)."""
    if not is_uri(path):
        return True
    return is_file(path) or _completion_marker(str(path).rstrip("/")) is not None


def _completion_marker(uri: str) -> pyarrow.fs.FileInfo | None:
    """The completion marker vouching for ``uri``: its own, or that of an upload it lies in
    (``s3://b/run/model`` inside a complete ``s3://b/run``). None when there is none."""
    root = root_uri(uri)
    parts = uri[len(root) :].strip("/").split("/")
    for depth in range(len(parts), 0, -1):
        found = info(join(root, *parts[:depth], COMPLETE))
        if found.type.name == "File":
            return found
    return None


def localize(ref: str | Path) -> str | Path:
    """``ref`` with an object-store URI replaced by its local copy (:func:`local_input`); any
    other reference (a local path, a hub id, ``models:/...``) unchanged."""
    return local_input(ref) if is_uri(ref) else ref


def resolve(path: str | Path) -> str | Path:
    """A local path resolved (absolute, symlinks followed); a URI unchanged."""
    return path if is_uri(path) else Path(path).resolve()


def absolute(path: str | Path) -> str:
    """``path`` as recorded in provenance: a URI as given, a local path made absolute."""
    return str(path) if is_uri(path) else str(Path(path).absolute())


def as_uri(path: str | Path) -> str:
    """A URI for ``path``: itself for an object store, ``file://...`` for a local path."""
    return str(path) if is_uri(path) else Path(path).absolute().as_uri()


def make_dirs(path: str | Path) -> None:
    """Create the local folder ``path`` with its parents; nothing for an object store, whose
    folders exist as soon as an object is written under them."""
    if not is_uri(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def noun(path: str | Path) -> str:
    """What a folder at ``path`` is called in messages: a prefix (object store) or a directory."""
    return "prefix" if is_uri(path) else "directory"


def stamp(path: str | Path) -> list[list]:
    """``[name, size, mtime_ns]`` of ``path`` itself (a file) or of each file directly in it (a
    folder), sorted: what a cache key that must change with the input's files hashes."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    found = retry(str(path), lambda: fs.get_file_info(inner))
    if found.type == pafs.FileType.File:
        return [[name(path), found.size, found.mtime_ns]]
    selector = pafs.FileSelector(inner, allow_not_found=True, recursive=False)
    infos = retry(str(path), lambda: fs.get_file_info(selector))
    return sorted([i.base_name, i.size, i.mtime_ns] for i in infos if i.type == pafs.FileType.File)


def fetch(src: str | Path, dst: Path, *, marker: str | None = COMPLETE) -> Path:
    """``dst`` holding what is at ``src``: nothing to do when they are the same folder (a local
    stage), else a download (see :func:`~meddiff.storage.download_dir`)."""
    from meddiff import storage  # through the package: tests spy on its download_dir

    if str(src) == str(dst):
        return dst
    return storage.download_dir(str(src), dst, marker=marker)
