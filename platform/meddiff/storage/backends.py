"""Object-store backends: which pyarrow filesystem serves a URI, with which endpoint and
credentials, and how a URI maps to a path inside it.

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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from meddiff.errors import DataError

if TYPE_CHECKING:
    import pyarrow.fs

    from meddiff.config import StorageConfig

# URI schemes that pyarrow's filesystems serve (``file`` is handled as a local path).
SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")
AZURE = ("abfs", "abfss")
GCS = ("gs", "gcs")


def config() -> StorageConfig:
    """The settings :func:`meddiff.storage.configure` set for this process (defaults before)."""
    from meddiff import storage
    from meddiff.config import StorageConfig

    return storage._settings or StorageConfig()


def split_uri(uri: str) -> tuple[str, str, str]:
    """``(scheme, root, key)`` of an object-store URI: ``("s3", "bucket", "a/b#7")`` for
    ``s3://bucket/a/b#7``. The key is taken as it is, character for character: no URL parsing
    (which would cut it at ``#`` or ``?`` and read ``%xx`` as an escape)."""
    scheme, _, rest = uri.partition("://")
    root, _, key = rest.partition("/")
    return scheme.lower(), root, key


def is_uri(path: str | Path) -> bool:
    """True for an object-store URI (``s3://...``), False for a local path."""
    return isinstance(path, str) and "://" in path and split_uri(path)[0] in SCHEMES


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


def root_uri(uri: str) -> str:
    """The bucket (or container) a URI lies in, as a URI: ``s3://bucket`` for
    ``s3://bucket/key``."""
    scheme, root, _ = split_uri(uri)
    return f"{scheme}://{root}"


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
    scheme = split_uri(path)[0]
    shipped = _shipped.get(root_uri(path))
    if shipped is not None:
        return shipped, filesystem_path(path)
    if scheme in AZURE:
        return _azure_filesystem(path), filesystem_path(path)
    if scheme in GCS:
        return _gcs_filesystem(), filesystem_path(path)
    if scheme != "s3":
        try:
            return pafs.FileSystem.from_uri(path)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot open this filesystem ({first_line(err)})") from None
    cfg = config()
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
    return pafs.S3FileSystem(**kwargs), filesystem_path(path)


# Filesystems a driver built and shipped to this process (see ``use_filesystem``), by bucket.
_shipped: dict[str, pyarrow.fs.FileSystem] = {}


def use_filesystem(uri: str, fs: pyarrow.fs.FileSystem) -> None:
    """Open every URI in ``uri``'s bucket (or container) with ``fs`` in this process.

    For Ray workers: ``fs`` is what :func:`filesystem` built on the driver, pickled with its
    endpoint and credentials (as Ray Train's own ``storage_filesystem`` is), so a worker whose
    environment lacks them (started before they were set, or on a node without them) reads and
    writes the same store the driver does.
    """
    _shipped[root_uri(uri)] = fs


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def azure_endpoint() -> str | None:
    return config().azure_endpoint or os.environ.get("AZURE_STORAGE_SERVICE_ENDPOINT")


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _azure_filesystem(uri: str) -> pyarrow.fs.AzureFileSystem:
    """pyarrow's Azure filesystem for ``uri`` (its root is the storage account: paths inside it
    are ``container/path``), with the endpoint of the settings and the credential of the
    environment passed explicitly, so the pickled filesystem that Ray ships to a worker (started
    before they were set, or on a node without them) carries them."""
    import pyarrow.fs as pafs

    host = split_uri(uri)[1].partition("@")[2]  # container@ACCOUNT.dfs.core.windows.net
    endpoint = azure_endpoint()
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
        raise DataError(f"{uri}: cannot open this filesystem ({first_line(err)})") from None


def gcs_endpoint() -> str | None:
    return config().gcs_endpoint or os.environ.get("STORAGE_EMULATOR_HOST")


def _gcs_filesystem() -> pyarrow.fs.GcsFileSystem:
    import datetime

    import pyarrow.fs as pafs

    kwargs: dict = {
        # pyarrow's own retries are silent; ours (``retry``) log each attempt.
        "retry_time_limit": datetime.timedelta(seconds=config().timeout_s),
        "project_id": os.environ.get("GOOGLE_CLOUD_PROJECT"),
    }
    endpoint = gcs_endpoint()
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
    scheme, root, key = split_uri(str(uri))
    if scheme in AZURE:
        root = root.partition("@")[0]
    return f"{root}/{key}".rstrip("/")


def s3_endpoint() -> str:
    """The S3 endpoint requests go to (for messages): the setting, the environment, else AWS."""
    return config().endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
