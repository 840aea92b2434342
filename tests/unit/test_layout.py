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


# The project's "short functions" rule: every function of meddiff is under 80 lines.
MAX_FUNCTION_LINES = 79
# Functions ("file:name" under platform/meddiff) allowed 80 lines or more: none any more. The set
# may only shrink: a function on it that is short now fails the test until it is taken off.
STILL_LONG: set[str] = set()


def function_lengths(folder: Path) -> list[tuple[int, str]]:
    """(lines, "file:line name") of every function and method under ``folder``, decorators and
    docstring included, longest first."""
    import ast

    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                where = f"{path.relative_to(folder)}:{node.lineno} {node.name}"
                found.append((node.end_lineno - start + 1, where))
    return sorted(found, reverse=True)


def test_function_lengths_count_decorators_methods_and_nested_functions(tmp_path):
    body = "    x = 1\n" * 78
    (tmp_path / "m.py").write_text(
        f"import functools\n\n\n@functools.cache\ndef f():\n{body}    def inner():\n"
        "        return 1\n\n\nclass C:\n    async def g(self):\n        return 1\n"
    )
    assert function_lengths(tmp_path) == [(82, "m.py:5 f"), (2, "m.py:89 g"), (2, "m.py:84 inner")]


def test_every_function_is_under_80_lines():
    long = {}
    for n, where in function_lengths(ROOT / "platform" / "meddiff"):
        if n > MAX_FUNCTION_LINES:
            place, name = where.split(" ")
            long[f"{place.rsplit(':', 1)[0]}:{name}"] = f"{where}: {n} lines"
    too_long = [w for key, w in long.items() if key not in STILL_LONG]
    assert not too_long, f"split these functions of meddiff: {too_long}"
    short_now = sorted(STILL_LONG - set(long))
    assert not short_now, f"under 80 lines now: take them off STILL_LONG: {short_now}"


# The layers of docs/architecture.md, bottom first: a module imports from its own layer or below.
LAYERS = (
    ("errors", "weights", "__version__"),
    ("config", "files", "grids", "precision"),
    ("storage", "runtime"),
    ("tracking", "reports"),
    ("data",),
    ("training",),
    ("morphology", "prompts", "synthesis", "thor"),
    ("evaluation",),
    ("serving",),
    ("demo",),
    ("commands", "cli"),
)
# Imports that still run up a layer (docs/architecture.md, "What is still being moved"); none
# now, and none may be added.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _upward_imports() -> set[tuple[str, str, str]]:
    import ast

    level = {area: i for i, names in enumerate(LAYERS) for area in names}
    root = ROOT / "platform" / "meddiff"
    found = set()
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        area = rel.parts[0].removesuffix(".py")
        if area == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] != "meddiff" or len(parts) < 2 or parts[1] not in level:
                    continue
                if level[parts[1]] > level[area]:
                    found.add((area, parts[1], str(rel)))
    return found


def test_no_import_runs_up_the_layers():
    """Every module's meddiff imports come from its own layer or below (docs/architecture.md);
    the known exceptions may only shrink."""
    up = _upward_imports()
    assert {(a, b) for a, b, _ in up} <= KNOWN_UPWARD, sorted(up)
    areas = {name for names in LAYERS for name in names}
    root = ROOT / "platform" / "meddiff"
    on_disk = {
        p.name.removesuffix(".py")
        for p in root.iterdir()
        if not p.name.startswith("_") and (p.suffix == ".py" or (p / "__init__.py").is_file())
    }
    assert on_disk <= areas, on_disk - areas  # a new module or package gets a layer
