"""Reader-study kit: a blinded export, and scoring of hand-made answer files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from eval_helpers import make_synthetic
from meddiff.errors import DataError
from meddiff.evaluation.reader_study import cohen_kappa, export_study, score_answers


@pytest.fixture(scope="module")
def study(sample_pcam_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("study")
    synth = make_synthetic(sample_pcam_dir, tmp / "synth", shift=8, n=40)
    export_study(sample_pcam_dir, synth, tmp / "study", num_real=6, num_synthetic=4, seed=3)
    return tmp / "study"


def _key(study: Path) -> dict:
    return json.loads((study / "key.json").read_text())


def _answers(study: Path, path: Path, reader: str, said: dict[str, str], **extra) -> Path:
    doc = {"study_id": _key(study)["study_id"], "reader": reader, "answers": said, **extra}
    path.write_text(json.dumps(doc))
    return path


def test_export_is_blinded_shuffled_and_self_contained(study: Path):
    key = _key(study)
    page = (study / "study.html").read_text()
    assert len(key["items"]) == 10
    truths = [item["truth"] for item in key["items"]]
    assert truths.count("real") == 6 and truths.count("synthetic") == 4
    assert truths != sorted(truths) and truths != sorted(truths, reverse=True)
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 10
    assert key["study_id"] in page
    # No ground truth or provenance on the page the reader sees.
    assert '"truth"' not in page and "synth" not in page.replace("ynthetic", "")
    assert "http://" not in page and "https://" not in page  # opens offline
    ids = re.findall(r'data-id="(img-\d+)"', page)
    assert ids == [item["id"] for item in key["items"]]


def test_export_asks_for_more_than_available(sample_pcam_dir: Path, tmp_path: Path):
    synth = make_synthetic(sample_pcam_dir, tmp_path / "s", n=12)
    with pytest.raises(DataError, match="asked for 20 synthetic images"):
        export_study(sample_pcam_dir, synth, tmp_path / "o", num_real=2, num_synthetic=20)


def test_export_refuses_sets_of_different_sizes(sample_pcam_dir: Path, tmp_path: Path):
    synth = make_synthetic(sample_pcam_dir, tmp_path / "s", n=12, size=64)
    with pytest.raises(DataError, match="different sizes.*96×96.*64×64"):
        export_study(sample_pcam_dir, synth, tmp_path / "o", num_real=2, num_synthetic=2)


def test_score_hand_made_answers(study: Path, tmp_path: Path):
    items = _key(study)["items"]
    truth = {i["id"]: i["truth"] for i in items}
    ids = [i["id"] for i in items]
    perfect = _answers(study, tmp_path / "a.json", "A", truth)
    everything_synthetic = _answers(
        study, tmp_path / "b.json", "B", dict.fromkeys(ids, "synthetic")
    )
    # C: calls the first two synthetic images real and the first real image synthetic.
    c = dict(truth)
    synth_ids = [i for i in ids if truth[i] == "synthetic"]
    real_ids = [i for i in ids if truth[i] == "real"]
    for i in synth_ids[:2]:
        c[i] = "real"
    c[real_ids[0]] = "synthetic"
    mixed = _answers(study, tmp_path / "c.json", "C", c)

    result = score_answers(study / "key.json", [perfect, everything_synthetic, mixed])
    readers = result["readers"]
    assert readers["A"]["sensitivity"] == 1.0 and readers["A"]["specificity"] == 1.0
    assert readers["B"]["sensitivity"] == 1.0 and readers["B"]["specificity"] == 0.0
    assert readers["C"]["sensitivity"] == pytest.approx(2 / 4)
    assert readers["C"]["specificity"] == pytest.approx(5 / 6)
    assert result["median"]["sensitivity"] == 1.0
    assert result["median"]["specificity"] == pytest.approx(5 / 6)

    from sklearn.metrics import cohen_kappa_score

    pairs = result["kappa"]["all"]["pairs"]
    expected = cohen_kappa_score([truth[i] for i in ids], [c[i] for i in ids])
    assert pairs["A | C"] == pytest.approx(expected)
    assert pairs["A | B"] == pytest.approx(0.0)
    # On the synthetic images A and B both said "synthetic" throughout: kappa is undefined.
    assert result["kappa"]["synthetic"]["pairs"]["A | B"] is None
    assert result["kappa"]["real"]["pairs"]["A | B"] == pytest.approx(0.0)
    assert result["num_readers"] == 3 and result["num_real"] == 6


def test_cohen_kappa_matches_sklearn():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 50).astype(bool), rng.integers(0, 2, 50).astype(bool)
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))


def test_single_reader_has_no_kappa(study: Path, tmp_path: Path):
    truth = {i["id"]: i["truth"] for i in _key(study)["items"]}
    result = score_answers(study / "key.json", [_answers(study, tmp_path / "a.json", "A", truth)])
    assert result["kappa"]["all"] is None


def test_the_same_answer_file_twice_is_one_reader_not_two(study: Path, tmp_path: Path):
    truth = {i["id"]: i["truth"] for i in _key(study)["items"]}
    a = _answers(study, tmp_path / "a.json", "A", truth)
    with pytest.raises(DataError, match="given twice"):
        score_answers(study / "key.json", [a, tmp_path / "." / "a.json"])
    # Two readers who typed the same name are kept apart by their files.
    b = _answers(study, tmp_path / "b.json", "A", truth)
    assert len(score_answers(study / "key.json", [a, b])["readers"]) == 2


def test_answer_files_that_do_not_match_the_study(study: Path, tmp_path: Path):
    key = _key(study)
    ids = [i["id"] for i in key["items"]]
    full = dict.fromkeys(ids, "real")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"study_id": "0000", "reader": "X", "answers": full}))
    with pytest.raises(DataError, match="other.json: answers are for study '0000'"):
        score_answers(study / "key.json", [other])
    extra = _answers(study, tmp_path / "extra.json", "X", {**full, "img-9999": "real"})
    with pytest.raises(DataError, match="not in study.*img-9999"):
        score_answers(study / "key.json", [extra])
    partial = _answers(study, tmp_path / "partial.json", "X", {ids[0]: "real"})
    with pytest.raises(DataError, match="9 of 10 images are unanswered"):
        score_answers(study / "key.json", [partial])
    bad = _answers(study, tmp_path / "bad.json", "X", {**full, ids[1]: "maybe"})
    with pytest.raises(DataError, match="'maybe'; expected 'real' or 'synthetic'"):
        score_answers(study / "key.json", [bad])
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    with pytest.raises(DataError, match="junk.json is not valid JSON"):
        score_answers(study / "key.json", [junk])
    with pytest.raises(DataError, match="other.json: not a meddiff reader-study key"):
        score_answers(other, [other])
