"""Smoke tests of the benchmark scripts that the GPU suite runs: tiny sizes on the CPU, no timing assertions.

They check that each script runs every variant it reports (every selection layout, the matmul and HLO
check, the batch sweep) and writes the JSON keys that the GPU suite and BENCHMARKS.md read; and that the
weight-sharing pipeline runs and that its unit removal and dead-unit clean-up keep the network's function.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_python

from benchmarks import distillation, gpu_suite, pruning, quantization
from compressjax import radix_select


def test_pruning_quick_reports_every_strategy(tmp_path):
    out = tmp_path / "pruning.json"
    res = pruning.main(["--quick", "--no-rss", "--repeats", "1", "--peak-gbps", "100", "--json", str(out)])
    assert json.loads(out.read_text())["strategies"].keys() == set(radix_select.STRATEGIES)
    # today's keys (benchmarks/gpu/h200-pruning.json, the summary table) stay, for the automatic layout
    assert {"ours_ms", "sort_ms", "speedup", "exact_count", "agree_except_ties", "n_weights"} <= res.keys()
    assert res["strategy_auto"] == "chunked" and res["exact_count"] and res["agree_except_ties"]
    assert res["same_masks_every_strategy"]
    for name, r in res["strategies"].items():
        assert r["same_masks"] and r["ms"] > 0 and r["speedup"] > 0, name
        assert r["bandwidth_fraction"] == pytest.approx(r["gbps_three_passes"] / 100)
    assert res["bandwidth_fraction"] == pytest.approx(3 * res["params_bytes"] / (res["ours_ms"] * 1e-3) / 1e9 / 100)


def test_pruning_strategy_subset_and_bad_name(tmp_path):
    res = pruning.main(["--quick", "--no-rss", "--repeats", "1", "--strategies", "chunked,whole", "--banks", "1"])
    assert list(res["strategies"]) == ["chunked", "whole", "whole/banks=1"]  # no copies in the chunked layout
    assert res["same_masks_every_strategy"] and "bandwidth_fraction" not in res  # no --peak-gbps
    assert radix_select.BANKS == 32  # a module constant: the variant is an argument, nothing is mutated
    for bad in (["--strategies", "sorted"], ["--banks", "0"], ["--banks", "x"]):
        with pytest.raises(SystemExit):
            pruning.main(["--quick", *bad])


def test_pruning_alternatives_quick():
    got = pruning.alternatives(quick=True, repeats=1)
    assert len(got) == 5 and all(ms > 0 for ms in got.values())


def test_quantization_matmuls_and_int_dot_check(tmp_path):
    res = quantization.main(["--quick", "--only", "matmul,throughput", "--reps", "1"])
    assert res["int_dot_in_hlo"] is True  # XLA:CPU keeps the int8 dot
    assert res["throughput"]["fake_quant_throughput_ratio"] > 0
    for row in res["matmul"]:
        assert set(row["ms"]) == {"f32", "f32_highest", "bf16", "int8_dot", "quantized_dot_general_int"}
        assert not row["float_dot_in_hlo"] and all(v > 0 for v in row["ratios"].values())
    assert "qat_mlp" not in res  # --only
    with pytest.raises(SystemExit):
        quantization.main(["--quick", "--only", "nothing"])


def test_hlo_dots_reads_cpu_and_gpu_text():
    cpu = """HloModule m
%fused_computation (param_0: s8[64,128], param_1: s8[128,32]) -> s32[64,32] {
  %param_0 = s8[64,128]{1,0} parameter(0)
  %param_1 = s8[128,32]{1,0} parameter(1)
  ROOT %dot_general.0 = s32[64,32]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
    assert quantization.hlo_dots(cpu) == [{"op": "dot", "result": "s32", "operands": ["s8", "s8"]}]
    cublas = """ENTRY %main (Arg_0.1: s8[4096,4096], Arg_1.2: s8[4096,4096]) -> s32[4096,4096] {
  %custom-call.1 = (s32[4096,4096]{1,0}, s8[33554432]{0}) custom-call(s8[4096,4096]{1,0} %Arg_0.1, s8[4096,4096]{0,1} %Arg_1.2), custom_call_target="__cublas$gemm", backend_config={}
  %convert.3 = f32[4096,4096]{1,0} convert(s8[4096,4096]{1,0} %Arg_0.1)
  %custom-call.2 = (f32[4096,4096]{1,0}, s8[0]{0}) custom-call(f32[4096,4096]{1,0} %convert.3, f32[4096,4096]{1,0} %convert.3), custom_call_target="__cublas$lt$matmul"
  %cc = f32[8]{0} custom-call(f32[8]{0} %x), custom_call_target="something_else"
}
"""
    dots = quantization.hlo_dots(cublas)
    assert [d["op"] for d in dots] == ["__cublas$gemm", "__cublas$lt$matmul"]
    assert dots[0] == {"op": "__cublas$gemm", "result": "s32", "operands": ["s8", "s8"]}
    assert dots[1]["operands"] == ["f32", "f32"]


def test_distillation_batch_sweep_quick(tmp_path):
    res = distillation.main(["--quick", "--rounds", "1", "--inner", "1", "--batches", "8,16"])
    assert [r["batch"] for r in res["batches"]] == [8, 16]
    for r in res["batches"]:
        assert r["plain_ms"] > 0 and r["compress_ratio"] > 0 and r["gflops_per_s"] > 0 and r["flops_ratio"] > 0
        assert r["step_gflop"] == pytest.approx(
            sum(distillation.matmul_flops(*a) for a in [(res["sizes"]["teacher"], r["batch"]), (res["sizes"]["student"], r["batch"]),
                                                        (res["sizes"]["student"], r["batch"], True)]) / 1e9
        )
    assert res["ratios"]["compress_b8"] == res["batches"][0]["compress_ratio"]
    with pytest.raises(SystemExit):
        distillation.main(["--quick", "--batches", "8,x"])


def test_gpu_suite_names_and_peaks():
    assert gpu_suite.slug("NVIDIA H200") == "h200"  # the name of the existing benchmarks/gpu/h200-*.json
    assert gpu_suite.slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_suite.slug("cpu") == "cpu" and gpu_suite.slug("TPU v5 lite") == "tpu-v5-lite"
    assert gpu_suite.peak_gbps("NVIDIA H200") == 4800 and gpu_suite.peak_gbps("NVIDIA H100 PCIe") == 2000
    assert gpu_suite.peak_gbps("cpu") is None
    assert "--peak-gbps" in gpu_suite.commands(False, 4800.0)["pruning"]
    assert "--peak-gbps" not in gpu_suite.commands(False, None)["pruning"]
    assert all("--quick" in args for args in gpu_suite.commands(True, None).values())


@pytest.mark.slow  # three benchmark processes, ~30 s
def test_gpu_suite_quick_on_cpu(tmp_path):
    proc = run_python(["-m", "benchmarks.gpu_suite", "--quick", "--out", str(tmp_path)], timeout=600)
    suite = json.loads((tmp_path / "cpu-suite.json").read_text())
    assert suite["device"]["device_kind"] == "cpu" and suite["device"]["jax"]
    assert set(suite["runs"]) == set(gpu_suite.NAMES) and all(r["ok"] for r in suite["runs"].values()), proc.stdout
    for name in gpu_suite.NAMES:
        saved = json.loads((tmp_path / f"cpu-{name}.json").read_text())
        assert saved["machine"]["device_kind"] == "cpu" and saved["machine"]["jax"]
    assert suite["runs"]["pruning"]["result"]["same_masks_every_strategy"] is True
    assert suite["runs"]["quantization"]["result"]["int_dot_in_hlo"] is True
    assert len(suite["runs"]["distillation"]["result"]["batches"]) == 2


def test_gpu_suite_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--only", "pruning,nothing"])
    assert "nothing" in capsys.readouterr().err


def test_weight_sharing_unit_removal_and_dead_unit_clean_up_keep_the_function():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import weight_sharing as ws

    params = ws.init_mlp(jax.random.key(0))
    for i in range(3):
        params[f"fc{i}"]["bias"] = jax.random.normal(jax.random.key(i + 1), params[f"fc{i}"]["bias"].shape)
    masks = ws.unit_masks(params, 0.5)
    # half of each hidden layer's units: the column of the unit's kernel and the row of the next one
    assert [int(jnp.sum(jnp.any(masks[f"fc{i}"]["kernel"], axis=0))) for i in range(2)] == [150, 50]
    assert [int(jnp.sum(jnp.any(masks[f"fc{i}"]["kernel"], axis=1))) for i in (1, 2)] == [150, 50]
    assert bool(jnp.all(masks["fc2"]["kernel"].any(axis=0)))  # the ten outputs stay
    assert ws.unit_masks(params, 0.0)["fc1"]["kernel"].all()
    # Sparse random masks on top leave units with no outgoing weight (their incoming ones are useless) and
    # units with no incoming weight (constants, folded into the next bias), in both hidden layers.
    for i, keep in enumerate((0.02, 0.01, 0.1)):
        rand = jax.random.uniform(jax.random.key(10 + i), params[f"fc{i}"]["kernel"].shape) < keep
        masks[f"fc{i}"]["kernel"] = masks[f"fc{i}"]["kernel"] & rand
    pruned = ws.cj.apply_masks(params, masks)
    for i in range(2):
        a, b = masks[f"fc{i}"]["kernel"], masks[f"fc{i + 1}"]["kernel"]
        has_in, has_out = np.asarray(a.any(axis=0)), np.asarray(b.any(axis=1))
        assert (has_in & ~has_out).any() and (~has_in & has_out).any()
    clean, cmasks = ws.remove_dead_units(pruned, masks)
    x = jax.random.normal(jax.random.key(9), (16, 40))
    np.testing.assert_allclose(ws.apply_mlp(clean, x), ws.apply_mlp(pruned, x), rtol=1e-5, atol=1e-5)
    for i in range(3):  # the masks describe the weights, and only weights were dropped
        w, m = np.asarray(clean[f"fc{i}"]["kernel"]), np.asarray(cmasks[f"fc{i}"]["kernel"])
        assert not w[~m].any() and m.sum() < np.asarray(masks[f"fc{i}"]["kernel"]).sum() + (i == 2)
    for i in range(2):  # every unit left has both inputs and outputs, and comes first; dead ones have bias 0
        has_in = np.asarray(cmasks[f"fc{i}"]["kernel"].any(axis=0))
        has_out = np.asarray(cmasks[f"fc{i + 1}"]["kernel"].any(axis=1))
        np.testing.assert_array_equal(has_in, has_out)
        width = int(has_out.sum())
        assert has_out[:width].all() and not has_out[width:].any()
        assert not np.asarray(clean[f"fc{i}"]["bias"])[width:].any()


@pytest.mark.slow
def test_weight_sharing_quick_writes_the_issue_keys(tmp_path):
    from benchmarks import weight_sharing as ws

    out = tmp_path / "ws.json"
    res = ws.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text())["bytes"] == res["bytes"]
    for key in ("float_accuracy", "accuracy", "bytes", "ratio"):
        assert key in res
    assert res["ratio"] == pytest.approx(res["float_bytes"] / res["bytes"])
    for side in (res["uniform"], res["uniform_same_sparsity"]):
        assert {"accuracy", "bytes", "ratio"} <= side.keys() and 0 <= side["accuracy"] <= 1
    # the uniform side at about the weight-shared file's size (one proportional step): pruned harder
    assert res["uniform"]["sparsity"] > ws.Settings().sparsity
    assert abs(res["uniform"]["bytes"] - res["bytes"]) < 0.1 * res["bytes"]
    assert res["uniform_same_sparsity"]["bytes"] > res["uniform"]["bytes"]
