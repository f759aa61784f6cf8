"""Compress to a budget: the allocator (exact against brute force), exact bytes, budgets and errors."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import compressjax as cj
from compressjax.allocation import budget_bytes, from_candidates, model_stages, pareto_front
from compressjax.allocation._menu import KernelInfo, why_not

Q = cj.QuantSpec


def brute(costs, damages, budget):
    best = (math.inf, None)
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(costs[k][j] for k, j in enumerate(combo))
        d = sum(damages[k][j] for k, j in enumerate(combo))
        if c <= budget and d < best[0]:
            best = (d, combo)
    return best


@st.composite
def instances(draw):
    k = draw(st.integers(1, 4))
    o = draw(st.integers(1, 4))
    costs = [[draw(st.integers(0, 60)) for _ in range(o)] for _ in range(k)]
    damages = [[draw(st.floats(0, 10, allow_nan=False)) for _ in range(o)] for _ in range(k)]
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    budget = draw(st.integers(lo, hi + 5))
    return costs, damages, budget


@settings(max_examples=80, deadline=None)
@given(instances())
def test_allocator_is_exact_against_brute_force(inst):
    costs, damages, budget = inst
    choice = cj.allocate(costs, damages, budget)
    total_cost = sum(costs[k][j] for k, j in enumerate(choice))
    total_damage = sum(damages[k][j] for k, j in enumerate(choice))
    best, _ = brute(costs, damages, budget)
    assert total_cost <= budget
    assert total_damage == pytest.approx(best, rel=1e-12, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(instances(), st.integers(1, 10**6))
def test_allocator_on_a_coarse_grid_stays_within_budget_and_half_a_percent(inst, scale):
    # Byte counts far above the grid: the program works on a grid and must still fit, and be at least as
    # good as the exact optimum at 99.5% of the budget.
    costs, damages, budget = inst
    big = [[c * 1000 * scale + 7 for c in row] for row in costs]
    b = budget * 1000 * scale + 7 * len(costs)
    choice = cj.allocate(big, damages, b, max_cells=1000)
    assert sum(big[k][j] for k, j in enumerate(choice)) <= b
    d = sum(damages[k][j] for k, j in enumerate(choice))
    lo = sum(min(r) for r in big)
    ref, combo = brute(big, damages, max(lo, lo + 0.995 * (b - lo)))
    assert combo is None or d <= ref + 1e-12


def test_allocator_skips_options_marked_as_not_applying_and_takes_ragged_rows():
    costs = [[10, 5, -1], [4, 2]]
    damages = [[0.0, 1.0, 0.0], [0.0, 3.0]]
    assert cj.allocate(costs, damages, 9).tolist() == [1, 0]
    assert cj.allocate(costs, damages, 14).tolist() == [0, 0]
    assert cj.allocate([[1, 1]], [[np.inf, 2.0]], 1).tolist() == [1]


@pytest.mark.parametrize("budget, exc, match", [
    (float("nan"), ValueError, "NaN"),
    (-1, ValueError, "-1"),
    (float("inf"), ValueError, "finite"),
    (True, TypeError, "True"),
    ("100", TypeError, "'100'"),
    (6, ValueError, r"budget 6 bytes is smaller than the cheapest plan \(7 bytes\)"),
])
def test_allocator_rejects_bad_budgets(budget, exc, match):
    with pytest.raises(exc, match=match):
        cj.allocate([[3, 5], [4, 9]], [[1.0, 0.0], [1.0, 0.0]], budget)


def test_allocator_rejects_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        cj.allocate([[1, 2]], [[np.nan, 0.0]], 5)
    with pytest.raises(ValueError, match="negative damage"):
        cj.allocate([[1, 2]], [[-1.0, 0.0]], 5)
    with pytest.raises(ValueError, match="no usable option"):
        cj.allocate([[-1, -1]], [[0.0, 0.0]], 5)
    with pytest.raises(ValueError, match="empty"):
        cj.allocate([], [], 5)


def test_budget_forms():
    assert budget_bytes(1000, bits_per_weight=3.5) == 437
    assert budget_bytes(1000, max_bytes=123.9) == 123
    assert budget_bytes(1000, ratio=8) == 500
    with pytest.raises(ValueError, match="exactly one"):
        budget_bytes(1000)
    with pytest.raises(ValueError, match="exactly one"):
        budget_bytes(1000, bits_per_weight=3, ratio=8)
    with pytest.raises(ValueError, match="ratio must be > 0"):
        budget_bytes(1000, ratio=0)
    with pytest.raises(ValueError, match="bits_per_weight is NaN"):
        budget_bytes(1000, bits_per_weight=float("nan"))
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -5"):
        budget_bytes(1000, max_bytes=-5)


def test_default_menu_skips_what_does_not_divide_and_options_validate():
    menu = cj.default_menu()
    names = [o.name for o in menu]
    assert len(set(names)) == len(names) == 19
    k = KernelInfo("a/kernel", (96, 40), (0,))
    skipped = {o.name: why_not(o, k) for o in menu if why_not(o, k)}
    assert set(skipped) == {n for n in names if re.search(r"-g(128|64)$", n)}  # neither divides 96
    assert "group_size=128 does not divide the input axis of length 96" in skipped["gptq-int4-g128"]
    k6 = KernelInfo("b/kernel", (6, 8), (0,))
    assert "m=4 does not divide" in why_not(cj.Option("s", "sparsegpt", n=2, m=4), k6)
    with pytest.raises(ValueError, match="method"):
        cj.Option("x", "magic")
    with pytest.raises(ValueError, match="needs a QuantSpec"):
        cj.Option("x", "gptq")


# ----------------------------------------------------------------------------------- end to end, tiny model
MODEL = nn.Sequential([nn.Dense(32), nn.gelu, nn.Dense(32), nn.gelu, nn.Dense(8)])
BATCHES = [jax.random.normal(jax.random.key(i), (32, 16)) for i in range(3)]
PARAMS = MODEL.init(jax.random.key(0), BATCHES[0])
RTN = [cj.Option("float", "float"), cj.Option("rtn8", "rtn", Q(bits=8)), cj.Option("rtn4", "rtn", Q(bits=4)),
       cj.Option("rtn4-g8", "rtn", Q(bits=4, group_size=8)), cj.Option("rtn2", "rtn", Q(bits=2, symmetric=False))]


def apply(p, x):
    return MODEL.apply(p, x)


def kernel_bytes(report) -> dict[str, int]:
    return {s.path: s.stored_bytes for s in report.leaves if s.path.endswith("kernel")}


@pytest.mark.slow
@pytest.mark.parametrize("sequential", [False, True])
def test_auto_compress_bytes_predicted_equal_bytes_saved(tmp_path, sequential):
    out, plan = cj.auto_compress(apply, PARAMS, BATCHES, bits_per_weight=5.0, menu=RTN, sequential=sequential)
    assert isinstance(plan, cj.Plan) and plan.sequential is sequential
    n = sum(x.size for p, x in cj.tree.leaves_with_paths(PARAMS) if p.endswith("kernel"))
    assert plan.num_weights == n and plan.budget_bytes == math.floor(5.0 * n / 8)
    assert plan.total_bytes <= plan.budget_bytes
    cj.save(tmp_path / "m.cjx", out)
    saved = kernel_bytes(cj.size_report(tmp_path / "m.cjx"))
    assert saved == {e.path: e.bytes for e in plan.entries}
    assert sum(saved.values()) == plan.total_bytes
    # Mixed: at 5 bits per weight neither all-int4 nor all-int8 is the answer.
    assert len(plan.counts()) >= 2
    y = apply(cj.load(tmp_path / "m.cjx"), BATCHES[0])
    assert bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.slow  # over 10 s on 2 cores
def test_plan_never_exceeds_budget_and_tightens_with_it():
    h = cj.collect_hessians(apply, PARAMS, BATCHES)
    cands = cj.option_costs_and_damages(PARAMS, h, RTN)
    lo = int(cands.costs.clip(min=0).min(axis=1).sum())  # all float never; rtn2 everywhere is cheapest
    prev = math.inf
    from compressjax.allocation import apply_plan

    for bpw in (4.0, 5.0, 6.0, 9.0, 33.0):
        out, plan = cj.auto_compress(apply, PARAMS, BATCHES, bits_per_weight=bpw, menu=RTN, sequential=False, importance=False)
        assert lo <= plan.total_bytes <= plan.budget_bytes
        assert plan.total_damage <= prev + 1e-9  # more bytes, never more damage
        prev = plan.total_damage
        again, masks = apply_plan(PARAMS, plan, h)
        assert masks is None and sum(kernel_bytes(cj.size_report(again)).values()) == plan.total_bytes
    assert set(plan.counts()) == {"float"}


def test_layer_error_is_the_trace_form():
    h = cj.collect_hessians(apply, PARAMS, BATCHES)
    cands = cj.option_costs_and_damages(PARAMS, h, RTN, keep_results=True)
    i, j = 1, [o.name for o in RTN].index("rtn4")
    path = cands.paths[i]
    w = dict(cj.tree.leaves_with_paths(PARAMS))[path]
    dw = np.asarray(cj.dequantize(cands.results[(path, "rtn4")][0]), np.float64) - np.asarray(w, np.float64)
    H = np.asarray(dict(cj.tree.leaves_with_paths(h, lambda x: isinstance(x, cj.Hessian)))[path].h, np.float64)
    assert cands.errors[i, j] == pytest.approx(np.trace(dw.T @ H @ dw), rel=1e-4)
    assert (cands.errors[:, 0] == 0).all() and (cands.costs[:, 0] > cands.costs[:, 1]).all()


@pytest.mark.parametrize("kw, exc, match", [
    ({}, ValueError, "exactly one budget"),
    ({"bits_per_weight": 3, "max_bytes": 100}, ValueError, "exactly one budget"),
    ({"bits_per_weight": float("nan")}, ValueError, "bits_per_weight is NaN"),
    ({"max_bytes": -10}, ValueError, "max_bytes must be >= 0, got -10"),
    ({"ratio": -2.0}, ValueError, "ratio must be >= 0, got -2.0"),
    ({"max_bytes": 50}, ValueError, r"budget 50 bytes is smaller than the cheapest plan"),
    ({"max_bytes": 10**6, "menu": []}, ValueError, "menu is empty"),
    ({"max_bytes": 10**6, "menu": [cj.Option("g5", "rtn", Q(bits=4, group_size=5))]}, ValueError,
     r"option 'g5' applies to no selected kernel .*group_size=5 does not divide the input axis of length 16"),
    ({"max_bytes": 10**6, "menu": [cj.Option("24", "sparsegpt", n=2, m=3)]}, ValueError,
     r"option '24' applies to no selected kernel .*m=3 does not divide"),
    ({"max_bytes": 10**6, "menu": ["int4"]}, TypeError, "Option"),
    ({"max_bytes": 10**6, "importance_method": "backward"}, ValueError, "importance_method must be one of .*'backward'"),
])
def test_auto_compress_errors_name_the_value(kw, exc, match):
    with pytest.raises(exc, match=match):
        cj.auto_compress(apply, PARAMS, BATCHES, sequential=False, importance=False, **{"menu": RTN, **kw})


def test_model_stages_follow_the_model_not_the_key_order():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            for name in ("layer_2", "layer_10", "layer_1"):  # sorted keys would put layer_1 first
                x = nn.gelu(nn.Dense(8, name=f"{name}_a")(x))
                x = nn.Dense(8, name=f"{name}_b")(x)
            return x

    net = Net()
    p = net.init(jax.random.key(0), jnp.ones((2, 8)))
    paths = [q for q, _ in cj.tree.leaves_with_paths(p) if q.endswith("kernel")]
    stages = model_stages(lambda q, x: net.apply(q, x), p, jnp.ones((2, 8)), paths)
    # Each kernel is its own block here (the first component with a digit differs): model order, not key order.
    assert stages == [[f"params/{n}_{s}/kernel"] for n in ("layer_2", "layer_10", "layer_1") for s in "ab"]


@pytest.mark.slow
def test_plan_table_plot_and_pareto_front(tmp_path):
    _, plan = cj.auto_compress(apply, PARAMS, BATCHES, bits_per_weight=4.0, menu=RTN, sequential=False)
    from rich.console import Console

    console = Console(record=True, width=140)
    console.print(plan.table())
    text = console.export_text()
    assert "params/layers_0/kernel" in text and f"{plan.total_bytes:,}" in text
    assert plan.plot(tmp_path / "plan.png") == tmp_path / "plan.png"
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pareto_front([(10, 1.0), (5, 2.0), (7, 3.0), (20, 0.0)]) == [1, 0, 3]
    d = plan.to_dict()
    assert d["total_bytes"] == plan.total_bytes and len(d["kernels"]) == 3
    assert all(e.importance > 0 for e in plan.entries) and plan.importance


@pytest.mark.slow
def test_auto_compress_with_every_method_and_masks(tmp_path):
    menu = [cj.Option("gptq3", "gptq", Q(bits=3, symmetric=False)), cj.Option("gptq4-g8", "gptq", Q(bits=4, group_size=8)),
            cj.Option("sp-2:4", "sparsegpt", n=2, m=4), cj.Option("sp50+int4", "sparsegpt", Q(bits=4), sparsity=0.5),
            cj.Option("km3", "kmeans", bits=3), cj.Option("float", "float")]
    for bpw in (4.6, 12.0):  # the cheapest plan of this tiny model is 4.2 bits per weight (scales)
        out, plan = cj.auto_compress(apply, PARAMS, BATCHES, bits_per_weight=bpw, menu=menu)
        cj.save(tmp_path / "m.cjx", out)
        saved = kernel_bytes(cj.size_report(tmp_path / "m.cjx"))
        assert sum(saved.values()) == plan.total_bytes <= plan.budget_bytes
        pruned = [e.path for e in plan.entries if e.option.startswith("sp")]
        if pruned:
            masks = dict(cj.tree.leaves_with_paths(plan.masks))
            assert set(masks) == set(pruned)


def test_demo_budget_flag_and_config():
    pytest.importorskip("mnist1d")
    from compressjax.cli import build_parser
    from compressjax.demo.pipeline import DemoConfig

    args = build_parser().parse_args(["demo", "--quick", "--budget", "3.5"])
    assert args.budget == 3.5
    assert DemoConfig.quick(budget_bits=3.5).budget_bits == 3.5 and DemoConfig().budget_bits is None
    for bad in (0, -1.0, float("nan"), True, "3"):
        with pytest.raises(ValueError, match="budget_bits must be None or a number"):
            DemoConfig(budget_bits=bad)


def test_apply_plan_checks_names_modes_and_paths():
    from compressjax.allocation import apply_plan

    h = cj.collect_hessians(apply, PARAMS, BATCHES)
    paths = [p for p, x in cj.tree.leaves_with_paths(h, lambda x: isinstance(x, cj.Hessian)) if x is not None]
    out, masks = apply_plan(PARAMS, {p: "rtn4" for p in paths}, h, menu=RTN)
    assert masks is None and all(isinstance(dict(cj.tree.leaves_with_paths(out, cj.tree.is_compressed_leaf))[p], cj.QArray) for p in paths)
    with pytest.raises(ValueError, match="option 'int5' is not in the menu"):
        apply_plan(PARAMS, {paths[0]: "int5"}, h, menu=RTN)
    with pytest.raises(ValueError, match="without a Hessian"):
        apply_plan(PARAMS, {"params/nope/kernel": "rtn4"}, h, menu=RTN)
    with pytest.raises(ValueError, match="give hessians="):
        apply_plan(PARAMS, {paths[0]: "rtn4"}, menu=RTN)


def test_kernel_importance_equals_the_jvp_ratio_by_hand_for_any_chunk_size():
    """alpha = sum_b ||J X dW||^2 / sum_b ||X dW||^2, with J X dW the model's jvp along the probe."""
    rng = np.random.default_rng(3)
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)},
              "c": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}}

    def apply(p, x):
        h = jnp.tanh(x @ p["a"]["kernel"])
        h = jnp.tanh(h @ p["b"]["kernel"])
        return h @ p["c"]["kernel"]

    batches = [jnp.asarray(rng.normal(size=(7, 6)), jnp.float32) for _ in range(3)]
    probes = {f"{k}/kernel": jnp.asarray(rng.normal(size=params[k]["kernel"].shape), jnp.float32) for k in "abc"}
    xs = {"a": lambda x: x, "b": lambda x: jnp.tanh(x @ params["a"]["kernel"]),
          "c": lambda x: jnp.tanh(jnp.tanh(x @ params["a"]["kernel"]) @ params["b"]["kernel"])}
    want = {}
    for k in "abc":
        dw = probes[f"{k}/kernel"]
        tangent = jax.tree.map(jnp.zeros_like, params)
        tangent[k]["kernel"] = dw
        num = sum(float(jnp.sum(jax.jvp(lambda p, x=x: apply(p, x), (params,), (tangent,))[1] ** 2)) for x in batches)
        den = sum(float(jnp.sum((xs[k](x) @ dw) ** 2)) for x in batches)
        want[f"{k}/kernel"] = num / den
    for chunk in (1, 2, 3, 8):
        got = cj.kernel_importance(apply, params, batches, probes, chunk_size=chunk)
        for p in probes:
            np.testing.assert_allclose(got[p], want[p], rtol=1e-4)


def _three_layer_mlp(seed=3, n=64):
    rng = np.random.default_rng(seed)
    params = {k: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)} for k, shape in (("a", (6, 8)), ("b", (8, 5)), ("c", (5, 3)))}

    def apply(p, x):
        h = jnp.tanh(x @ p["a"]["kernel"])
        h = jnp.tanh(h @ p["b"]["kernel"])
        return h @ p["c"]["kernel"]

    batches = [jnp.asarray(rng.normal(size=(n, 6)), jnp.float32) for _ in range(3)]
    probes = {f"{k}/kernel": jnp.asarray(rng.normal(size=params[k]["kernel"].shape), jnp.float32) for k in "abc"}
    return apply, params, batches, probes


@pytest.mark.parametrize("metric", [None, cj.softmax_kl])
def test_reverse_mode_importance_is_an_unbiased_estimate_of_the_forward_one(metric):
    """Per-sample probes v with the metric's covariance: E[<grad (v . y_s), dW>^2] is the sample's numerator, so
    with many probes the reverse estimate comes to the exact (forward) alpha; with one probe it is within the
    noise of 3 x 64 samples, deterministic in the seed."""
    apply, params, batches, probes = _three_layer_mlp()
    exact = cj.kernel_importance(apply, params, batches, probes, output_metric=metric)
    many = cj.kernel_importance(apply, params, batches, probes, output_metric=metric, method="reverse", num_probes=512)
    for p in probes:
        np.testing.assert_allclose(many[p], exact[p], rtol=0.04)
    one = cj.kernel_importance(apply, params, batches, probes, output_metric=metric, method="reverse")
    assert one == cj.kernel_importance(apply, params, batches, probes, output_metric=metric, method="reverse")
    assert one != cj.kernel_importance(apply, params, batches, probes, output_metric=metric, method="reverse", seed=1)
    for p in probes:
        np.testing.assert_allclose(one[p], exact[p], rtol=0.5)
    for chunk in (1, 5, 64):  # the same per-sample probes however the samples are chunked (padding counts 0)
        other = cj.kernel_importance(apply, params, batches, probes, output_metric=metric, method="reverse", chunk_size=chunk)
        for p in probes:
            np.testing.assert_allclose(other[p], one[p], rtol=1e-5)
    auto = cj.kernel_importance(apply, params, batches, probes, output_metric=metric, method="auto")
    assert auto == cj.kernel_importance(apply, params, batches, probes, output_metric=metric, method="reverse")


def test_kernel_importance_reuses_given_hessians_only_when_every_batch_is_used(monkeypatch):
    """The denominators from the Hessians given (no second capture pass), the same alphas; with fewer batches
    used than given, or a probed kernel without a Hessian, they are collected over the batches used."""
    from compressjax.allocation import _importance

    apply, params, batches, probes = _three_layer_mlp()
    hess = cj.collect_hessians(apply, params, batches)
    want = cj.kernel_importance(apply, params, batches, probes)
    calls = []
    real = _importance.collect_hessians
    monkeypatch.setattr(_importance, "collect_hessians", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = cj.kernel_importance(apply, params, batches, probes, hessians=hess)
    assert calls == [] and got.keys() == want.keys()
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-5)
    sub = cj.kernel_importance(apply, params, batches, probes, hessians=hess, max_batches=2)
    assert calls == [1] and sub == cj.kernel_importance(apply, params, batches, probes, max_batches=2)
    calls.clear()
    again = cj.kernel_importance(apply, params, batches, probes, hessians=cj.collect_hessians(apply, params, batches, where=r"^a/"))
    assert calls == [1]
    for p in want:
        np.testing.assert_allclose(again[p], want[p], rtol=1e-5)
    with pytest.raises(TypeError, match="a/kernel.*Array"):
        cj.kernel_importance(apply, params, batches, probes, hessians={"a": {"kernel": jnp.eye(6)}})


def test_auto_leaves_kernels_whose_per_sample_gradient_is_too_big_to_forward_mode(monkeypatch):
    from compressjax.allocation import _importance

    apply, params, batches, probes = _three_layer_mlp()
    exact = cj.kernel_importance(apply, params, batches, probes)
    monkeypatch.setattr(_importance, "AUTO_REVERSE_BYTES", 4 * 6 * 8)  # less than the three kernels' 4 * 103 bytes
    assert cj.kernel_importance(apply, params, batches, probes, method="auto") == exact


def test_auto_keeps_forward_mode_where_there_are_few_kernels_for_the_batches():
    """One kernel over 3 batches: forward is 2 x 1 x 3 batch passes, reverse about 3 x 3: forward is cheaper."""
    apply, params, batches, probes = _three_layer_mlp()
    one = {"c/kernel": probes["c/kernel"]}
    assert cj.kernel_importance(apply, params, batches, one, method="auto") == cj.kernel_importance(apply, params, batches, one)


def test_reverse_mode_refuses_a_model_that_mixes_samples_and_auto_falls_back_to_forward():
    apply, params, batches, probes = _three_layer_mlp()

    def centred(p, x):  # each sample's output depends on the batch mean: samples are not independent
        return apply(p, x - x.mean(axis=0))

    with pytest.raises(ValueError, match="independent samples.*sample 0's output alone differs"):
        cj.kernel_importance(centred, params, batches, probes, method="reverse")
    assert cj.kernel_importance(centred, params, batches, probes, method="auto") == cj.kernel_importance(centred, params, batches, probes)

    def pooled(p, x):  # one output for the whole batch: no sample axis on the output
        return jnp.sum(apply(p, x))

    with pytest.raises(ValueError, match="output's leaves have no common leading axis"):
        cj.kernel_importance(pooled, params, batches, probes, method="reverse")
    pair = [(x, x[:3]) for x in batches]  # batch leaves with different leading sizes
    with pytest.raises(ValueError, match="batch's leaves have no common leading axis"):
        cj.kernel_importance(lambda p, b: apply(p, b[0]), params, pair, probes, method="reverse")


@pytest.mark.parametrize("kw, err, match", [({"method": "backward"}, ValueError, "method must be one of"),
                                            ({"method": "reverse", "num_probes": 0}, ValueError, "num_probes"),
                                            ({"method": "reverse", "seed": 1.5}, TypeError, "seed must be an int"),
                                            ({"method": "reverse", "output_metric": lambda y, t: jnp.sum(t ** 4)}, TypeError,
                                             "supports output_metric squared_change or softmax_kl")])
def test_kernel_importance_bad_method_options_are_named(kw, err, match):
    apply, params, batches, probes = _three_layer_mlp()
    with pytest.raises(err, match=match):
        cj.kernel_importance(apply, params, batches, probes, **kw)


def test_stacked_kernels_of_a_scanned_model_are_allocated_with_per_layer_scales_and_codebooks(tmp_path):
    """A kernel stacked (L, in, out) and run by lax.scan is one allocation unit: every option keeps each layer's
    own scales or codebooks, and the saved bytes are the plan's."""
    rng = np.random.default_rng(7)
    L, d = 3, 16
    params = {"layers": {"kernel": jnp.asarray(rng.normal(size=(L, d, d)) / np.sqrt(d), jnp.float32)},
              "head": {"kernel": jnp.asarray(rng.normal(size=(d, 8)), jnp.float32)}}

    def apply(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"]["kernel"])
        return h @ p["head"]["kernel"]

    batches = [jnp.asarray(rng.normal(size=(32, d)), jnp.float32) for _ in range(2)]
    Q = cj.QuantSpec
    menu = [cj.Option("float", "float"), cj.Option("gptq-int4-g8", "gptq", Q(bits=4, group_size=8)),
            cj.Option("rtn-int4-g8", "rtn", Q(bits=4, group_size=8)), cj.Option("kmeans-2b", "kmeans", bits=2)]
    hess = cj.collect_hessians(apply, params, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no LayerAxesWarning: the rtn option declares the layer axes
        cands = cj.option_costs_and_damages(params, hess, menu, keep_results=True)
    stacked = cands.results[("layers/kernel", "rtn-int4-g8")][0]
    assert 0 in stacked.channel_axes
    cb = cands.results[("layers/kernel", "kmeans-2b")][0]
    assert cb.layer_axes == (0,) and cb.centroids.shape == (L, d, 4)
    for opt in menu[1:]:
        leaf = cands.results[("layers/kernel", opt.name)][0]
        assert cands.costs[cands.paths.index("layers/kernel"), menu.index(opt)] == cj.size_report([leaf]).leaves[0].stored_bytes
    for sequential in (False, True):
        # tiny kernels: the scales and metadata dominate, so the budget sits between the cheapest plan and float
        out, plan = cj.auto_compress(apply, params, batches, bits_per_weight=12.0, menu=menu, sequential=sequential)
        cj.save(tmp_path / "a.cjx", out)
        kernels = {leaf.path: leaf.stored_bytes for leaf in cj.size_report(tmp_path / "a.cjx").leaves}
        assert sum(kernels[e.path] for e in plan.entries) == plan.total_bytes <= math.floor(12.0 * (L * d * d + d * 8) / 8)
        assert np.all(np.isfinite(np.asarray(apply(cj.dequantize_params(out), batches[0]))))
        assert any(e.option != "float" for e in plan.entries)


@pytest.mark.parametrize("kw, err", [({"chunk_size": 0}, ValueError), ({"max_batches": -1}, ValueError),
                                     ({"chunk_size": 2.0}, TypeError), ({"max_batches": True}, TypeError)])
def test_kernel_importance_bad_sizes_are_named(kw, err):
    params = {"k": jnp.ones((3, 2))}
    with pytest.raises(err, match=next(iter(kw))):
        cj.kernel_importance(lambda p, x: x @ p["k"], params, [jnp.ones((4, 3))], {"k": jnp.ones((3, 2))}, **kw)


def test_softmax_kl_importance_is_the_fisher_form_of_the_jvp_by_hand():
    """With ``output_metric=softmax_kl`` the numerator is ``1/2 dz^T (diag p - p p^T) dz`` of the logits' jvp,
    which is also the second derivative of KL(p || softmax(z + t dz)) at t = 0."""
    rng = np.random.default_rng(5)
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)}}

    def apply(p, x):
        return jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"]

    batches = [jnp.asarray(rng.normal(size=(7, 6)), jnp.float32) for _ in range(2)]
    probes = {f"{k}/kernel": jnp.asarray(rng.normal(size=params[k]["kernel"].shape), jnp.float32) for k in "ab"}
    got = cj.kernel_importance(apply, params, batches, probes, output_metric=cj.softmax_kl, chunk_size=1)
    for k, xs in (("a", lambda x: x), ("b", lambda x: jnp.tanh(x @ params["a"]["kernel"]))):
        dw = probes[f"{k}/kernel"]
        tangent = jax.tree.map(jnp.zeros_like, params)
        tangent[k]["kernel"] = dw
        num = 0.0
        for x in batches:
            z, dz = jax.jvp(lambda p, x=x: apply(p, x), (params,), (tangent,))

            def kl(t, z=z, dz=dz):
                p = jax.nn.softmax(z, -1)
                return jnp.sum(p * (jax.nn.log_softmax(z, -1) - jax.nn.log_softmax(z + t * dz, -1)))

            num += 0.5 * float(jax.grad(jax.grad(kl))(0.0))
        den = sum(float(jnp.sum((xs(x) @ dw) ** 2)) for x in batches)
        np.testing.assert_allclose(got[f"{k}/kernel"], num / den, rtol=1e-3)
    with pytest.raises(TypeError, match="output_metric must be callable"):
        cj.kernel_importance(apply, params, batches, probes, output_metric="kl")


def test_sequential_plans_on_a_scanned_model_calibrate_layer_by_layer():
    """sequential=True on stacked kernels is one pass of compressjax.sequential with the planned options: the
    same result as calling it with that option, not the float-model Hessians' one-shot result."""
    rng = np.random.default_rng(11)
    L, d = 3, 16
    params = {"layers": {"kernel": jnp.asarray(rng.normal(size=(L, d, d)) / np.sqrt(d), jnp.float32)}}

    def apply(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"]["kernel"])
        return h

    batches = [jnp.asarray(rng.normal(size=(32, d)), jnp.float32) for _ in range(2)]
    spec = cj.QuantSpec(bits=4, group_size=8)
    menu = [cj.Option("float", "float"), cj.Option("gptq", "gptq", spec)]
    one, plan1 = cj.auto_compress(apply, params, batches, bits_per_weight=8.0, menu=menu, sequential=False)
    seq, plan = cj.auto_compress(apply, params, batches, bits_per_weight=8.0, menu=menu, sequential=True)
    assert plan.choices == plan1.choices == {"layers/kernel": "gptq"}
    want = cj.sequential(apply, params, batches, lambda p, h: cj.gptq(p, h, spec, act_order=True))["layers"]["kernel"]
    got, first = seq["layers"]["kernel"], one["layers"]["kernel"]
    assert plan.total_bytes <= math.floor(8.0 * L * d * d / 8)
    np.testing.assert_array_equal(np.asarray(got.ints()), np.asarray(want.ints()))  # (its bytes fit the plan here)
    np.testing.assert_array_equal(np.asarray(got.ints())[0], np.asarray(first.ints())[0])  # layer 0 sees float inputs
    assert not np.array_equal(np.asarray(got.ints())[2], np.asarray(first.ints())[2])


def test_stacked_kernels_of_one_scan_are_one_sequential_stage():
    """Two kernels stacked in one lax.scan (and a head outside it): sequential=True compresses both stacked
    kernels in one pass, layer after layer (what compressjax.sequential gives), not one kernel per pass."""
    rng = np.random.default_rng(12)
    L, d = 3, 16
    params = {"layers": {"a": {"kernel": jnp.asarray(rng.normal(size=(L, d, d)) / np.sqrt(d), jnp.float32)},
                         "b": {"kernel": jnp.asarray(rng.normal(size=(L, d, d)) / np.sqrt(d), jnp.float32)}},
              "head": {"kernel": jnp.asarray(rng.normal(size=(d, 8)) / np.sqrt(d), jnp.float32)}}

    def apply(p, x):
        def body(h, w):
            return jnp.tanh(jnp.tanh(h @ w["a"]["kernel"]) @ w["b"]["kernel"]), None

        h, _ = jax.lax.scan(body, x, p["layers"])
        return h @ p["head"]["kernel"]

    batches = [jnp.asarray(rng.normal(size=(32, d)), jnp.float32) for _ in range(2)]
    spec = cj.QuantSpec(bits=4, group_size=8)
    menu = [cj.Option("float", "float"), cj.Option("gptq", "gptq", spec)]
    where = r"layers/.*kernel$"
    seq, plan = cj.auto_compress(apply, params, batches, bits_per_weight=8.0, menu=menu, where=where)
    assert set(plan.choices.values()) == {"gptq"}
    want = cj.sequential(apply, params, batches, lambda p, h: cj.gptq(p, h, spec, act_order=True), where=where)
    for k in "ab":
        np.testing.assert_array_equal(np.asarray(seq["layers"][k]["kernel"].ints()), np.asarray(want["layers"][k]["kernel"].ints()))


def _three_layers():
    rng = np.random.default_rng(5)
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(16, 16)) / 4, jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.normal(size=(16, 16)) / 4, jnp.float32)}}

    def apply(p, x):
        return jnp.tanh(jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"])

    batches = [jnp.asarray(rng.normal(size=(24, 16)), jnp.float32) for _ in range(3)]
    return params, apply, batches


def test_output_damages_put_each_result_alone_into_the_float_model():
    from compressjax.allocation import from_candidates, output_damages

    params, apply, batches = _three_layers()
    menu = [cj.Option("float", "float"), cj.Option("int2", "rtn", Q(bits=2)), cj.Option("int4", "rtn", Q(bits=4))]
    hess = cj.collect_hessians(apply, params, batches)
    cands = cj.option_costs_and_damages(params, hess, menu, keep_results=True)
    got = output_damages(apply, params, batches, cands, max_batches=3)
    assert got.shape == (2, 3) and np.all(got[:, 0] == 0)
    for i, p in enumerate(cands.paths):
        for j, o in enumerate(menu[1:], start=1):
            trial = cj.tree.replace_leaves(params, {p: cj.dequantize(cands.results[(p, o.name)][0])})
            want = sum(float(jnp.sum((apply(trial, x) - apply(params, x)) ** 2)) for x in batches)
            np.testing.assert_allclose(got[i, j], want, rtol=1e-5)
    assert np.all(got[:, 1] > got[:, 2])  # int2 hurts more than int4
    # The allocator follows the measured damages: at a budget for one int4 kernel and one int2 kernel, the
    # kernel whose int2 damage is the smaller one takes int2.
    budget = int(cands.costs[0, 1] + cands.costs[1, 2]) + int(abs(cands.costs[1, 1] - cands.costs[0, 1]))
    _, plan = from_candidates(apply, params, batches, cands, budget, None, sequential=False, damages=got)
    cheap = int(np.argmin(got[:, 1] - got[:, 2]))
    assert plan.choices[cands.paths[cheap]] == "int2"
    assert plan.entries[cheap].damage == pytest.approx(got[cheap, 1])
    # One batch by default is spaced out of three; errors are named.
    assert output_damages(apply, params, batches, cands, max_batches=1).shape == (2, 3)
    with pytest.raises(TypeError, match="distance must be callable"):
        output_damages(apply, params, batches, cands, distance="kl")
    with pytest.raises(ValueError, match="batches is empty"):
        output_damages(apply, params, [], cands)
    with pytest.raises(ValueError, match="keep_results=True"):
        output_damages(apply, params, batches, cj.option_costs_and_damages(params, hess, menu))
    with pytest.raises(ValueError, match="candidates' shape"):
        from_candidates(apply, params, batches, cands, budget, None, sequential=False, damages=got[:, :2])
    bad = got.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"damages\[1, 2\].*'int4'"):
        from_candidates(apply, params, batches, cands, budget, None, sequential=False, damages=bad)


def test_plan_distances_compile_the_model_once_across_calls():
    from compressjax.allocation import plan_distances

    params, apply, batches = _three_layers()
    menu = [cj.Option("float", "float"), cj.Option("int2", "rtn", Q(bits=2)), cj.Option("int4", "rtn", Q(bits=4))]
    cands = cj.option_costs_and_damages(params, cj.collect_hessians(apply, params, batches), menu, keep_results=True)
    traces = []

    def counted(p, x):
        traces.append(1)
        return apply(p, x)

    first = plan_distances(counted, params, batches, cands, [[1, 2], [2, 2]], max_batches=3)
    again = plan_distances(counted, params, batches, cands, [[1, 2]], max_batches=3)  # auto_compress at another budget
    assert len(traces) == 1 and again[0] == first[0]

    class Unhashable:  # a callable object with __eq__ and no __hash__: compiled per call, same distances
        __eq__ = object.__eq__
        __hash__ = None

        def __call__(self, p, x):
            return apply(p, x)

    np.testing.assert_allclose(plan_distances(Unhashable(), params, batches, cands, [[1, 2], [2, 2]], max_batches=3),
                               first, rtol=1e-6)


def test_plans_are_compared_whole_at_the_output_with_the_fitting_uniform_settings():
    from compressjax.allocation import from_candidates, plan_distances, uniform_choices

    params, apply, batches = _three_layers()
    menu = [cj.Option("float", "float"), cj.Option("int2", "rtn", Q(bits=2)), cj.Option("int4", "rtn", Q(bits=4))]
    hess = cj.collect_hessians(apply, params, batches)
    cands = cj.option_costs_and_damages(params, hess, menu, keep_results=True)
    budget = int(cands.costs[:, 2].sum())  # uniform int4 fits, float does not
    assert set(uniform_choices(cands, budget)) == {"int2", "int4"}
    # plan_distances runs each plan whole: every kernel replaced at once.
    got = plan_distances(apply, params, batches, cands, [[1, 2], [2, 2]], max_batches=3)
    for k, choice in enumerate([[1, 2], [2, 2]]):
        trial = cj.tree.replace_leaves(params, {p: cj.dequantize(cands.results[(p, menu[j].name)][0])
                                                for p, j in zip(cands.paths, choice, strict=True)})
        want = sum(float(jnp.sum((apply(trial, x) - apply(params, x)) ** 2)) for x in batches)
        np.testing.assert_allclose(got[k], want, rtol=1e-5)
    # Forged damages that call int2 harmless: the allocator takes int2 on both kernels (uniform int2, so one
    # plan to compare with int4); measured whole, int4 is closer to the float model and is what is applied.
    forged = np.where(cands.costs >= 0, 1.0, np.inf)
    forged[:, 0], forged[:, 1] = 0.0, 0.0
    out, plan = from_candidates(apply, params, batches, cands, budget, None, sequential=False, damages=forged)
    assert set(plan.choices.values()) == {"int4"}
    assert [n for n, _, _ in plan.compared] == ["allocated", "uniform int4"]
    dist = dict((n, d) for n, _, d in plan.compared)
    assert dist["uniform int4"] < dist["allocated"]
    assert plan.compared[1][1] == budget == plan.total_bytes
    assert plan.kept == "uniform int4"
    assert "compared at the output" in str(plan) and plan.to_dict()["compared"][0]["plan"] == "allocated"
    leaf = dict(cj.tree.leaves_with_paths(out, cj.tree.is_compressed_leaf))[cands.paths[0]]
    assert leaf.bits == 4
    _, kept = from_candidates(apply, params, batches, cands, budget, None, sequential=False, damages=forged,
                              compare_uniform=False)
    assert set(kept.choices.values()) == {"int2"} and kept.compared == () and kept.kept == "allocated"
    # Errors name the plan and the kernel.
    with pytest.raises(ValueError, match="plan 0 chooses 1 options for 2 kernels"):
        plan_distances(apply, params, batches, cands, [[1]])
    costs = cands.costs.copy()
    costs[0, 2] = -1
    with pytest.raises(ValueError, match="plan 0: option 'int4' does not apply to kernel"):
        plan_distances(apply, params, batches, dataclasses.replace(cands, costs=costs), [[2, 2]])
    with pytest.raises(TypeError, match="distance must be callable"):
        plan_distances(apply, params, batches, cands, [[1, 1]], distance=3)
    with pytest.raises(ValueError, match="plan 0: the output distance is nan"):
        plan_distances(apply, params, batches, cands, [[1, 1]], distance=lambda ref, y: jnp.float32(jnp.nan))


def test_softmax_kl_distance_is_the_kl_of_the_predictions():
    from compressjax.allocation import softmax_kl_distance

    rng = np.random.default_rng(0)
    ref, y = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
    p, q = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True), np.exp(y) / np.exp(y).sum(-1, keepdims=True)
    want = float(np.sum(p * (np.log(p) - np.log(q))))
    assert float(softmax_kl_distance(jnp.asarray(ref), jnp.asarray(y))) == pytest.approx(want, rel=1e-5)
    assert float(softmax_kl_distance(jnp.asarray(ref), jnp.asarray(ref))) == pytest.approx(0.0, abs=1e-6)


def test_sequential_first_stage_takes_the_candidates_and_later_stages_are_recalibrated(monkeypatch):
    """The first stage sees the float model, as the candidates did: its results are the candidates' own (no
    capture pass for it); the second is solved again on Hessians through the compressed first layer."""
    from compressjax.allocation import _auto

    params, apply, batches = _three_layers()
    menu = [cj.Option("float", "float"), cj.Option("int3", "gptq", cj.QuantSpec(bits=3))]
    hess = cj.collect_hessians(apply, params, batches)
    cands = cj.option_costs_and_damages(params, hess, menu, keep_results=True)
    captured = []
    real = _auto.collect_hessians
    monkeypatch.setattr(_auto, "collect_hessians", lambda *a, **k: captured.append(k["where"]) or real(*a, **k))
    budget = int(cands.costs[:, 1].sum())
    out, plan = from_candidates(apply, params, batches, cands, budget, None, sequential=True, compare_uniform=False)
    assert plan.choices == {"a/kernel": "int3", "b/kernel": "int3"} and len(captured) == 1 and "b/kernel" in captured[0]
    assert out["a"]["kernel"] is cands.results[("a/kernel", "int3")][0]
    first = {e.path: e for e in plan.entries}["a/kernel"]
    assert (first.bytes, first.layer_error) == (int(cands.costs[0, 1]), float(cands.errors[0, 1]))
    one_shot = cands.results[("b/kernel", "int3")][0]
    assert not np.array_equal(np.asarray(cj.dequantize(out["b"]["kernel"])), np.asarray(cj.dequantize(one_shot)))
