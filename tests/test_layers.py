"""The import layering of pyproject.toml holds, and an upward import breaks it (so CI would fail)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent  # the venv's scripts, where `lint-imports` is installed
LINT_IMPORTS = shutil.which("lint-imports", path=str(BIN)) or shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(LINT_IMPORTS is None, reason='needs import-linter: pip install "compressjax[test]"')


def lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with ``root``'s pyproject.toml, importing ``compressjax`` from ``root``."""
    env = {"PATH": str(BIN), "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--config", str(root / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, cwd=root, env=env, timeout=120)


def test_the_library_keeps_its_layers():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(ROOT / "compressjax", tmp_path / "compressjax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    tree = tmp_path / "compressjax" / "tree.py"
    tree.write_text(tree.read_text() + "\nfrom compressjax.export import save  # an upward import\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0
    assert "compressjax.tree is not allowed to import compressjax.export" in proc.stdout
