"""The generated docs agree with the code: docs/API.md with compressjax's docstrings, BENCHMARKS.md's summary
table with benchmarks/results/results.json; one command style for benchmarks in the docs."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from conftest import ROOT

from benchmarks import summary


def _api_reference():
    spec = importlib.util.spec_from_file_location("api_reference", ROOT / "scripts" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_current():
    api = _api_reference()
    assert (ROOT / "docs" / "API.md").read_text() == api.render(), "docs/API.md is stale: run python scripts/api_reference.py"


def test_api_reference_lists_every_public_name_once():
    import compressjax

    text = (ROOT / "docs" / "API.md").read_text()
    listed = re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)` \|", text, flags=re.M)
    assert sorted(listed) == sorted(compressjax.__all__)


def test_api_groups_follow_the_comments_of_init():
    api = _api_reference()
    source = '"""doc"""\nfrom compressjax.a import x, y\nfrom compressjax.b import z\n__all__ = [\n    # --- Pruning ---\n    "y",\n    "x",\n    # Export: files\n    "z",\n]\n'
    assert api.groups(source) == [("Pruning", ["y", "x"]), ("Export: files", ["z"])]
    in_imports = '# --- pruning\nfrom compressjax.a import x\n# === export\nfrom compressjax.b import (\n    z,\n)\n__all__ = ["z", "x"]\n'
    assert api.groups(in_imports) == [("export", ["z"]), ("pruning", ["x"])]
    plain = 'from compressjax.a import x\nfrom compressjax.b.c import z\n__all__ = ["x", "z"]\n'
    assert api.groups(plain) == [("a", ["x"]), ("b", ["z"])]


def test_benchmarks_summary_matches_results_json():
    doc = (ROOT / "BENCHMARKS.md").read_text()
    results = json.loads((ROOT / "benchmarks" / "results" / "results.json").read_text())
    assert summary.render(doc, results) == doc, "BENCHMARKS.md is stale: run python -m benchmarks.summary"
    assert doc.index(summary.BEGIN) < doc.index("## Pruning")  # the current results come first


def test_summary_status_comes_from_the_numbers():
    results = json.loads((ROOT / "benchmarks" / "results" / "results.json").read_text())
    results["benchmarks"]["pruning"]["result"]["speedup"] = 12.0
    del results["benchmarks"]["export"]
    text = summary.table(results)
    row = next(line for line in text.splitlines() if line.startswith("| pruning"))
    assert "**12x**" in row and row.endswith("| **missed** |")
    assert "| export | not in this `results.json`" in text
    with pytest.raises(ValueError, match="markers"):
        summary.render("no markers here", results)


def test_one_command_style_for_benchmarks():
    for doc in ("README.md", "BENCHMARKS.md", *(f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*.py"))):
        text = (ROOT / doc).read_text()
        assert not re.search(r"python3? benchmarks/\w+\.py", text), doc


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if "def main(argv" in p.read_text()))
def test_benchmark_help_prints(name, capsys):
    """``python -m benchmarks.<name> --help`` prints its usage (a ``%`` in a help string crashed it once)."""
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as e:  # an optional extra (e.g. gguf for the LLM benchmarks)
        pytest.skip(f"benchmarks.{name} needs {e.name}: pip install -e '.[test]'")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out
