"""Pass 1 as a checkpoint: its rows stay in the build's partial folder (``_work/checked``, with a
fingerprint of what they depend on in their manifest), so a rerun with the same source and
settings (e.g. after fixing ``k``) skips the expensive filter + embedding pass."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from meddiff import storage
from meddiff.config import Config
from meddiff.config.prompts import EmbedConfig
from meddiff.data.shards import MANIFEST, is_shard_dir, read_manifest
from meddiff.morphology.layout import Workspace
from meddiff.morphology.stages import EMBED_SCHEDULING, check_and_embed, preflight

log = logging.getLogger(__name__)


def fingerprint(
    cfg: Config, source: str | Path, split: str, limit: int | None, embed: EmbedConfig | None
) -> str:
    """What pass 1's output depends on: the source (and its files' sizes and times), the data
    and filter settings, and the embedder (not its scheduling: batch size, GPUs, actors)."""
    parts = {
        "source": str(storage.resolve(source)),
        "stamp": storage.stamp(source),
        "split": split,
        "limit": limit,
        "data": cfg.data.model_dump(mode="json"),
        "patch_size": cfg.prompts.patch_size,
        "filter": cfg.prompts.filter.model_dump(mode="json"),
        "embed": embed.model_dump(mode="json", exclude=set(EMBED_SCHEDULING)) if embed else None,
        "seed": cfg.runtime.seed if embed is not None and embed.weights is None else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_matches(checked: Path, key: str) -> bool:
    """True when ``checked`` holds a complete pass 1 made with the fingerprint ``key``."""
    return is_shard_dir(checked) and read_manifest(checked).get("fingerprint") == key


def embed_or_resume(
    cfg: Config,
    source: str | Path,
    ws: Workspace,
    embed_cfg: EmbedConfig | None,
    *,
    split: str,
    limit: int | None,
    run_id: str | None = None,
) -> tuple[bool, int]:
    """Pass 1 into ``ws`` (``embed_cfg`` None: the filter alone, for baseline prompts), or the
    checkpoint of an earlier run with the same fingerprint; returns (resumed, rows read).

    Anything else in the partial folder (an earlier run with other settings) is removed first.

    Raises:
        DataError: a bad source or wrong patch size (from the dataset and the filter).
        ModelError: the embedder weights cannot be loaded (checked before any Ray work).
    """
    key = fingerprint(cfg, source, split, limit, embed_cfg)
    if checkpoint_matches(ws.checked, key):
        log.info("resuming from %s (embedding pass already complete)", ws.checked)
        return True, read_manifest(ws.checked)["rows"]
    shutil.rmtree(ws.partial, ignore_errors=True)
    if embed_cfg is not None:
        preflight(embed_cfg, cfg.runtime.seed)
    from meddiff.data.datasets import patch_dataset

    ds = patch_dataset(source, cfg.data, split=split, limit=limit)
    info = {"fingerprint": key}
    manifest = check_and_embed(cfg, ds, ws.worker_checked, embed_cfg, info=info, run_id=run_id)
    storage.fetch(ws.worker_checked, ws.checked, marker=MANIFEST)
    return False, manifest["rows"]
