"""Registry aliases as deployments use them: resolve ``models:/NAME@ALIAS`` to a version, move an
alias (promote) and move it back (rollback).

Each move is recorded on the registered model as the tag ``meddiff.alias.<ALIAS>.history`` (the
versions the alias has pointed at, oldest first), so a rollback knows where to go back to.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from meddiff.config import TrackingConfig
from meddiff.errors import ModelError
from meddiff.tracking.runs import configure

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
        names = sorted(m.name for m in client.search_registered_models())
        return f"no registered model '{name}'; registered models: {', '.join(names) or 'none'}"
    versions = sorted(
        (int(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int
    )
    aliases = ", ".join(f"{a}={v}" for a, v in sorted((model.aliases or {}).items()))
    return (
        f"known versions of {name}: {', '.join(map(str, versions)) or 'none'}"
        f" (aliases: {aliases or 'none'})"
    )


def promote(name: str, version: str, alias: str, tracking: TrackingConfig) -> str | None:
    """Point ``alias`` at ``version``; returns the version it pointed at before (or None).

    Raises:
        ModelError: no such model or version (the known versions are listed).
    """
    import mlflow

    configure(tracking)
    client = mlflow.MlflowClient()
    try:
        client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        raise ModelError(f"models:/{name}/{version} does not exist; {known(name)}") from None
    previous = _current(client, name, alias)
    history = _history(client, name, alias)
    if previous is not None and (not history or history[-1] != previous):
        history.append(previous)
    history.append(str(version))
    client.set_registered_model_alias(name, alias, str(version))
    client.set_registered_model_tag(name, _tag(alias), ",".join(history))
    return previous


def rollback(name: str, alias: str, tracking: TrackingConfig) -> tuple[str, str]:
    """Point ``alias`` back at the version it pointed at before the last promotion.

    Returns (from_version, to_version).

    Raises:
        ModelError: no such model or alias, or no earlier version recorded for the alias.
    """
    import mlflow

    configure(tracking)
    client = mlflow.MlflowClient()
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
    client.set_registered_model_alias(name, alias, target)
    client.set_registered_model_tag(name, _tag(alias), ",".join(history))
    return current, target


def _tag(alias: str) -> str:
    return f"meddiff.alias.{alias}.history"


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
