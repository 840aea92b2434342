"""Registry aliases as deployments use them: resolve ``models:/NAME@ALIAS`` to a version, move an
alias (promote) and move it back (rollback).

Each move is recorded on the registered model as the tag ``meddiff.alias.<ALIAS>.history`` (the
versions the alias has pointed at, oldest first), so a rollback knows where to go back to. A
canary (a share of the traffic to a candidate version before the alias moves) is the tag
``meddiff.alias.<ALIAS>.canary`` = ``VERSION:PERCENT``, which the serving replicas follow.

Moves of one alias are serialized across processes and machines by a lock that the registry
itself provides: creating a registered model is atomic (its name is unique in the registry's
database), so the lock is a registered model ``meddiff-lock--NAME--ALIAS`` that exists while a
move reads the history, moves the alias and writes the history back. Without it, four concurrent
promotions all succeeded and the history lost one of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from meddiff.config import TrackingConfig
from meddiff.errors import ModelError
from meddiff.tracking.runs import configure

log = logging.getLogger(__name__)

LOCK_PREFIX = "meddiff-lock--"
_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ResolvedModel:
    """What a served model is: the registry entry behind a reference (None for a directory)."""

    ref: str
    uri: str  # what to fetch: models:/NAME/VERSION, or the directory
    name: str | None = None
    alias: str | None = None
    version: str | None = None
    run_id: str | None = None
    code_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_ref(ref: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version) of a ``models:/`` reference; None for anything else."""
    m = _REF.match(ref)
    if m is None:
        if ref.startswith("models:/"):
            raise ModelError(
                f"model reference '{ref}': expected models:/NAME/VERSION or models:/NAME@ALIAS"
            )
        return None
    return m["name"], m["alias"], m["version"]


def model_version(ref: str, tracking: TrackingConfig):
    """The MLflow ``ModelVersion`` that ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` names
    now (the one place a registry reference is looked up).

    Raises:
        ModelError: not a ``models:/`` reference; no such registered model, version or alias
            (the message lists the known versions and aliases).
    """
    import mlflow

    parsed = parse_ref(ref)
    if parsed is None:
        raise ModelError(f"'{ref}': expected models:/NAME/VERSION or models:/NAME@ALIAS")
    name, alias, version = parsed
    configure(tracking)
    client = mlflow.MlflowClient()
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException:
        raise ModelError(f"model reference '{ref}' does not exist; {known(name)}") from None


def resolve(ref: str, tracking: TrackingConfig) -> ResolvedModel:
    """Pin ``ref`` to one version now (an alias may move later); a directory stays itself.

    Raises:
        ModelError: as :func:`model_version`.
    """
    parsed = parse_ref(ref)
    if parsed is None:
        return ResolvedModel(ref=ref, uri=ref)
    import mlflow

    name, alias, _ = parsed
    mv = model_version(ref, tracking)
    code = None
    if mv.run_id:
        try:
            code = mlflow.MlflowClient().get_run(mv.run_id).data.tags.get("meddiff.code_version")
        except mlflow.exceptions.MlflowException:
            code = None
    return ResolvedModel(
        ref=ref,
        uri=f"models:/{name}/{mv.version}",
        name=name,
        alias=alias,
        version=str(mv.version),
        run_id=mv.run_id,
        code_version=code,
    )


def known(name: str) -> str:
    """'known versions of NAME: 1, 2 (aliases: production=2)' or the registered names."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        names = sorted(m.name for m in client.search_registered_models() if not is_lock(m.name))
        return f"no registered model '{name}'; registered models: {', '.join(names) or 'none'}"
    versions = sorted(
        (int(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int
    )
    aliases = ", ".join(f"{a}={v}" for a, v in sorted((model.aliases or {}).items()))
    return (
        f"known versions of {name}: {', '.join(map(str, versions)) or 'none'}"
        f" (aliases: {aliases or 'none'})"
    )


def is_lock(name: str) -> bool:
    """Whether a registered model name is one of meddiff's alias locks."""
    return name.startswith(LOCK_PREFIX)


@contextlib.contextmanager
def alias_lock(client, name: str, alias: str, timeout_s: float = 60.0, stale_s: float = 300.0):
    """Hold the lock of ``NAME@ALIAS`` (see the module's docstring). A lock older than
    ``stale_s`` (a process killed while holding it) is broken, with a warning.

    Raises:
        ModelError: the lock could not be had within ``timeout_s``.
    """
    import mlflow

    lock = f"{LOCK_PREFIX}{name}--{alias}"
    holder = f"meddiff alias lock: pid {os.getpid()} on {socket.gethostname()}"
    deadline = time.monotonic() + timeout_s
    reason = "held by another promotion"
    while True:
        try:
            client.create_registered_model(lock, description=holder)
            break
        except mlflow.exceptions.MlflowException as err:
            reason = _held(client, lock, stale_s) or str(err.message).splitlines()[0]
        if time.monotonic() > deadline:
            raise ModelError(
                f"models:/{name}@{alias}: could not lock the alias within {timeout_s:.0f} s "
                f"({reason}); retry, or delete the registered model '{lock}' if no promotion is "
                "running"
            )
        time.sleep(random.uniform(0.05, 0.25))
    try:
        yield
    finally:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.delete_registered_model(lock)


def _held(client, lock: str, stale_s: float) -> str | None:
    """Why the lock is taken (its holder and age); breaks it when older than ``stale_s``."""
    import mlflow

    try:
        model = client.get_registered_model(lock)
    except mlflow.exceptions.MlflowException:
        return None  # released meanwhile (or the registry hiccuped): try again
    age = time.time() - model.creation_timestamp / 1000
    if age > stale_s:
        log.warning("breaking the stale lock %s (%s, %.0f s old)", lock, model.description, age)
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.delete_registered_model(lock)
    return f"held by {model.description or 'another process'} for {age:.0f} s"


def _client(tracking: TrackingConfig):
    import mlflow

    configure(tracking)
    return mlflow.MlflowClient()


def _require_version(client, name: str, version: str) -> None:
    import mlflow

    try:
        client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        raise ModelError(f"models:/{name}/{version} does not exist; {known(name)}") from None


def version_tags(name: str, version: str, tracking: TrackingConfig) -> dict[str, str]:
    """The tags of ``models:/NAME/VERSION``.

    Raises:
        ModelError: no such version (the message lists the known versions and aliases).
    """
    import mlflow

    client = _client(tracking)
    try:
        return dict(client.get_model_version(name, str(version)).tags or {})
    except mlflow.exceptions.MlflowException:
        raise ModelError(f"models:/{name}/{version} does not exist; {known(name)}") from None


def set_version_tags(
    name: str, version: str, tags: Mapping[str, str], tracking: TrackingConfig
) -> None:
    """Set ``tags`` on ``models:/NAME/VERSION`` (a calibration, a memorization audit).

    Raises:
        ModelError: the registry refused (no such version, a store that cannot be written).
    """
    import mlflow

    client = _client(tracking)
    try:
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
    except mlflow.exceptions.MlflowException as err:
        raise ModelError(f"models:/{name}/{version}: cannot set tags ({err.message})") from None


def promote(name: str, version: str, alias: str, tracking: TrackingConfig) -> str | None:
    """Point ``alias`` at ``version``, ending a canary of the alias; returns the version it
    pointed at before (or None). Serialized with every other move of the alias.

    Raises:
        ModelError: no such model or version (the known versions are listed); the alias stayed
            locked by another move for a minute.
    """
    client = _client(tracking)
    _require_version(client, name, version)
    with alias_lock(client, name, alias):
        previous = _current(client, name, alias)
        history = _history(client, name, alias)
        if previous is not None and (not history or history[-1] != previous):
            history.append(previous)
        history.append(str(version))
        client.set_registered_model_alias(name, alias, str(version))
        client.set_registered_model_tag(name, _tag(alias), ",".join(history))
        _clear_canary(client, name, alias)
    return previous


def rollback(name: str, alias: str, tracking: TrackingConfig) -> tuple[str, str]:
    """Point ``alias`` back at the version it pointed at before the last promotion.

    Returns (from_version, to_version).

    Raises:
        ModelError: no such model or alias, no earlier version recorded for the alias, or that
            version was deleted from the registry (the known versions are listed).
    """
    client = _client(tracking)
    with alias_lock(client, name, alias):
        current = _current(client, name, alias)
        if current is None:
            raise ModelError(f"models:/{name}@{alias} does not exist; {known(name)}")
        history = _history(client, name, alias)
        while history and history[-1] == current:
            history.pop()
        if not history:
            raise ModelError(
                f"models:/{name}@{alias} has no earlier version to roll back to (it points at "
                f"{current}; promote with `meddiff serve promote` records the history)"
            )
        target = history[-1]
        try:
            _require_version(client, name, target)
        except ModelError:
            raise ModelError(
                f"models:/{name}@{alias}: the version before {current}, {target}, was deleted "
                f"from the registry; {known(name)}; point the alias at one with `meddiff serve "
                f"promote {name} VERSION`"
            ) from None
        client.set_registered_model_alias(name, alias, target)
        client.set_registered_model_tag(name, _tag(alias), ",".join(history))
        _clear_canary(client, name, alias)
    return current, target


def set_canary(
    name: str, version: str, percent: float, alias: str, tracking: TrackingConfig
) -> str:
    """Send ``percent`` % of the requests of services that follow ``models:/NAME@ALIAS`` to
    ``version`` (each replica loads it beside the alias's version); returns the alias's version.

    Raises:
        ModelError: no such version or alias, the candidate is the alias's version, or
            ``percent`` is not in (0, 100].
    """
    if not 0 < percent <= 100:
        raise ModelError(f"--percent {percent:g}: expected a share in (0, 100]")
    client = _client(tracking)
    _require_version(client, name, version)
    with alias_lock(client, name, alias):
        current = _current(client, name, alias)
        if current is None:
            raise ModelError(f"models:/{name}@{alias} does not exist; {known(name)}")
        if current == str(version):
            raise ModelError(f"models:/{name}@{alias} already points at {version}")
        client.set_registered_model_tag(name, _canary_tag(alias), f"{version}:{percent:g}")
    return current


def canary_of(name: str, alias: str, tracking: TrackingConfig) -> tuple[str, float] | None:
    """(candidate version, percent) of the alias's canary, or None."""
    client = _client(tracking)
    raw = client.get_registered_model(name).tags.get(_canary_tag(alias), "")
    version, _, percent = raw.partition(":")
    try:
        return (version, float(percent)) if version else None
    except ValueError:
        log.warning("ignoring the malformed canary tag of %s@%s", name, alias)
        return None


def end_canary(name: str, alias: str, tracking: TrackingConfig) -> str | None:
    """End the alias's canary (the alias stays); returns the candidate version, or None."""
    client = _client(tracking)
    with alias_lock(client, name, alias):
        raw = client.get_registered_model(name).tags.get(_canary_tag(alias), "")
        _clear_canary(client, name, alias)
    return raw.partition(":")[0] or None


def _clear_canary(client, name: str, alias: str) -> None:
    import mlflow

    if _canary_tag(alias) in client.get_registered_model(name).tags:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.delete_registered_model_tag(name, _canary_tag(alias))


def _tag(alias: str) -> str:
    return f"meddiff.alias.{alias}.history"


def _canary_tag(alias: str) -> str:
    return f"meddiff.alias.{alias}.canary"


def _current(client, name: str, alias: str) -> str | None:
    import mlflow

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        try:
            client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            raise ModelError(f"no registered model '{name}'; {known(name)}") from None
        return None


def _history(client, name: str, alias: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(_tag(alias), "")
    return [v for v in raw.split(",") if v]
