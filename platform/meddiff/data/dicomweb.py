"""A PACS over DICOMweb: retrieve a series (WADO-RS), store results (STOW-RS), with bounded
retries and one-line errors.

Locations (``--images``, ``--out``)::

    dicomweb://HOST:PORT/PREFIX/studies/STUDY_UID/series/SERIES_UID   a series (http)
    dicomwebs://HOST:PORT/PREFIX/...                                     the same over https
    dicomweb://HOST:PORT/PREFIX                                          a PACS (where to store)
    dicomweb:///studies/STUDY_UID/series/SERIES_UID                      on data.dicom.url's PACS

``PREFIX`` is the server's DICOMweb root (Orthanc's plugin: ``dicom-web``). Credentials: HTTP
basic auth with ``data.dicom.username`` (else ``MEDDIFF_DICOMWEB_USER``) and the password from
the environment variable ``data.dicom.password_env`` (never from config or the location, which
end up in logs and shell history).

Transient failures (connection refused or reset, timeouts, HTTP 408/429/5xx) are retried up to
``data.dicom.retries`` times with exponential backoff, each attempt logged; every request has a
``data.dicom.timeout_s`` bound, so a PACS that does not answer never hangs a job. Refused
credentials (401/403) and other client errors are not retried. A store the PACS rejects raises
:class:`StoreRejected`, so the caller can say where the results it kept are. Every error is a
:class:`~meddiff.errors.DataError` (the CLI's exit 2); its kind tells a service what to answer:
:class:`PacsUnavailable` (down, timed out, server errors: the gateway's fault), :class:`PacsRefused`
(credentials), :class:`NotOnPacs` (no such series: the reference's fault).

Study and series UIDs and patient attributes are kept out of the log lines this module writes
(dicomweb-client's own info lines, which name UIDs, are silenced).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

from meddiff.config.dicom import DicomConfig
from meddiff.errors import DataError

log = logging.getLogger(__name__)
T = TypeVar("T")
SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
_SERIES = re.compile(
    r"^(?P<prefix>.*?)/studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/?$"
)
RETRIABLE_STATUS = {408, 429, 500, 502, 503, 504}


class StoreRejected(DataError):
    """The PACS refused a STOW-RS store (the results were not stored)."""


class PacsUnavailable(DataError):
    """The PACS did not answer, or answered a server error, after the bounded retries
    (``timed_out``: the last attempt timed out). Not the request's fault: a service answers
    502/504."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


class PacsRefused(DataError):
    """The PACS refused the credentials (HTTP 401/403): the caller's configuration is at fault."""


class NotOnPacs(DataError):
    """The PACS does not hold what was asked for (HTTP 404, or no instances)."""


@dataclass(frozen=True)
class Location:
    """A DICOMweb server (``base_url``: http(s)://host:port/prefix) and optionally a study and
    series on it."""

    base_url: str
    study_uid: str | None = None
    series_uid: str | None = None

    def __str__(self) -> str:  # messages name the server, never the UIDs
        return self.base_url


def is_dicomweb(text: Any) -> bool:
    """True for a ``dicomweb://`` or ``dicomwebs://`` location."""
    return isinstance(text, str) and urlparse(text).scheme in SCHEMES


def server_of(text: str) -> str:
    """A location without its study and series (what logs and MLflow may show)."""
    return text.split("/studies", 1)[0] or text


def parse(text: str, cfg: DicomConfig) -> Location:
    """The server, study and series a location names (module docstring).

    Raises:
        DataError: not a DICOMweb location, a host-less one without ``data.dicom.url``, or a
            study/series path that is malformed.
    """
    parsed = urlparse(text)
    if parsed.scheme not in SCHEMES:
        raise DataError(f"{text}: not a DICOMweb location (dicomweb://HOST:PORT/PREFIX/...)")
    if parsed.username or parsed.password:
        raise DataError(
            f"{parsed.scheme}://...@{parsed.hostname}: credentials do not go in the location; "
            f"set data.dicom.username and the password in ${cfg.password_env}"
        )
    path = parsed.path.rstrip("/")
    if parsed.netloc:
        base = f"{SCHEMES[parsed.scheme]}://{parsed.netloc}"
    elif cfg.url:
        base = cfg.url.rstrip("/")
    else:
        raise DataError(f"{text}: names no server; give dicomweb://HOST:PORT/... or data.dicom.url")
    if "/studies" not in path:
        return Location(base + path)
    m = _SERIES.match(path)
    if m is None:
        raise DataError(
            f"{text}: expected .../studies/STUDY_UID[/series/SERIES_UID] (UIDs are digits and dots)"
        )
    return Location(base + m["prefix"], m["study"], m["series"])


def client(base_url: str, cfg: DicomConfig) -> Any:
    """A dicomweb-client ``DICOMwebClient`` for ``base_url`` with this config's credentials and
    timeout; its own retries are off (:func:`call` retries)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
    session = requests.Session()
    user = cfg.username or os.environ.get("MEDDIFF_DICOMWEB_USER")
    if user:
        session.auth = (user, os.environ.get(cfg.password_env, ""))
    web = DICOMwebClient(base_url, session=session, timeout=cfg.timeout_s)
    web.set_http_retry_params(retry=False)
    return web


def call(what: str, fn: Callable[[], T], cfg: DicomConfig, *, store: bool = False) -> T:
    """``fn()`` with bounded retries of transient failures; errors become one-line DataErrors
    naming ``what`` (a :class:`StoreRejected` when ``store`` and the server refused)."""
    import requests

    attempts = cfg.retries
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except requests.HTTPError as err:
            status = err.response.status_code if err.response is not None else 0
            if status in RETRIABLE_STATUS and attempt < attempts:
                _wait(what, f"HTTP {status}", attempt, attempts)
                continue
            raise _http_error(what, status, err, cfg, store, attempt) from None
        except (requests.ConnectionError, requests.Timeout) as err:
            kind = "timed out" if isinstance(err, requests.Timeout) else "not reachable"
            if attempt < attempts:
                _wait(what, kind, attempt, attempts)
                continue
            raise PacsUnavailable(
                f"{what}: PACS {kind} after {attempts} attempts ({_reason(err)})",
                timed_out=isinstance(err, requests.Timeout),
            ) from None
    raise AssertionError("unreachable")


def _wait(what: str, why: str, attempt: int, attempts: int) -> None:
    wait = min(8.0, 0.5 * 2 ** (attempt - 1))
    log.warning("%s: %s; attempt %d of %d, retrying in %.1f s", what, why, attempt, attempts, wait)
    time.sleep(wait)


def _http_error(
    what: str, status: int, err: Exception, cfg: DicomConfig, store: bool, attempt: int
) -> DataError:
    after = f" after {attempt} attempts" if attempt > 1 else ""
    if status in (401, 403):
        return PacsRefused(
            f"{what}: the PACS refused the credentials (HTTP {status}); set data.dicom.username "
            f"(or MEDDIFF_DICOMWEB_USER) and the password in ${cfg.password_env}"
        )
    if store:
        return StoreRejected(f"{what}: the PACS rejected the store (HTTP {status}{after})")
    if status == 404:
        return NotOnPacs(f"{what}: not found on the PACS (HTTP 404)")
    kind = PacsUnavailable if status in RETRIABLE_STATUS else DataError
    return kind(f"{what}: the PACS answered HTTP {status}{after} ({_reason(err)})")


def _reason(err: Exception) -> str:
    text = str(err)
    for pattern, short in (
        (r"Connection refused", "connection refused"),
        (r"Name or service not known|nodename nor servname", "unknown host"),
        (r"timed out", "timed out"),
        (r"Connection reset", "connection reset"),
    ):
        if re.search(pattern, text):
            return short
    return text.splitlines()[0][:160] if text else type(err).__name__


def retrieve_series(location: Location, cfg: DicomConfig) -> list[tuple[str, Any]]:
    """The instances of the location's series (WADO-RS), as (name, dataset) pairs in the order
    of their Instance Number; names are ``instance N`` (messages name them with the server).

    Raises:
        DataError: no series in the location, the series is absent or empty, the PACS is down or
            refuses the credentials (bounded retries, see :func:`call`).
    """
    if not (location.study_uid and location.series_uid):
        raise DataError(f"{location}: the location names no series (.../studies/UID/series/UID)")
    web = client(location.base_url, cfg)
    what = f"series on {location}"
    datasets = call(what, lambda: _retrieve(web, location, what), cfg)
    if not datasets:
        raise NotOnPacs(f"{what}: the PACS returned no instances")
    datasets = sorted(datasets, key=lambda ds: int(getattr(ds, "InstanceNumber", 0) or 0))
    log.info("retrieved %d instances from %s", len(datasets), location)
    return [
        (f"instance {getattr(ds, 'InstanceNumber', k + 1)}", ds) for k, ds in enumerate(datasets)
    ]


def count_instances(location: Location, cfg: DicomConfig, limit: int) -> int:
    """How many instances the location's series holds (QIDO-RS), counting at most ``limit`` + 1:
    enough to refuse an oversized series before any pixel data is retrieved. A server that caps
    its search results may answer fewer (the retrieved series is counted again).

    Raises:
        NotOnPacs: the PACS has no instance of that series.
        DataError: as :func:`retrieve_series` (PACS down, credentials refused).
    """
    if not (location.study_uid and location.series_uid):
        raise DataError(f"{location}: the location names no series (.../studies/UID/series/UID)")
    web = client(location.base_url, cfg)
    what = f"series on {location}"
    found = call(
        what,
        lambda: web.search_for_instances(
            location.study_uid, location.series_uid, fields=["00080018"], limit=limit + 1
        ),
        cfg,
    )
    if not found:
        raise NotOnPacs(f"{what}: no such series on the PACS (no instances found)")
    return len(found)


def _retrieve(web: Any, location: Location, what: str) -> list[Any]:
    from pydicom.errors import InvalidDicomError

    try:
        return web.retrieve_series(location.study_uid, location.series_uid)
    except InvalidDicomError:
        raise DataError(
            f"{what}: the PACS sent an instance that is not a DICOM Part 10 file (no 'DICM' "
            "header: stored without its preamble), which pydicom does not read"
        ) from None


def store(base_url: str, datasets: Sequence[Any], cfg: DicomConfig) -> list[str]:
    """Store ``datasets`` on the PACS (STOW-RS, one request); returns their SOP Instance UIDs.

    Raises:
        StoreRejected: the PACS refused the request or some instances (Failed SOP Sequence).
        DataError: the PACS is down or refuses the credentials.
    """
    web = client(base_url, cfg)
    what = f"store on {base_url}"
    for ds in datasets:
        # A Part 10 file has a 128-byte preamble and 'DICM'; dicomweb-client writes a dataset
        # without one as bare data, which readers (dicomweb-client's own WADO-RS included)
        # refuse when the PACS sends it back.
        if getattr(ds, "preamble", None) is None:
            ds.preamble = b"\0" * 128
    answer = call(what, lambda: web.store_instances(list(datasets)), cfg, store=True)
    failed = getattr(answer, "FailedSOPSequence", None) or []
    if failed:
        reasons = sorted({str(getattr(item, "FailureReason", "?")) for item in failed})
        raise StoreRejected(
            f"{what}: the PACS rejected {len(failed)} of {len(datasets)} instances "
            f"(failure reason {', '.join(reasons)})"
        )
    log.info("stored %d instances on %s", len(datasets), base_url)
    return [str(ds.SOPInstanceUID) for ds in datasets]
