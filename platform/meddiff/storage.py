"""Where inputs and outputs live: a local path or an object-store URI, through one API.

Every path a job takes may be a local path or a URI: ``s3://bucket/prefix`` (tested against
SeaweedFS), ``abfs://container/prefix`` (Azure Blob Storage / ADLS Gen2, tested against Azurite),
``gs://bucket/prefix`` (tested against gcp-storage-emulator), and ``hdfs://`` through pyarrow's
own URI resolution (untested). Files are read and written through :mod:`pyarrow.fs`, whose
filesystem objects pickle, so Ray Data's native Parquet reader and writer and Ray tasks on any
node use the same one.

S3 settings: credentials come from the usual AWS sources (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` environment variables, a profile or an instance role); the endpoint
(an S3-compatible server such as SeaweedFS or MinIO) from ``storage.endpoint_url``, else
``AWS_ENDPOINT_URL``.

Azure settings (``abfs://container/path``, ``abfss://...``, or
``abfs://container@ACCOUNT.dfs.core.windows.net/path``): the account from the URI, else the
endpoint's path, else ``AZURE_STORAGE_ACCOUNT_NAME`` (or ``AZURE_STORAGE_ACCOUNT``); the
credential from ``AZURE_STORAGE_ACCOUNT_KEY`` (or ``AZURE_STORAGE_KEY``), else
``AZURE_STORAGE_SAS_TOKEN``, else a service principal (``AZURE_CLIENT_ID``/``AZURE_CLIENT_SECRET``/
``AZURE_TENANT_ID``), else Azure's default credential chain (managed identity...); the endpoint
(an emulator such as Azurite, or a private endpoint) from ``storage.azure_endpoint``, else
``AZURE_STORAGE_SERVICE_ENDPOINT`` (the variable the ``az`` CLI reads), else
``https://ACCOUNT.blob.core.windows.net``. An endpoint ``http[s]://host[:port][/ACCOUNT]`` is
addressed path-style (Azurite, a private endpoint); one ``https://ACCOUNT.blob.SUFFIX`` (another
Azure cloud) keeps Azure's ``ACCOUNT.blob.SUFFIX`` / ``ACCOUNT.dfs.SUFFIX`` hosts.

GCS settings: credentials from Google's default chain (``GOOGLE_APPLICATION_CREDENTIALS``, the
metadata server), resolved on each node (pyarrow's GCS filesystem cannot carry a key file); the
endpoint (an emulator) from ``storage.gcs_endpoint``, else ``STORAGE_EMULATOR_HOST``; with an
endpoint and no ``GOOGLE_APPLICATION_CREDENTIALS`` requests are anonymous, as emulators expect.

Object stores have no atomic rename of a directory, so the all-or-nothing rule is kept by a
marker: a directory-like output is complete only once its manifest or marker object exists, and
that object is written last (see :mod:`meddiff.data.shards` and :func:`upload_dir`).

Errors: a missing bucket or key, refused credentials or an unreachable endpoint raise
:class:`~meddiff.errors.DataError` with a one-line message naming the URI. Errors that may pass
(connection refused or reset, timeouts, throttling, HTTP 5xx) are retried a bounded number of
times (``storage.retries``) with each attempt logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlparse

from meddiff import files
from meddiff.errors import DataError

if TYPE_CHECKING:
    import pyarrow.fs

    from meddiff.config import StorageConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

# URI schemes that pyarrow's filesystems serve (``file`` is handled as a local path).
SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")
AZURE = ("abfs", "abfss")
GCS = ("gs", "gcs")
_settings: StorageConfig | None = None

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


def configure(cfg: StorageConfig) -> None:
    """Use ``cfg`` (endpoints, region, retries) for every URI this process opens from now on.

    The endpoints are also exported as ``AWS_ENDPOINT_URL``, ``AZURE_STORAGE_SERVICE_ENDPOINT``
    and ``STORAGE_EMULATOR_HOST`` (when unset) so processes started later, such as the workers
    of an embedded Ray, find the same servers.
    """
    global _settings
    _settings = cfg
    if cfg.endpoint_url:
        os.environ.setdefault("AWS_ENDPOINT_URL", cfg.endpoint_url)
    if cfg.azure_endpoint:
        os.environ.setdefault("AZURE_STORAGE_SERVICE_ENDPOINT", cfg.azure_endpoint)
    if cfg.gcs_endpoint:
        os.environ.setdefault("STORAGE_EMULATOR_HOST", cfg.gcs_endpoint)


def _config() -> StorageConfig:
    from meddiff.config import StorageConfig

    return _settings or StorageConfig()


def is_uri(path: str | Path) -> bool:
    """True for an object-store URI (``s3://...``), False for a local path."""
    return isinstance(path, str) and urlparse(path).scheme in SCHEMES


def path_arg(text: str) -> str | Path:
    """An argparse ``type``: a URI stays a string (``Path`` would fold ``s3://`` to ``s3:/``)."""
    return text if is_uri(text) else Path(text)


def join(base: str | Path, *names: str) -> str | Path:
    """``base`` / ``names``: a URI stays a URI (forward slashes), a local path a ``Path``."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *names])
    return Path(base).joinpath(*names)


def name(path: str | Path) -> str:
    """The last component of a path or URI."""
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def filesystem(path: str | Path) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem that serves ``path`` and the path inside it.

    For ``s3://``, ``abfs://`` and ``gs://`` the endpoint and credentials come from the settings
    and the environment (module docstring); other schemes use pyarrow's own resolution
    (``FileSystem.from_uri``). Raises DataError naming ``path`` when it cannot be opened (no
    Azure account known, an unknown scheme's URI pyarrow refuses).
    """
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).absolute())
    path = str(path)
    parsed = urlparse(path)
    shipped = _shipped.get(f"{parsed.scheme}://{parsed.netloc}")
    if shipped is not None:
        return shipped, filesystem_path(path)
    if parsed.scheme in AZURE:
        return _azure_filesystem(path), filesystem_path(path)
    if parsed.scheme in GCS:
        return _gcs_filesystem(), filesystem_path(path)
    if parsed.scheme != "s3":
        try:
            return pafs.FileSystem.from_uri(path)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot open this filesystem ({_first_line(err)})") from None
    cfg = _config()
    endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict = {
        "region": region or "us-east-1",
        "connect_timeout": cfg.timeout_s,
        "request_timeout": cfg.timeout_s,
        # Our own retry loop (``retry``) logs its attempts; the SDK's would retry silently.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    }
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # Explicit, so the pickled filesystem that Ray ships to workers carries them: a worker
        # started before they were set (or on a node without them) authenticates the same way.
        kwargs.update(
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            session_token=os.environ.get("AWS_SESSION_TOKEN"),
        )
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")


# Filesystems a driver built and shipped to this process (see ``use_filesystem``), by bucket.
_shipped: dict[str, pyarrow.fs.FileSystem] = {}


def use_filesystem(uri: str, fs: pyarrow.fs.FileSystem) -> None:
    """Open every URI in ``uri``'s bucket (or container) with ``fs`` in this process.

    For Ray workers: ``fs`` is what :func:`filesystem` built on the driver, pickled with its
    endpoint and credentials (as Ray Train's own ``storage_filesystem`` is), so a worker whose
    environment lacks them (started before they were set, or on a node without them) reads and
    writes the same store the driver does.
    """
    parsed = urlparse(uri)
    _shipped[f"{parsed.scheme}://{parsed.netloc}"] = fs


def _azure_endpoint() -> str | None:
    return _config().azure_endpoint or os.environ.get("AZURE_STORAGE_SERVICE_ENDPOINT")


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _azure_filesystem(uri: str) -> pyarrow.fs.AzureFileSystem:
    """pyarrow's Azure filesystem for ``uri`` (its root is the storage account: paths inside it
    are ``container/path``), with the endpoint of the settings and the credential of the
    environment passed explicitly, so the pickled filesystem that Ray ships to a worker (started
    before they were set, or on a node without them) carries them."""
    import pyarrow.fs as pafs

    host = urlparse(uri).netloc.partition("@")[2]  # container@ACCOUNT.dfs.core.windows.net
    endpoint = _azure_endpoint()
    url = urlparse(endpoint) if endpoint else None
    # ACCOUNT.blob.SUFFIX: Azure's own naming (another cloud's suffix), not a path-style server.
    named = url.hostname.partition(".blob.") if url and url.hostname else ("", "", "")
    account = (
        host.split(".", 1)[0]
        or (url.path.strip("/") if url else "")
        or (named[0] if named[1] else "")
        or _env("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT")
    )
    if not account:
        raise DataError(
            f"{uri}: no Azure storage account (set AZURE_STORAGE_ACCOUNT_NAME, or write "
            "abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH)"
        )
    kwargs: dict = {}
    if url:
        # pyarrow prefixes the account to an authority starting with "." (ACCOUNT.blob.SUFFIX)
        # and puts it first in the path otherwise (an emulator or private endpoint).
        blob = dfs = url.netloc
        if named[1]:
            blob, dfs = f".blob.{named[2]}", f".dfs.{named[2]}"
        kwargs.update(
            blob_storage_authority=blob,
            dfs_storage_authority=dfs,
            blob_storage_scheme=url.scheme,
            dfs_storage_scheme=url.scheme,
        )
    key = _env("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_KEY")
    sas = _env("AZURE_STORAGE_SAS_TOKEN")
    principal = [_env(n) for n in ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID")]
    if key:
        kwargs["account_key"] = key
    elif sas:
        kwargs["sas_token"] = sas
    elif all(principal):
        kwargs.update(zip(("client_id", "client_secret", "tenant_id"), principal, strict=True))
    try:
        return pafs.AzureFileSystem(account, **kwargs)
    except (OSError, ValueError) as err:
        raise DataError(f"{uri}: cannot open this filesystem ({_first_line(err)})") from None


def _gcs_endpoint() -> str | None:
    return _config().gcs_endpoint or os.environ.get("STORAGE_EMULATOR_HOST")


def _gcs_filesystem() -> pyarrow.fs.GcsFileSystem:
    import datetime

    import pyarrow.fs as pafs

    kwargs: dict = {
        # pyarrow's own retries are silent; ours (``retry``) log each attempt.
        "retry_time_limit": datetime.timedelta(seconds=_config().timeout_s),
        "project_id": os.environ.get("GOOGLE_CLOUD_PROJECT"),
    }
    endpoint = _gcs_endpoint()
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
        kwargs["anonymous"] = not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    return pafs.GcsFileSystem(**kwargs)


def filesystem_path(uri: str | Path) -> str:
    """The path inside its filesystem of a URI: ``bucket/key`` for ``s3://bucket/key``,
    ``container/path`` for ``abfs://container/path`` and
    ``abfs://container@account.dfs.core.windows.net/path``."""
    if not is_uri(uri):
        return str(Path(uri).absolute())
    parsed = urlparse(str(uri))
    root = parsed.netloc
    if parsed.scheme in AZURE:
        root = root.partition("@")[0]
    return f"{root}{parsed.path}".rstrip("/")


def retry(what: str, fn: Callable[[], T]) -> T:
    """``fn()``, tried again on transient errors up to ``storage.retries`` times (each attempt is
    logged); a permanent error, or the last transient one, becomes a one-line :class:`DataError`
    naming ``what``."""
    attempts = max(1, _config().retries)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FileNotFoundError as err:
            raise DataError(f"{what}: {_explain(err)}") from None
        except OSError as err:
            message = _explain(err)
            if not _TRANSIENT.search(str(err)) or attempt == attempts:
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


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
        where = _azure_endpoint() or "Azure"
        return f"object store at {where} unreachable ({detail[0] if detail else _first_line(err)})"
    if _TRANSIENT.search(text) and "google::cloud" in text:
        detail = re.search(r"Status\((\w+)", text)
        where = _gcs_endpoint() or "Google Cloud Storage"
        return f"object store at {where} unreachable ({detail[1] if detail else _first_line(err)})"
    if _TRANSIENT.search(text):
        endpoint = _config().endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
        detail = re.search(r"AWS Error (\w+)", text)
        return (
            f"object store at {endpoint} unreachable ({detail[1] if detail else _first_line(err)})"
        )
    return _first_line(err)


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
        word = "container" if urlparse(str(path)).scheme in AZURE else "bucket"
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
        files.write_bytes(Path(path), data)
        return
    fs, inner = filesystem(path)

    def write() -> None:
        with fs.open_output_stream(inner) as f:
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
    if urlparse(str(path)).scheme in (*AZURE, "s3") and "/" in inner and not keep:
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


def upload_dir(
    local: str | Path, uri: str, *, marker: str | None = COMPLETE, keep: Sequence[str] = ()
) -> list[str]:
    """Copy the local directory ``local`` to ``uri`` (replacing what was there but the
    sub-folders in ``keep``), then write ``marker`` (a JSON list of the files) last, so a reader
    can tell a complete upload.

    Returns the uploaded names. A file named like the marker in ``local`` is uploaded last too.
    """
    import json

    local = Path(local)
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    delete_dir(uri, keep=keep)
    fs, inner = filesystem(uri)
    last = [n for n in names if n in MARKERS]
    for rel in [n for n in names if n not in MARKERS] + last:
        retry(
            f"{uri}/{rel}",
            lambda r=rel: _upload_file(fs, local / r, f"{inner}/{r}"),
        )
    if marker and marker not in last:
        write_text(join(uri, marker), json.dumps({"files": names}, indent=2))
    return names


def _upload_file(fs: pyarrow.fs.FileSystem, src: Path, dst: str) -> None:
    with open(src, "rb") as f, fs.open_output_stream(dst) as out:
        shutil.copyfileobj(f, out, length=8 * 2**20)


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


@contextlib.contextmanager
def local_output(
    path: str | Path,
    *,
    overwrite: bool = True,
    flag: str = "--overwrite",
    keep: Sequence[str] = (),
) -> Iterator[Path]:
    """A local directory to write an output into: a local ``path`` itself (not created here: the
    job creates it, under its own rules for an existing one); for a URI, an empty temporary one
    uploaded to it (with the completion marker last) when the block ends without error, and
    discarded otherwise.

    The temporary directory is named like the URI's last component (``.../model`` -> ``model``)
    and its siblings are free for the job's own scratch (e.g. a ``.partial`` folder). An upload
    replaces whatever was at the URI (its marker is deleted first) but the sub-folders named in
    ``keep``, which the job writes to the URI itself (e.g. ``ray``: Ray Train's checkpoints,
    written there by every node). With ``overwrite=False`` a URI that already holds something is
    refused up front: DataError naming it (and ``flag``, the option that would allow replacing
    it).
    """
    if not is_uri(path):
        yield Path(path)  # the job creates it (a failed one may then leave nothing behind)
        return
    if not overwrite and exists(path):
        raise DataError(f"{path} already exists; choose another --out or pass {flag}")
    with tempfile.TemporaryDirectory(prefix="meddiff-out-") as tmp:
        local = Path(tmp) / (name(path) or "out")
        local.mkdir()
        yield local
        upload_dir(local, str(path), keep=keep)


def rebase(value: T, local: str | Path, uri: str | Path) -> T:
    """``value`` (a JSON-able summary) with every string under the local directory ``local``
    rewritten to the same place under ``uri``: what a job run in :func:`local_output` reports
    then names where its files end up. Unchanged when ``uri`` is a local path."""
    if not is_uri(uri):
        return value
    root = str(local).rstrip("/")

    def walk(v):
        if isinstance(v, str) and (v == root or v.startswith(root + "/")):
            return str(uri).rstrip("/") + v[len(root) :]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return type(v)(walk(x) for x in v)
        return v

    return walk(value)


def local_input(path: str | Path, cache: str | Path | None = None) -> Path:
    """A local file or directory with the contents of ``path``: itself when local; for a URI
    naming one object, :func:`cached_file`; else a copy of a complete uploaded prefix (see
    :func:`upload_dir`) or of a folder inside one (``s3://b/run/model``), fetched once per node
    and content into ``MEDDIFF_CACHE``.

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
    if not out.is_dir():
        if not is_dir(path):
            raise DataError(f"{path} does not exist")
        out.parent.mkdir(parents=True, exist_ok=True)
        download_dir(path, out, marker=None)  # completeness checked above
    return out


def _completion_marker(uri: str) -> pyarrow.fs.FileInfo | None:
    """The completion marker vouching for ``uri``: its own, or that of an upload it lies in
    (``s3://b/run/model`` inside a complete ``s3://b/run``). None when there is none."""
    parsed = urlparse(uri)
    parts = parsed.path.strip("/").split("/")
    for depth in range(len(parts), 0, -1):
        prefix = f"{parsed.scheme}://{parsed.netloc}/{'/'.join(parts[:depth])}"
        found = info(join(prefix, COMPLETE))
        if found.type.name == "File":
            return found
    return None
