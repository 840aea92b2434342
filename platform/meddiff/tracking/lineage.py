"""Lineage: where a registered model came from, back to the slides or PCam files.

Each job logs what it read as an MLflow dataset input (:func:`log_input`, through its run
handle): the URI or path, a content digest, and, when the input is a shard directory some earlier
meddiff run wrote, that run's id (shard manifests record the run that wrote them; the job reads it
with :func:`meddiff.data.shards.producer_run` and passes it in). A registered model version points at
its training run, so the chain model → training run → its inputs → the runs that produced them →
... ends at inputs no run produced: the source files. :func:`model_lineage` walks it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

from meddiff import storage
from meddiff.config import TrackingConfig
from meddiff.errors import DataError
from meddiff.tracking.aliases import model_version

log = logging.getLogger(__name__)

# Inputs up to this size are hashed byte for byte; larger ones by file names and sizes (hashing
# terabytes of slides on every run would cost more than the run).
CONTENT_DIGEST_MAX_BYTES = 2 * 2**30
MAX_DEPTH = 12


def dataset_digest(path: str | Path) -> tuple[str, str]:
    """A digest of the file or directory/prefix ``path`` and its kind.

    Returns ``("sha256:<hex>", "content")`` (names and bytes of every file, sorted) when the
    total size is at most ``CONTENT_DIGEST_MAX_BYTES``, else ``(..., "listing")`` (names and
    sizes). Raises DataError when ``path`` does not exist.
    """
    fs, inner = storage.filesystem(path)
    found = storage.info(path)
    if found.type.name == "File":
        entries = [("", inner, found.size)]
    else:
        names = storage.list_files(path)
        if not names:
            raise DataError(f"{path} does not exist or is empty")
        infos = storage.retry(str(path), lambda: fs.get_file_info([f"{inner}/{n}" for n in names]))
        entries = [(n, i.path, i.size) for n, i in zip(names, infos, strict=True)]
    total = sum(size for _, _, size in entries)
    kind = "content" if total <= CONTENT_DIGEST_MAX_BYTES else "listing"
    digest = hashlib.sha256()
    for rel, full, size in entries:
        digest.update(f"{rel}\0{size}\0".encode())
        if kind == "content":
            storage.retry(str(path), lambda f=full: _hash_file(fs, f, digest))
    return f"sha256:{digest.hexdigest()}", kind


def _hash_file(fs, path: str, digest) -> None:
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 * 2**20):
            digest.update(chunk)


def log_input(
    client,
    run_id: str,
    path: str | Path,
    context: str,
    name: str | None = None,
    producer_run: str | None = None,
) -> dict[str, str]:
    """Record ``path`` as a dataset input of run ``run_id`` (context: ``source``, ``training``,
    ``evaluation``...) through the ``MlflowClient`` ``client``; ``producer_run`` is the run that
    wrote it, if any. Returns the tags logged with it."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    uri = storage.absolute(path)
    try:
        digest, kind = dataset_digest(path)
    except DataError as err:
        # The job validates its input itself and says what is wrong with it in its own words.
        log.warning("not recording %s as a dataset input: %s", uri, err)
        return {}
    tags = {"meddiff.uri": uri, "meddiff.digest": digest, "meddiff.digest_kind": kind}
    if producer_run:
        tags["meddiff.producer_run"] = producer_run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "interpreted in multiple ways": both are local paths
        # MLflow knows abfss:// (Azure Data Lake) but not abfs://, the same store: take the
        # abfss source type and keep the URI as given.
        twin = "abfss://" + uri.removeprefix("abfs://") if uri.startswith("abfs://") else uri
        source = resolve_dataset_source(twin)
        if twin != uri:
            source = type(source)(uri)
    # MLflow keeps at most 36 characters of a dataset digest; the full one is in the tags.
    short = digest.removeprefix("sha256:")[:32]
    dataset = MetaDataset(source=source, name=name or storage.name(uri), digest=short)
    # What mlflow.log_input does for the active run, for this handle's run.
    input_tags = [InputTag(k, v) for k, v in tags.items()]
    input_tags.append(InputTag(MLFLOW_DATASET_CONTEXT, context))
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), input_tags)])
    return {**tags, "digest": digest}


def model_lineage(ref: str, tracking: TrackingConfig) -> dict[str, Any]:
    """The chain behind a registered model version, as nested dicts.

    ``{"model": ref, "name", "version", "aliases", "tags", "run": RUN}`` where RUN is
    ``{"run_id", "job", "code_version", "status", "config", "params", "inputs": [INPUT]}`` and
    INPUT is ``{"name", "uri", "digest", "digest_kind", "context", "produced_by": RUN | None}``.
    """
    import mlflow

    mv = model_version(ref, tracking)
    client = mlflow.MlflowClient()
    chain = {
        "model": ref,
        "name": mv.name,
        "version": str(mv.version),
        "aliases": list(getattr(mv, "aliases", []) or []),
        "tags": dict(mv.tags or {}),
        "run": _run_node(client, mv.run_id, 0) if mv.run_id else None,
    }
    return chain


def _run_node(client, run_id: str, depth: int) -> dict[str, Any]:
    import mlflow

    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        return {"run_id": run_id, "error": err.message}
    tags = run.data.tags
    node: dict[str, Any] = {
        "run_id": run_id,
        "job": tags.get("meddiff.job", run.info.run_name),
        "code_version": tags.get("meddiff.code_version"),
        "status": run.info.status,
        "config": f"runs:/{run_id}/config.yaml",
        "inputs": [],
    }
    for item in run.inputs.dataset_inputs if run.inputs else []:
        itags = {t.key: t.value for t in item.tags}
        producer = itags.get("meddiff.producer_run")
        node["inputs"].append(
            {
                "name": item.dataset.name,
                "uri": itags.get("meddiff.uri") or json.loads(item.dataset.source).get("uri"),
                "digest": itags.get("meddiff.digest", item.dataset.digest),
                "digest_kind": itags.get("meddiff.digest_kind"),
                "context": itags.get("mlflow.data.context"),
                "produced_by": _run_node(client, producer, depth + 1)
                if producer and producer != run_id and depth < MAX_DEPTH
                else None,
            }
        )
    return node


def format_lineage(chain: dict[str, Any]) -> str:
    """The chain as an indented tree, the model first and the source files last."""
    aliases = f" (aliases: {', '.join(chain['aliases'])})" if chain["aliases"] else ""
    lines = [f"model {chain['name']} version {chain['version']}{aliases}"]
    if chain["run"]:
        _format_run(chain["run"], lines, "  ")
    return "\n".join(lines)


def _format_run(node: dict[str, Any], lines: list[str], pad: str) -> None:
    if "error" in node:
        lines.append(f"{pad}run {node['run_id']}: {node['error']}")
        return
    lines.append(
        f"{pad}run {node['run_id']}  job={node['job']}  code={node['code_version']}  "
        f"status={node['status']}  config={node['config']}"
    )
    for item in node["inputs"]:
        lines.append(
            f"{pad}  input [{item['context']}] {item['uri']}  {item['digest_kind']} digest "
            f"{item['digest']}"
        )
        if item["produced_by"]:
            _format_run(item["produced_by"], lines, pad + "    ")
        else:
            lines.append(f"{pad}    (source files: no meddiff run produced them)")
