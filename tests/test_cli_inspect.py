"""Tests for ``compressjax inspect FILE`` (issue 13): the table, ``--json`` and one-line errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

import compressjax as cj
from compressjax.cli import build_parser, inspect_dict, main


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (64, 32)), "bias": jnp.arange(1.0, 33.0)},
              "head": {"kernel": jax.random.normal(jax.random.key(1), (32, 10))}}
    kernel = np.asarray(params["dense"]["kernel"])
    params["dense"]["kernel"] = jnp.asarray(np.where(np.abs(kernel) > np.quantile(np.abs(kernel), 0.75), kernel, 0))
    path = tmp_path_factory.mktemp("inspect") / "m.cjx"
    cj.save(path, params, rules={"dense/kernel": cj.QuantSpec(bits=4)})
    return path, params


def test_table_lists_every_leaf_and_the_totals(model_file, capsys):
    path, _ = model_file
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    report = cj.size_report(path)
    for leaf in report.leaves:
        line = next(line for line in out.splitlines() if f" {leaf.path} " in line)
        assert "x".join(map(str, leaf.shape)) in line and leaf.dtype in line and leaf.encoding in line
        assert f"{leaf.stored_bytes:,}" in line and f"{leaf.bits_per_weight:.2f}" in line
    total = next(line for line in out.splitlines() if " total " in line)
    assert f"{report.total_bytes:,}" in total and f"{report.num_weights:,} w" in total
    assert f"{report.ratio:.1f}x smaller than float32" in out
    assert "int4 sparse" in out and "75.0%" in out  # the pruned, quantized kernel


def test_json_matches_size_report_and_counts_zeros(model_file, capsys):
    path, params = model_file
    assert main(["inspect", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    report = cj.size_report(path)
    assert got == json.loads(json.dumps(inspect_dict(report, str(path))))
    assert got["total_bytes"] == path.stat().st_size == report.total_bytes
    leaves = {leaf["path"]: leaf for leaf in got["leaves"]}
    assert set(leaves) == {"dense/bias", "dense/kernel", "head/kernel"}
    for name, x in (("dense/bias", params["dense"]["bias"]), ("dense/kernel", params["dense"]["kernel"])):
        assert leaves[name]["sparsity"] == pytest.approx(float(np.mean(np.asarray(x) == 0)))
    assert leaves["dense/kernel"]["sparsity"] == 0.75 and leaves["head/kernel"]["sparsity"] == 0.0
    zeros = sum(int(np.sum(np.asarray(x) == 0)) for x in jax.tree.leaves(params))
    assert got["sparsity"] == pytest.approx(zeros / report.num_weights)
    assert leaves["dense/kernel"]["encoding"].startswith("int4")
    assert all(leaf["bytes"] == leaf["stored_bytes"] for leaf in got["leaves"])


def test_long_paths_are_not_folded_when_piped(tmp_path, capsys):
    name = "encoder/" + "very_long_module_name_" * 6 + "kernel"
    cj.save(tmp_path / "long.cjx", {name: jnp.ones((3, 2))})
    assert main(["inspect", str(tmp_path / "long.cjx")]) == 0
    assert name in capsys.readouterr().out


def _bad_files(tmp_path, good: bytes) -> dict:
    flipped = bytearray(good)
    flipped[-2] ^= 0x40
    files = {"truncated": good[:100], "foreign": b"PK\x03\x04" + bytes(64), "empty": b"", "corrupted": bytes(flipped)}
    out = {}
    for name, blob in files.items():
        (tmp_path / f"{name}.cjx").write_bytes(blob)
        out[name] = tmp_path / f"{name}.cjx"
    out["missing"] = tmp_path / "missing.cjx"
    out["folder"] = tmp_path
    return out


def test_malformed_files_give_one_line_and_status_1(model_file, tmp_path, capsys):
    path, _ = model_file
    messages = {"truncated": "truncated", "foreign": "not a compressjax", "empty": "not a compressjax",
                "corrupted": "checksum", "missing": "FileNotFoundError", "folder": "IsADirectoryError"}
    for name, bad in _bad_files(tmp_path, path.read_bytes()).items():
        for extra in ([], ["--json"]):
            assert main(["inspect", str(bad), *extra]) == 1, name
            captured = capsys.readouterr()
            assert captured.out == ""
            lines = captured.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"compressjax inspect: {bad}: "), captured.err
            assert messages[name] in lines[0], (name, lines[0])


def test_command_line_error_has_no_traceback(model_file, tmp_path):
    path, _ = model_file
    bad = _bad_files(tmp_path, path.read_bytes())["truncated"]
    proc = run_python(["-m", "compressjax", "inspect", str(bad)], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "truncated" in proc.stderr
    ok = run_python(["-m", "compressjax", "inspect", str(path), "--json"])
    assert json.loads(ok.stdout)["total_bytes"] == path.stat().st_size


def test_parser():
    args = build_parser().parse_args(["inspect", "a.cjx", "--json"])
    assert args.command == "inspect" and args.file == "a.cjx" and args.json
    with pytest.raises(SystemExit):
        build_parser().parse_args(["inspect"])
