"""All-or-nothing writes: the target appears complete or not at all, nothing is left beside it;
versioned JSON reads that name the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meddiff.errors import DataError
from meddiff.files import copy_tree, read_format_json, save_figure, write_json, write_text


def test_write_json_and_copy_tree_replace_and_leave_no_temporaries(tmp_path: Path):
    write_json(tmp_path / "a.json", {"x": 1, "p": tmp_path})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1, "p": str(tmp_path)}
    write_text(tmp_path / "a.json", "FID 178.8 → 90.2")
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == "FID 178.8 → 90.2"
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("new")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    copy_tree(src, dst)
    assert (dst / "sub" / "f.txt").read_text() == "new" and not (dst / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "dst", "src"]


def test_save_figure_writes_a_png(tmp_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_read_format_json_names_the_problem(tmp_path: Path):
    path = tmp_path / "info.json"
    with pytest.raises(DataError, match="^no info here$"):
        read_format_json(path, "fmt/1", DataError, "no info here")
    path.write_text('{"format": "fmt/1", "rows": 3')
    with pytest.raises(DataError, match=r"info\.json: corrupt JSON"):
        read_format_json(path, "fmt/1", DataError, "")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="corrupt JSON"):
        read_format_json(path, "fmt/1", DataError, "")
    for doc, found in (({"format": "fmt/2"}, "'fmt/2'"), ([1, 2], "None")):
        write_json(path, doc)
        with pytest.raises(DataError, match=f"format {found}, expected 'fmt/1'"):
            read_format_json(path, "fmt/1", DataError, "")
    write_json(path, {"format": "fmt/1", "rows": 3})
    assert read_format_json(path, "fmt/1", DataError, "")["rows"] == 3
