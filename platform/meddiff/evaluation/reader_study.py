"""Reader study kit: a blinded real-vs-synthetic reading set and the scoring of readers' answers.

``export_study`` picks real and synthetic patches at random, shuffles them and writes

- ``study.html``: one self-contained page (images inlined) where a reader marks each image real or
  synthetic and downloads the answers as JSON; it holds no ground truth;
- ``key.json``: the answer key (which image is which, and where it came from), kept apart.

``score_answers`` checks each answer file against the key and reports, with "synthetic" as the
positive class (paper A: median sensitivity/specificity 0.55/0.55): per-reader sensitivity and
specificity, their medians, and pairwise Cohen's kappa over all images and separately over real
and over synthetic images (paper A, Fig. 5c).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.errors import DataError
from meddiff.files import write_json, write_text
from meddiff.reports import Provenance, encode_png, png_data_uri, render

KEY_FORMAT = "meddiff-reader-study/1"
ANSWER_FORMAT = "meddiff-reader-answers/1"
CHOICES = ("real", "synthetic")


def export_study(
    real: str | Path,
    synthetic: str | Path,
    out: str | Path,
    *,
    num_real: int,
    num_synthetic: int,
    real_split: str = "train",
    synthetic_split: str = "train",
    seed: int = 0,
    display_size: int = 288,
    title: str = "Real or synthetic?",
    provenance: Provenance | None = None,
) -> dict[str, Any]:
    """Write ``study.html`` and ``key.json`` under ``out``; returns the key.

    Raises:
        DataError: a set is missing or has fewer images than asked for, or the two sets' image
            sizes differ (size alone would give the answer away).
    """
    from meddiff.data import pcam
    from meddiff.evaluation.features import check_same_size

    check_same_size({"real": (real, real_split), "synthetic": (synthetic, synthetic_split)})
    rng = np.random.default_rng(seed)
    picks = []
    for truth, root, split, n in (
        ("real", real, real_split, num_real),
        ("synthetic", synthetic, synthetic_split, num_synthetic),
    ):
        opened = pcam.open_pcam(root, split, patch_size=None)
        if n > opened.num_rows:
            raise DataError(
                f"{root}: asked for {n} {truth} images but split '{split}' has {opened.num_rows}"
            )
        meta = pcam.read_meta(root, split)
        for row in np.sort(rng.choice(opened.num_rows, n, replace=False)):
            block = pcam.read_rows(opened, int(row), int(row) + 1)
            picks.append(
                {
                    "truth": truth,
                    "source": str(Path(root).resolve()),
                    "split": split,
                    "index": int(row),
                    "label": int(block["label"][0]),
                    "prompt": (meta[int(row)].get("prompt") if meta else None),
                    "image": block["image"][0],
                }
            )
    order = rng.permutation(len(picks))
    items = []
    for pos, i in enumerate(order, start=1):
        items.append({"id": f"img-{pos:04d}", **picks[i]})
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item['id']}:{item['truth']}:{item['source']}:{item['index']};".encode())
    study_id = digest.hexdigest()[:16]
    key = {
        "format": KEY_FORMAT,
        "study_id": study_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_real": num_real,
        "num_synthetic": num_synthetic,
        "items": [{k: v for k, v in item.items() if k != "image"} for item in items],
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = [(item["id"], encode_png(item["image"])) for item in items]
    page = study_html(
        study_id, images, title=title, display_size=display_size, provenance=provenance
    )
    write_json(out / "key.json", key)
    write_text(out / "study.html", page)
    return key


def study_html(
    study_id: str,
    images: Sequence[tuple[str, bytes]],
    *,
    title: str,
    display_size: int,
    provenance: Provenance | None = None,
) -> str:
    """The blinded reading page: images in order, two choices each, answers downloaded as JSON.

    Answers are kept in the browser's localStorage under the study id, so a reload keeps them.
    """
    config = {"study": study_id, "format": ANSWER_FORMAT, "n": len(images)}
    return render(
        "reader_study.html",
        title=title,
        provenance=provenance,
        study_id=study_id,
        images=[(item_id, png_data_uri(png)) for item_id, png in images],
        display_size=display_size,
        config=config,
    )


def load_key(path: str | Path) -> dict[str, Any]:
    """The study's answer key; DataError when it is not one."""
    path = Path(path)
    doc = _read_json(path, "answer key")
    if doc.get("format") != KEY_FORMAT or not isinstance(doc.get("items"), list):
        raise DataError(f"{path}: not a meddiff reader-study key (expected format {KEY_FORMAT})")
    return doc


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{what} {path} is not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{what} {path} must hold a JSON object")
    return doc


def load_answers(path: str | Path, key: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """(reader, {image id: 'real'|'synthetic'}) of one answer file, checked against the key.

    Raises:
        DataError: the file belongs to another study, names images the study does not have,
            holds a value other than real/synthetic, or leaves images unanswered.
    """
    path = Path(path)
    doc = _read_json(path, "answer file")
    if doc.get("study_id") != key["study_id"]:
        raise DataError(
            f"{path}: answers are for study '{doc.get('study_id')}', but the key is for study "
            f"'{key['study_id']}'"
        )
    answers = doc.get("answers")
    if not isinstance(answers, dict):
        raise DataError(f"{path}: no 'answers' object mapping image ids to real/synthetic")
    ids = [item["id"] for item in key["items"]]
    unknown = sorted(set(answers) - set(ids))
    if unknown:
        raise DataError(
            f"{path}: {len(unknown)} answer(s) for images not in study {key['study_id']} "
            f"(first: {unknown[0]})"
        )
    bad = {k: v for k, v in answers.items() if v not in CHOICES}
    if bad:
        first = next(iter(bad))
        raise DataError(
            f"{path}: answer for {first} is {bad[first]!r}; expected 'real' or 'synthetic'"
        )
    missing = [i for i in ids if i not in answers]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} of {len(ids)} images are unanswered (first: {missing[0]})"
        )
    reader = str(doc.get("reader") or path.stem).strip() or path.stem
    return reader, {i: answers[i] for i in ids}


def score_answers(key_path: str | Path, answer_paths: Sequence[str | Path]) -> dict[str, Any]:
    """Per-reader sensitivity/specificity (positive = synthetic), medians, and pairwise kappa."""
    key = load_key(key_path)
    if not answer_paths:
        raise DataError("no answer files given")
    ids = [item["id"] for item in key["items"]]
    truth = np.array([item["truth"] == "synthetic" for item in key["items"]])
    if truth.all() or not truth.any():
        raise DataError(f"{key_path}: the study needs both real and synthetic images")
    readers: dict[str, np.ndarray] = {}
    files: dict[str, str] = {}
    seen: set[Path] = set()
    for path in answer_paths:
        if Path(path).resolve() in seen:
            raise DataError(f"{path}: the same answer file was given twice")
        seen.add(Path(path).resolve())
        name, answers = load_answers(path, key)
        if name in readers:  # two readers who typed the same name: tell them apart by file
            name = f"{name} ({Path(path).name})"
        if name in readers:
            raise DataError(f"{path}: two answer files with the same reader name and file name")
        readers[name] = np.array([answers[i] == "synthetic" for i in ids])
        files[name] = str(path)
    per_reader = {}
    for name, said in readers.items():
        tp = int((said & truth).sum())
        tn = int((~said & ~truth).sum())
        per_reader[name] = {
            "file": files[name],
            "sensitivity": tp / int(truth.sum()),
            "specificity": tn / int((~truth).sum()),
            "accuracy": (tp + tn) / len(truth),
            "said_synthetic": int(said.sum()),
        }
    result: dict[str, Any] = {
        "study_id": key["study_id"],
        "num_images": len(ids),
        "num_real": int((~truth).sum()),
        "num_synthetic": int(truth.sum()),
        "num_readers": len(readers),
        "readers": per_reader,
        "median": {
            m: statistics.median(r[m] for r in per_reader.values())
            for m in ("sensitivity", "specificity", "accuracy")
        },
    }
    subsets = {"all": np.ones_like(truth), "real": ~truth, "synthetic": truth}
    result["kappa"] = {
        name: pairwise_kappa(readers, mask) if len(readers) > 1 else None
        for name, mask in subsets.items()
    }
    return result


def pairwise_kappa(readers: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, Any]:
    """Cohen's kappa of every pair of readers on the images in ``mask``; mean and std of the
    defined ones (kappa is undefined when both readers gave one same answer throughout)."""
    pairs: dict[str, float | None] = {}
    for a, b in combinations(readers, 2):
        k = cohen_kappa(readers[a][mask], readers[b][mask])
        pairs[f"{a} | {b}"] = None if math.isnan(k) else k
    defined = [v for v in pairs.values() if v is not None]
    return {
        "pairs": pairs,
        "mean": float(np.mean(defined)) if defined else None,
        "std": float(np.std(defined)) if defined else None,
    }


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two binary ratings (n,): (p_o − p_e) / (1 − p_e); NaN when p_e = 1."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if len(a) == 0:
        return float("nan")
    p_o = float((a == b).mean())
    pa, pb = float(a.mean()), float(b.mean())
    p_e = pa * pb + (1 - pa) * (1 - pb)
    if p_e >= 1.0:
        return float("nan")
    return (p_o - p_e) / (1 - p_e)
