"""Issue 22 (codebooks): Hessian layouts, empty Hessians, finite centroids, zero-size leaves, argument errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compressjax as cj
from compressjax.codebook import Codebook, codebook_error_feedback, refit_centroids


def _hessian(d: int, seed: int = 0) -> jax.Array:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * d, d)).astype(np.float32) @ rng.standard_normal((d, d)).astype(np.float32)
    return jnp.asarray(x.T @ x)


def _to_2d(a, in_axes):
    out_axes = tuple(i for i in range(a.ndim) if i not in in_axes)
    perm = tuple(sorted(in_axes)) + out_axes
    d_in = math.prod(a.shape[i] for i in in_axes)
    return jnp.transpose(a, perm).reshape(d_in, -1)


def _transposed_codebook(cb: Codebook, in_axes, per_channel: bool) -> Codebook:
    return Codebook.from_indices(_to_2d(cb.index_array(), in_axes), cb.centroids, bits=cb.bits,
                                 per_channel=per_channel, zero_reserved=cb.zero_reserved)


# ------------------------------------------------------------------------------------------------ layouts (item 1)


def test_out_in_kernel_equals_the_transposed_run():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((16, 16)).astype(np.float32))  # square: the shape check cannot tell
    h = _hessian(16)
    q = cj.kmeans_codebooks({"w": w}, 3)["w"]
    ref_fed = codebook_error_feedback({"w": q}, {"w": w}, {"w": cj.Hessian(h, jnp.float32(64), (0,))})["w"]
    # The same problem written as x @ w.T: the kernel transposed, the input axis now axis 1.
    qt = Codebook.from_indices(q.index_array().T, q.centroids, bits=3)
    fed = codebook_error_feedback({"w": qt}, {"w": w.T}, {"w": cj.Hessian(h, jnp.float32(64), (1,))})["w"]
    np.testing.assert_array_equal(np.asarray(fed.decode()), np.asarray(ref_fed.decode()).T)
    ref_fit = refit_centroids({"w": ref_fed}, {"w": w}, {"w": cj.Hessian(h, jnp.float32(64), (0,))})["w"]
    fit = refit_centroids({"w": fed}, {"w": w.T}, {"w": cj.Hessian(h, jnp.float32(64), (1,))})["w"]
    np.testing.assert_allclose(np.asarray(fit.centroids), np.asarray(ref_fit.centroids), rtol=1e-5, atol=1e-6)
    # The output error x @ w.T: feedback beats plain nearest-centroid, refitting lowers it further.
    x = jnp.asarray(rng.standard_normal((64, 16)).astype(np.float32))
    hx = x.T @ x
    err = lambda cb: float(jnp.sum((x @ w.T - x @ cb.decode().T) ** 2))  # noqa: E731
    fed_x = codebook_error_feedback({"w": qt}, {"w": w.T}, {"w": cj.Hessian(hx, jnp.float32(64), (1,))})["w"]
    fit_x = refit_centroids({"w": fed_x}, {"w": w.T}, {"w": cj.Hessian(hx, jnp.float32(64), (1,))})["w"]
    assert err(fed_x) < err(qt) and err(fit_x) <= err(fed_x) * (1 + 1e-5)


@pytest.mark.slow
def test_per_channel_codebooks_along_the_contracted_axis():
    """(out, in) with per-channel codebooks on the last axis: each input row has its own codebook; the
    sweep must use codebook j for row j (checked against error_feedback driven by hand)."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((12, 8)).astype(np.float32))  # (out, in)
    h = _hessian(8, seed=2)
    q = cj.kmeans_codebooks({"w": w}, 2, per_channel=True)["w"]
    fed = codebook_error_feedback({"w": q}, {"w": w}, {"w": cj.Hessian(h, jnp.float32(1), (1,))})["w"]
    c = jnp.asarray(q.centroids)

    def nearest(row, j):
        cj_ = c[j]
        return cj_[jnp.argmin(jnp.abs(row[:, None] - cj_[None, :]), axis=1)]

    want = cj.error_feedback(w.T, h, nearest)
    np.testing.assert_array_equal(np.asarray(fed.decode()), np.asarray(want).T)
    fit = refit_centroids({"w": fed}, {"w": w}, {"w": cj.Hessian(h, jnp.float32(1), (1,))})["w"]
    err = lambda cb: float(jnp.sum((cb.decode() - w) @ h * (cb.decode() - w)))  # noqa: E731
    assert err(fit) <= err(fed) * (1 + 1e-5)


@pytest.mark.slow
def test_conv_kernel_equals_the_flattened_run():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 6)).astype(np.float32))  # HWIO
    h = _hessian(36, seed=4)
    masks = cj.magnitude_masks({"w": w}, 0.3)
    q = cj.kmeans_codebooks({"w": w}, 2, per_channel=True, masks=masks)["w"]
    hess = cj.Hessian(h, jnp.float32(10), (0, 1, 2))
    fed = codebook_error_feedback({"w": q}, {"w": w}, {"w": hess})["w"]
    q2 = _transposed_codebook(q, (0, 1, 2), True)
    fed2 = codebook_error_feedback({"w": q2}, {"w": w.reshape(36, 6)}, {"w": h})["w"]
    np.testing.assert_array_equal(np.asarray(fed.decode()).reshape(36, 6), np.asarray(fed2.decode()))
    fit = refit_centroids({"w": fed}, {"w": w}, {"w": hess})["w"]
    fit2 = refit_centroids({"w": fed2}, {"w": w.reshape(36, 6)}, {"w": h})["w"]
    np.testing.assert_allclose(np.asarray(fit.centroids), np.asarray(fit2.centroids), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(fit.centroids)[:, 0] == 0)  # the reserved zero stays


@st.composite
def _layouts(draw):
    nd = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(2, 4), min_size=nd, max_size=nd)))
    perm = draw(st.permutations(range(nd)))
    n_in = draw(st.integers(1, nd - 1))
    in_axes = tuple(sorted(perm[:n_in]))
    out_axes = tuple(a for a in range(nd) if a not in in_axes)
    # The 2-D problem has per-channel codebooks on its columns only when the kernel's one output axis is last.
    per_channel = out_axes == (nd - 1,) and draw(st.booleans())
    return shape, in_axes, per_channel, draw(st.booleans()), draw(st.integers(0, 2**16))


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_layouts())
def test_property_any_layout_equals_the_transposed_problem(case):
    shape, in_axes, per_channel, pruned, seed = case
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    d_in = math.prod(shape[a] for a in in_axes)
    h = _hessian(d_in, seed=seed + 1)
    masks = cj.magnitude_masks({"w": w}, 0.25) if pruned else None
    # layer_axes=(): every axis here is an input or output axis of one kernel (none stacks layers)
    q = cj.kmeans_codebooks({"w": w}, 1 if per_channel else 2, per_channel=per_channel, masks=masks,
                            layer_axes=())["w"]
    hess = cj.Hessian(h, jnp.float32(4 * d_in), in_axes)
    fed = codebook_error_feedback({"w": q}, {"w": w}, {"w": hess})["w"]
    q2 = _transposed_codebook(q, in_axes, per_channel)
    w2 = _to_2d(w, in_axes)
    fed2 = codebook_error_feedback({"w": q2}, {"w": w2}, {"w": h})["w"]
    np.testing.assert_array_equal(np.asarray(_to_2d(fed.decode(), in_axes)), np.asarray(fed2.decode()))
    fit = refit_centroids({"w": fed}, {"w": w}, {"w": hess})["w"]
    fit2 = refit_centroids({"w": fed2}, {"w": w2}, {"w": h})["w"]
    np.testing.assert_allclose(np.asarray(fit.centroids), np.asarray(fit2.centroids), rtol=2e-4, atol=2e-5)


# ------------------------------------------------------------------------------------------------ empty Hessian (item 2)


@pytest.mark.parametrize("fn", [codebook_error_feedback, refit_centroids])
def test_a_hessian_of_zero_rows_is_an_error_naming_the_leaf(fn):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    q = cj.kmeans_codebooks({"layer": {"kernel": w}}, 2)
    hess = {"layer": {"kernel": cj.Hessian(jnp.zeros((8, 8)), jnp.float32(0), (0,))}}
    with pytest.raises(ValueError, match=r"'layer/kernel'.*count=0"):
        fn(q, {"layer": {"kernel": w}}, hess)


def test_bad_in_axes_and_ridge_are_errors():
    w = jnp.ones((8, 4)) * jnp.arange(32.0).reshape(8, 4)
    q = cj.kmeans_codebooks({"w": w}, 2)
    with pytest.raises(ValueError, match=r"'w'.*expected \(4, 4\) for the input axes \(1,\)"):
        codebook_error_feedback(q, {"w": w}, {"w": cj.Hessian(jnp.eye(8), jnp.float32(1), (1,))})
    with pytest.raises(ValueError, match="'w': Hessian input axes"):
        refit_centroids(q, {"w": w}, {"w": cj.Hessian(jnp.eye(8), jnp.float32(1), (2,))})
    for bad in (float("nan"), float("inf"), -1.0, -1e-9, 10**400):
        with pytest.raises(ValueError, match=f"ridge must be a finite number >= 0, got {bad!r}"[:40]):
            refit_centroids(q, {"w": w}, {"w": jnp.eye(8)}, ridge=bad)
    with pytest.raises(TypeError, match="ridge must be a real number"):
        refit_centroids(q, {"w": w}, {"w": jnp.eye(8)}, ridge="0.1")
    out = refit_centroids(q, {"w": w}, {"w": jnp.eye(8)}, ridge=0)
    assert np.all(np.isfinite(np.asarray(out["w"].centroids)))


# ------------------------------------------------------------------------------------------------ k-means (items 3, 8, 10, 11)


def test_centroids_stay_finite_near_the_float32_limit():
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((32, 8)).astype(np.float32))
    ref = cj.kmeans_codebooks({"w": w}, 3)["w"]
    big = cj.kmeans_codebooks({"w": w * 1e37}, 3)["w"]  # prefix sums of 256 values near 1e38 overflowed
    np.testing.assert_array_equal(np.asarray(big.index_array()), np.asarray(ref.index_array()))
    np.testing.assert_allclose(np.asarray(big.centroids) / 1e37, np.asarray(ref.centroids), rtol=1e-5, atol=1e-6)
    imp = jnp.abs(w) + 0.1
    ref_w = cj.kmeans_codebooks({"w": w}, 3, weights={"w": imp})["w"]
    big_w = cj.kmeans_codebooks({"w": w}, 3, weights={"w": imp * 1e37})["w"]  # importance prefix sums overflowed
    np.testing.assert_allclose(np.asarray(big_w.centroids), np.asarray(ref_w.centroids), rtol=1e-4, atol=1e-6)
    top = cj.kmeans_codebooks({"w": w / jnp.max(jnp.abs(w)) * 3e38}, 3, per_channel=True, entropy_weight=0.05)["w"]
    assert np.all(np.isfinite(np.asarray(top.centroids))) and np.all(np.isfinite(np.asarray(top.decode())))


def test_powers_of_two_scale_exactly():
    w = jnp.asarray(np.random.default_rng(6).standard_normal((16, 4)).astype(np.float32))
    a = cj.kmeans_codebooks({"w": w}, 2, per_channel=True)["w"]
    b = cj.kmeans_codebooks({"w": w * 2.0**40}, 2, per_channel=True)["w"]
    np.testing.assert_array_equal(np.asarray(b.centroids), np.asarray(a.centroids) * 2.0**40)


def test_kmeans_argument_errors_name_the_argument():
    w = jnp.asarray(np.random.default_rng(7).standard_normal((8, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="iterations must be a positive int, got 1099511627776"):
        cj.kmeans_codebooks({"w": w}, 2, iterations=2**40)
    with pytest.raises(TypeError, match="iterations must be a positive int, got 2.5"):
        cj.kmeans_codebooks({"w": w}, 2, iterations=2.5)
    with pytest.raises(ValueError, match="entropy_weight must be finite and >= 0, got 1000000000"):
        cj.kmeans_codebooks({"w": w}, 2, entropy_weight=10**400)
    with pytest.raises(ValueError, match="'w': the weights hold 4 values, fewer than the 8 centroids"):
        cj.kmeans_codebooks({"w": jnp.arange(4.0).reshape(2, 2)}, 3, init="random")
    with pytest.raises(ValueError, match="'w': each channel of the weights hold 2 values, fewer than the 4"):
        cj.kmeans_codebooks({"w": jnp.arange(8.0).reshape(2, 4)}, 2, init="random", per_channel=True)
    # Enough values but fewer distinct ones: the distinct-value check names the leaf for every init.
    with pytest.raises(ValueError, match="'w': the weights have 2 distinct values, fewer than the 4 centroids"):
        cj.kmeans_codebooks({"w": jnp.tile(jnp.array([1.0, 2.0]), 8).reshape(4, 4)}, 2, init="random")


def test_zero_size_leaves_pass_through():
    for shape in ((8, 0), (0, 4), (0,)):
        for per_channel in (False, True) if len(shape) == 2 else (False,):
            cb = cj.kmeans_codebooks({"w": jnp.zeros(shape)}, 2, per_channel=per_channel, where="w")["w"]
            assert cb.shape == shape and cb.decode().shape == shape and cb.indices.shape == (0,)
            assert cb.centroids.shape == ((shape[-1], 4) if per_channel else (4,))
            h = jnp.eye(shape[0]) if shape[0] else jnp.zeros((0, 0))
            if len(shape) == 2:
                out = codebook_error_feedback({"w": cb}, {"w": jnp.zeros(shape)}, {"w": h})
                assert out["w"] is cb
                assert refit_centroids({"w": cb}, {"w": jnp.zeros(shape)}, {"w": h})["w"] is cb


def test_chunked_entropy_boundaries_equal_the_whole_table():
    from compressjax.codebook._kmeans import _rate_boundaries, _rate_boundaries_chunked

    rng = np.random.default_rng(8)
    c = jnp.sort(jnp.asarray(rng.standard_normal((13, 16)).astype(np.float32)), axis=1)
    lam = jnp.asarray(rng.uniform(0, 0.5, 13).astype(np.float32))
    code_len = jnp.asarray(rng.uniform(1, 6, (13, 16)).astype(np.float32)).at[:, 3].set(jnp.inf)
    whole = _rate_boundaries(c, lam, code_len)
    for chunk in (1, 4, 13):
        np.testing.assert_array_equal(np.asarray(_rate_boundaries_chunked(c, lam, code_len, chunk)), np.asarray(whole))

