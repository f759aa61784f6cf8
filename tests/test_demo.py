"""Tests for `compressjax demo` (the CLI, the pipeline pieces and the report files)."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import requires_minilm, run_python

pytest.importorskip("mnist1d")
pytest.importorskip("rich")
pytest.importorskip("matplotlib")

from compressjax.cli import build_parser  # noqa: E402
from compressjax.demo import data, models, report  # noqa: E402
from compressjax.demo.pipeline import STAGE_NAMES, DemoConfig, DemoResult, Stage, shift_signals  # noqa: E402

KEYS = ("name", "accuracy", "params", "nonzero", "bits_per_weight", "bytes", "ratio_vs_teacher", "seconds")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `compressjax demo --quick` in a subprocess, as a user would run it."""
    out = tmp_path_factory.mktemp("demo")
    # a wide console, so rich never truncates a header
    proc = run_python(["-m", "compressjax", "demo", "--quick", "--out", str(out), "--seed", "1"],
                      env={"COLUMNS": "200"}, timeout=600)
    return out, proc.stdout


@pytest.mark.slow
def test_quick_demo_writes_table_json_png_and_model(quick_run):
    out, stdout = quick_run
    header = next(line for line in stdout.splitlines() if "stage" in line and "ratio" in line)
    cells = [c.strip() for c in header.strip("┃│| ").split("┃")]
    assert tuple(cells) == report.COLUMNS
    for name in STAGE_NAMES:
        assert any(line.strip("│ ").startswith(name) for line in stdout.splitlines()), name

    payload = json.loads((out / report.JSON_NAME).read_text())
    assert set(payload) == {"stages", "seconds"}
    assert math.isfinite(payload["seconds"]) and payload["seconds"] > 0
    names = [s["name"] for s in payload["stages"]]
    assert names[: len(STAGE_NAMES)] == list(STAGE_NAMES)
    for stage in payload["stages"]:
        assert tuple(stage) == KEYS
        for key in KEYS[1:]:
            assert isinstance(stage[key], int | float) and math.isfinite(stage[key]), (stage["name"], key)
        assert 0.0 <= stage["accuracy"] <= 1.0
        assert 0 < stage["nonzero"] <= stage["params"]
        assert stage["bytes"] > 0
    by = {s["name"]: s for s in payload["stages"]}
    # The ratio is against the teacher's dense float32 bytes.
    for s in payload["stages"]:
        assert s["ratio_vs_teacher"] == pytest.approx(4 * by["teacher"]["params"] / s["bytes"])
        assert s["bits_per_weight"] == pytest.approx(8 * s["bytes"] / s["params"])
    # The compressed model is the student pruned to 80% and stored at 4 bits: far fewer non-zeros and bytes.
    assert by["compressed"]["params"] == by["student"]["params"]
    assert by["compressed"]["nonzero"] <= 0.21 * by["compressed"]["params"]
    assert by["compressed"]["bytes"] < by["distilled"]["bytes"] / 8
    assert by["compressed"]["bits_per_weight"] < 4

    png = (out / report.PNG_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (out / "compressjax-demo-student.cjx").stat().st_size == by["compressed"]["bytes"]


@pytest.mark.slow
def test_saved_model_loads_and_reproduces_the_compressed_accuracy(quick_run):
    import compressjax as cj

    out, _ = quick_run
    payload = json.loads((out / report.JSON_NAME).read_text())
    compressed = next(s for s in payload["stages"] if s["name"] == "compressed")
    params = cj.load(out / "compressjax-demo-student.cjx")
    model = models.make_model(models.STUDENT)
    d = data.load_mnist1d()
    acc = float(jnp.mean(jnp.argmax(model.apply({"params": params}, d.x_test), -1) == d.y_test))
    assert acc == pytest.approx(compressed["accuracy"], abs=1e-6)
    kernels = [np.asarray(v) for p, v in cj.tree.leaves_with_paths(params) if p.endswith("kernel")]
    nnz = sum(int(np.count_nonzero(k)) for k in kernels)
    total = sum(k.size for k in kernels)
    assert nnz / total == pytest.approx(0.2, abs=0.01)  # global 80% sparsity over the kernels
    for k in kernels:  # 4-bit symmetric per output channel: at most 15 distinct values per column
        flat = k.reshape(-1, k.shape[-1])
        assert max(len(np.unique(flat[:, j])) for j in range(flat.shape[1])) <= 15


def test_mnist1d_split_shapes_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = data.load_mnist1d()
    assert d.x_train.shape == (4000, 40) and d.x_test.shape == (1000, 40)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert set(np.unique(d.y_train)) == set(range(10))
    cached = list((tmp_path / "compressjax").glob("*.npz"))
    assert len(cached) == 1
    again = data.load_mnist1d()
    np.testing.assert_array_equal(again.x_train, d.x_train)
    np.testing.assert_array_equal(again.y_test, d.y_test)
    # Generation leaves the caller's global NumPy RNG alone.
    np.random.seed(123)  # noqa: NPY002
    expected = np.random.rand()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    data.load_transfer_inputs(20, seed=3, use_cache=False)
    assert np.random.rand() == expected  # noqa: NPY002


def test_transfer_inputs_are_new_examples(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = data.load_mnist1d()
    extra = data.load_transfer_inputs(50, seed=3)
    assert extra.shape == (50, 40) and extra.dtype == np.float32
    dist = np.abs(extra[:, None, :] - np.concatenate([d.x_train, d.x_test])[None]).sum(-1)
    assert dist.min() > 1e-3  # no example repeats the labelled or the test data
    with pytest.raises(ValueError, match="42"):
        data.load_transfer_inputs(50, seed=data.DATASET_SEED)
    with pytest.raises(ValueError, match="num_samples"):
        data.load_transfer_inputs(5, seed=3)


@pytest.mark.slow
def test_conv1d_matches_flax_conv():
    import flax.linen as nn

    for length, width, stride, cin, cout in [(40, 5, 1, 1, 8), (40, 5, 2, 3, 8), (21, 4, 2, 2, 3), (10, 3, 1, 2, 2)]:
        x = jax.random.normal(jax.random.key(0), (2, length, cin))
        ours = models.Conv1D(cout, width, stride)
        p = ours.init(jax.random.key(1), x)
        ref = nn.Conv(cout, (width,), strides=(stride,), padding="SAME").apply(p, x)
        np.testing.assert_allclose(ours.apply(p, x), ref, atol=1e-5)


def test_model_sizes():
    shapes = {c: jax.eval_shape(functools.partial(models.init_params, c), jax.random.key(0)) for c in (models.TEACHER, models.STUDENT)}
    n_teacher, n_student = (models.count_params(shapes[c]) for c in (models.TEACHER, models.STUDENT))
    assert n_teacher == 256_010 and n_student == 16_394
    assert n_teacher >= 10 * n_student


def test_shift_signals():
    x = jnp.arange(20.0).reshape(2, 10)
    assert shift_signals(jax.random.key(0), x, 0) is x
    y = shift_signals(jax.random.key(0), x, 3)
    for row_in, row_out in zip(np.asarray(x), np.asarray(y), strict=True):
        shifts = [s for s in range(-3, 4) if np.array_equal(row_out, row_in[np.clip(np.arange(10) - s, 0, 9)])]
        assert len(shifts) == 1


def test_config_validation_and_steps():
    assert DemoConfig().steps == 2000  # 64 epochs of 4000 at batch 128, rounded up to the chunk
    assert DemoConfig(epochs=1, chunk=7).steps == 35
    with pytest.raises(ValueError, match="sparsity"):
        DemoConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="bits"):
        DemoConfig(bits=9)
    with pytest.raises(ValueError, match="epochs"):
        DemoConfig(epochs=0)


def test_cli_rejects_bad_flags(capsys):
    parser = build_parser()
    for argv in (["demo", "--sparsity", "1.5"], ["demo", "--bits", "0"], ["demo", "--epochs", "0"], []):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 2
    args = parser.parse_args(["demo", "--quick", "--seed", "3", "--sparsity", "0.5", "--bits", "2", "--epochs", "4"])
    assert (args.quick, args.seed, args.sparsity, args.bits, args.epochs) == (True, 3, 0.5, 2, 4)


def test_report_rejects_non_finite(tmp_path):
    bad = DemoResult((Stage("teacher", float("nan"), 1, 1, 32.0, 4, 1.0),), 1.0, "", DemoConfig())
    with pytest.raises(ValueError, match="accuracy"):
        report.write_json(bad, tmp_path)


def test_import_compressjax_does_not_import_demo_dependencies():
    # rich is left out of the check: flax itself imports it.
    code = "import sys, compressjax; bad = [m for m in ('mnist1d', 'matplotlib') if m in sys.modules]; print(bad)"
    assert run_python(code).stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ benchmarks runner

def _runner():
    from benchmarks import run  # conftest puts the repository root (benchmarks/) on sys.path

    return run


def test_runner_headline_and_discovery():
    run = _runner()
    names = run.discover()
    assert "demo" in names and "run" not in names and "summary" not in names and "__main__" not in names
    assert run.headline({"ratios": {"a": 2.0, "b": {"c": 3}}, "x": 1}) == {"a": 2.0, "b.c": 3.0}
    assert run.headline({"summary": {"speed": 5}}) == {"speed": 5.0}
    got = run.headline({"settings": [{"name": "int4", "ratio": 8.0, "speed_ratio": 1.5, "bytes": 10}], "n": 1})
    assert got == {"settings.int4.ratio": 8.0, "settings.int4.speed_ratio": 1.5}
    assert run.headline({"ratios": {"nan": float("nan"), "ok": 1.0, "flag": True}}) == {"ok": 1.0}
    m = run.machine()
    assert m["cpu_cores"] >= 1 and m["device_kind"] and m["jax"] == jax.__version__ and m["cpu_model"]


def test_runner_reports_a_failing_script(tmp_path, monkeypatch):
    run = _runner()
    out = tmp_path / "results.json"
    monkeypatch.setattr(run, "run_one", lambda name, quick, timeout: {
        "command": name, "returncode": 3, "seconds": 0.1, "ok": False, "result": None, "ratios": {}, "error": "boom"})
    assert run.main(["--quick", "--only", "demo", "--out", str(out)]) == 1
    saved = json.loads(out.read_text())
    assert saved["benchmarks"]["demo"]["ok"] is False and saved["quick"] is True
    with pytest.raises(SystemExit):
        run.main(["--only", "no_such_benchmark", "--out", str(out)])


@pytest.mark.slow
@requires_minilm  # benchmarks/minilm.py needs the pretrained weights
def test_runner_quick_runs_every_benchmark(tmp_path):
    out = tmp_path / "results.json"
    proc = run_python(["-m", "benchmarks", "--quick", "--out", str(out)], timeout=3000, check=False)
    saved = json.loads(out.read_text())
    failed = {k: v.get("error") for k, v in saved["benchmarks"].items() if not v["ok"]}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:])
    assert set(saved["benchmarks"]) == set(_runner().discover())
    assert {"cpu_model", "cpu_cores", "device_kind", "jax"} <= set(saved["machine"])
    assert saved["benchmarks"]["demo"]["ratios"]["distilled_over_student"] > 0
    assert "benchmark" in proc.stdout and "ratio" in proc.stdout  # the table's header


# ------------------------------------------------------------------ issue 11 item 15: CLI argument checks
def _no_training(monkeypatch):
    import compressjax.demo.pipeline as pipeline

    def fail(*args, **kwargs):
        raise AssertionError("the demo started training despite a bad --out")

    monkeypatch.setattr(pipeline, "run_demo", fail)


def test_demo_out_that_is_a_file_fails_before_training(tmp_path, monkeypatch, capsys):
    from compressjax import cli

    _no_training(monkeypatch)
    f = tmp_path / "a-file"
    f.write_text("x")
    for out in (f, f / "sub"):
        assert cli.main(["demo", "--quick", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("compressjax demo: error: --out") and str(out) in err and "\n" not in err


def test_demo_out_that_cannot_be_written_fails_before_training(tmp_path, monkeypatch, capsys):
    import tempfile

    from compressjax import cli

    _no_training(monkeypatch)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)  # root ignores permission bits: simulate
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a writable folder" in err and "Permission denied" in err and "\n" not in err


@pytest.mark.parametrize("bits", ["4.5", "0", "9", "four"])
def test_demo_bits_says_which_values_are_allowed(bits, capsys):
    from compressjax import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--bits", bits])
    assert e.value.code == 2
    assert "must be one of 1, 2, 3, 4, 5, 6, 7, 8" in capsys.readouterr().err


def test_mnist1d_fresh_draw_with_another_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = data.load_mnist1d()
    fresh = data.load_mnist1d(seed=1001)
    assert fresh.x_train.shape == (4000, 40) and fresh.x_test.shape == (1000, 40)
    assert set(np.unique(fresh.y_test)) == set(range(10))
    assert not np.array_equal(fresh.x_train, d.x_train)
    explicit = data.load_mnist1d(seed=data.DATASET_SEED)
    np.testing.assert_array_equal(explicit.x_test, d.x_test)
    for bad in (-1, 1.5, True, "7"):
        with pytest.raises(ValueError, match="seed must be a non-negative int"):
            data.load_mnist1d(seed=bad)
