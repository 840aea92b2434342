"""``meddiff serve check``: a Serve config file validated strictly, before anything starts.

Ray's ``ServeDeploySchema`` ignores keys it does not know (a misspelt ``max_ongoing_requestz`` is
silently dropped), so every key is checked against the schema's fields here, with a suggestion
for the nearest one. meddiff's own parts are then validated: each application's ``args``
(:class:`~meddiff.config.serving.AppArgs`, including its config overrides), each model
deployment's ``user_config`` (:class:`~meddiff.config.serving.ModelUserConfig`), and the model
reference itself, which must resolve in the registry to a model of the service's kind.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from meddiff.config.serving import AppArgs, ModelUserConfig
from meddiff.errors import ConfigError, ModelError

BUILDERS = {
    "meddiff.serving.deployments:anomaly_app": ("anomaly", "AnomalyModel"),
    "meddiff.serving.deployments:synthesis_app": ("synthesis", "SynthesisModel"),
}


def shipped_config(name: str) -> Path:
    """The path of the Serve config ``name`` shipped with meddiff (``tiny``: one CPU machine,
    the default of ``meddiff serve run``; ``full``: a GPU cluster), package data under
    ``meddiff/serving/configs/`` found through :mod:`importlib.resources`, so an installed wheel
    finds it as a checkout does.

    Raises:
        ConfigError: no shipped config is named ``name`` (the message lists those that are).
    """
    from importlib.resources import files

    folder = files("meddiff.serving") / "configs"
    found = folder / f"{name}.yaml"
    if not found.is_file():
        names = sorted(p.name.removesuffix(".yaml") for p in folder.iterdir())
        raise ConfigError(f"no shipped Serve config '{name}'; shipped: {', '.join(names)}")
    # meddiff is installed unpacked (a wheel or a checkout), so the resource is a file on disk:
    # Serve and `meddiff serve check` read it by path.
    return Path(str(found))


def read_config(path: str | Path) -> dict[str, Any]:
    """The YAML mapping of a Serve config file (ConfigError when missing or not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Serve config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"Serve config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Serve config {path} must be a mapping with 'applications'")
    return data


def unknown_keys(data: Any, model: type[BaseModel], where: str = "") -> list[str]:
    """Every key of ``data`` that ``model`` (recursively) does not define, with a suggestion."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    names = set(fields) | {f.alias for f in fields.values() if f.alias}
    out = []
    for key, value in data.items():
        loc = f"{where}.{key}" if where else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            out.append(f"{loc}: unknown key{hint}")
            continue
        field = fields.get(key) or next(f for f in fields.values() if f.alias == key)
        sub, is_list = _nested_model(field.annotation)
        if sub is None:
            continue
        if is_list and isinstance(value, list):
            for i, item in enumerate(value):
                out += unknown_keys(item, sub, f"{loc}[{i}]")
        else:
            out += unknown_keys(value, sub, loc)
    return out


def _nested_model(annotation) -> tuple[type[BaseModel] | None, bool]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    for arg in typing.get_args(annotation):
        sub, is_list = _nested_model(arg)
        if sub is not None:
            return sub, is_list or origin in (list, tuple)
    return None, False


def check_config(path: str | Path, tracking=None, resolve_models: bool = True) -> list[dict]:
    """Validate ``path`` strictly; returns one entry per model deployment (application, kind,
    model reference and, with ``resolve_models``, the version it resolves to).

    Raises:
        ConfigError: an unknown key, an invalid value, an unknown builder, bad args/user_config.
        ModelError: a model reference that does not resolve (known versions listed) or a model of
            the other kind.
    """
    from ray.serve.schema import ServeDeploySchema

    from meddiff.serving.deployments import service_config

    data = read_config(path)
    problems = unknown_keys(data, ServeDeploySchema)
    if problems:
        raise ConfigError(f"{path}:\n  " + "\n  ".join(problems))
    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {_first(err)}") from None
    out = []
    for i, app in enumerate(data.get("applications") or []):
        where = f"{path}: applications[{i}] ({app.get('name')})"
        if app.get("import_path") not in BUILDERS:
            raise ConfigError(
                f"{where}.import_path '{app.get('import_path')}': expected one of "
                f"{', '.join(BUILDERS)}"
            )
        kind, model_name = BUILDERS[app["import_path"]]
        try:
            args = AppArgs.model_validate(app.get("args") or {})
        except ValidationError as err:
            raise ConfigError(f"{where}.args: {_first(err)}") from None
        try:
            cfg = service_config(args)
        except ConfigError as err:
            raise ConfigError(f"{where}.args: {err}") from None
        deployments = {d.get("name"): d for d in app.get("deployments") or []}
        model = deployments.get(model_name)
        if model is None or "user_config" not in model:
            raise ConfigError(f"{where}: deployment {model_name} needs a user_config with 'model'")
        try:
            user = ModelUserConfig.model_validate(model["user_config"])
        except ValidationError as err:
            raise ConfigError(
                f"{where}.deployments.{model_name}.user_config: {_first(err)}"
            ) from None
        entry = {"application": app.get("name"), "kind": kind, "model": user.model}
        if resolve_models:
            entry.update(resolve_kind(kind, user.model, tracking or cfg.tracking))
        out.append(entry)
    return out


def resolve_kind(kind: str, ref: str, tracking) -> dict[str, Any]:
    """The version ``ref`` resolves to, after checking the model is of ``kind``."""
    from meddiff.tracking import fetch_model
    from meddiff.tracking.aliases import resolve

    resolved = resolve(ref, tracking)
    local = Path(fetch_model(resolved.uri, tracking))
    marker = "thor_model.json" if kind == "anomaly" else "model_index.json"
    if not (local / marker).is_file():
        other = "Stable Diffusion pipeline" if kind == "anomaly" else "THOR model"
        raise ModelError(
            f"{ref} is not a model for the {kind} service (no {marker}; is it a {other}?)"
        )
    return {"version": resolved.version, "uri": resolved.uri}


def _first(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    return f"{loc}: {e['msg']} (got {e.get('input')!r})"
