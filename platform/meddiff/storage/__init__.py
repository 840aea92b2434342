"""Where inputs and outputs live: a local path or an object-store URI, through one API.

Every path a job takes may be a local path or a URI: ``s3://bucket/prefix`` (tested against
SeaweedFS), ``abfs://container/prefix`` (Azure Blob Storage / ADLS Gen2, tested against Azurite),
``gs://bucket/prefix`` (tested against gcp-storage-emulator), and ``hdfs://`` through pyarrow's
own URI resolution (untested). Files are read and written through :mod:`pyarrow.fs`, whose
filesystem objects pickle, so Ray Data's native Parquet reader and writer and Ray tasks on any
node use the same one.

The package has three layers, re-exported here (``storage.read_text``, ``storage.OutputLocation``):

- :mod:`~meddiff.storage.backends`: which filesystem serves a URI (per scheme, with the
  ``storage`` settings and the environment's credentials) and the path inside it;
- :mod:`~meddiff.storage.operations`: reads, writes, listings, deletes, uploads and downloads,
  retried on transient errors with every attempt logged;
- :mod:`~meddiff.storage.location` and :mod:`~meddiff.storage.inputs`: a command's output
  location (:class:`OutputLocation`) and the resolution of its inputs (:func:`local_input`).

Only this package asks whether a path is local or in an object store (:func:`is_uri`); the
rest of meddiff passes locations and paths to it.
"""

from __future__ import annotations

import os
import time  # noqa: F401  (tests stub storage.time.sleep to skip the retry back-off)
from typing import TYPE_CHECKING

from meddiff.storage.backends import (
    AZURE,
    GCS,
    SCHEMES,
    _shipped,
    filesystem,
    filesystem_path,
    first_line,
    is_uri,
    join,
    name,
    path_arg,
    use_filesystem,
)
from meddiff.storage.inputs import (
    absolute,
    as_uri,
    cache_dir,
    cached_file,
    fetch,
    is_vouched,
    local_copy,
    local_input,
    localize,
    make_dirs,
    name_uris,
    noun,
    resolve,
    stamp,
)
from meddiff.storage.location import (
    OWN_NAME,
    Location,
    OutputLocation,
    local_output,
    rebase,
    record_files,
    upload_dir,
    write_token,
)
from meddiff.storage.operations import (
    COMPLETE,
    MARKERS,
    append_line,
    delete_dir,
    delete_files,
    download_dir,
    exists,
    explain_error,
    file_sizes,
    info,
    is_complete,
    is_dir,
    is_file,
    list_files,
    read_bytes,
    read_text,
    retry,
    upload_file,
    write_bytes,
    write_text,
)

if TYPE_CHECKING:
    from meddiff.config import StorageConfig

# The settings every URI this process opens uses (see :func:`configure`); None: the defaults.
_settings: StorageConfig | None = None


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


__all__ = [
    "AZURE",
    "COMPLETE",
    "GCS",
    "MARKERS",
    "SCHEMES",
    "OWN_NAME",
    "Location",
    "OutputLocation",
    "_shipped",
    "absolute",
    "append_line",
    "as_uri",
    "cache_dir",
    "cached_file",
    "configure",
    "delete_dir",
    "delete_files",
    "download_dir",
    "exists",
    "explain_error",
    "fetch",
    "file_sizes",
    "filesystem",
    "filesystem_path",
    "first_line",
    "info",
    "is_complete",
    "is_dir",
    "is_file",
    "is_uri",
    "is_vouched",
    "join",
    "list_files",
    "local_copy",
    "local_input",
    "local_output",
    "localize",
    "make_dirs",
    "name",
    "name_uris",
    "noun",
    "path_arg",
    "read_bytes",
    "read_text",
    "rebase",
    "record_files",
    "resolve",
    "retry",
    "stamp",
    "upload_dir",
    "upload_file",
    "use_filesystem",
    "write_bytes",
    "write_text",
    "write_token",
]
