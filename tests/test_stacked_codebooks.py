"""Stacked codebooks (issue 19): k-means, error feedback and centroid refits per layer slice of a scanned kernel.

A stacked Codebook (``layer_axes``) must equal fitting each layer slice on its own, bit for bit for the
indices, keep the stacked layout through the scanned model and the file format, and ``sequential`` must
join its per-slice codebooks into one.
"""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import resign, set_field

import compressjax as cj
from compressjax.cli import main
from compressjax.codebook import Codebook, codebook_error_feedback, kmeans_codebooks, refit_centroids
from compressjax.export import FormatError, _container
from compressjax.hessians import Hessian


def _gram(rng, d, n=48):
    x = (rng.normal(size=(n, 3)) @ rng.normal(size=(3, d)) + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    return x.T @ x


def _take(a, layer_axes, li):
    a = np.asarray(a)
    for ax, i in sorted(zip(layer_axes, li, strict=True), reverse=True):
        a = np.take(a, i, axis=ax)
    return a


CASES = {  # shape, layer axes, input axes (of the stacked kernel)
    "L,in,out": ((3, 12, 8), (0,), (1,)),
    "in,L,out (MaxText)": ((12, 3, 8), (1,), (0,)),
    "L,out,in (x @ w.T)": ((3, 8, 12), (0,), (2,)),
    "nested scans": ((2, 2, 12, 6), (0, 1), (2,)),
}


def _case(name, seed=0):
    shape, layer_axes, in_axes = CASES[name]
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    layer_shape = tuple(shape[a] for a in layer_axes)
    d_in = int(np.prod([shape[a] for a in in_axes]))
    h = np.stack([_gram(rng, d_in) for _ in range(int(np.prod(layer_shape)))]).reshape(layer_shape + (d_in, d_in))
    hess = Hessian(jnp.asarray(h), jnp.full(layer_shape, 48.0), in_axes, layer_axes=layer_axes)
    rest = [a for a in range(len(shape)) if a not in layer_axes]
    in2 = tuple(rest.index(a) for a in in_axes)
    slices = list(itertools.product(*[range(d) for d in layer_shape]))
    return w, layer_axes, hess, h, in2, slices


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("per_channel", [False, True])
def test_stacked_codebooks_equal_each_slice(name, per_channel):
    w, layer_axes, hess, h, in2, slices = _case(name)
    q = kmeans_codebooks({"w": jnp.asarray(w)}, 3, per_channel=per_channel, layer_axes=layer_axes)["w"]
    assert q.layer_axes == layer_axes and q.shape == w.shape
    assert q.centroids.shape == tuple(w.shape[a] for a in layer_axes) + ((w.shape[-1],) if per_channel else ()) + (8,)
    fed = codebook_error_feedback({"w": q}, {"w": jnp.asarray(w)}, {"w": hess})["w"]
    fit = refit_centroids({"w": fed}, {"w": jnp.asarray(w)}, {"w": hess})["w"]
    assert fed.layer_axes == fit.layer_axes == layer_axes
    for li in slices:
        ws = jnp.asarray(_take(w, layer_axes, li))
        q1 = kmeans_codebooks({"w": ws}, 3, per_channel=per_channel)["w"]
        np.testing.assert_array_equal(_take(q.index_array(), layer_axes, li), np.asarray(q1.index_array()))
        np.testing.assert_allclose(np.asarray(q.centroids[li]), np.asarray(q1.centroids), rtol=1e-6, atol=1e-6)
        h1 = Hessian(jnp.asarray(h[li]), 48.0, in2)
        fed1 = codebook_error_feedback({"w": q1}, {"w": ws}, {"w": h1})["w"]
        np.testing.assert_array_equal(_take(fed.index_array(), layer_axes, li), np.asarray(fed1.index_array()))
        fit1 = refit_centroids({"w": fed1}, {"w": ws}, {"w": h1})["w"]
        np.testing.assert_allclose(np.asarray(fit.centroids[li]), np.asarray(fit1.centroids), rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(_take(fit.decode(), layer_axes, li), np.asarray(fit1.decode()), rtol=2e-4, atol=2e-5)


def _out_err(w_hat, w, h):
    """``sum_l tr(dW_l^T H_l dW_l)`` of an ``(L, in, out)`` kernel."""
    d = np.asarray(w_hat, np.float64) - w
    return float(sum(np.trace(d[i].T @ h[i] @ d[i]) for i in range(d.shape[0])))


def test_a_codebook_shared_by_the_layers_sweeps_each_slice_on_its_own_hessian():
    w, _, hess, h, in2, slices = _case("L,in,out", seed=1)
    q = kmeans_codebooks({"w": jnp.asarray(w)}, 3, layer_axes=())["w"]  # one codebook for all layers
    fed = codebook_error_feedback({"w": q}, {"w": jnp.asarray(w)}, {"w": hess})["w"]
    assert fed.layer_axes == () and np.array_equal(np.asarray(fed.centroids), np.asarray(q.centroids))
    for (i,) in slices:  # the sweep of slice i uses slice i's Hessian and the shared table
        one = Codebook.from_indices(q.index_array()[i], q.centroids, bits=3)
        fed1 = codebook_error_feedback({"w": one}, {"w": jnp.asarray(w[i])}, {"w": Hessian(jnp.asarray(h[i]), 48.0, in2)})["w"]
        np.testing.assert_array_equal(np.asarray(fed.index_array()[i]), np.asarray(fed1.index_array()))
    fit = refit_centroids({"w": fed}, {"w": jnp.asarray(w)}, {"w": hess})["w"]
    e_q, e_fed, e_fit = (_out_err(c.decode(), w, h) for c in (q, fed, fit))
    assert e_fed < e_q and e_fit <= e_fed * (1 + 1e-5)
    # The refit is the exact minimiser of the summed error: nudging any centroid raises it.
    for j in range(8):
        bumped = fit.with_centroids(fit.centroids.at[j].add(1e-2))
        assert _out_err(bumped.decode(), w, h) > e_fit


def test_stacked_codebook_through_the_scanned_model_and_the_file_format(tmp_path, capsys):
    L, d = 3, 16
    rng = np.random.default_rng(5)
    params = {"layers": {"kernel": jnp.asarray(rng.normal(size=(L, d, d)).astype(np.float32) / np.sqrt(d))},
              "head": {"kernel": jnp.asarray(rng.normal(size=(d, 4)).astype(np.float32))}}

    def apply(p, x):
        hh, _ = jax.lax.scan(lambda hh, w: (jnp.tanh(hh @ w), None), x, p["layers"]["kernel"])
        return hh @ p["head"]["kernel"]

    x = jnp.asarray(rng.normal(size=(64, d)).astype(np.float32))
    hess = cj.collect_hessians(apply, params, [x], where="layers/kernel")
    q = kmeans_codebooks(params, 3, where="layers/kernel", per_channel=True, layer_axes=(0,))
    q = refit_centroids(codebook_error_feedback(q, params, hess), params, hess)
    cb = q["layers"]["kernel"]
    assert isinstance(cb, Codebook) and cb.layer_axes == (0,) and cb.centroids.shape == (L, d, 8)
    y = apply(cj.dequantize_params(q), x)
    y_float = apply(params, x)
    shared = kmeans_codebooks(params, 3, where="layers/kernel", per_channel=True, layer_axes=())
    y_shared = apply(cj.dequantize_params(shared), x)
    assert float(jnp.mean((y - y_float) ** 2)) < float(jnp.mean((y_shared - y_float) ** 2))
    # jit and the pytree: the stacked codebook crosses jit whole
    np.testing.assert_allclose(np.asarray(jax.jit(lambda p: apply(cj.dequantize_params(p), x))(q)), np.asarray(y),
                               rtol=1e-6, atol=1e-6)
    rep = cj.save(tmp_path / "s.cjx", q)
    back = cj.load(tmp_path / "s.cjx", dequantize=False)["layers"]["kernel"]
    assert isinstance(back, Codebook) and back.layer_axes == (0,)
    np.testing.assert_array_equal(np.asarray(back.decode()), np.asarray(cb.decode()))
    report = cj.size_report(tmp_path / "s.cjx")
    assert report.total_bytes == rep.total_bytes
    assert any("/layer" in leaf.encoding for leaf in report.leaves)
    assert main(["inspect", str(tmp_path / "s.cjx")]) == 0
    assert "cb3/ch/layer" in capsys.readouterr().out


def test_sequential_joins_the_slices_codebooks_into_a_stacked_codebook():
    L, d = 3, 16
    rng = np.random.default_rng(6)
    params = {"layers": {"kernel": jnp.asarray(rng.normal(size=(L, d, d)).astype(np.float32) / np.sqrt(d))}}

    def apply(p, x):
        hh, _ = jax.lax.scan(lambda hh, w: (jnp.tanh(hh @ w), None), x, p["layers"]["kernel"])
        return hh

    def compress(p, h):
        q = kmeans_codebooks(p, 3, where=lambda path, _: h_has(h, path), per_channel=True)
        return refit_centroids(codebook_error_feedback(q, p, h), p, h)

    def h_has(h, path):
        return dict(cj.tree.leaves_with_paths(h, lambda v: v is None or isinstance(v, Hessian))).get(path) is not None

    xs = [jnp.asarray(rng.normal(size=(32, d)).astype(np.float32)) for _ in range(2)]
    out = cj.sequential(apply, params, xs, compress)["layers"]["kernel"]
    assert isinstance(out, Codebook) and out.layer_axes == (0,) and out.centroids.shape == (L, d, 8)
    # Slice 0 sees the float inputs: it equals compressing layer 0 alone on the same Hessian.
    x0 = jnp.concatenate(xs)
    h0 = Hessian(x0.T @ x0, float(x0.shape[0]), (0,))
    one = compress({"k": params["layers"]["kernel"][0]}, {"k": h0})["k"]
    np.testing.assert_array_equal(np.asarray(out.index_array()[0]), np.asarray(one.index_array()))
    np.testing.assert_allclose(np.asarray(out.centroids[0]), np.asarray(one.centroids), rtol=1e-4, atol=1e-5)


def test_layer_axes_errors_name_the_leaf():
    w = jnp.asarray(np.random.default_rng(9).standard_normal((2, 4, 3)).astype(np.float32))
    with pytest.raises(ValueError, match="'w': Codebook layer_axes \\(3,\\) are not axes"):
        kmeans_codebooks({"w": w}, 2, layer_axes=(3,))
    with pytest.raises(ValueError, match="'w': the last axis .* cannot also be a layer axis"):
        kmeans_codebooks({"w": w}, 2, per_channel=True, layer_axes=(2,))
    with pytest.raises(ValueError, match="'w': Codebook layer_axes \\(0, 0\\) repeat an axis"):
        kmeans_codebooks({"w": w}, 1, layer_axes=(0, 0))
    with pytest.raises(TypeError, match="'w': Codebook layer_axes must be a tuple of ints"):
        kmeans_codebooks({"w": w}, 1, layer_axes=0)
    with pytest.raises(ValueError, match="each layer of the weights hold 6 values, fewer than the 8 centroids"):
        kmeans_codebooks({"w": w[:, :2]}, 3, layer_axes=(0,))
    q = kmeans_codebooks({"w": w}, 2, layer_axes=(0,))["w"]
    with pytest.raises(ValueError, match="needs floating-point centroids of shape \\(2, 4\\)"):
        Codebook(q.indices, q.centroids[0], bits=2, shape=q.shape, layer_axes=(0,), path="w")
    # A stacked codebook whose layers are not the Hessian's is refused, naming both.
    q1 = kmeans_codebooks({"w": w}, 2, layer_axes=(0,))
    for fn in (codebook_error_feedback, refit_centroids):
        with pytest.raises(ValueError, match="'w': the Codebook has layer axes \\(0,\\) but its Hessian has layer axes \\(1,\\)"):
            fn(q1, {"w": w}, {"w": Hessian(jnp.stack([jnp.eye(3)] * 4), jnp.ones(4), (2,), layer_axes=(1,))})
    with pytest.raises(ValueError, match="'w': Hessian has shape \\(4, 2, 2\\), expected \\(2, 4, 4\\)"):
        codebook_error_feedback(q1, {"w": w}, {"w": Hessian(jnp.stack([jnp.eye(2)] * 4), jnp.ones(4), (1,), layer_axes=(0,))})


@pytest.mark.parametrize("layers", [[2], [1], [0, 0], [1, 0], "0", [True], [7], [0, 1, 2, 3]])
def test_forged_layer_axes_in_a_file_are_format_errors(tmp_path, layers):
    w = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, 3)).astype(np.float32))
    path = tmp_path / "a.cjx"
    cj.save(path, kmeans_codebooks({"w": w}, 2, layer_axes=(0,)))
    header = json.loads(_container.parse(path.read_bytes())[0])
    i = next(i for i, rec in enumerate(header["leaves"]) if rec.get("e") == "cb")
    assert header["leaves"][i]["meta"]["layers"] == [0]
    bad = tmp_path / "f.cjx"
    bad.write_bytes(resign(path.read_bytes(), set_field(["leaves", i, "meta", "layers"], layers)))
    for fn in (cj.load, cj.size_report):
        with pytest.raises(FormatError, match="codebook layer axes|do not match the metadata"):
            fn(bad)


def test_grouped_convolution_hessians_sweep_and_refit_each_group():
    """A grouped convolution's Hessian (``groups``) pairs group ``g`` of the output channels with ``H[g]``: the
    per-channel codebooks are swept and refit per group, as on each group's kernel alone."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(3, 3, 2, 6)).astype(np.float32)  # (kh, kw, in per group, out), 2 groups of 3 outputs
    h = np.stack([_gram(rng, 18) for _ in range(2)])
    hess = Hessian(jnp.asarray(h), jnp.full((2,), 48.0), (0, 1, 2), groups=2)
    q = kmeans_codebooks({"w": jnp.asarray(w)}, 2, per_channel=True)["w"]
    fed = codebook_error_feedback({"w": q}, {"w": jnp.asarray(w)}, {"w": hess})["w"]
    fit = refit_centroids({"w": fed}, {"w": jnp.asarray(w)}, {"w": hess})["w"]
    for g in range(2):
        cols = slice(3 * g, 3 * g + 3)
        q1 = Codebook.from_indices(q.index_array()[..., cols], q.centroids[cols], bits=2, per_channel=True)
        h1 = Hessian(jnp.asarray(h[g]), 48.0, (0, 1, 2))
        fed1 = codebook_error_feedback({"w": q1}, {"w": jnp.asarray(w[..., cols])}, {"w": h1})["w"]
        np.testing.assert_array_equal(np.asarray(fed.index_array()[..., cols]), np.asarray(fed1.index_array()))
        fit1 = refit_centroids({"w": fed1}, {"w": jnp.asarray(w[..., cols])}, {"w": h1})["w"]
        np.testing.assert_allclose(np.asarray(fit.centroids[cols]), np.asarray(fit1.centroids), rtol=2e-4, atol=2e-5)


def test_an_undeclared_3d_leaf_warns_naming_it_and_declaring_silences_it():
    import warnings

    from compressjax.quantization import LayerAxesWarning

    w = jnp.asarray(np.random.default_rng(8).standard_normal((3, 8, 4)).astype(np.float32))
    with pytest.warns(LayerAxesWarning, match="leaf 'layers/kernel' of shape \\(3, 8, 4\\)"):
        kmeans_codebooks({"layers": {"kernel": w}}, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kmeans_codebooks({"w": w}, 2, layer_axes=(0,))
        kmeans_codebooks({"w": w}, 2, layer_axes=())
        kmeans_codebooks({"w": w[0]}, 2)  # 2-D: nothing to declare
