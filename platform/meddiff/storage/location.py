"""Where a job's output goes: one object, made once by the command, that knows every path.

:class:`OutputLocation` is the source of truth for an output's paths (as Ray Train's
``StorageContext`` is for a run's): the final place (a local folder or an object-store prefix),
the local staging folder the job writes into, the filesystem that serves the final place
(pickled with its endpoint and credentials, so Ray workers on any node reach it), the
sub-folders the job's workers write straight to the final place (Ray Train's checkpoints), and
the completion marker. Jobs, Ray workers and the training core take a location and never ask
whether it is local or remote: the location stages, uploads, rebases paths and ships its
filesystem.

**What meddiff wrote, and nothing else, is meddiff's to replace.** Every output carries a
marker listing its files: ``_meddiff_complete.json`` (``{"files": [...], "folders": [...]}``:
the files, and the sub-folders written straight to the target whose whole content is
meddiff's, such as ``ray/``) or a shard manifest (``_meddiff_shards.json``, its Parquet files).
Shard files are also named ``meddiff-<token>-...parquet``, so the leftovers of a write that was
interrupted before its manifest are recognised too. Any other file under the target is
*foreign*: never deleted, never replaced (a job that would write a file of the same name stops
with an error naming it). When the location is opened:

- an existing output (anything there but such leftovers) is refused unless ``overwrite``;
- a bucket or container root, and a target that is a file (an object), are refused;
- the target is listed, so a missing bucket or refused credentials fail before the job works;
- with ``overwrite``, the earlier output's files are what the new one replaces: removed when the
  job starts (local) or when the new output is uploaded (object store), marker first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from meddiff.errors import DataError
from meddiff.storage.backends import (
    filesystem,
    is_uri,
    join,
    name,
    root_uri,
    use_filesystem,
)
from meddiff.storage.operations import (
    COMPLETE,
    MARKERS,
    delete_files,
    file_sizes,
    info,
    read_text,
    write_text,
)

if TYPE_CHECKING:
    import pyarrow.fs

log = logging.getLogger("meddiff.storage")
T = TypeVar("T")

# A local job writing in place claims its folder first, in ``<folder>.meddiff-pending.json``
# beside it: ``{"foreign": [...]}`` lists the files that were not meddiff's when it started;
# everything else there is the job's until it commits (then the claim goes).
PENDING = ".meddiff-pending.json"


def _claim(target: str | Path) -> Path:
    return Path(f"{target}{PENDING}")


# Files meddiff names itself (shard files, see :func:`write_token`): a write interrupted before
# its manifest leaves only these, which the next write may replace.
OWN_NAME = re.compile(r"meddiff-[0-9a-f]{12}-[^/]*\.parquet")


def write_token() -> str:
    """A prefix for the files of one write (``meddiff-<12 hex>-``): files named so are
    meddiff's own even before a manifest lists them (:data:`OWN_NAME`)."""
    return f"meddiff-{uuid.uuid4().hex[:12]}-"


@dataclass
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

    def __str__(self) -> str:
        return str(self.target)

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
        return Location(self.join(*names), self.fs)

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


@dataclass
class OutputLocation(Location):
    """A command's output: the final place (:attr:`target`), the local folder the job writes
    into (:attr:`staging`: the target itself when local, a temporary folder named like the URI's
    last component for an object store, a sibling ``<name>.staging-<pid>`` folder for a local
    target that holds foreign files), the sub-folders in :attr:`keep` that the job's workers
    write straight to the target (``ray``: Ray Train's checkpoints, from every node), and what
    was at the target when it was opened (module docstring).

    Made by :meth:`open` in the command; :meth:`commit` (run when the ``with`` block ends
    without error) puts the staged files in place with the completion marker last.
    """

    staging: Path = Path()
    keep: tuple[str, ...] = ()
    marker: str | None = COMPLETE
    before: frozenset[str] = frozenset()  # every file there when opened
    previous: frozenset[str] = frozenset()  # meddiff's, to be replaced
    foreign: frozenset[str] = frozenset()  # not meddiff's: never touched
    cleared: bool = False

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        path: str | Path,
        *,
        overwrite: bool = False,
        flag: str = "--overwrite",
        keep: Sequence[str] = (),
        resume: bool = False,
        marker: str | None = COMPLETE,
    ) -> Iterator[OutputLocation]:
        """The location of the output ``path``, committed when the block ends without error.

        ``resume``: the job continues an earlier run there (training): an existing output is
        not refused, nothing is removed up front, and a failed job leaves what it wrote.
        ``marker``: the completion marker the location writes (None: the job writes its own,
        e.g. a shard manifest). A job that fails leaves nothing at a local target it wrote in
        place (unless ``resume``), and nothing but what its workers wrote straight to an
        object store.

        Raises:
            DataError: ``path`` is a bucket root or a file; its bucket does not exist or the
                credentials are refused; it holds an output and neither ``overwrite`` nor
                ``resume`` is given (naming it and ``flag``).
        """
        loc = cls.prepare(
            path, overwrite=overwrite, flag=flag, keep=keep, resume=resume, marker=marker
        )
        with contextlib.ExitStack() as stack:
            if loc.remote:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="meddiff-out-"))
                loc.staging = Path(tmp) / (name(loc.target) or "out")
                loc.staging.mkdir()
            try:
                yield loc
            except BaseException:
                loc._abandon(resume)
                raise
            loc.commit()

    @classmethod
    def prepare(
        cls,
        path: str | Path,
        *,
        overwrite: bool = False,
        flag: str = "--overwrite",
        keep: Sequence[str] = (),
        resume: bool = False,
        marker: str | None = COMPLETE,
        stage: bool = True,
    ) -> OutputLocation:
        """The checks of :meth:`open` and what is at ``path`` now; with ``stage``, for a local
        target also the staging folder, cleared of the earlier output (unless ``resume``) and
        claimed (without: for :meth:`publish` alone)."""
        base = Location.of(path)
        _refuse_root_or_file(base)
        listing = file_sizes(base.target)  # a missing bucket or refused credentials fail here
        claimed = None if base.remote else _read_claim(_claim(base.target))
        owned, leftovers = _owned(base.target, listing, keep, claimed)
        foreign = frozenset(listing) - owned
        if (foreign or owned - leftovers) and not (overwrite or resume):
            raise DataError(f"{base.target} {_holds(foreign)}; choose another --out or pass {flag}")
        loc = cls(
            base.target,
            base.fs,
            staging=Path(str(base.target)),
            keep=tuple(keep),
            marker=marker,
            before=frozenset(listing),
            previous=owned,
            foreign=foreign,
        )
        if stage and not base.remote:
            loc._stage_locally(resume)
        return loc

    def _stage_locally(self, resume: bool) -> None:
        """A local target: the job writes in place (claimed, so a killed job's files are known
        as meddiff's), or beside it when foreign files are there (moved in by :meth:`commit`);
        the earlier output goes before the job writes its new one."""
        if not resume:
            if self.foreign:
                self.staging = Path(f"{self.target}.staging-{os.getpid()}")
                shutil.rmtree(self.staging, ignore_errors=True)
                self.clear()
                return
            self.clear()
        claim = {"foreign": sorted(self.foreign)}
        write_text(_claim(self.target), json.dumps(claim, indent=2))

    def _abandon(self, resume: bool) -> None:
        """After the job failed: its staging folder goes; so does what it wrote in place at a
        local target (unless it resumes there next time)."""
        if self.remote:
            return
        if self.staging != Path(str(self.target)):
            shutil.rmtree(self.staging, ignore_errors=True)
        elif not resume:
            self.discard()
            _claim(self.target).unlink(missing_ok=True)

    @classmethod
    @contextlib.contextmanager
    def use(cls, out: str | Path | OutputLocation, **kwargs: Any) -> Iterator[OutputLocation]:
        """``out`` itself when it is a location already (its command commits it), else a
        location opened (and committed) here with ``kwargs`` (``overwrite`` defaults to True:
        a library caller that passes a path replaces meddiff's earlier output there)."""
        if isinstance(out, OutputLocation):
            yield out
            return
        kwargs.setdefault("overwrite", True)
        with cls.open(out, **kwargs) as loc:
            yield loc

    def shared(self, local: Path) -> str | Path:
        """Where Ray workers on any node write a stage the driver then reads at ``local``: the
        target itself for an object store (every node reaches it), else ``local`` (on a shared
        filesystem)."""
        return self.target if self.remote else local

    def _kept(self, rel: str) -> bool:
        return rel.split("/", 1)[0] in self.keep

    def clear(self, *, kept: bool = False) -> None:
        """Remove the earlier output's files (markers first, so a half-removed output never
        looks complete), once; with ``kept`` also the ``keep`` sub-folders (``--fresh``).
        Foreign files stay."""
        if self.cleared and not kept:
            return
        doomed = [n for n in self.previous if kept or not self._kept(n)]
        delete_files(self.target, _markers_first(doomed))
        self.cleared = True

    def start_over(self) -> None:
        """``--fresh``: remove everything meddiff wrote at the target, checkpoints included
        (the files its marker lists, its ``keep`` sub-folders, shard leftovers), then start
        from an empty staging folder. Foreign files stay."""
        self.clear(kept=True)
        self.previous = frozenset()
        self.before = self.foreign  # from now on, all but the foreign files is this run's
        self.staging.mkdir(parents=True, exist_ok=True)

    def install(self, built: str | Path) -> None:
        """Put the folder ``built`` (the job's complete output, written beside the staging
        folder) in the staging folder's place; nothing to do when the job wrote in place."""
        built = Path(built)
        if built in (self.staging, Path(str(self.target))):
            return
        if self.staging.is_dir() and not _files(self.staging):
            shutil.rmtree(self.staging)  # empty folders left by clear(), or the temporary one
        if self.staging.exists():
            _move_files(built, self.staging)
        else:
            os.replace(built, self.staging)

    def discard(self) -> None:
        """After a failed job: remove what its workers wrote straight to the target since it
        was opened (it carries no marker, but would make the next run need ``--overwrite``);
        a failure to do so is logged, not raised over the job's own error."""
        try:
            now = file_sizes(self.target)
            new = [n for n in now if n not in self.before and not self._kept(n)]
            delete_files(self.target, _markers_first(new))
        except DataError as err:
            log.warning("could not remove the unfinished output at %s: %s", self.target, err)

    def commit(self) -> None:
        """Put the staged files at the target, replacing the earlier output's (previous) files
        and what the job's workers wrote there as scratch, never a foreign file; then the
        completion marker, last. Nothing staged at an object store, nothing done (the job wrote
        its output straight to the target, with its own marker)."""
        if Path(str(self.target)) == self.staging:
            self._mark(sorted(n for n in file_sizes(self.target) if n not in self.foreign))
            _claim(self.target).unlink(missing_ok=True)
            return
        staged = _files(self.staging)
        if staged:
            self.publish(self.staging, staged, move=not self.remote)
        if not self.remote:
            shutil.rmtree(self.staging, ignore_errors=True)

    def publish(
        self, local: Path, staged: list[str] | None = None, *, move: bool = False
    ) -> list[str]:
        """Copy (``move``: move, on the same local filesystem) the files of the local folder
        ``local`` to the target (see :meth:`commit`); returns their names."""
        staged = _files(local) if staged is None else staged
        now = file_sizes(self.target)
        clash = sorted(n for n in staged if n in self.foreign and n in now)
        if clash:
            raise DataError(
                f"{join(self.target, clash[0])} was not written by meddiff: meddiff never "
                "replaces it; move it or choose another --out"
            )
        stale = [
            n
            for n in now
            if (n in self.previous or n not in self.before)
            and n not in staged
            and not self._kept(n)
            and n not in self.foreign
        ]
        # Old markers go first: an old marker never vouches for a mix of old and new files.
        delete_files(self.target, [n for n in stale if _is_marker(n)])
        delete_files(self.target, [n for n in self.previous if _is_marker(n) and n in staged])
        _copy_files(local, self.target, staged, move=move)
        delete_files(self.target, [n for n in stale if not _is_marker(n)])
        self._mark(staged)
        return staged

    def _mark(self, files: list[str]) -> None:
        """Write the completion marker listing ``files`` (and the ``keep`` folders), last."""
        files = [n for n in files if n != self.marker and not self._kept(n)]
        if self.marker is None or not (files or self.keep):
            return
        record = {"files": sorted(files)}
        if self.keep:
            record["folders"] = list(self.keep)
        write_text(self.join(self.marker), json.dumps(record, indent=2))

    def rebase(self, value: T) -> T:
        """``value`` (a JSON-able summary) with the staging folder's paths rewritten to the same
        places under the target: what the job reports names where its files end up."""
        return _rebase(value, self.staging, self.target)


def _refuse_root_or_file(loc: Location) -> None:
    if loc.remote and str(loc.target) == root_uri(str(loc.target)):
        raise DataError(
            f"{loc.target}: a bucket or container root cannot be an output (meddiff would share "
            f"it with everything else there); give a prefix inside it, e.g. {loc.target}/NAME"
        )
    if info(loc.target).type.name == "File":
        raise DataError(f"{loc.target} is a file (an object), not a folder; choose another --out")


def _holds(foreign: frozenset[str]) -> str:
    if not foreign:
        return "already exists"
    return f"already exists (it holds files meddiff did not write, e.g. {min(foreign)})"


def _is_marker(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1] in MARKERS


def _markers_first(names: Iterable[str]) -> list[str]:
    names = sorted(set(names))
    return [n for n in names if _is_marker(n)] + [n for n in names if not _is_marker(n)]


def _owned(
    target: str | Path,
    listing: dict[str, int],
    keep: Sequence[str],
    claimed: dict[str, Any] | None = None,
) -> tuple[frozenset[str], frozenset[str]]:
    """The files under ``target`` that meddiff wrote, and which of them are leftovers of a job
    that did not finish (no marker lists them).

    Meddiff's: what its markers list (at any depth: an output's own, and those of shard
    folders inside it), the markers themselves, everything in a folder a marker (or ``keep``)
    declares meddiff's, files meddiff named itself (:data:`OWN_NAME`), and, under the claim of
    a local job that never finished (``claimed``), everything but the foreign files it recorded.
    """
    folders = set(keep)
    listed: set[str] = set()
    named: set[str] = set()
    for rel in listing:
        base, _, fname = rel.rpartition("/")
        prefix = f"{base}/" if base else ""
        if fname in MARKERS:
            record = _read_marker(join(target, rel))
            named.add(rel)
            listed.update(prefix + str(f) for f in record.get("files", []))
            folders.update(prefix + str(f) for f in record.get("folders", []))
        elif OWN_NAME.fullmatch(fname):
            named.add(rel)
    kept = {n for n in listing if any(n.startswith(f"{d}/") for d in folders)}
    other = set((claimed or {}).get("foreign", []))
    leftovers = {n for n in listing if claimed is not None and n not in other}
    leftovers |= {n for n in named if OWN_NAME.fullmatch(n.rsplit("/", 1)[-1])}
    leftovers -= listed | kept | {n for n in named if n.rsplit("/", 1)[-1] in MARKERS}
    owned = (listed | named | kept | leftovers) & set(listing)
    return frozenset(owned), frozenset(leftovers & owned)


def _read_claim(path: Path) -> dict[str, Any] | None:
    return _read_marker(path) if path.is_file() else None


def _read_marker(path: str | Path) -> dict[str, Any]:
    try:
        record = json.loads(read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # unreadable: it vouches for nothing (the marker itself is still meddiff's)
    return record if isinstance(record, dict) else {}


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _copy_files(local: Path, target: str | Path, names: list[str], *, move: bool) -> None:
    """Copy (or move) ``names`` (relative to ``local``) to ``target``, markers last."""
    from meddiff.storage.operations import upload_file

    for rel in [n for n in names if not _is_marker(n)] + [n for n in names if _is_marker(n)]:
        if move:
            dst = Path(str(target)) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local / rel, dst)
        else:
            upload_file(local / rel, join(target, rel))


def _move_files(src: Path, dst: Path) -> None:
    """Move every file of ``src`` into ``dst`` (markers last), then remove ``src``."""
    _copy_files(src, dst, _files(src), move=True)
    shutil.rmtree(src, ignore_errors=True)


def record_files(folder: str | Path, names: Sequence[str]) -> None:
    """Add ``names`` (files meddiff wrote into the complete output ``folder`` after it was
    committed, e.g. the CLI's ``index.html``) to its completion marker; nothing without one."""
    marker = join(folder, COMPLETE)
    if info(marker).type.name != "File":
        return
    record = _read_marker(marker)
    record["files"] = sorted({*record.get("files", []), *names})
    write_text(marker, json.dumps(record, indent=2))


def upload_dir(
    local: str | Path, uri: str | Path, *, marker: str | None = COMPLETE, keep: Sequence[str] = ()
) -> list[str]:
    """Copy the local directory ``local`` to ``uri``, replacing the output meddiff had there
    (never a foreign file: one of the same name is an error) but the sub-folders in ``keep``,
    then write ``marker`` (a JSON list of the files) last, so a reader can tell a complete
    upload. Returns the uploaded names (a file named like the marker is uploaded last too)."""
    loc = OutputLocation.prepare(
        uri, overwrite=True, keep=keep, resume=True, marker=marker, stage=False
    )
    return loc.publish(Path(local))


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
    return _rebase(value, local, uri) if is_uri(uri) else value


def _rebase(value: T, local: str | Path, dest: str | Path) -> T:
    root, dest = str(local).rstrip("/"), str(dest).rstrip("/")
    if root == dest:
        return value

    def walk(v):
        if isinstance(v, str) and (v == root or v.startswith(root + "/")):
            return dest + v[len(root) :]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return type(v)(walk(x) for x in v)
        return v

    return walk(value)


__all__ = [
    "COMPLETE",
    "OWN_NAME",
    "Location",
    "OutputLocation",
    "local_output",
    "record_files",
    "rebase",
    "upload_dir",
    "write_token",
]
