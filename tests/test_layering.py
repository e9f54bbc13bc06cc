"""The library knows nothing of Ray, DuckDB or s3fs: only ``pro2sam/pipeline`` and ``pro2sam/apps``
use them. A rule that holds only by convention is not yet a rule."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pro2sam"
OUTSIDE_THE_LIBRARY = ("pipeline", "apps")
FORBIDDEN = ("ray", "duckdb", "s3fs")


def library_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] in OUTSIDE_THE_LIBRARY or parts[-1] == "__main__":
            continue
        names.append(".".join(("pro2sam", *(p for p in parts if p != "__init__"))))
    return names


def test_no_library_module_mentions_ray_duckdb_or_s3fs_in_an_import():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in OUTSIDE_THE_LIBRARY:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders


def test_the_library_imports_with_ray_duckdb_and_s3fs_blocked():
    modules = library_modules()
    assert {"pro2sam.model", "pro2sam.matching", "pro2sam.metrics", "pro2sam.evaluation", "pro2sam.export"} <= set(modules)
    code = "\n".join(
        [
            "import importlib, sys",
            *(f"sys.modules[{name!r}] = None" for name in FORBIDDEN),
            f"for name in {modules!r}:",
            "    importlib.import_module(name)",
            "print('imported', len(sys.modules))",
        ]
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
