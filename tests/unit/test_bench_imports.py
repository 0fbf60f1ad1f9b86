"""bench/ and testbed/ need no test-only package: `pip install -e '.[bench]'` (no pytest,
no hypothesis) then `python -m bench --quick` must work.

A fresh interpreter whose import system refuses `pytest`, `hypothesis` and `tests`
imports every module of bench/ and testbed/ and every module any of them imports,
including the imports done lazily inside functions (found in the source), so a benchmark
that reaches for a test helper fails here rather than on a user's machine.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("bench", "testbed")
BLOCKED = ("pytest", "_pytest", "hypothesis", "tests")

_GUARD = """
import importlib, importlib.abc, json, sys

BLOCKED = set(json.loads(sys.argv[1]))

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"test-only module {name!r} imported", name=name)
        return None

sys.meta_path.insert(0, Refuse())
failed = []
for name in json.loads(sys.argv[2]):
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print(json.dumps(failed))
"""


def _modules() -> list[str]:
    """Every module of the packages, then every absolute import in their source."""
    own: list[str] = []
    imported: set[str] = set()
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).glob("*.py")):
            if path.stem != "__main__":  # `python -m bench` itself: runs the suite
                own.append(pkg if path.stem == "__init__" else f"{pkg}.{path.stem}")
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    imported.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    imported.add(node.module)
    return own + sorted(imported - set(own) - {"__future__"})


def test_bench_imports_without_test_packages() -> None:
    names = _modules()
    assert "bench.capture" in names and "testbed.driver" in names
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(
        [sys.executable, "-c", _GUARD, json.dumps(BLOCKED), json.dumps(names)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    failed = json.loads(res.stdout.strip().splitlines()[-1])
    assert not failed, "bench/testbed need a test-only module:\n" + "\n".join(failed)
