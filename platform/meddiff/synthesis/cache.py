"""The training set as training workers read it: memory-mapped arrays in one directory.

Built once from a pairs shard directory by Ray Data stages, then read by every worker through
``np.load(mmap_mode="r")`` (one copy in the page cache per node, random access per batch, nothing
held per worker). Two kinds:

- ``latents`` (``train.cache_latents``): the VAE posterior of every image (``latent_mean``,
  ``latent_std`` float16 (N, C, h, w)) and the text-encoder output of every distinct prompt
  (``text_embeddings`` float32 (P, L, D)); training never runs the VAE or text encoder.
- ``images``: the patches themselves (``images`` uint8 (N, H, W, 3)); training encodes each
  batch on the fly (augmentation needs this).

Both hold ``prompt_ids`` int64 (N,) into ``prompts`` (``cache.json``; entry 0 is the empty prompt
used for prompt dropout) and ``labels``. ``cache.json`` is written last and the directory is built
under a temporary name, so a half-built cache is never used. On a cluster the directory must be on
storage every node sees (like the pairs it came from).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddiff import runtime, storage
from meddiff.config import Config
from meddiff.data import shards
from meddiff.errors import DataError
from meddiff.files import read_format_json, write_json
from meddiff.synthesis import components as C

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

INFO = "cache.json"
FORMAT = "meddiff-synthesis-cache/1"
PAIR_COLUMNS = ("prompt", "label", "cluster")


def check_pairs(pairs: str | Path) -> dict[str, Any]:
    """The manifest of a pairs shard directory, checked for the columns training needs."""
    manifest = shards.read_manifest(pairs)
    missing = [c for c in ("image", *PAIR_COLUMNS) if c not in manifest["columns"]]
    if missing:
        raise DataError(
            f"{pairs}: pairs need column(s) {', '.join(missing)} "
            f"(have {', '.join(manifest['columns'])}); are these the morphology-prompts output?"
        )
    if manifest["rows"] == 0:
        raise DataError(f"{pairs}: the pairs have no rows")
    return manifest


def pair_prompts(pairs: str | Path) -> list[str]:
    """The distinct prompts of a pairs directory (reads only the prompt column)."""
    manifest = shards.read_manifest(pairs)
    values: set[str] = set()
    for name in manifest["files"]:
        col = shards.read_file(pairs, name, columns=["prompt"])["prompt"]
        values.update(str(v) for v in col.to_pylist())
    return sorted(values)


def cache_key(cfg: Config, source: str, pairs: str | Path, manifest: dict[str, Any]) -> str:
    """What the cache depends on: the pairs, the model, the resolution and the cache kind."""
    parts = {
        "pairs": str(storage.resolve(pairs)),
        "files": manifest["files"],
        "rows": manifest["rows"],
        "model": _model_identity(source),
        "revision": cfg.synthesis.model.revision,
        "resolution": cfg.synthesis.model.resolution,
        "kind": "latents" if cfg.synthesis.train.cache_latents else "images",
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _model_identity(source: str) -> str:
    """A model built from config is identified by what it was built from (so a copied base
    directory keeps its cache); any other by its name and the time its directory was written."""
    built = Path(source) / C.BASE_INFO
    if built.is_file():
        return built.read_text()
    index = Path(source) / "model_index.json"
    return f"{source}@{index.stat().st_mtime_ns}" if index.is_file() else source


def build_cache(cfg: Config, source: str, pairs: str | Path, out: str | Path) -> dict[str, Any]:
    """Build (or reuse, when complete and for the same inputs) the training cache under ``out``.

    Returns the cache info (``cache.json``).
    """
    out = Path(out)
    manifest = check_pairs(pairs)
    key = cache_key(cfg, source, pairs, manifest)
    if (out / INFO).is_file():
        info = json.loads((out / INFO).read_text())
        if info.get("key") == key:
            log.info("reusing training cache %s", out)
            return info
    tcfg = cfg.synthesis.train
    n = int(manifest["rows"])
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    prompts = ["", *pair_prompts(pairs)]
    ids = {p: i for i, p in enumerate(prompts)}
    _write_rows(cfg, _encoded_pairs(cfg, source, pairs), ids, n, tmp, pairs)
    if tcfg.cache_latents:
        _write_text_embeddings(cfg, source, prompts, tmp)
    info = {
        "format": FORMAT,
        "key": key,
        "kind": "latents" if tcfg.cache_latents else "images",
        "rows": n,
        "prompts": prompts,
        "pairs": str(pairs),
        "source": source,
        "resolution": cfg.synthesis.model.resolution,
    }
    write_json(tmp / INFO, info)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return info


def _encoded_pairs(cfg: Config, source: str, pairs: str | Path) -> ray.data.Dataset:
    """The pairs as a Ray dataset, with each image's VAE latent distribution (``latent_mean``,
    ``latent_std``) added by the model's encoder where ``synthesis.train.cache_latents``."""
    from meddiff.synthesis.stages import ImageEncoder

    tcfg = cfg.synthesis.train
    ds = shards.read_shards(pairs, columns=list(PAIR_COLUMNS))
    if tcfg.cache_latents:
        ds = ds.map_batches(
            ImageEncoder,
            fn_constructor_kwargs={
                "source": source,
                "resolution": cfg.synthesis.model.resolution,
                "revision": cfg.synthesis.model.revision,
                "use_gpu": tcfg.use_gpu,
            },
            batch_size=tcfg.encode_batch_size,
            concurrency=tcfg.encode_concurrency,
            num_gpus=1 if tcfg.use_gpu else 0,
            batch_format="numpy",
        )
    return ds


def _write_rows(
    cfg: Config, ds: ray.data.Dataset, ids: dict[str, int], n: int, tmp: Path, pairs: str | Path
) -> None:
    """Stream the ``n`` rows of ``ds`` into one memory-mapped ``.npy`` per column under ``tmp``:
    prompt ids (into ``ids``), labels, clusters, and the latents or the images.

    Raises:
        DataError: ``ds`` held another number of rows than the manifest of ``pairs`` says.
    """
    tcfg = cfg.synthesis.train
    arrays: dict[str, np.ndarray] = {}
    row = 0
    batches = ds.iter_batches(batch_size=tcfg.encode_batch_size, batch_format="numpy")
    total = -(-n // tcfg.encode_batch_size)
    desc = "encode latents" if tcfg.cache_latents else "cache images"
    for batch in runtime.progress(batches, total=total, desc=desc, show=cfg.runtime.progress):
        m = len(batch["prompt"])
        cols = {
            "prompt_ids": np.array([ids[str(p)] for p in batch["prompt"]], dtype=np.int64),
            "labels": np.asarray(batch["label"], dtype=np.int64),
            "clusters": np.asarray(batch["cluster"], dtype=np.int64),
        }
        if tcfg.cache_latents:
            cols["latent_mean"] = batch["latent_mean"]
            cols["latent_std"] = batch["latent_std"]
        else:
            cols["images"] = np.asarray(batch["image"], dtype=np.uint8)
        for name, values in cols.items():
            if name not in arrays:
                arrays[name] = np.lib.format.open_memmap(
                    tmp / f"{name}.npy", mode="w+", dtype=values.dtype, shape=(n, *values.shape[1:])
                )
            arrays[name][row : row + m] = values
        row += m
    if row != n:
        raise DataError(f"{pairs}: manifest says {n} rows but {row} were read")
    for arr in arrays.values():
        arr.flush()


def _write_text_embeddings(cfg: Config, source: str, prompts: list[str], tmp: Path) -> None:
    """Encode every distinct prompt once with the model's text encoder (a Ray Data stage) and
    save them, in the order of ``prompts``, as ``text_embeddings.npy`` (float32) under ``tmp``."""
    import ray.data

    from meddiff.synthesis.stages import PromptEncoder

    tcfg = cfg.synthesis.train
    emb = (
        ray.data.from_items([{"prompt": p} for p in prompts])
        .map_batches(
            PromptEncoder,
            fn_constructor_kwargs={
                "source": source,
                "revision": cfg.synthesis.model.revision,
                "use_gpu": tcfg.use_gpu,
            },
            batch_size=64,
            concurrency=1,
            num_gpus=1 if tcfg.use_gpu else 0,
            batch_format="numpy",
        )
        .take_all()
    )
    table = {str(r["prompt"]): r["embedding"] for r in emb}
    np.save(tmp / "text_embeddings.npy", np.stack([table[p] for p in prompts]).astype(np.float32))


class TrainingSet:
    """A built cache, memory-mapped (cheap to open in every worker)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        missing = f"{self.root} is not a complete training cache (no {INFO})"
        self.info = read_format_json(self.root / INFO, FORMAT, DataError, missing)
        self.kind: str = self.info["kind"]
        self.prompts: list[str] = self.info["prompts"]
        self.prompt_ids = np.load(self.root / "prompt_ids.npy", mmap_mode="r")
        self.labels = np.load(self.root / "labels.npy", mmap_mode="r")
        if self.kind == "latents":
            self.latent_mean = np.load(self.root / "latent_mean.npy", mmap_mode="r")
            self.latent_std = np.load(self.root / "latent_std.npy", mmap_mode="r")
            self.text_embeddings = np.load(self.root / "text_embeddings.npy")
        else:
            self.images = np.load(self.root / "images.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.prompt_ids)


def batch_indices(n: int, step: int, *, world: int, rank: int, batch: int, seed: int) -> np.ndarray:
    """Rows of the (0-based) ``step`` for ``rank``: a fresh permutation per epoch, the global
    batch cut into one slice per rank, the epoch's remainder dropped.

    A pure function of the step, so a run resumed from a checkpoint at step s reads exactly the
    batches an uninterrupted run would have read from s on.
    """
    per_step = world * batch
    if n < per_step:
        raise DataError(
            f"the pairs have {n} rows, fewer than one global batch of {per_step} "
            f"(train.num_workers={world} × train.batch_size={batch})"
        )
    epoch, k = divmod(step, n // per_step)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    start = k * per_step + rank * batch
    # Sorted: neighbouring rows are read together from the memory map; the loss is a mean, so
    # the order inside a batch does not matter.
    return np.sort(perm[start : start + batch])
