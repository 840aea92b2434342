"""Where a job's output goes: one object, made once by the command, that knows every path.

:class:`OutputLocation` is the source of truth for an output's paths (as Ray Train's
``StorageContext`` is for a run's): the final place (a local folder or an object-store prefix),
the local staging folder the job writes into, the filesystem that serves the final place
(pickled with its endpoint and credentials, so Ray workers on any node reach it), the
sub-folders the job's workers write straight to the final place (Ray Train's checkpoints), and
the completion marker. Jobs, Ray workers and the training core take a location and never ask
whether it is local or remote: the location stages, uploads, rebases paths and ships its
filesystem.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from meddiff.errors import DataError
from meddiff.storage.backends import filesystem, is_uri, join, name, use_filesystem
from meddiff.storage.operations import COMPLETE, delete_dir, exists, upload_dir

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger("meddiff.storage")
T = TypeVar("T")


@dataclass(frozen=True)
class Location:
    """A folder: a local path or an object-store prefix, with the pyarrow filesystem that serves
    it. It pickles with the filesystem (endpoint, credentials), so a Ray worker that calls
    :meth:`activate` opens the bucket as the driver did."""

    target: str | Path
    fs: pyarrow.fs.FileSystem | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, path: str | Path | Location) -> Location:
        """``path`` as a location (itself when it is one already); a local path is resolved,
        as Ray workers in another working directory see it."""
        if isinstance(path, Location):
            return path
        target = str(path).rstrip("/") if is_uri(path) else Path(path).resolve()
        return cls(target, filesystem(target)[0] if is_uri(target) else None)

    @property
    def remote(self) -> bool:
        """True for an object-store prefix (every node reaches it), False for a local folder."""
        return self.fs is not None

    @property
    def uri(self) -> str:
        """The place as a string, for summaries and messages."""
        return str(self.target)

    def join(self, *names: str) -> str | Path:
        """The path of ``names`` under the place (a URI for an object store)."""
        return join(self.target, *names)

    def sub(self, *names: str) -> Location:
        """The location of the sub-folder ``names``, served by the same filesystem."""
        return replace(self, target=self.join(*names))

    def activate(self) -> None:
        """In a Ray worker: open this place's bucket with the driver's filesystem (a worker
        started before the credentials were set, or on a node without them, still reaches it).
        Nothing to do for a local folder."""
        if self.fs is not None:
            use_filesystem(str(self.target), self.fs)

    def ray_storage(self) -> dict[str, Any]:
        """Ray Train's ``RunConfig`` arguments for runs stored here: ``storage_path`` (and the
        ``storage_filesystem`` of an object store, so every worker uploads from its own node)."""
        if self.fs is None:
            return {"storage_path": str(self.target)}
        return {"storage_path": filesystem(self.target)[1], "storage_filesystem": self.fs}


@dataclass(frozen=True)
class OutputLocation(Location):
    """A command's output: the final place (:attr:`target`), the local folder the job writes
    into (:attr:`staging`: the target itself when local, a temporary folder named like the URI's
    last component for an object store) and the sub-folders in :attr:`keep` that the job's
    workers write straight to the target (``ray``: Ray Train's checkpoints, from every node).

    Made by :meth:`open` in the command; :meth:`commit` (run when the ``with`` block ends
    without error) puts the staged files in place with the completion marker last.
    """

    staging: Path = Path()
    keep: tuple[str, ...] = ()

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        path: str | Path,
        *,
        overwrite: bool = True,
        flag: str = "--overwrite",
        keep: Sequence[str] = (),
    ) -> Iterator[OutputLocation]:
        """The location of the output ``path``, committed when the block ends without error.

        Raises:
            DataError: with ``overwrite=False``, an object-store ``path`` that already holds
                something (naming it and ``flag``, the option that would allow replacing it).
        """
        base = Location.of(path)
        if not base.remote:
            # The job creates a local folder itself (a failed one may then leave nothing).
            yield cls(base.target, None, staging=Path(base.target), keep=tuple(keep))
            return
        if not overwrite and exists(base.target):
            raise DataError(f"{base.target} already exists; choose another --out or pass {flag}")
        with tempfile.TemporaryDirectory(prefix="meddiff-out-") as tmp:
            staging = Path(tmp) / (name(base.target) or "out")
            staging.mkdir()
            loc = cls(base.target, base.fs, staging=staging, keep=tuple(keep))
            yield loc
            loc.commit()

    @classmethod
    @contextlib.contextmanager
    def use(cls, out: str | Path | OutputLocation, **kwargs: Any) -> Iterator[OutputLocation]:
        """``out`` itself when it is a location already (its command commits it), else a
        location opened (and committed) here with ``kwargs``: for library callers that pass a
        path."""
        if isinstance(out, OutputLocation):
            yield out
            return
        with cls.open(out, **kwargs) as loc:
            yield loc

    def shared(self, local: Path) -> str | Path:
        """Where Ray workers on any node write a stage the driver then reads at ``local``: the
        target itself for an object store (every node reaches it), else ``local`` (on a shared
        filesystem)."""
        return self.target if self.remote else local

    def clear(self) -> None:
        """Remove what is at an object-store target before the job's workers write straight to
        it (a local target is replaced by the job itself)."""
        if self.remote and exists(self.target):
            delete_dir(self.target)

    def install(self, built: str | Path) -> None:
        """Put the folder ``built`` (the job's complete output, written beside the staging
        folder) in the staging folder's place; nothing to do when the job wrote in place."""
        if str(built) == str(self.staging) or str(built) == str(self.target):
            return
        if self.staging.exists():
            shutil.rmtree(self.staging)
        os.replace(built, self.staging)

    def discard(self) -> None:
        """After a failed job: remove what its workers wrote straight to an object-store
        target (it carries no marker, but would make the next run need ``--overwrite``); a
        failure to do so is logged, not raised over the job's own error."""
        if not self.remote:
            return
        try:
            delete_dir(self.target)
        except DataError as err:
            log.warning("could not remove the unfinished output at %s: %s", self.target, err)

    def start_over(self) -> None:
        """Delete the target and everything under it (``--fresh``), and recreate the staging."""
        delete_dir(self.target)
        self.staging.mkdir(parents=True, exist_ok=True)

    def commit(self) -> None:
        """Upload the staging folder to an object-store target (replacing what was there but
        the ``keep`` sub-folders), the completion marker last; nothing staged, nothing done (the
        job wrote its output in place). A local target needs nothing."""
        if not self.remote or not any(p.is_file() for p in self.staging.rglob("*")):
            return
        upload_dir(self.staging, str(self.target), keep=self.keep)

    def rebase(self, value: T) -> T:
        """``value`` (a JSON-able summary) with the staging folder's paths rewritten to the same
        places under the target: what the job reports names where its files end up."""
        return rebase(value, self.staging, self.target)


@contextlib.contextmanager
def local_output(
    path: str | Path,
    *,
    overwrite: bool = True,
    flag: str = "--overwrite",
    keep: Sequence[str] = (),
) -> Iterator[Path]:
    """The staging folder of :meth:`OutputLocation.open` ``(path, ...)``, committed when the
    block ends without error (for callers that only need a folder to write into)."""
    with OutputLocation.open(path, overwrite=overwrite, flag=flag, keep=keep) as loc:
        yield loc.staging


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


__all__ = ["COMPLETE", "Location", "OutputLocation", "local_output", "rebase"]
