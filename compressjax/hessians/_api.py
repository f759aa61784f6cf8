"""``collect_hessians``: the capture pass, its compile cache, the checks and the stacked results."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import tree
from compressjax.hessians._analysis import _V, _Analysis
from compressjax.hessians._evaluate import _Evaluator
from compressjax.hessians._hessian import Hessian
from compressjax.qarray import QArray
from compressjax.quantization import dequantize

# ---------------------------------------------------------------------------------------------- API
# Traced and compiled accumulation steps, reused across calls with the same apply_fn, params shapes,
# selection and batch shape (so calling collect_hessians again, e.g. per layerwise stage or per sweep point,
# does not retrace the model). Least recently used first out, with room for a few dozen (selection, batch
# shape) programs, e.g. a 6-block model's sequential pass over 3 batch shapes (a cycle longer than the
# cache misses every time, so a second such pass would recompile them all). It holds references to apply_fn.
_CACHE: dict[tuple, tuple] = {}
_CACHE_SIZE = 64


def _is_hashable(key: tuple) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _batch_signature(batch) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return (treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves))


def collect_hessians(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Iterable[Any],
    *,
    where: tree.Where = None,
    row_mask: Callable[[Any], jax.Array] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
) -> Any:
    """Input Gram matrices ``H = sum x x^T`` of every selected matmul weight, over calibration batches.

    Runs ``apply_fn(params, batch)`` for each batch, without changing the model: the function is traced to
    a jaxpr, the ``dot_general`` / ``conv_general_dilated`` equations whose weight operand derives from a
    selected leaf (through reshapes, transposes and casts) are found, and the jaxpr is evaluated by an
    interpreter that also accumulates ``X^T X`` of their other operand (see the module docstring). A kernel
    used several times accumulates every use. The accumulation is one ``jax.jit``-compiled function per
    batch shape.

    Args:
        apply_fn: ``(params, batch) -> anything``; e.g. ``lambda p, x: model.apply(p, x)`` (linen),
            ``lambda s, x: nnx.merge(graphdef, s)(x)`` (NNX), ``lambda m, x: jax.vmap(m)(x)`` (equinox).
            It receives float params: ``QArray`` leaves of ``params`` are dequantized for it (and get no
            Hessian).
        params: the params pytree.
        batches: an iterable of batches (any pytrees that ``apply_fn`` accepts).
        where: which leaves to collect for, among the float leaves with ``ndim >= 2`` (vectors such as
            biases are skipped, so ``where="layer_0/"`` selects a block's kernels). With the default
            (``None``), selected leaves that are not a matmul weight (e.g. embedding tables, which are
            gathered) get ``None``; with an explicit ``where`` such a leaf is an error.
        row_mask: optional ``batch -> bool array`` over the leading (batch, token) dims of the layer inputs;
            rows where it is False (padding) are left out of every Gram matrix and of the counts.
        mesh: optional ``jax.sharding.Mesh``: each batch is split over ``data_axis`` (its leading dim must
            be divisible by that axis' size) and the Gram matrices are summed across devices.
        data_axis: the mesh axis that splits the batch.

    Returns:
        A pytree like ``params`` with a :class:`Hessian` at each selected kernel and ``None`` elsewhere: ``h``
        float32 ``(d_in, d_in)`` for a plain kernel; ``(*layer_shape, [groups,] d_in, d_in)`` for a stacked
        kernel (used in a ``scan``/loop, by static slices ``w[i]``, or as MoE experts in a batched matmul;
        ``layer_axes`` records which kernel axes) or a grouped convolution (``groups``); ``count`` per matrix.
        On a mesh spanning several processes every process receives the summed Hessians.

    Raises:
        ValueError: ``where`` selects nothing or a leaf that is never a matmul weight (naming it and what it
            was used by), a selected leaf that reaches a matmul or convolution through something the capture
            cannot follow (naming the leaf and the primitive, with any ``where``), a kernel used with different
            layouts, no batches, NaN/Inf reaching a kernel's input (naming the kernel), a Hessian (or a layer's
            or group's) built from zero rows (naming the kernel), a ``row_mask`` that does not match the leading
            dims of the layer inputs (or used with a kernel inside ``shard_map``), a batch not divisible over
            the mesh.
        TypeError: a non-callable ``apply_fn`` or ``row_mask``, a selected leaf that is not floating point.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be a callable (params, batch) -> output, got {apply_fn!r}")
    if row_mask is not None and not callable(row_mask):
        raise TypeError(f"row_mask must be None or a callable batch -> bool array, got {row_mask!r}")
    treedef, paths, leaves, selected = _select(params, where)
    is_q = lambda x: isinstance(x, QArray)  # noqa: E731
    float_leaves = [dequantize(x) if is_q(x) else x for x in leaves]
    if mesh is not None:
        mesh = auto_mesh(mesh)
        if data_axis not in mesh.axis_names:
            raise ValueError(f"data_axis={data_axis!r} is not an axis of the mesh {mesh.axis_names}")
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        float_leaves = [None if x is None else jax.device_put(x, rep) for x in float_leaves]

    def fn(leaf_list, batch):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaf_list), batch)

    leaf_sig = tuple(None if x is None else (tuple(x.shape), str(x.dtype)) for x in float_leaves)
    # A Selector compares by the `where` it wraps; a cache key with an unhashable part (a callable object
    # without __hash__ passed as apply_fn, row_mask or where) is simply not cached.
    base_key = (apply_fn, row_mask, treedef, leaf_sig, tuple(selected), tree.selector(where), mesh)
    cacheable = _is_hashable(base_key)
    acc = None
    found = None
    n_batches = 0
    for batch in batches:
        if mesh is not None:  # before tracing: the jaxpr then sees the batch on the (automatic) mesh
            batch = _shard_batch(batch, mesh, data_axis)
        key = (*base_key, _batch_signature(batch)) if cacheable else None
        hit = None if key is None else _CACHE.pop(key, None)
        if hit is not None:
            _CACHE[key] = hit  # now the most recently used
        else:
            hit = _build(fn, float_leaves, batch, selected, paths, where, row_mask, mesh)
            if key is not None:
                _CACHE[key] = hit
                while len(_CACHE) > _CACHE_SIZE:
                    _CACHE.pop(next(iter(_CACHE)))
        step, found_here = hit
        if found is None:
            found = found_here
            acc = {i: (jnp.zeros((lay.n, lay[1], lay[1]), jnp.float32), jnp.zeros((lay.n,), jnp.float32)) for i, lay in found.items()}
            if mesh is not None:
                acc = jax.device_put(acc, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        elif found_here != found:
            raise ValueError("batches of different shapes use different kernels; collect them in separate calls")
        acc = step(acc, float_leaves, batch)
        n_batches += 1
    if n_batches == 0:
        raise ValueError("batches is empty: collect_hessians needs at least one calibration batch")
    out = [None] * len(leaves)
    for i, lay in found.items():
        h, c = (_local(x) for x in acc[i])
        out[i] = _finish(paths[i], h, c, lay)
    return jax.tree_util.tree_unflatten(treedef, out)


def _local(x: jax.Array) -> jax.Array:
    """A replicated array spanning several processes (a multi-host mesh) as this process' own copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x.addressable_data(0)
    return x


def _select(params: Any, where: tree.Where) -> tuple[Any, list[str], list[Any], list[int]]:
    """``(treedef, paths, leaves, selected)``: the params flattened (``QArray`` leaves kept whole) and the
    indices of the selected float leaves with ``ndim >= 2``."""
    is_q = lambda x: isinstance(x, QArray)  # noqa: E731
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_q)
    paths = [tree.path_to_str(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    pred = tree.selector(where)
    selected = []
    for i, (p, x) in enumerate(zip(paths, leaves, strict=True)):
        if x is None or is_q(x) or not pred(p, x):
            continue
        if not tree.is_float_array(x):
            if where is None:
                continue
            raise TypeError(f"leaf {p!r} selected by where={where!r} has dtype {getattr(x, 'dtype', type(x).__name__)}; expected a floating-point array")
        if x.ndim < 2:  # biases, norm scales: never a kernel, even when a stage's `where` covers them
            continue
        selected.append(i)
    if not selected:
        raise ValueError(f"where={where!r} selects no float leaf of the params; the tree's leaves are {paths[:8]}{' ...' if len(paths) > 8 else ''}")
    return treedef, paths, leaves, selected


def _finish(path: str, h, c, lay: _Layout) -> Hessian:
    """Checks the accumulated matrices of one leaf and lays them out as the :class:`Hessian` contract says."""
    in_axes, d, layer_axes, layer_shape, g = lay
    if not bool(jnp.all(jnp.isfinite(h))):
        raise ValueError(f"leaf {path!r}: its layer inputs hold NaN or Inf in the calibration batches (the Hessian is not finite)")
    counts = np.asarray(c)
    if np.any(counts == 0):
        j = int(np.argmin(counts))
        where_ = ""
        if layer_shape or g > 1:
            pos = np.unravel_index(j, (*layer_shape, g))
            where_ = f" for layer {tuple(int(x) for x in pos[: len(layer_shape)])}" if layer_shape else ""
            where_ += f" group {int(pos[-1])}" if g > 1 else ""
        raise ValueError(
            f"leaf {path!r}: its Hessian{where_} is built from zero input rows (a row_mask that is all False, an empty "
            "batch, or a slice the calibration batches never use); it cannot calibrate the kernel"
        )
    lead = (*layer_shape, g) if g > 1 else tuple(layer_shape)
    return Hessian(h.reshape(*lead, d, d), c.reshape(lead), in_axes, layer_axes, g)


def auto_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """The same devices and axis names with automatic (GSPMD) sharding propagation on every axis, so that
    the model's jaxpr, traced without shardings, can be evaluated on sharded inputs."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {mesh!r}")
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def _shard_batch(batch, mesh, data_axis):
    n_dev = mesh.shape[data_axis]

    def put(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % n_dev:
            raise ValueError(f"batch leaf of shape {tuple(x.shape)} cannot be split over mesh axis {data_axis!r} of size {n_dev}: its leading dim must be divisible by {n_dev}")
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(data_axis)))

    return jax.tree_util.tree_map(put, batch)


_ANALYSIS_CHUNK = 2**24  # kernel weights followed at once by the analysis (64 MiB of int32 indices)


def _chunks(selected: list[int], shapes: dict[int, tuple[int, ...]], limit: int) -> list[list[int]]:
    """``selected`` in order, cut into runs of at most ``limit`` weights (a larger leaf alone); one empty
    chunk when nothing is selected, so the model is still walked once."""
    out: list[list[int]] = [[]]
    size = 0
    for i in selected:
        n = math.prod(shapes[i])
        if out[-1] and size + n > limit:
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return out


def _analyse(fn, float_leaves, batch, selected, paths, where):
    """Traces ``fn(float_leaves, batch)`` and finds its sites: ``(closed jaxpr, analysis, layouts)``."""
    closed = jax.make_jaxpr(fn)(float_leaves, batch)
    n_leaves = len(jax.tree_util.tree_leaves(float_leaves))
    # make_jaxpr flattens (leaf_list, batch): leaf i (an array) is invar i (None leaves have no invar).
    invar_of = {}
    k = 0
    for i, x in enumerate(float_leaves):
        if x is not None:
            invar_of[i] = k
            k += 1
    assert k == n_leaves
    shapes = {i: tuple(float_leaves[i].shape) for i in selected}
    an = _Analysis(shapes)
    # The analysis follows one index per kernel weight (int32 where it fits). It follows the leaves a chunk
    # at a time, each run of the jaxpr adding its sites to the same record, so that its memory is bounded by
    # a chunk rather than by the model (a leaf larger than a chunk is followed alone).
    for chunk in _chunks(selected, shapes, _ANALYSIS_CHUNK):
        ins = [None] * len(closed.jaxpr.invars)
        for i in chunk:
            n = math.prod(shapes[i])
            ins[invar_of[i]] = _V((i, np.arange(n, dtype=np.int32 if n < 2**31 else np.int64).reshape(shapes[i]), ()))
        for k in range(n_leaves, len(closed.jaxpr.invars)):
            ins[k] = _V(None, None, True)
        an.run(closed.jaxpr, ins, ())
        del ins
    found = _layouts(an, selected, paths, where)
    return closed, an, found


def _build(fn, float_leaves, batch, selected, paths, where, row_mask, mesh):
    """Traces once for a batch shape: the analysis and the jit-compiled accumulation step."""
    closed, an, found = _analyse(fn, float_leaves, batch, selected, paths, where)
    ev = _Evaluator(an, paths)
    sel = [i for i in found]

    def step(acc, leaf_list, batch):
        mask = None
        if row_mask is not None:
            mask = jnp.asarray(row_mask(batch))
            if mask.dtype != jnp.bool_:
                raise TypeError(f"row_mask must return a bool array, got dtype {mask.dtype}")
        acc = dict(acc)
        args = jax.tree_util.tree_leaves((leaf_list, batch))
        ev.run(closed.jaxpr, closed.consts, args, (), acc, mask)
        return {i: acc[i] for i in sel}

    return jax.jit(step, donate_argnums=(0,)), found


class _Layout(tuple):
    """``(in_axes, d_in, layer_axes, layer_shape, groups)`` of one leaf's Hessian."""

    @property
    def n(self) -> int:
        return math.prod(self[3]) * self[4]


def _layouts(an: _Analysis, selected: list[int], paths: list[str], where) -> dict[int, _Layout]:
    """Checks what the analysis found and gives every used leaf one layout; fills in each site's flat
    matrix index (static part and run-time steps)."""
    for i in selected:
        if i in an.errors:
            raise ValueError(f"leaf {paths[i]!r} reaches a matmul or convolution that collect_hessians cannot capture: {an.errors[i]}")
    found: dict[int, _Layout] = {}
    for site in an.sites.values():
        kshape = an.shapes[site.leaf]
        lay = _Layout((site.in_axes, site.d_in, site.layer_axes, tuple(kshape[a] for a in site.layer_axes), site.groups))
        prev = found.get(site.leaf)
        if prev is not None and prev != lay:
            raise ValueError(
                f"leaf {paths[site.leaf]!r} is used with different layouts in different matmuls: input axes {prev[0]} / {lay[0]}, "
                f"layer axes {prev[2]} / {lay[2]}, groups {prev[4]} / {lay[4]}"
            )
        found[site.leaf] = lay
    for site in an.sites.values():
        _, _, layer_axes, layer_shape, g = found[site.leaf]
        lstrides = [math.prod(layer_shape[j + 1:]) * g for j in range(len(layer_shape))]
        base = (site.lcoords * np.asarray(lstrides, np.int64)).sum(axis=-1) if layer_shape else np.zeros(site.lcoords.shape[0], np.int64)
        if g > 1:
            base = (base[:, None] + np.arange(g)).reshape(-1)
        site.lbase = base
        site.lsteps = [(m * lstrides[j], tok) for j, m, tok in site.ldyn]
    missing = [i for i in selected if i not in found]
    if missing and where is not None:
        i = missing[0]
        used = sorted(an.other.get(i, ())) or ["nothing (it does not reach the output)"]
        raise ValueError(
            f"leaf {paths[i]!r} selected by where={where!r} is not the weight of any matmul or convolution in apply_fn; "
            f"it is used by {used}. Narrow `where` to the matmul kernels."
        )
    if not found:
        raise ValueError(f"no selected leaf is the weight of a matmul or convolution in apply_fn (where={where!r})")
    return found
