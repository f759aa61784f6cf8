"""Stacked kernels (scanned layers, MoE experts, grouped convolutions) in the one-shot solvers (issue 19).

Every stacked result must equal solving each layer slice (and convolution group) as its own 2-D problem,
bit for bit here (the same compiled sweep runs on each slice), keep the stacked layout, and give per-layer
scales. Also: declared layer axes in ``quantize_params`` (no Hessian).
"""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compressjax import (
    QuantSpec,
    dequantize,
    dequantize_params,
    fake_quant_params,
    load,
    quantize,
    quantize_params,
    save,
    size_report,
)
from compressjax.hessians import Hessian
from compressjax.oneshot import gptq, sparsegpt, wanda_masks
from compressjax.qarray import QArray
from compressjax.quantization import LayerAxesWarning


def stacked_hessian(h, count, in_axes, layer_axes=(), groups=1):
    """A Hessian with the contract's ``layer_axes``/``groups`` fields, before or after they exist in compressjax.hessians."""
    try:
        return Hessian(h, count, in_axes, layer_axes=tuple(layer_axes), groups=groups)
    except TypeError:
        hs = Hessian(h, count, in_axes)
        hs.layer_axes, hs.groups = tuple(layer_axes), groups
        return hs


def gram(rng, n, d):
    z = rng.normal(size=(n, 4)) @ rng.normal(size=(4, d)) + 0.3 * rng.normal(size=(n, d))
    x = z.astype(np.float32)
    return x.T @ x


class Case:
    """A stacked kernel, its stacked Hessian, and the 2-D problems it is made of."""

    def __init__(self, shape, layer_axes, in_axes, groups=1, seed=0, n=48):
        rng = np.random.default_rng(seed)
        self.shape, self.layer_axes, self.in_axes, self.groups = shape, layer_axes, in_axes, groups
        self.w = rng.normal(size=shape).astype(np.float32)
        self.layer_shape = tuple(shape[a] for a in layer_axes)
        rest = [a for a in range(len(shape)) if a not in layer_axes]
        self.in2 = tuple(rest.index(a) for a in in_axes)  # input axes of a slice
        d_in = int(np.prod([shape[a] for a in in_axes]))
        hs = np.stack([gram(rng, n, d_in) for _ in range(int(np.prod(self.layer_shape or (1,))) * groups)])
        self.h = hs.reshape(self.layer_shape + ((groups,) if groups > 1 else ()) + (d_in, d_in))
        self.hess = stacked_hessian(jnp.asarray(self.h), jnp.full(self.h.shape[:-2], float(n)), in_axes, layer_axes, groups)

    def slices(self):
        """``(index, kernel_slice, hessian_matrix)`` where ``index`` selects the slice in the stacked kernel."""
        for li in itertools.product(*[range(d) for d in self.layer_shape]):
            k = self.w
            for a, i in sorted(zip(self.layer_axes, li, strict=True), reverse=True):
                k = np.take(k, i, axis=a)
            out_ax = [a for a in range(k.ndim) if a not in self.in2]
            og = k.shape[out_ax[-1]] // self.groups
            for g in range(self.groups):
                sl = [slice(None)] * k.ndim
                sl[out_ax[-1]] = slice(g * og, (g + 1) * og)
                h = self.h[li + ((g,) if self.groups > 1 else ())]
                yield li, tuple(sl), k[tuple(sl)], h

    def pick(self, arr, li, sl):
        a = np.asarray(arr)
        for ax, i in sorted(zip(self.layer_axes, li, strict=True), reverse=True):
            a = np.take(a, i, axis=ax)
        return a[sl]

    def solve2d(self, fn, k, h):
        return fn({"k": jnp.asarray(k)}, {"k": Hessian(jnp.asarray(h), 48.0, self.in2)})


CASES = {
    "L,in,out": dict(shape=(3, 16, 8), layer_axes=(0,), in_axes=(1,)),
    "in,L,out (MaxText)": dict(shape=(16, 3, 8), layer_axes=(1,), in_axes=(0,)),
    "MoE E,in,out": dict(shape=(4, 8, 6), layer_axes=(0,), in_axes=(1,)),
    "grouped conv": dict(shape=(2, 2, 4, 6), layer_axes=(), in_axes=(0, 1, 2), groups=2),
    "nested scans": dict(shape=(2, 2, 8, 4), layer_axes=(0, 1), in_axes=(2,)),
    "depthwise conv": dict(shape=(3, 3, 1, 4), layer_axes=(), in_axes=(0, 1, 2), groups=4),
}


def _spec_for(case):
    last_in = case.shape[case.in_axes[-1]]
    if last_in % 4:
        return QuantSpec(bits=4, symmetric=False)  # depthwise: one input channel per group, per channel asymmetric
    return QuantSpec(bits=4, group_size=4 if last_in % 8 else 8)


SLOW = pytest.mark.slow  # each case compiles its own sweeps (about 5-30 s on the shared 2-core machine)


@pytest.mark.parametrize("name", ["L,in,out", "in,L,out (MaxText)", pytest.param("MoE E,in,out", marks=SLOW), "grouped conv",
                                  pytest.param("nested scans", marks=SLOW), pytest.param("depthwise conv", marks=SLOW)])
def test_gptq_stacked_equals_each_slice(name):
    case = Case(**CASES[name])
    spec = _spec_for(case)
    q = gptq({"k": jnp.asarray(case.w)}, {"k": case.hess}, spec)["k"]
    assert isinstance(q, QArray) and q.shape == case.shape
    assert set(case.layer_axes) <= set(q.channel_axes)  # layer axes never share a scale
    ints, deq = np.asarray(q.ints()), np.asarray(dequantize(q))
    n = 0
    for li, sl, k, h in case.slices():
        ref = case.solve2d(lambda p, hh: gptq(p, hh, spec), k, h)["k"]
        np.testing.assert_array_equal(case.pick(ints, li, sl), np.asarray(ref.ints()))
        np.testing.assert_array_equal(case.pick(deq, li, sl), np.asarray(dequantize(ref)))
        n += 1
    assert n == int(np.prod(case.layer_shape or (1,))) * case.groups


@pytest.mark.parametrize("name", [pytest.param("L,in,out", marks=SLOW), "in,L,out (MaxText)", pytest.param("grouped conv", marks=SLOW)])
def test_sparsegpt_and_wanda_stacked_equal_each_slice(name):
    case = Case(**CASES[name], seed=1)
    p, m = sparsegpt({"k": jnp.asarray(case.w)}, {"k": case.hess}, 0.5)
    wm = wanda_masks({"k": jnp.asarray(case.w)}, {"k": case.hess}, 0.5)["k"]
    assert m["k"].shape == case.shape and wm.shape == case.shape
    for li, sl, k, h in case.slices():
        rp, rm = case.solve2d(lambda pp, hh: sparsegpt(pp, hh, 0.5), k, h)
        np.testing.assert_array_equal(case.pick(m["k"], li, sl), np.asarray(rm["k"]))
        np.testing.assert_array_equal(case.pick(p["k"], li, sl), np.asarray(rp["k"]))
        rw = case.solve2d(lambda pp, hh: wanda_masks(pp, hh, 0.5), k, h)["k"]
        np.testing.assert_array_equal(case.pick(wm, li, sl), np.asarray(rw))
        # each slice loses exactly its own half
        assert int(np.sum(~case.pick(m["k"], li, sl))) == k.size // 2


@SLOW
def test_moe_nm_sparsegpt_with_quantization_and_variants_equal_each_slice():
    case = Case(**CASES["MoE E,in,out"], seed=2)
    spec_pt = QuantSpec(bits=4, channel_axes=())  # per tensor -> per expert
    spec_asym = QuantSpec(bits=3, symmetric=False)
    p, m = sparsegpt({"k": jnp.asarray(case.w)}, {"k": case.hess}, None, n=2, m=4, rules=spec_asym)
    qpt = gptq({"k": jnp.asarray(case.w)}, {"k": case.hess}, spec_pt, act_order=True)["k"]
    assert qpt.scale.shape == (4, 1, 1) and qpt.channel_axes == (0,)
    assert len(np.unique(np.asarray(qpt.scale))) == 4  # one scale per expert, never shared
    for li, sl, k, h in case.slices():
        rp, rm = case.solve2d(lambda pp, hh: sparsegpt(pp, hh, None, n=2, m=4, rules=spec_asym), k, h)
        np.testing.assert_array_equal(case.pick(m["k"], li, sl), np.asarray(rm["k"]))
        np.testing.assert_array_equal(case.pick(dequantize(p["k"]), li, sl), np.asarray(dequantize(rp["k"])))
        rq = case.solve2d(lambda pp, hh: gptq(pp, hh, spec_pt, act_order=True), k, h)["k"]
        np.testing.assert_array_equal(case.pick(dequantize(qpt), li, sl), np.asarray(dequantize(rq)))


def _scanned_model(L=3, d=16, seed=3, n=64):
    rng = np.random.default_rng(seed)
    params = {"layers": {"kernel": jnp.asarray(rng.normal(size=(L, d, d)).astype(np.float32) / np.sqrt(d))},
              "head": {"kernel": jnp.asarray(rng.normal(size=(d, 4)).astype(np.float32))}}

    def apply(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"]["kernel"])
        return h @ p["head"]["kernel"]

    # Per-layer Hessians of the scanned model, by running the layers by hand.
    x = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
    hs, h = [], x
    for i in range(L):
        hs.append(h.T @ h)
        h = jnp.tanh(h @ params["layers"]["kernel"][i])
    hess = {"layers": {"kernel": stacked_hessian(jnp.stack(hs), jnp.full((L,), float(n)), (1,), (0,))},
            "head": {"kernel": Hessian(h.T @ h, float(n), (0,))}}
    return params, apply, hess, x


@pytest.mark.slow  # over 10 s on 2 cores
def test_stacked_qarray_runs_through_the_scanned_model_and_the_file_format(tmp_path):
    params, apply, hess, x = _scanned_model()
    q = gptq(params, hess, QuantSpec(bits=4, group_size=8))
    qk = q["layers"]["kernel"]
    assert qk.scale.shape == (3, 2, 1, 16) and qk.channel_axes == (0, 2)
    deq = dequantize_params(q)
    y = apply(deq, x)
    assert y.shape == (64, 4) and bool(jnp.all(jnp.isfinite(y)))
    # The scan body can also take the integer codes and per-layer scales directly.
    lay = qk.layout

    def body(h, cs):
        codes, scale = cs
        w = (codes.astype(jnp.float32).reshape(lay.grouped_shape[1:]) * scale).reshape(qk.shape[1:])
        return jnp.tanh(h @ w), None

    h, _ = jax.lax.scan(body, x, (qk.ints(), qk.scale))
    np.testing.assert_allclose(np.asarray(h @ deq["head"]["kernel"]), np.asarray(y), rtol=1e-6, atol=1e-6)
    # The compressed model is closer to the float model than round-to-nearest with the same grid.
    rtn = quantize_params(params, {"layers/": QuantSpec(bits=4, group_size=8, layer_axes=(0,)), "head": QuantSpec(bits=4, group_size=8)})
    y_float = apply(params, x)
    err_gptq = float(jnp.mean((y - y_float) ** 2))
    err_rtn = float(jnp.mean((apply(dequantize_params(rtn), x) - y_float) ** 2))
    assert err_gptq < err_rtn
    # save / load / size_report
    rep = save(tmp_path / "s.cjx", q)
    back = load(tmp_path / "s.cjx")
    np.testing.assert_array_equal(np.asarray(back["layers"]["kernel"]), np.asarray(deq["layers"]["kernel"]))
    assert size_report(tmp_path / "s.cjx").total_bytes == rep.total_bytes
    kept = load(tmp_path / "s.cjx", dequantize=False)["layers"]["kernel"]
    assert isinstance(kept, QArray) and kept.channel_axes == (0, 2)
    np.testing.assert_array_equal(np.asarray(kept.scale), np.asarray(qk.scale))


@SLOW
def test_stacked_gptq_compiles_once_per_slice_shape_not_per_layer():
    from compressjax.oneshot import _solver

    case = Case(shape=(5, 16, 8), layer_axes=(0,), in_axes=(1,), seed=4)
    spec = QuantSpec(bits=4, group_size=8)
    stacked0, single0 = _solver.solve_stacked._cache_size(), _solver.solve._cache_size()
    gptq({"a": jnp.asarray(case.w)}, {"a": case.hess}, spec)
    gptq({"a": jnp.asarray(case.w) * 2.0}, {"a": case.hess}, spec)  # same shapes: no new compilation
    # one compiled lax.map over the 5 layers, no per-layer 2-D compilation
    assert _solver.solve_stacked._cache_size() - stacked0 == 1
    assert _solver.solve._cache_size() == single0


def test_zero_count_slice_and_shape_errors_name_the_leaf():
    case = Case(**CASES["L,in,out"])
    count = np.full((3,), 48.0)
    count[1] = 0
    bad = stacked_hessian(jnp.asarray(case.h), jnp.asarray(count), (1,), (0,))
    for fn in (lambda p, h: gptq(p, h, QuantSpec(4)), lambda p, h: sparsegpt(p, h, 0.5), lambda p, h: wanda_masks(p, h, 0.5)):
        with pytest.raises(ValueError, match=r"'k'.*layer \(1,\).*zero input rows"):
            fn({"k": jnp.asarray(case.w)}, {"k": bad})
    wrong = stacked_hessian(jnp.asarray(case.h[:2]), jnp.full((2,), 48.0), (1,), (0,))
    with pytest.raises(ValueError, match=r"'k'.*stacked Hessian has shape \(2, 16, 16\), expected \(3, 16, 16\)"):
        gptq({"k": jnp.asarray(case.w)}, {"k": wrong}, QuantSpec(4))
    with pytest.raises(ValueError, match=r"'k'.*layer axes \(1,\).*do not fit"):
        gptq({"k": jnp.asarray(case.w)}, {"k": stacked_hessian(jnp.asarray(case.h), jnp.full((3,), 48.0), (1,), (1,))}, QuantSpec(4))
    with pytest.raises(ValueError, match=r"'k'.*declares layer_axes=\(2,\).*records layer axes \(0,\)"):
        gptq({"k": jnp.asarray(case.w)}, {"k": case.hess}, QuantSpec(4, layer_axes=(2,)))
    # declaring the same axes as the Hessian is fine
    q = gptq({"k": jnp.asarray(case.w)}, {"k": case.hess}, QuantSpec(4, layer_axes=(0,)))["k"]
    assert q.channel_axes == (0, 2)


# ------------------------------------------------------------------ quantize_params without a Hessian (B)
def test_quantize_params_declared_layer_axes_give_per_layer_scales():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(3, 16, 8)).astype(np.float32)
    w[1] *= 100.0  # one loud layer: with a shared scale the others would round to few codes
    spec = QuantSpec(bits=4, group_size=8, layer_axes=(0,))
    q = quantize_params({"k": jnp.asarray(w)}, spec)["k"]
    assert q.channel_axes == (0, 2) and q.scale.shape == (3, 2, 1, 8)
    for i in range(3):
        ref = quantize(jnp.asarray(w[i]), QuantSpec(bits=4, group_size=8))
        np.testing.assert_array_equal(np.asarray(dequantize(q))[i], np.asarray(dequantize(ref)))
    # MaxText layout (in, L, out): the layer axis 1, groups along axis 0
    wt = np.transpose(w, (1, 0, 2))
    qt = quantize_params({"k": jnp.asarray(wt)}, QuantSpec(bits=4, group_size=8, group_axis=0, layer_axes=(1,)))["k"]
    np.testing.assert_array_equal(np.transpose(np.asarray(dequantize(qt)), (1, 0, 2)), np.asarray(dequantize(q)))
    # per tensor: one scale per layer
    qp = quantize_params({"k": jnp.asarray(w)}, QuantSpec(bits=4, channel_axes=(), layer_axes=(0,)))["k"]
    assert qp.scale.shape == (3, 1, 1)


def test_scales_never_span_a_declared_layer_axis():
    w = jnp.ones((16, 3, 8))
    # the default group axis (-2) is the declared layer axis 1 here
    with pytest.raises(ValueError, match=r"'k'.*group axis 1 is a layer axis \(1,\)"):
        quantize_params({"k": w}, QuantSpec(bits=4, group_size=8, layer_axes=(1,)))
    with pytest.raises(ValueError, match=r"'k'.*layer axis 3 is out of range"):
        quantize_params({"k": w}, QuantSpec(bits=4, layer_axes=(3,)))
    with pytest.raises(TypeError, match="layer_axes"):
        QuantSpec(bits=4, layer_axes=("0",))


def test_undeclared_3d_kernel_warns_naming_it_and_conv1d_can_say_so():
    params = {"conv": {"kernel": jnp.ones((3, 4, 8))}, "dense": {"kernel": jnp.ones((4, 8))}}
    with pytest.warns(LayerAxesWarning, match=r"'conv/kernel'.*layer_axes=\(0,\)"):
        quantize_params(params, QuantSpec(bits=4))
    with pytest.warns(LayerAxesWarning, match=r"'conv/kernel'"):
        fake_quant_params(params, QuantSpec(bits=4, channel_axes=()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = quantize_params(params, QuantSpec(bits=4, layer_axes=()))  # a conv1d kernel: shared across k, as before
        assert q["conv"]["kernel"].channel_axes == (2,)
        # per-(axis 0, out) scales never span axis 0: no warning either
        quantize_params(params, {"conv": QuantSpec(bits=4, channel_axes=(0, 2))})


def test_quantized_dot_general_with_per_expert_weight_scales_in_a_batched_matmul():
    # MoE experts in one batched dot_general ("etd,edf->etf"): layer_axes=(0,) gives each expert its own scales,
    # which the integer path factors out like a batch axis.
    from compressjax import quantized_dot_general

    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(3, 5, 8)).astype(np.float32))
    w = rng.normal(size=(3, 8, 4)).astype(np.float32)
    w[2] *= 50.0
    w = jnp.asarray(w)
    wspec, aspec = QuantSpec(bits=8, layer_axes=(0,)), QuantSpec(bits=8, channel_axes=())
    dn = (((2,), (1,)), ((0,), (0,)))
    fake = quantized_dot_general(wspec, aspec)(x, w, dn)
    intd = quantized_dot_general(wspec, aspec, mode="int")(x, w, dn)
    np.testing.assert_allclose(np.asarray(intd), np.asarray(fake), rtol=1e-5, atol=1e-4)
    wq = dequantize_params(quantize_params({"w": w}, {"w": wspec}))["w"]
    xq = dequantize(quantize(x, aspec))
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(fake), np.asarray(jnp.einsum("etd,edf->etf", xq, wq)), rtol=1e-5, atol=1e-4)
    # per-expert scales: the loud expert does not coarsen the others' grids
    assert quantize(w, wspec).scale.shape == (3, 1, 4)
