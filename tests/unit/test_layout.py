"""The src layout must never shadow the standard library's ``platform`` module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_platform_package_marker():
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_import_platform_from_repo_root_is_stdlib():
    code = "import platform, sys; print(platform.__file__); print(platform.python_version())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert "site-packages" not in out[0] and str(ROOT / "platform") not in out[0]
    assert out[0].endswith("platform.py")
    assert out[1].count(".") == 2


def test_meddiff_imports_without_heavy_side_effects():
    code = "import sys, meddiff, meddiff.cli, meddiff.config; print('torch' in sys.modules, 'ray' in sys.modules, 'mlflow' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False False False"


def test_code_and_docs_cite_only_files_in_the_project():
    """Every Markdown file a tracked file cites by name is part of the project (code and docs
    once cited a design note that only lived outside the repository)."""
    import re

    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    names = {Path(t).name for t in tracked}
    cited = re.compile(r"\b([A-Za-z0-9_-]+\.md)\b")
    missing = []
    for t in tracked:
        if not t.endswith((".py", ".md", ".toml", ".yaml", ".yml", ".txt", ".cfg")):
            continue
        text = (ROOT / t).read_text(errors="replace")
        missing += [f"{t}: {m}" for m in cited.findall(text) if m not in names]
    assert not missing, missing
