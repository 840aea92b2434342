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
