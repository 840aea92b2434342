"""Object-store operations on a local path or a URI alike: queries, reads and writes, deletes,
directory uploads and downloads, each retried on transient errors with every attempt logged.

Object stores have no atomic rename of a directory, so the all-or-nothing rule is kept by a
marker: a directory-like output is complete only once its manifest or marker object exists, and
that object is written last (see :mod:`meddiff.data.shards` and
:mod:`meddiff.storage.location`).

Errors: a missing bucket or key, refused credentials or an unreachable endpoint raise
:class:`~meddiff.errors.DataError` with a one-line message naming the URI. Errors that may pass
(connection refused or reset, timeouts, throttling, HTTP 5xx) are retried a bounded number of
times (``storage.retries``) with each attempt logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from meddiff import files
from meddiff.errors import DataError
from meddiff.storage.backends import (
    AZURE,
    azure_endpoint,
    config,
    filesystem,
    first_line,
    gcs_endpoint,
    is_uri,
    join,
    s3_endpoint,
    split_uri,
)

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger("meddiff.storage")
T = TypeVar("T")

# Messages of errors that may pass if tried again (the AWS SDK's, surfaced by pyarrow as OSError).
_TRANSIENT = re.compile(
    r"connection refused|couldn't connect|could not connect|connection reset|timed out|timeout|"
    r"slow ?down|service unavailable|internal ?error|throttl|HTTP response code: 5\d\d|"
    r"curlCode: (?:6|7|28|52|56)|"
    # The Azure SDK's, surfaced by pyarrow as OSError.
    r"fail to get a new connection|connection closed before getting full response|"
    r"Azure Error: \[\w*\] 5\d\d|ServerBusy|OperationTimedOut",
    re.IGNORECASE,
)


def retry(what: str, fn: Callable[[], T], *, only_transient: bool = False) -> T:
    """``fn()``, tried again on transient errors up to ``storage.retries`` times (each attempt is
    logged); a permanent error, or the last transient one, becomes a one-line :class:`DataError`
    naming ``what``. With ``only_transient`` a permanent error is raised as it is (``fn`` runs
    other code whose errors say what is wrong themselves, e.g. a Ray Data write).

    Each attempt is bounded by ``storage.timeout_s`` per request (S3, GCS), so a store that
    stops answering costs at most about ``retries × timeout_s`` before the error.
    """
    attempts = max(1, config().retries)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as err:
            transient = _TRANSIENT.search(str(err)) is not None
            if only_transient and not transient:
                raise
            message = _explain(err)
            if not transient or attempt == attempts:
                suffix = f" (after {attempt} attempts)" if attempt > 1 else ""
                raise DataError(f"{what}: {message}{suffix}") from None
            wait = min(8.0, 0.5 * 2 ** (attempt - 1))
            log.warning(
                "%s: %s; attempt %d of %d, retrying in %.1f s",
                what,
                message,
                attempt,
                attempts,
                wait,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def explain_error(err: BaseException) -> DataError | None:
    """The one-line :class:`DataError` for an object-store failure anywhere in ``err``'s chain
    (raised in a Ray task, or by Ray Data or Ray Train with pyarrow), naming the endpoint;
    None when it is not one."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if isinstance(err, OSError) and re.search(r"AWS Error|Azure Error|google::cloud", text):
            return DataError(_explain(err))
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def _explain(err: BaseException) -> str:
    """A short, actionable reading of an object-store error."""
    text = str(err)
    checks = (
        ("ContainerNotFound", "no such container"),
        ("AuthenticationFailed", "credentials refused (check AZURE_STORAGE_ACCOUNT_KEY)"),
        ("AuthorizationFailure", "credentials refused (check AZURE_STORAGE_ACCOUNT_KEY)"),
        ("AuthorizationPermissionMismatch", "access denied (check the Azure credential's role)"),
        ("UNAUTHENTICATED", "credentials refused (check GOOGLE_APPLICATION_CREDENTIALS)"),
        ("PERMISSION_DENIED", "access denied (check the Google credential's role)"),
        ("NoSuchBucket", "no such bucket"),
        ("bucket does not exist", "no such bucket"),
        ("InvalidAccessKeyId", "credentials refused (check AWS_ACCESS_KEY_ID)"),
        ("INVALID_ACCESS_KEY_ID", "credentials refused (check AWS_ACCESS_KEY_ID)"),
        ("SignatureDoesNotMatch", "credentials refused (check AWS_SECRET_ACCESS_KEY)"),
        ("SIGNATURE_DOES_NOT_MATCH", "credentials refused (check AWS_SECRET_ACCESS_KEY)"),
        ("AccessDenied", "access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"),
        ("ACCESS_DENIED", "access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"),
    )
    for needle, meaning in checks:
        if needle.lower() in text.lower():
            return meaning
    if isinstance(err, FileNotFoundError) or "NoSuchKey" in text or "Path does not exist" in text:
        return "no such file or object"
    if _TRANSIENT.search(text) and "Azure Error" in text:
        detail = re.search(r"Could not connect|Azure Error: \[\w*\] \d+", text)
        where = azure_endpoint() or "Azure"
        return f"object store at {where} unreachable ({detail[0] if detail else first_line(err)})"
    if _TRANSIENT.search(text) and "google::cloud" in text:
        detail = re.search(r"Status\((\w+)", text)
        where = gcs_endpoint() or "Google Cloud Storage"
        return f"object store at {where} unreachable ({detail[1] if detail else first_line(err)})"
    if _TRANSIENT.search(text):
        endpoint = s3_endpoint()
        detail = re.search(r"AWS Error (\w+)", text)
        return (
            f"object store at {endpoint} unreachable ({detail[1] if detail else first_line(err)})"
        )
    return first_line(err)


# --- queries -------------------------------------------------------------------------------------


def info(path: str | Path) -> pyarrow.fs.FileInfo:
    """The file info of ``path`` (type NotFound when absent). A missing bucket is an error."""
    if not is_uri(path):
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem().get_file_info(str(Path(path).absolute()))
    fs, inner = filesystem(path)
    found = retry(str(path), lambda: fs.get_file_info(inner))
    if found.type.name == "NotFound":
        _check_bucket(path, fs, inner)
    return found


def _check_bucket(path: str | Path, fs: pyarrow.fs.FileSystem, inner: str) -> None:
    bucket = inner.split("/", 1)[0]
    if retry(str(path), lambda: fs.get_file_info(bucket)).type.name == "NotFound":
        word = "container" if split_uri(str(path))[0] in AZURE else "bucket"
        raise DataError(f"{path}: no such {word} '{bucket}'")


def is_file(path: str | Path) -> bool:
    return info(path).type.name == "File"


def is_dir(path: str | Path) -> bool:
    """A local directory, or an object prefix holding at least one object."""
    if not is_uri(path):
        return Path(path).is_dir()
    found = info(path)
    if found.type.name == "Directory":
        return True
    return found.type.name != "File" and bool(list_files(path, recursive=False, limit=1))


def exists(path: str | Path) -> bool:
    return is_file(path) or is_dir(path)


def list_files(path: str | Path, *, recursive: bool = True, limit: int | None = None) -> list[str]:
    """Names (relative to ``path``, ``/``-separated) of the files under ``path``, sorted.

    Empty for a missing prefix; DataError naming ``path`` for a missing bucket or container."""
    names = sorted(file_sizes(path, recursive=recursive))
    return names[:limit] if limit else names


def file_sizes(path: str | Path, *, recursive: bool = True) -> dict[str, int]:
    """Size in bytes of each file under ``path``, by name as :func:`list_files` gives it."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    selector = pafs.FileSelector(inner, allow_not_found=True, recursive=recursive)
    infos = retry(str(path), lambda: fs.get_file_info(selector))
    if not infos and is_uri(path):
        _check_bucket(path, fs, inner)
    return {i.path[len(inner) :].lstrip("/"): i.size for i in infos if i.type.name == "File"}


# --- reading and writing -------------------------------------------------------------------------


def read_bytes(path: str | Path) -> bytes:
    """The whole file at ``path``. Raises DataError naming it when absent or unreadable."""
    if not is_uri(path):
        try:
            return Path(path).read_bytes()
        except OSError as err:
            raise DataError(f"{path}: {err.strerror or err}") from None
    fs, inner = filesystem(path)

    def read() -> bytes:
        with fs.open_input_stream(inner) as f:
            return f.read()

    try:
        return retry(str(path), read)
    except DataError as err:
        if "no such file" in str(err):
            _check_bucket(path, fs, inner)
        raise


def read_text(path: str | Path) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` at ``path``, all or nothing: a local file is written beside and renamed; an object
    PUT is atomic already (readers see the old object or the new one, never part)."""
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        files.write_bytes(Path(path), data)
        return
    fs, inner = filesystem(path)

    def write() -> None:
        with _open_output(fs, inner) as f:
            f.write(data)

    retry(str(path), write)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` and a newline to the text file at ``path`` (created with its parents when
    absent). An object cannot be appended to: it is read and written whole, so ``path`` must
    have one writer at a time (e.g. rank 0 of a training run)."""
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
        return
    before = read_text(path) if is_file(path) else ""
    write_text(path, before + line + "\n")


def delete_dir(path: str | Path, *, keep: Sequence[str] = ()) -> None:
    """Remove ``path`` and everything under it (nothing if absent), except the sub-folders named
    in ``keep`` (object stores only: e.g. the Ray Train checkpoints a job writes there itself)."""
    if not is_uri(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, inner = filesystem(path)
    # Delete the marker first, so a half-deleted output never keeps looking complete. Only
    # objects listed: deleting an absent one costs Azure a failed lease, and Azurite a slow error.
    names = [n for n in list_files(path) if n.split("/", 1)[0] not in keep]
    for rel in [m for m in MARKERS if m in names] + [n for n in names if n not in MARKERS]:
        retry(str(path), lambda r=rel: _delete_file(fs, f"{inner}/{r}"))
    if split_uri(str(path))[0] in (*AZURE, "s3") and "/" in inner and not keep:
        # pyarrow emulates directories on S3 and on Azure's flat namespace: a delete leaves an
        # empty marker object for each folder it emptied; drop them so the prefix no longer
        # "exists" (a failed job's output must not ask the next run for --overwrite). Not with
        # ``keep``: deleting a folder deletes what is in it.
        retry(str(path), lambda: _delete_tree(fs, inner))


def _delete_file(fs: pyarrow.fs.FileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def _delete_tree(fs: pyarrow.fs.FileSystem, path: str) -> None:
    """Remove the (emptied) folders under ``path`` and ``path`` itself, deepest first: SeaweedFS
    keeps a folder whose marker is deleted while a subfolder still exists, and goes on listing it."""
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(path, allow_not_found=True, recursive=True)
    folders = [i.path for i in fs.get_file_info(selector) if i.type.name == "Directory"]
    for folder in [*sorted(folders, key=lambda p: p.count("/"), reverse=True), path]:
        with contextlib.suppress(FileNotFoundError):
            fs.delete_dir(folder)


# Files whose presence says a directory-like output is complete; written last, deleted first.
COMPLETE = "_meddiff_complete.json"
MARKERS = ("_meddiff_shards.json", COMPLETE)


def delete_files(path: str | Path, names: Sequence[str]) -> None:
    """Delete the files ``names`` (relative to the folder ``path``, in this order; absent ones
    are skipped), then the folders they leave empty (``path`` too, if it ends up empty): an
    emptied output must not go on "existing". Nothing else under ``path`` is touched."""
    if not names:
        return
    fs, inner = filesystem(path)
    for rel in names:
        retry(str(join(path, rel)), lambda r=rel: _delete_file(fs, f"{inner}/{r}"))
    folders = {""}
    for rel in names:
        parts = rel.split("/")[:-1]
        folders.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    for folder in sorted(folders, key=lambda f: (f.count("/"), len(f)), reverse=True):
        where = f"{inner}/{folder}".rstrip("/")
        retry(str(join(path, folder)) if folder else str(path), lambda w=where: _prune(fs, w))


def _prune(fs: pyarrow.fs.FileSystem, folder: str) -> None:
    """Remove ``folder`` if nothing is left in it (never a bucket: no ``/`` in its path)."""
    import pyarrow.fs as pafs

    if "/" not in folder.strip("/"):
        return
    selector = pafs.FileSelector(folder, allow_not_found=True, recursive=False)
    if fs.get_file_info(selector):
        return
    with contextlib.suppress(FileNotFoundError):
        if fs.get_file_info(folder).type == pafs.FileType.Directory:
            fs.delete_dir(folder)


def upload_file(src: Path, dst: str | Path) -> None:
    """Copy the local file ``src`` to ``dst`` (a local path, its folders made, or a URI)."""
    fs, inner = filesystem(dst)
    with open(src, "rb") as f, _open_output(fs, inner) as out:
        shutil.copyfileobj(f, out, length=8 * 2**20)


def _open_output(fs: pyarrow.fs.FileSystem, inner: str):
    """``fs.open_output_stream(inner)``; on a filesystem with real folders (local, or a local
    stand-in for a bucket) the missing folders are made first."""
    try:
        return fs.open_output_stream(inner)
    except FileNotFoundError:
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        return fs.open_output_stream(inner)


def is_complete(uri: str | Path, marker: str = COMPLETE) -> bool:
    return is_file(join(uri, marker))


def download_dir(uri: str, dst: str | Path, *, marker: str | None = COMPLETE) -> Path:
    """Copy the object prefix ``uri`` into the local directory ``dst`` (all or nothing), less
    its completion marker.

    Raises DataError when the prefix is absent, or (with ``marker``) incomplete.
    """
    if marker and not is_complete(uri, marker):
        if not is_dir(uri):
            raise DataError(f"{uri} does not exist")
        raise DataError(f"{uri} is incomplete (no {marker}; was the upload interrupted?)")
    dst = Path(dst)
    tmp = dst.with_name(dst.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fs, inner = filesystem(uri)
    tmp.mkdir(parents=True)
    # The completion marker is the store's bookkeeping, not content: a folder of PNGs stays one.
    for rel in [r for r in list_files(uri) if r != COMPLETE]:
        out = tmp / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        retry(f"{uri}/{rel}", lambda r=rel, o=out: _download_file(fs, f"{inner}/{r}", o))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def _download_file(fs: pyarrow.fs.FileSystem, src: str, dst: Path) -> None:
    with fs.open_input_stream(src) as f, open(dst, "wb") as out:
        shutil.copyfileobj(f, out, length=8 * 2**20)
