"""GPTQ-style error feedback onto codebooks and least-squares centroid refits (Gram-matrix metric)."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import tree
from compressjax.checks import check_positive_int
from compressjax.codebook._codebook import Codebook
from compressjax.codebook._train import _nearest
from compressjax.oneshot._common import KernelLayout
from compressjax.oneshot._sweep import (
    check_damp,
    inverse_hessian_factor,
    padded_block,
    run_sweep,
    sub_block_size,
)

# ------------------------------------------------------------------------------------------------ error feedback


@functools.partial(jax.jit, static_argnames=("block_size", "zero_reserved"))
def _codebook_sweep(w, h, table, chan, keep, damp, *, block_size: int, zero_reserved: bool):
    """GPTQ's sweep (:func:`compressjax.oneshot._sweep.run_sweep`, the sweep of ``error_feedback``) over the
    ``(d_in, d_out)`` kernel ``w``: row ``j`` goes to the nearest centroid of each entry's codebook
    (``table[chan[j, o]]``, ``table`` of shape ``(codebooks, k)``), pruned entries (``keep`` False) to exactly
    zero. The table, codebook map and mask are arguments, not constants, so one compilation serves every
    kernel (and layer slice) of a shape."""
    d_in, _ = w.shape
    block, n_pad = padded_block(d_in, block_size)
    u, dead = inverse_hessian_factor(h, damp, n_pad)
    w = jnp.pad(jnp.where(dead[:, None], 0.0, w), ((0, n_pad - d_in), (0, 0)))
    cand_table = table[:, 1:] if zero_reserved else table

    def step(row, j, i, view, st):
        del i, view
        jj = jnp.minimum(j, d_in - 1)
        cand = jnp.take(cand_table, jax.lax.dynamic_index_in_dim(chan, jj, keepdims=False), axis=0)
        a = jnp.argmin(jnp.abs(row[:, None] - cand), axis=1)
        q = jnp.take_along_axis(cand, a[:, None], axis=1)[:, 0]
        q = jnp.where(jax.lax.dynamic_index_in_dim(keep, jj, keepdims=False), q, 0.0)
        q = jnp.where(j < d_in, q, row)  # padding rows stay as they are (they are decoupled anyway)
        return q, q, st

    out, _ = run_sweep(w, u, step, None, block, jnp.float32, sub=sub_block_size(block))
    return out[:d_in]


def _hessian_of(p: str, hess: Any, shape: tuple[int, ...]) -> tuple[jax.Array, KernelLayout]:
    """``(H float32 (batch, d_in, d_in), layout)`` of a :class:`~compressjax.Hessian` (stacked or not) or a
    plain ``(d_in, d_in)`` matrix pairing with the kernel's leading axes, checked."""
    layer_axes, groups = (), 1
    if hasattr(hess, "in_axes"):
        layer_axes = tuple(int(a) for a in (getattr(hess, "layer_axes", ()) or ()))
        groups = getattr(hess, "groups", 1)
        count = getattr(hess, "count", None)
        if count is not None and not isinstance(count, jax.core.Tracer):
            c = np.asarray(count)
            if c.size and np.any(c <= 0):
                raise ValueError(f"leaf {p!r}: its Hessian was summed over count={c.min()} input rows: no calibration "
                                 "row reached this kernel (an all-False row_mask or empty batches); collect it again")
        h, in_axes = hess.h, tuple(int(a) for a in hess.in_axes)
    elif hasattr(hess, "shape") and len(hess.shape) == 2:
        h = hess
        d = int(hess.shape[0])
        prods = np.cumprod([1, *shape])
        hits = [k for k in range(1, len(shape)) if prods[k] == d]
        in_axes = tuple(range(hits[0] if hits else 1))  # no match: the shape check below names both
    else:
        raise TypeError(f"leaf {p!r}: expected a Hessian (from collect_hessians) or a (d_in, d_in) array, "
                        f"got {type(hess).__name__}")
    lay = KernelLayout(shape, in_axes, p, layer_axes, groups)
    if not hasattr(h, "dtype") or not jnp.issubdtype(h.dtype, jnp.floating):
        raise TypeError(f"leaf {p!r}: the Hessian must be a float array, got {getattr(h, 'dtype', type(h).__name__)}")
    if tuple(h.shape) != lay.h_shape:
        raise ValueError(f"leaf {p!r}: Hessian has shape {tuple(h.shape)}, expected {lay.h_shape} for the "
                         f"input axes {lay.in_axes}{f' and layer axes {lay.layer_axes}' if lay.layer_axes else ''} "
                         f"of a kernel of shape {shape}")
    return jnp.asarray(h, jnp.float32).reshape(lay.batch, lay.d_in, lay.d_in), lay


def _check_books(p: str, x: Codebook, lay: KernelLayout) -> None:
    """A stacked codebook's layers must be the Hessian's layers (an unstacked one may serve every slice)."""
    if x.layer_axes and x.layer_axes != lay.layer_axes:
        raise ValueError(f"leaf {p!r}: the Codebook has layer axes {x.layer_axes} but its Hessian has layer axes "
                         f"{lay.layer_axes}; fit the codebooks with kmeans_codebooks(..., layer_axes={lay.layer_axes})")


def _slice_books(x: Codebook, lay: KernelLayout) -> np.ndarray:
    """``(batch, d_in, d_out_g)`` int32: each entry's codebook (row of ``centroids.reshape(-1, 2^bits)``)."""
    ids = x.book_ids()
    ids = jnp.zeros(x.shape, jnp.int32) if ids is None else ids
    return np.asarray(lay.to_3d(ids))


def _map_codebook_kernels(fn, params: Any, reference: Any, hessians: Any, what: str) -> Any:
    """Calls ``fn(path, codebook, H, w, layout)`` on each :class:`Codebook` leaf of ``params`` that has a
    Hessian in ``hessians`` (a :class:`~compressjax.Hessian`, whose ``in_axes`` say which kernel axes are
    contracted and whose ``layer_axes`` / ``groups`` which index independent slices, or a plain
    ``(d_in, d_in)`` matrix pairing with the leading axes), with its float reference kernel ``w`` from
    ``reference`` (checked: same shape, finite) as float32 and ``H`` as float32 ``(batch, d_in, d_in)``; other
    leaves pass through, and so do zero-size codebooks (nothing to assign)."""
    refs = dict(tree.leaves_with_paths(reference, lambda x: x is None or tree.is_compressed_leaf(x)))
    hs = dict(tree.leaves_with_paths(hessians, lambda x: x is None or hasattr(x, "in_axes")))

    def visit(kp, x):
        if not isinstance(x, Codebook):
            return x
        p = tree.path_to_str(kp)
        hess = hs.get(p)
        if hess is None:
            return x
        r = refs.get(p)
        if r is None or tuple(getattr(r, "shape", ())) != x.shape or x.ndim < 2:
            raise ValueError(f"leaf {p!r}: reference weights of shape {x.shape} needed ({what} takes kernels with at "
                             f"least 2 axes), got {None if r is None else getattr(r, 'shape', type(r).__name__)}")
        h, lay = _hessian_of(p, hess, x.shape)
        _check_books(p, x, lay)
        tree.check_finite(p, r)
        tree.check_finite(p, h)
        if x.size == 0:
            return x
        return fn(p, x, h, jnp.asarray(r, jnp.float32), lay)

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=tree.is_compressed_leaf)


def codebook_error_feedback(params: Any, reference: Any, hessians: Any, *, block_size: int = 128, damp: float = 0.01) -> Any:
    """Re-assigns the indices of :class:`Codebook` kernels with GPTQ's error feedback.

    For each Codebook leaf of ``params`` whose path has a Hessian in ``hessians`` (as returned by
    :func:`compressjax.collect_hessians`, or a plain ``(d_in, d_in)`` matrix pairing with the kernel's leading
    axes), the float kernel in ``reference`` is seen as the ``(d_in, d_out)`` matrix of the Hessian's
    ``in_axes`` (``(in, out)``, ``(out, in)`` as in ``x @ w.T``, convolution kernels ``(h, w, in, out)``;
    exactly as :func:`compressjax.gptq` reads it) and swept one input row at a time
    (:func:`compressjax.error_feedback`): each row is replaced by the nearest centroid of each entry's
    codebook, and its error, weighted by the inverse Hessian, is pushed onto the rows not yet assigned.
    The result equals the same sweep on the transposed (2-D) problem. A stacked Hessian (``layer_axes``, or
    ``groups`` of a grouped convolution) sweeps each slice on its own ``H``, against the slice's own codebooks
    when the Codebook is stacked too (``kmeans_codebooks(..., layer_axes=...)``), one compilation per slice
    shape. The centroids are kept; pruned
    weights of a ``zero_reserved`` codebook stay on the exact zero. This is what lifts 3-bit per-channel
    codebooks on MiniLM from 0.89-0.90 to about 0.97 mean cosine (BENCHMARKS.md).

    Args:
        params: a tree with Codebook leaves (from :func:`kmeans_codebooks`).
        reference: the float params the codebooks were fitted to (same structure as ``params``).
        hessians: a tree like ``params`` with a Hessian (or ``None``) per leaf; Codebook leaves without one,
            and zero-size ones, are left as they are.
        block_size, damp: as for :func:`compressjax.error_feedback`.

    Raises:
        ValueError: a Hessian whose shape or ``in_axes`` do not fit the kernel, one summed over
            ``count == 0`` rows, a stacked codebook whose ``layer_axes`` are not the Hessian's, NaN/Inf in
            the Hessian or the reference, a reference leaf of the wrong shape, a negative ``damp``; each names the leaf.
        TypeError: a Hessian that is not a float array, a bad ``damp`` / ``block_size`` type.

    References:
        Frantar et al., "GPTQ", ICLR 2023 (the column sweep); Han et al., "Deep Compression", ICLR 2016.
    """
    block_size = check_positive_int("block_size", block_size)
    damp = check_damp(damp)

    def assign(p, x, h, r, lay):
        table = jnp.asarray(x.centroids, jnp.float32).reshape(-1, x.num_centroids)
        keep = x.index_array() != 0 if x.zero_reserved else jnp.ones(x.shape, bool)
        w3, keep3, books = lay.to_3d(jnp.where(keep, r, 0.0)), lay.to_3d(keep), _slice_books(x, lay)
        # One slice at a time (one compilation per slice shape): a stacked kernel's layers (and a grouped
        # convolution's groups) each sweep on their own Hessian.
        wq = jnp.stack([_codebook_sweep(w3[b], h[b], table, jnp.asarray(books[b]), keep3[b], damp,
                                        block_size=block_size, zero_reserved=x.zero_reserved)
                        for b in range(lay.batch)])
        if not bool(jnp.all(jnp.isfinite(wq))):
            bad = int(np.flatnonzero(~np.all(np.isfinite(np.asarray(wq)), axis=(1, 2)))[0])
            where_ = f" ({lay.slice_name(bad)})" if lay.stacked else ""
            raise ValueError(f"leaf {p!r}{where_}: error feedback produced NaN/Inf: the Hessian is not positive "
                             f"definite even after damping (damp={damp}); raise damp")
        return x.with_indices(_nearest(lay.from_3d(wq), x.centroids, keep, per_channel=x.per_channel,
                                       zero_reserved=x.zero_reserved, shape=x.shape, layer_axes=x.layer_axes))

    return _map_codebook_kernels(assign, params, reference, hessians, "error feedback")


# Bytes of one-hot work per chunk of output columns in the refit (the k x k systems themselves are extra).
_REFIT_CHUNK_BYTES = 64 << 20
# The most centroids solved as one coupled system (per-channel codebooks along a contracted axis).
MAX_COUPLED_CENTROIDS = 4096


@functools.partial(jax.jit, static_argnames=("kk", "systems", "chunk"))
def _normal_equations(w, h, g, sys_id, *, kk, systems, chunk):
    """``(gram, rhs)``: ``sum_o A_o^T H A_o`` and ``sum_o A_o^T H w_o`` per system (``(systems, kk, kk)``,
    ``(systems, kk)``), where column ``o`` of the 2-D kernel ``w`` has one-hot rows ``A_o = onehot(g[:, o])``
    (``-1``: the entry is no free parameter) and belongs to system ``sys_id[o]``. Columns are processed
    ``chunk`` at a time so the one-hot work stays ``O(chunk * d_in * kk)``."""
    d_in, d_out = w.shape
    n = -(-d_out // chunk)
    pad = n * chunk - d_out
    gc = jnp.pad(g, ((0, 0), (0, pad)), constant_values=-1).T.reshape(n, chunk, d_in)
    wc = jnp.pad(w, ((0, 0), (0, pad))).T.reshape(n, chunk, d_in)
    sc = jnp.pad(sys_id, (0, pad)).reshape(n, chunk)
    hp = jax.lax.Precision.HIGHEST

    def body(carry, xs):
        gram, rhs = carry
        gi, wi, si = xs
        a = jax.nn.one_hot(gi, kk, dtype=jnp.float32)  # (chunk, d_in, kk); -1 gives a zero row
        ha = jnp.einsum("ij,cjk->cik", h, a, precision=hp)
        return (gram.at[si].add(jnp.einsum("cik,cil->ckl", a, ha, precision=hp)),
                rhs.at[si].add(jnp.einsum("cik,ci->ck", ha, wi, precision=hp))), None

    init = (jnp.zeros((systems, kk, kk), jnp.float32), jnp.zeros((systems, kk), jnp.float32))
    (gram, rhs), _ = jax.lax.scan(body, init, (gc, wc, sc))
    return gram, rhs


@jax.jit
def _ridge_solve(gram, rhs, c_old, h_scale, ridge):
    """Solves each system ``(gram + lam I) c = rhs + lam c_old``, ``lam = ridge * h_scale * max(1, mean diag
    gram)`` (``h_scale``: the mean Hessian diagonal of the system's slices)."""
    k = gram.shape[-1]
    lam = ridge * h_scale * jnp.maximum(1.0, jnp.mean(jnp.diagonal(gram, axis1=1, axis2=2), axis=1))
    lam = jnp.maximum(lam, 1e-30)[:, None, None]
    eye = jnp.eye(k, dtype=jnp.float32)[None]
    return jnp.linalg.solve(gram + lam * eye, (rhs + lam[:, :, 0] * c_old)[..., None])[..., 0]


def _check_ridge(ridge: Any) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float, np.integer, np.floating)):
        raise TypeError(f"ridge must be a real number >= 0, got {ridge!r}")
    try:
        value = float(ridge)
    except OverflowError:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}") from None
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    return value


def _chunk(d_in: int, d_out: int, kk: int) -> int:
    return max(1, min(d_out, _REFIT_CHUNK_BYTES // (4 * d_in * kk)))


def _column_systems(books, g3, w3, h, c_old, h_diag, n_books) -> list:
    """The refit's systems when each output column of every slice uses one codebook: one ``2^bits``-square
    system per codebook, summed over the slices that use it (``[(codebook ids, gram, rhs, c_old, h_scale)]``)."""
    k = c_old.shape[1]
    gram, rhs = jnp.zeros((n_books, k, k), jnp.float32), jnp.zeros((n_books, k), jnp.float32)
    h_sum, h_n = np.zeros(n_books), np.zeros(n_books)
    for b in range(books.shape[0]):
        sys_id = books[b][0]
        gb, rb = _normal_equations(w3[b], h[b], g3[b], jnp.asarray(sys_id), kk=k, systems=n_books,
                                   chunk=_chunk(*w3[b].shape, k))
        gram, rhs = gram + gb, rhs + rb
        used = np.unique(sys_id)
        h_sum[used] += h_diag[b]
        h_n[used] += 1
    h_scale = jnp.asarray(np.where(h_n > 0, h_sum / np.maximum(h_n, 1), 1.0), jnp.float32)
    return [(np.arange(n_books), gram, rhs, c_old, h_scale)]


def _coupled_systems(p, x, books, g3, w3, h, c_old, h_diag) -> list:
    """The refit's systems when codebooks change down a column (per-channel codebooks along a contracted axis):
    every codebook a slice uses is coupled through its ``H`` into one system of ``codebooks x 2^bits`` unknowns
    (at most :data:`MAX_COUPLED_CENTROIDS`); slices using the same codebooks (the layers of a shared codebook)
    add up into one system."""
    k = c_old.shape[1]
    acc: dict[tuple, list] = {}
    owner: dict[int, tuple] = {}
    for b in range(books.shape[0]):
        ub = np.unique(books[b])
        key = tuple(int(i) for i in ub)
        kk = len(ub) * k
        if kk > MAX_COUPLED_CENTROIDS:
            raise ValueError(f"leaf {p!r}: per-channel codebooks along a contracted axis couple all "
                             f"{len(ub)} x {k} = {kk} centroids (more than {MAX_COUPLED_CENTROIDS}); use one "
                             "codebook per leaf (per_channel=False) or a kernel whose last axis is an output axis")
        if any(owner.get(i, key) != key for i in key):
            raise ValueError(f"leaf {p!r}: its slices share some codebooks but not all; the refit cannot split them "
                             f"({x!r})")
        owner.update(dict.fromkeys(key, key))
        local = np.searchsorted(ub, books[b])
        gl = jnp.where(g3[b] < 0, -1, jnp.asarray(local, jnp.int32) * k + g3[b])
        gb, rb = _normal_equations(w3[b], h[b], gl, jnp.zeros(w3[b].shape[1], jnp.int32), kk=kk, systems=1,
                                   chunk=_chunk(*w3[b].shape, kk))
        if key in acc:
            acc[key][0] += gb
            acc[key][1] += rb
            acc[key][2].append(h_diag[b])
        else:
            acc[key] = [gb, rb, [h_diag[b]]]
    return [(np.asarray(key), gram, rhs, c_old[np.asarray(key)].reshape(1, -1), jnp.float32([np.mean(hs)]))
            for key, (gram, rhs, hs) in acc.items()]


def refit_centroids(params: Any, reference: Any, hessians: Any, *, ridge: float = 1e-4) -> Any:
    """Least-squares centroids for fixed indices under each kernel's input Gram matrix.

    For every :class:`Codebook` kernel with a Hessian ``H`` (``(d_in, d_in)``, e.g. from
    :func:`compressjax.collect_hessians`; the kernel is read as the ``(d_in, d_out)`` matrix of the
    Hessian's ``in_axes``, as :func:`codebook_error_feedback` does), the centroids become the minimiser of
    the layer's output error ``sum_o (w_o - A_o c)^T H (w_o - A_o c)`` over the reference weights ``w``
    (``A_o`` the one-hot indices of output column ``o``; per channel or shared, as the codebook is), with a
    small ridge ``ridge * mean(diag H)`` towards the current centroids that keeps empty clusters in place.
    Per-channel codebooks along an output axis give one ``2^bits``-square system per channel; along a
    contracted axis (an ``(out, in)`` kernel) every channel's centroids are coupled through ``H`` and solved
    as one system of ``channels * 2^bits`` unknowns (at most :data:`MAX_COUPLED_CENTROIDS`). A stacked
    Hessian (``layer_axes``, from a kernel run under ``lax.scan``) pairs each layer slice with its own ``H``:
    a stacked codebook (``kmeans_codebooks(..., layer_axes=...)``) is refit per layer, a codebook shared by
    the layers sums their systems. The indices do not change; a reserved zero stays zero. Use after :func:`codebook_error_feedback`, whose assignments
    were made against the k-means centroids: refitting them can only lower the output error.

    Raises:
        ValueError: a reference leaf or Hessian of the wrong shape, a Hessian summed over ``count == 0``
            rows, a stacked codebook whose layer axes are not the Hessian's, ``ridge`` negative, NaN or
            infinite, a coupled system over
            :data:`MAX_COUPLED_CENTROIDS` unknowns; each names the leaf (or ``ridge``) and the value.
        TypeError: ``ridge`` not a real number, a Hessian that is not a float array.
    """
    ridge = _check_ridge(ridge)

    def refit(p, x, h, r, lay):
        k, n_books = x.num_centroids, x.num_codebooks
        books = _slice_books(x, lay)
        idx3 = lay.to_3d(x.index_array())
        g3 = jnp.where(idx3 == 0, -1, idx3) if x.zero_reserved else idx3  # the reserved zero is not a free parameter
        w3 = lay.to_3d(r)
        c_old = jnp.asarray(x.centroids, jnp.float32).reshape(n_books, k)
        h_diag = np.asarray(jnp.mean(jnp.diagonal(h, axis1=1, axis2=2), axis=1))
        coupled = any(not np.all(books[b] == books[b][:1]) for b in range(lay.batch))
        systems = _coupled_systems(p, x, books, g3, w3, h, c_old, h_diag) if coupled else \
            _column_systems(books, g3, w3, h, c_old, h_diag, n_books)
        c = c_old
        for ids, gram, rhs, c_sys, h_scale in systems:
            new = _ridge_solve(gram, rhs, c_sys, h_scale, jnp.float32(ridge))
            c = c.at[jnp.asarray(ids)].set(new.reshape(len(ids), k))
        c = c.reshape(x.centroids.shape)
        if x.zero_reserved:
            c = c.at[..., 0].set(0.0)
        if not bool(jnp.all(jnp.isfinite(c))):
            raise ValueError(f"leaf {p!r}: the refit centroids are not finite (the Hessian's scale overflows float32 "
                             f"in the normal equations); rescale the Hessian or raise ridge (ridge={ridge})")
        return x.with_centroids(c.astype(x.centroids.dtype))

    return _map_codebook_kernels(refit, params, reference, hessians, "refitting")
