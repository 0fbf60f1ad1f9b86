"""The architecture holds: import contracts (pyproject.toml, import-linter) pass on the
tree and fail on a forbidden import; docs/architecture.md names only modules that exist
and every package of the tree."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cpcoord", "coordinator", "nodeagent", "storecore")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports")
    require(exe is not None, "import-linter (lint-imports) is not installed")
    return subprocess.run(
        [str(exe), "--config", str(root / "pyproject.toml")],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy(tmp: Path) -> Path:
    root = tmp / "tree"
    for p in PACKAGES:
        shutil.copytree(REPO / p, root / p, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_import_contracts_hold() -> None:
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" not in r.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("coordinator/__init__.py", "import nodeagent.proc.procfs", "independent"),
        ("cpcoord/ranges.py", "import coordinator.store.index", "only the CLI"),
        ("nodeagent/proc/procfs.py", "import nodeagent.capture.selection", "layers"),
        ("storecore/packs.py", "import coordinator.store.index", "storecore"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    root = _copy(tmp_path)
    target = root / module
    target.write_text(target.read_text() + f"\n{line}  # forbidden\n")
    r = _lint(root)
    assert r.returncode != 0, r.stdout
    broken = r.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, r.stdout


def _named(doc: str) -> set[str]:
    """Module paths the page names in backticks: a/b/c.py or a/b/ (packages)."""
    tops = "cpcoord|coordinator|nodeagent|storecore|bench|tests|testbed"
    return set(re.findall(rf"`((?:{tops})/(?:[\w/]*(?:\.py|/))?)`", doc))


def test_architecture_page_matches_the_tree() -> None:
    doc = (REPO / "docs" / "architecture.md").read_text()
    named = _named(doc)
    assert len(named) > 20, "the page names the modules it describes"
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing, f"docs/architecture.md names what does not exist: {missing}"
    packages = {
        str(p.parent.relative_to(REPO)) + "/"
        for top in PACKAGES
        for p in (REPO / top).rglob("__init__.py")
        if "gen" not in p.parts and "demo" not in p.parts
    }
    unnamed = sorted(p for p in packages if p not in named)
    assert not unnamed, f"packages docs/architecture.md does not place: {unnamed}"


def test_no_module_imports_a_private_name() -> None:
    """`from x import _y` across modules: what others need is public."""
    bad = []
    for top in (*PACKAGES, "bench"):
        for p in (REPO / top).rglob("*.py"):
            if "gen" in p.parts:
                continue
            for i, text in enumerate(p.read_text().splitlines(), 1):
                m = re.match(r"\s*from\s+([\w.]+)\s+import\s+(.*)", text)
                if m and m.group(1) != "__future__":
                    names = re.findall(r"\b(_[a-z]\w*)", m.group(2).split("#")[0])
                    if names and not m.group(1).endswith("_native"):
                        bad.append(f"{p.relative_to(REPO)}:{i}: {text.strip()}")
    assert not bad, "\n".join(bad)
