"""The MLflow model registry: register a model directory, fetch one back by reference.

Models are plain directories (diffusers' ``save_pretrained`` layout, or a THOR checkpoint folder)
logged as run artifacts; a registered version points at them. ``fetch_model`` accepts a local
directory, an object-store prefix (``s3://bucket/run/model``, a complete meddiff upload),
``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or ``runs:/RUN_ID/PATH``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from meddiff.config import TrackingConfig
from meddiff.errors import ModelError
from meddiff.tracking.runs import configure


def register_model(
    local_dir: str | Path,
    name: str,
    *,
    artifact_path: str = "model",
    alias: str | None = None,
    tags: dict[str, str] | None = None,
    description: str | None = None,
) -> str:
    """Log ``local_dir`` under the active run and register it as a new version of ``name``.

    ``tags`` and ``description`` go on the model version (e.g. a shipped model's provenance).
    Returns the new version number (as a string).
    """
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_model needs an active MLflow run (use tracking.start_run)")
    mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path)
    client = mlflow.MlflowClient()
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        client.create_registered_model(name)  # fails when already registered: add a version
    # Lineage starts here: the version names its training run, whose tags and dataset inputs
    # lead back to the source files (meddiff lineage models:/NAME/VERSION).
    run_tags = client.get_run(run.info.run_id).data.tags
    lineage = {
        "meddiff.training_run": run.info.run_id,
        "meddiff.job": run_tags.get("meddiff.job", ""),
        "meddiff.code_version": run_tags.get("meddiff.code_version", ""),
        "meddiff.config": f"runs:/{run.info.run_id}/config.yaml",
    }
    version = client.create_model_version(
        name,
        f"runs:/{run.info.run_id}/{artifact_path}",
        run_id=run.info.run_id,
        tags={**lineage, **{k: str(v) for k, v in (tags or {}).items()}},
        description=description,
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def fetch_model(ref: str | Path, tracking: TrackingConfig, dst: str | Path | None = None) -> Path:
    """A local directory holding the model that ``ref`` names.

    An object-store prefix is fetched once per node into ``MEDDIFF_CACHE``
    (:func:`meddiff.storage.local_input`).

    Raises:
        ModelError: the directory does not exist, or the registry has no such model/version/alias
            (the message lists the registered names).
        DataError: an object-store prefix that is absent or incomplete (no completion marker).
    """
    from meddiff import storage

    if not str(ref).startswith(("models:/", "runs:/")):
        path = storage.local_input(ref)  # an object-store prefix: a local copy
        if not path.exists():
            raise ModelError(f"model directory {path} does not exist")
        if not path.is_dir():
            raise ModelError(f"model {ref} is a single file or object, not a model directory")
        return path
    ref = str(ref)

    import mlflow

    configure(tracking)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=ref, dst_path=str(dst) if dst else None
        )
    except mlflow.exceptions.MlflowException as err:
        known = sorted(m.name for m in mlflow.MlflowClient().search_registered_models())
        raise ModelError(
            f"cannot fetch model '{ref}': {err.message}; registered models: {known or 'none'}"
        ) from None
    local = Path(local)
    if not any(local.iterdir()):
        # MLflow answers an empty folder when the artifacts are gone (the store was moved or
        # emptied): say so, instead of letting the caller report a folder of the wrong kind.
        if dst is None:
            local.rmdir()
        raise ModelError(
            f"artifacts missing at {artifact_location(ref)} (for {ref}): the registry's "
            "artifact store was moved or emptied; restore it there or register the model again"
        )
    return local


def artifact_location(ref: str) -> str:
    """Where the files of ``models:/…`` or ``runs:/RUN/PATH`` are stored (the run's artifact
    URI joined with the path); ``ref`` itself when that cannot be found out."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        if ref.startswith("models:/"):
            from meddiff.tracking.aliases import parse_ref

            name, alias, version = parse_ref(ref)
            if alias:
                version = client.get_model_version_by_alias(name, alias).version
            ref = client.get_model_version_download_uri(name, version)
        if ref.startswith("runs:/"):
            run_id, _, path = ref[len("runs:/") :].partition("/")
            return client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + path
    except mlflow.exceptions.MlflowException:
        pass
    return ref
