"""``kmeans_codebooks``: exact one-dimensional Lloyd iterations under ``jax.jit``."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import tree
from compressjax.codebook._codebook import (
    DEFAULT_ITERATIONS,
    INITS,
    Codebook,
    _check_bits,
    _pack_jit,
    centroid_shape,
    check_layer_axes,
)
from compressjax.quantization import LayerAxesWarning

# ------------------------------------------------------------------------------------------------ k-means

# The most Lloyd updates (the loop counter is an int32 inside jit).
MAX_ITERATIONS = 2**31 - 1


def _init_centroids(xs, pw, n_valid, valid, x_rows, key, k: int, init: str):
    """Initial sorted centroids ``(rows, k)`` from the sorted values ``xs`` and weight prefix sums ``pw``."""
    rows, n = xs.shape
    if init == "density":
        # Quantiles of the (weighted) distribution: centroid j at cumulative weight (j + 1/2) / k.
        total = pw[:, -1:]
        targets = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k * total
        pos = jax.vmap(lambda p, t: jnp.searchsorted(p, t, side="left"))(pw[:, 1:], targets)
        # Rows with zero total weight fall back to unweighted ranks among the valid values.
        rank = jnp.floor((jnp.arange(k, dtype=jnp.float32) + 0.5) / k * n_valid[:, None].astype(jnp.float32))
        pos = jnp.where(total > 0, pos, rank.astype(pos.dtype))
        pos = jnp.clip(pos, 0, jnp.maximum(n_valid[:, None] - 1, 0))
        return jnp.take_along_axis(xs, pos, axis=1)
    if init == "linear":
        lo = xs[:, 0]
        hi = jnp.take_along_axis(xs, jnp.maximum(n_valid - 1, 0)[:, None], axis=1)[:, 0]
        if k == 1:
            return ((lo + hi) / 2)[:, None]
        t = jnp.arange(k, dtype=jnp.float32) / (k - 1)
        return lo[:, None] + (hi - lo)[:, None] * t[None, :]
    # "random" (Forgy): k distinct weights drawn uniformly among the valid ones.
    u = jax.random.uniform(key, (rows, n))
    u = jnp.where(valid, u, 2.0)
    if n < k:  # only all-pruned rows can get here (the caller rejects the others): pad with zeros
        u = jnp.pad(u, ((0, 0), (0, k - n)), constant_values=3.0)
        x_rows = jnp.pad(x_rows, ((0, 0), (0, k - n)))
    _, idx = jax.lax.top_k(-u, k)
    return jnp.sort(jnp.take_along_axis(x_rows, idx, axis=1), axis=1)


def _rate_boundaries(c: jax.Array, lam: jax.Array, code_len: jax.Array) -> jax.Array:
    """Upper decision boundaries ``(rows, k - 1)`` of entropy-constrained assignment to sorted centroids ``c``.

    Value ``x`` goes to ``argmin_j (x - c_j)^2 + lam * code_len_j`` (ties to the lower index). Each cost is a
    line in ``x`` plus ``x^2``, with slopes ``-2 c_j`` sorted, so the assignment is monotone in ``x`` and
    ``x`` goes to a centroid ``<= j`` iff ``x <= B_j = max_{i <= j} min_{i' > j} x_{i i'}``, where
    ``x_{i i'}`` is where centroid ``i`` stops beating ``i'``. O(k^2) per row, exact; ``lam = 0`` gives the
    midpoints. An empty centroid (``code_len = inf``) never wins.
    """
    ci, cj = c[:, :, None], c[:, None, :]
    li, lj = code_len[:, :, None], code_len[:, None, :]
    gap = cj - ci
    safe = jnp.where(gap > 0, gap, 1.0)
    dl = jnp.where(jnp.isfinite(li) & jnp.isfinite(lj), lj - li, 0.0)
    cross = jnp.where(gap > 0, (ci + cj) * 0.5 + lam[:, None, None] * dl / (2.0 * safe),
                      jnp.where(li <= lj, jnp.inf, -jnp.inf))
    cross = jnp.where(jnp.isinf(lj), jnp.inf, cross)  # nothing loses to an empty centroid
    cross = jnp.where(jnp.isinf(li) & ~jnp.isinf(lj), -jnp.inf, cross)  # an empty one loses to everything
    k = c.shape[1]
    later = jnp.arange(k)[None, :] > jnp.arange(k)[:, None]  # [i, i'] : i' > i
    # suffix[i, j] = min over i' > j of cross[i, i'], for j in 0..k-2.
    masked = jnp.where(later[None], cross, jnp.inf)
    suffix = jax.lax.cummin(masked[:, :, ::-1], axis=2)[:, :, ::-1][:, :, 1:]  # min over i' >= j + 1
    upto = jnp.arange(k)[:, None] <= jnp.arange(k - 1)[None, :]  # [i, j] : i <= j
    b = jnp.max(jnp.where(upto[None], suffix, -jnp.inf), axis=1)
    return jax.lax.cummax(b, axis=1)  # exact values are monotone already; guard against rounding


# Rows (codebooks) whose k x k crossing tables are built at once: bounds the working memory of
# entropy-constrained k-means to about RATE_TABLE_BYTES x the temporaries of one table, whatever the number of
# channels (a 4096 x 11008 kernel at 8 bits would otherwise need ~6.8 GiB).
RATE_TABLE_BYTES = 16 << 20


def _rate_boundaries_chunked(c: jax.Array, lam: jax.Array, code_len: jax.Array, chunk: int | None = None) -> jax.Array:
    """:func:`_rate_boundaries` over chunks of ``chunk`` rows (``lax.map``; default: ``RATE_TABLE_BYTES`` of
    crossing table at a time); the same values as one call (each row is computed alone)."""
    rows, k = c.shape
    chunk = max(1, RATE_TABLE_BYTES // (4 * k * k)) if chunk is None else chunk
    if rows <= chunk:
        return _rate_boundaries(c, lam, code_len)
    return jax.lax.map(lambda a: _rate_boundaries(a[0][None], a[1][None], a[2][None])[0], (c, lam, code_len),
                       batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("k", "iterations", "init", "has_mask", "has_weights", "has_rate"))
# Long (about 80 lines) on purpose: one traced function whose init, assignment and update closures share the
# sorted values and prefix sums of every row; split up, they would pass a dozen arrays between them.
def _lloyd(x_rows, valid, w_rows, key, rate, *, k: int, iterations: int, init: str, has_mask: bool,
           has_weights: bool, has_rate: bool):
    """Exact 1-D Lloyd on every row of ``x_rows`` at once; returns ``(centroids, assignment, its, distinct)``.

    ``valid`` marks the values that take part (the others get assignment 0 and no weight); ``w_rows`` are
    non-negative importances. Assignment rule: value ``x`` goes to the first centroid whose upper decision
    boundary (midpoint to the next sorted centroid) is ``>= x`` (nearest centroid, ties to the lower one).
    With ``has_rate``, the boundaries are those of entropy-constrained quantization with Lagrange weight
    ``rate`` (a scalar, relative to each row's variance) and code lengths ``-log2`` of the cluster
    frequencies of the previous step (:func:`_rate_boundaries`).
    """
    rows, n = x_rows.shape
    # Each row is scaled by a power of two to below 4 in magnitude (and its importances likewise), so that
    # prefix sums of values near the float32 limit cannot overflow; a power of two scales exactly, so
    # ordinary inputs give bit-identical centroids.
    x_rows = x_rows.astype(jnp.float32)
    x_scale = _pow2_above(jnp.max(jnp.where(valid, jnp.abs(x_rows), 0.0), axis=1))
    x_rows = x_rows / x_scale[:, None]
    if has_weights:
        w_rows = w_rows.astype(jnp.float32)
        w_rows = w_rows / _pow2_above(jnp.max(jnp.where(valid, w_rows, 0.0), axis=1))[:, None]
    keys = jnp.where(valid, x_rows, jnp.inf) if has_mask else x_rows
    if has_weights:
        w = jnp.where(valid, w_rows.astype(jnp.float32), 0.0) if has_mask else w_rows.astype(jnp.float32)
        ks, ws = jax.lax.sort((keys, w), dimension=1, num_keys=1)
    else:
        ks = jnp.sort(keys, axis=1)
        ws = jnp.isfinite(ks).astype(jnp.float32) if has_mask else jnp.ones_like(ks)
    finite = jnp.isfinite(ks)
    xs = jnp.where(finite, ks, 0.0)
    n_valid = jnp.sum(finite, axis=1, dtype=jnp.int32) if has_mask else jnp.full((rows,), n, jnp.int32)
    zero = jnp.zeros((rows, 1), jnp.float32)
    pw = jnp.concatenate([zero, jnp.cumsum(ws, axis=1)], axis=1)
    px = jnp.concatenate([zero, jnp.cumsum(ws * xs, axis=1)], axis=1)
    distinct = jnp.where(n_valid > 0, 1 + jnp.sum((ks[:, 1:] != ks[:, :-1]) & finite[:, 1:], axis=1), 0)
    if has_rate:  # the Lagrange weight in the row's own units: rate x the variance of its values
        cnt = jnp.maximum(n_valid, 1).astype(jnp.float32)
        mean = jnp.sum(xs * finite, axis=1) / cnt
        lam = rate * jnp.sum(jnp.where(finite, (xs - mean[:, None]) ** 2, 0.0), axis=1) / cnt
        pc = jnp.concatenate([zero, jnp.cumsum(finite.astype(jnp.float32), axis=1)], axis=1)

    c0 = _init_centroids(xs, pw, n_valid, valid, x_rows, key, k, init)
    search = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side="right"))

    def boundaries(c, code_len):
        if has_rate:
            return _rate_boundaries_chunked(c, lam, code_len)
        return (c[:, :-1] + c[:, 1:]) * 0.5

    def assign(c, code_len):  # (rows, k - 1) end positions of clusters 0..k-2 in the sorted row
        return search(ks, boundaries(c, code_len)).astype(jnp.int32)

    def update(c, pos):
        edges = jnp.concatenate([jnp.zeros((rows, 1), jnp.int32), pos, jnp.full((rows, 1), n, jnp.int32)], axis=1)
        sw = jnp.diff(jnp.take_along_axis(pw, edges, axis=1), axis=1)
        sx = jnp.diff(jnp.take_along_axis(px, edges, axis=1), axis=1)
        new = jnp.where(sw > 0, sx / jnp.where(sw > 0, sw, 1.0), c)  # an empty cluster keeps its centroid
        if not has_rate:
            return jnp.sort(new, axis=1), None
        # Cluster frequencies (counts of values, not importances: the rate is paid per index) give the
        # code lengths of the next assignment; an empty cluster gets an infinite one and stays empty.
        counts = jnp.diff(jnp.take_along_axis(pc, edges, axis=1), axis=1)
        code_len = jnp.where(counts > 0, -jnp.log2(jnp.maximum(counts, 1.0) / cnt[:, None]), jnp.inf)
        order = jnp.argsort(new, axis=1, stable=True)
        return jnp.take_along_axis(new, order, axis=1), jnp.take_along_axis(code_len, order, axis=1)

    def cond(state):
        it, _, _, _, changed = state
        return (it < iterations) & changed

    def body(state):
        it, c, _, pos, _ = state
        c, code_len = update(c, pos)
        new_pos = assign(c, code_len)
        return it + 1, c, code_len, new_pos, jnp.any(new_pos != pos)

    len0 = jnp.full((rows, k), float(np.log2(k)), jnp.float32) if has_rate else None
    if k == 1:
        c, code_len = update(c0, jnp.zeros((rows, 0), jnp.int32))
        its = jnp.int32(1)
    else:
        its, c, code_len, _, _ = jax.lax.while_loop(
            cond, body, (jnp.int32(0), c0, len0, assign(c0, len0), jnp.bool_(True)))
    if k == 1:
        a = jnp.zeros(x_rows.shape, jnp.int32)
    else:
        a = jax.vmap(lambda b, v: jnp.searchsorted(b, v, side="left"))(boundaries(c, code_len), x_rows)
        a = a.astype(jnp.int32)
    return c * x_scale[:, None], a, its, distinct


def _pow2_above(m: jax.Array) -> jax.Array:
    """A power of two ``s`` with ``m / s`` in ``[1, 4)`` (1 where ``m`` is 0; never below the smallest normal
    float32, never above 2^126, so that ``s`` and ``1 / s`` are normal floats and dividing by it is exact)."""
    _, e = jnp.frexp(m)
    return jnp.where(m > 0, jnp.ldexp(jnp.ones_like(m), jnp.clip(e - 1, -126, 126)), 1.0)


def _rows(x: jax.Array, per_channel: bool, layer_axes: tuple[int, ...] = ()) -> jax.Array:
    """``(codebooks, values)`` view: one row per codebook, in the order of :func:`~compressjax.codebook.
    _codebook.book_ids` (layer-major, then the output channel), or one row for the whole array."""
    if layer_axes:
        rest = tuple(a for a in range(x.ndim) if a not in layer_axes)
        n_layers = math.prod(x.shape[a] for a in layer_axes)
        x = jnp.transpose(x, layer_axes + rest)
    else:
        n_layers = 1
    if per_channel:
        c = x.shape[-1]
        return jnp.reshape(x, (n_layers, -1, c)).transpose(0, 2, 1).reshape(n_layers * c, -1)
    return jnp.reshape(x, (n_layers, -1))


def _unrows(a: jax.Array, shape: tuple[int, ...], per_channel: bool, layer_axes: tuple[int, ...] = ()) -> jax.Array:
    """Inverse of :func:`_rows`."""
    rest = tuple(d for d in range(len(shape)) if d not in layer_axes)
    perm = tuple(layer_axes) + rest
    if per_channel:
        n_layers = math.prod(shape[d] for d in layer_axes)
        a = a.reshape(n_layers, shape[-1], -1).transpose(0, 2, 1)
    a = jnp.reshape(a, [shape[d] for d in perm])
    return jnp.transpose(a, tuple(int(i) for i in np.argsort(perm))) if layer_axes else a


def _check_aux(path: str, name: str, aux: Any, leaf: Any, *, nonneg: bool) -> None:
    if not hasattr(aux, "shape") or not hasattr(aux, "dtype"):
        raise TypeError(f"leaf {path!r}: the {name} entry must be an array, got {type(aux).__name__}")
    if tuple(aux.shape) != tuple(leaf.shape):
        raise ValueError(f"leaf {path!r}: the {name} entry has shape {tuple(aux.shape)}, the weights {tuple(leaf.shape)}")
    if name == "weights":
        if not (jnp.issubdtype(aux.dtype, jnp.floating) or jnp.issubdtype(aux.dtype, jnp.integer)):
            raise TypeError(f"leaf {path!r}: weights must be real numbers, got dtype {aux.dtype}")
        if not isinstance(aux, jax.core.Tracer):
            a = np.asarray(aux, np.float64)
            bad = ~np.isfinite(a) | (a < 0) if nonneg else ~np.isfinite(a)
            if np.any(bad):
                raise ValueError(f"leaf {path!r}: weights must be finite and >= 0, found {a[bad].ravel()[0]} "
                                 f"({int(np.sum(bad))} bad entries)")
    elif not (aux.dtype == jnp.bool_ or jnp.issubdtype(aux.dtype, jnp.integer) or jnp.issubdtype(aux.dtype, jnp.floating)):
        raise TypeError(f"leaf {path!r}: masks must be boolean arrays, got dtype {aux.dtype}")


def _aux_by_path(aux_tree: Any, params: Any, name: str) -> dict[str, Any]:
    """``{path: leaf}`` of ``weights``/``masks``, after checking they have the params' structure."""
    if aux_tree is None:
        return {}
    tree.check_same_structure(aux_tree, params, name, "params")
    return dict(tree.leaves_with_paths(aux_tree, tree.is_none_or_compressed))


# Long (about 65 lines of body) on purpose: the public entry checks every argument (naming it) before the
# per-leaf loop; each check is a line or two.
def kmeans_codebooks(
    params: Any,
    bits: int,
    *,
    where: tree.Where = None,
    per_channel: bool = False,
    init: str = "density",
    iterations: int = DEFAULT_ITERATIONS,
    weights: Any = None,
    masks: Any = None,
    key: jax.Array | None = None,
    entropy_weight: float = 0.0,
    layer_axes: tuple[int, ...] | None = None,
) -> Any:
    """Replaces the selected kernels with k-means :class:`Codebook` leaves (weight sharing).

    Each selected leaf gets ``2^bits`` shared values (per array, or per output channel with
    ``per_channel``), found by exact one-dimensional Lloyd iterations (sorted values, prefix sums and
    ``searchsorted``; every codebook of the leaf at once under ``jax.jit``) run until no weight changes
    cluster or ``iterations`` updates were made. Each weight's index is its nearest centroid.

    Args:
        params: the float parameter pytree.
        bits: index width, 1 to 8 (``2^bits`` centroids per codebook).
        where: which leaves (default: floating-point arrays with ``ndim >= 2``; leaves that are already
            compressed, :class:`Codebook` or :class:`~compressjax.QArray`, are skipped by the default).
        per_channel: one codebook per output channel (the last axis) instead of one per leaf.
        init: ``"density"`` (default; the (weighted) quantiles ``(j + 1/2) / k``, which beats the paper's
            linear init by 0.01-0.04 mean cosine on MiniLM), ``"linear"`` (evenly spaced between the smallest
            and largest weight, Han et al.'s choice) or ``"random"`` (Forgy: distinct weights drawn by ``key``).
        iterations: the most Lloyd updates per leaf (convergence usually comes first).
        weights: optional pytree of non-negative per-weight importances, matching ``params`` (``None`` at
            leaves without), for weighted k-means: each centroid is the importance-weighted mean of its
            weights, e.g. the Hessian diagonal or squared gradients (SqueezeLLM).
        masks: optional pruning masks (as from :func:`~compressjax.magnitude_masks`, ``None`` at unmasked
            leaves): pruned weights are not clustered and get index 0, which is reserved for an exact zero
            (``zero_reserved``), so ``2^bits - 1`` centroids are fitted to the surviving weights.
        key: PRNG key for ``init="random"`` (default ``jax.random.key(0)``); results are deterministic for
            a given key.
        entropy_weight: ``lambda >= 0`` of entropy-constrained scalar quantization (Chou, Lookabaugh &
            Gray, 1989; for networks, Choi, El-Khamy & Lee, 2017). With ``lambda > 0`` each weight goes to
            ``argmin_j (w - c_j)^2 + lambda * var * (-log2 p_j)``, where ``p_j`` is centroid ``j``'s share of
            the codebook's weights in the previous step and ``var`` the variance of those weights: rare
            centroids cost more, so the indices' entropy (what an entropy-coded file pays per index) falls at
            a small cost in error, and some centroids end up unused. ``0`` (default) is plain k-means. On
            a pruned MNIST-1D MLP, ``0.01`` cut its 5-bit indices from about 4.2 to 3.2 bits each
            (entropy) at a relative squared error of 0.6% (0.1% at ``0``). With ``weights``, the rate
            term is not weighted (the assignment stays one interval per centroid).

    Returns:
        ``params`` with each selected leaf replaced by a :class:`Codebook` (centroids float32).

    Raises:
        ValueError: ``bits`` outside 1..8, unknown ``init``, ``iterations < 1``, ``layer_axes`` that are not
            axes of a selected leaf (or include a per-channel codebook's last axis), a leaf with NaN/Inf,
            negative or non-finite importances, a leaf (or a channel) with fewer distinct surviving values
            than centroids to fit, ``weights`` / ``masks`` whose structure or shapes differ from
            ``params``; each names the leaf.
        TypeError: non-integer ``bits``, a selected leaf that is not a float array, or an explicitly
            selected compressed leaf.

    References:
        Han, Mao & Dally, "Deep Compression", ICLR 2016 (weight sharing, linear init, reserved zero).
        Kim et al., "SqueezeLLM", ICML 2024 (sensitivity-weighted k-means).
    """
    _check_bits(bits, "params")
    bits = int(bits)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)):
        raise TypeError(f"iterations must be a positive int, got {iterations!r}")
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be a positive int, got {iterations!r} (at most {MAX_ITERATIONS}: an int32 loop counter)")
    if not isinstance(per_channel, (bool, np.bool_)):
        raise TypeError(f"per_channel must be a bool, got {per_channel!r}")
    if isinstance(entropy_weight, bool) or not isinstance(entropy_weight, (int, float, np.integer, np.floating)):
        raise TypeError(f"entropy_weight must be a real number, got {entropy_weight!r}")
    try:
        rate = float(entropy_weight)
    except OverflowError:  # an int beyond float range, e.g. 10**400
        rate = math.inf
    if not (math.isfinite(rate) and rate >= 0):
        shown = repr(entropy_weight) if len(repr(entropy_weight)) <= 40 else f"{repr(entropy_weight)[:20]}... (a {len(repr(entropy_weight))}-digit number)"
        raise ValueError(f"entropy_weight must be finite and >= 0, got {shown}")
    key = jax.random.key(0) if key is None else key
    if isinstance(key, jax.Array) and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32 key from jax.random.PRNGKey

    pred = tree.selector(where)

    def chosen(path, leaf):
        if tree.is_compressed_leaf(leaf):
            if where is None:
                return False
            if pred(path, leaf):
                raise TypeError(f"leaf {path!r} is already compressed ({leaf!r}); decode it first")
            return False
        return pred(path, leaf)

    flat = tree.leaves_with_paths(params, tree.is_compressed_leaf)
    selected = [(p, leaf) for p, leaf in flat if chosen(p, leaf)]
    if not selected:
        shown = ", ".join(repr(p) for p, _ in flat[:8])
        raise ValueError(f"where={where!r} selects no leaf for kmeans_codebooks; the tree's leaves are {shown}")
    w_by = _aux_by_path(weights, params, "weights")
    m_by = _aux_by_path(masks, params, "masks")
    k = (1 << bits) - (1 if masks is not None else 0)
    out: dict[str, Codebook] = {}
    for i, (path, leaf) in enumerate(selected):
        if not tree.is_float_array(leaf):
            raise TypeError(f"leaf {path!r} selected by where={where!r} has dtype "
                            f"{getattr(leaf, 'dtype', type(leaf).__name__)}; expected a floating-point array")
        tree.check_finite(path, leaf)
        if per_channel and jnp.ndim(leaf) == 0:
            raise ValueError(f"leaf {path!r} is a scalar: per_channel codebooks need an output axis")
        if layer_axes is None and jnp.ndim(leaf) == 3 and jnp.size(leaf):
            warnings.warn(
                f"leaf {path!r} of shape {tuple(jnp.shape(leaf))} gets codebooks shared across axes 0 and 1: if it "
                f"stacks {jnp.shape(leaf)[0]} layers or experts, each codebook spans them all. Declare "
                "layer_axes=(0,) for per-layer codebooks, or layer_axes=() for a conv1d (k, in, out) kernel",
                LayerAxesWarning, stacklevel=2)
        axes = check_layer_axes(() if layer_axes is None else layer_axes, tuple(jnp.shape(leaf)), bool(per_channel), path)
        w, m = w_by.get(path), m_by.get(path)
        if w is not None:
            _check_aux(path, "weights", w, leaf, nonneg=True)
        if m is not None:
            _check_aux(path, "masks", m, leaf, nonneg=False)
        out[path] = _kmeans_leaf(path, jnp.asarray(leaf), bits, k, per_channel, axes, init, int(iterations), w, m,
                                 masks is not None, jax.random.fold_in(key, i), rate)

    def visit(kp, leaf):
        p = tree.path_to_str(kp)
        return out.get(p, leaf)

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=tree.is_compressed_leaf)


def _book_name(r: int, shape: tuple[int, ...], per_channel: bool, layer_axes: tuple[int, ...]) -> str:
    """``"layer (2,) channel 5 of "``: codebook ``r`` (a row of :func:`_rows`) in words, for error messages."""
    layer, chan = divmod(r, shape[-1]) if per_channel else (r, None)
    parts = []
    if layer_axes:
        parts.append(f"layer {tuple(int(i) for i in np.unravel_index(layer, [shape[a] for a in layer_axes]))}")
    if chan is not None:
        parts.append(f"channel {chan}")
    return " ".join(parts) + " of " if parts else ""


def _kmeans_leaf(path, x, bits, k, per_channel, layer_axes, init, iterations, w, m, reserve_zero, key, rate) -> Codebook:
    shape = tuple(x.shape)
    if x.size == 0:  # nothing to cluster: a valid empty Codebook (zero centroids), as quantize passes them through
        centroids = jnp.zeros(centroid_shape(shape, bits, per_channel, layer_axes), jnp.float32)
        return Codebook(jnp.zeros((0,), jnp.uint8), centroids, bits=bits, shape=shape, dtype=x.dtype,
                        per_channel=per_channel, zero_reserved=reserve_zero, layer_axes=layer_axes, path=path)
    x_rows = _rows(x.astype(jnp.float32), per_channel, layer_axes)
    n_values = x_rows.shape[1]
    if n_values < k and not reserve_zero:  # (with masks, the distinct-value check below says which codebook)
        where_ = "each channel of " if per_channel else "each layer of " if layer_axes else ""
        raise ValueError(f"leaf {path!r}: {where_}the weights hold {n_values} values, fewer than the {k} centroids of "
                         f"a {bits}-bit codebook; use fewer bits{' or one codebook per leaf' if per_channel else ''}")
    if m is not None:
        valid = _rows(jnp.asarray(m) != 0, per_channel, layer_axes)
    else:
        valid = jnp.ones(x_rows.shape, bool)
    w_rows = _rows(jnp.asarray(w, jnp.float32), per_channel, layer_axes) if w is not None else None
    c, a, _, distinct = _lloyd(x_rows, valid, w_rows, key, jnp.float32(rate), k=k, iterations=iterations,
                               init=init, has_mask=m is not None, has_weights=w is not None, has_rate=rate > 0)
    if not isinstance(distinct, jax.core.Tracer):
        d = np.asarray(distinct)
        short = (d > 0) & (d < k) if reserve_zero else d < k
        if np.any(short):
            r = int(np.argmax(short))
            raise ValueError(
                f"leaf {path!r}: {_book_name(r, shape, per_channel, layer_axes)}the weights have {int(d[r])} distinct "
                f"{'surviving ' if reserve_zero else ''}values, fewer than the {k} centroids of a {bits}-bit codebook"
                f"{' (one of 2^bits is the reserved zero)' if reserve_zero else ''}; use fewer bits"
                f"{' or one codebook per leaf' if per_channel else ''}"
            )
    if reserve_zero:
        c = jnp.concatenate([jnp.zeros((c.shape[0], 1), c.dtype), c], axis=1)
        a = jnp.where(valid, a + 1, 0)
    centroids = c.reshape(centroid_shape(shape, bits, per_channel, layer_axes))
    idx = _unrows(a, shape, per_channel, layer_axes)
    return Codebook(_pack_jit(idx, bits), centroids, bits=bits, shape=shape, dtype=x.dtype,
                    per_channel=per_channel, zero_reserved=reserve_zero, layer_axes=layer_axes, path=path)
