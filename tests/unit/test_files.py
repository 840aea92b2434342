"""All-or-nothing writes: the target appears complete or not at all, nothing is left beside it."""

from __future__ import annotations

import json
from pathlib import Path

from meddiff.files import copy_tree, save_figure, write_json


def test_write_json_and_copy_tree_replace_and_leave_no_temporaries(tmp_path: Path):
    write_json(tmp_path / "a.json", {"x": 1, "p": tmp_path})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1, "p": str(tmp_path)}
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
