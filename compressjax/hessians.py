"""Calibration statistics for any JAX model: the input Gram matrix of every matmul weight.

:func:`collect_hessians` traces ``apply_fn(params, batch)`` to a jaxpr and finds each ``dot_general`` and
``conv_general_dilated`` whose weight operand derives from a selected params leaf through shape-only
operations (``reshape``, ``transpose``, ``broadcast_in_dim``, ``squeeze``, ``slice``, ``rev`` and dtype
casts). It then evaluates the jaxpr with a small interpreter that, besides computing every equation, adds
``X^T X`` of the other operand (the layer input; for a convolution, its patches) to that leaf's Gram
matrix. The interpreter recurses into ``jit``/``pjit``, ``closed_call``, ``remat``, ``custom_jvp_call`` and
``custom_vjp_call`` sub-jaxprs. No model code changes: Flax linen, Flax NNX (``nnx.split`` state with an
``nnx.merge`` closure), equinox modules and plain functions of a dict all work alike.

Layout: a kernel's *input axes* are the axes it contracts with the layer input. ``H`` is indexed by the
kernel's input positions flattened in the kernel's own axis order (``(in, out)`` Flax kernel:
``(in, in)``; conv kernel ``(kh, kw, c_in, c_out)``: ``(kh*kw*c_in, kh*kw*c_in)`` in the order of
``kernel.reshape(-1, c_out)``; equinox ``(out, in)``: ``(in, in)``), so a solver pairs row ``j`` of ``H``
with row ``j`` of the kernel moved to ``(inputs..., outputs...)``. :class:`Hessian` records those axes.

References:
    Frantar et al., "GPTQ", ICLR 2023 (the layer-wise objective ``||XW - XW_q||^2`` whose Hessian is
    ``2 X^T X``); Frantar & Alistarh, "SparseGPT", ICML 2023.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from compressjax import tree
from compressjax.qarray import QArray

__all__ = ["Hessian", "collect_hessians"]

_IDENTITY_PRIMS = {"convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier"}
_CALL_PRIMS = {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}


@jax.tree_util.register_pytree_node_class
class Hessian:
    """The input Gram matrix of one kernel: ``h = sum x x^T`` over ``count`` input rows.

    Attributes:
        h: float32 ``(d_in, d_in)``, indexed by the kernel's input positions (see the module docstring).
        count: float32 scalar, the number of input rows summed (over every use of the kernel).
        in_axes: the kernel axes that are contracted with the input (static), in kernel order.
    """

    def __init__(self, h, count, in_axes: tuple[int, ...]):
        self.h = h
        self.count = count
        self.in_axes = tuple(int(a) for a in in_axes)

    def tree_flatten(self):
        return (self.h, self.count), self.in_axes

    @classmethod
    def tree_unflatten(cls, in_axes, children):
        return cls(*children, in_axes)

    @property
    def d_in(self) -> int:
        return int(self.h.shape[0])

    def __repr__(self) -> str:
        return f"Hessian(d_in={self.h.shape[0]}, in_axes={self.in_axes}, count={self.count})"


# ------------------------------------------------------------------------------------------- analysis
class _Site:
    """A matmul whose weight operand comes from params leaf ``leaf`` (static facts found at trace time)."""

    def __init__(self, leaf, kind, x_pos, x_con, idx, in_axes, d_in, params):
        self.leaf, self.kind, self.x_pos, self.x_con = leaf, kind, x_pos, x_con
        self.idx, self.in_axes, self.d_in, self.params = idx, in_axes, d_in, params
        self.full = idx is not None and len(idx) == d_in and np.array_equal(idx, np.arange(d_in))


def _origin_op(eqn, o: np.ndarray) -> np.ndarray | None:
    """Applies a shape-only primitive to an index array (``None`` if the primitive is not shape-only)."""
    name, p = eqn.primitive.name, eqn.params
    if name in _IDENTITY_PRIMS:
        return o
    if name == "reshape":
        if p.get("dimensions") is not None:
            o = o.transpose(p["dimensions"])
        return o.reshape(p["new_sizes"])
    if name == "transpose":
        return o.transpose(p["permutation"])
    if name == "squeeze":
        return np.squeeze(o, axis=tuple(p["dimensions"]))
    if name == "broadcast_in_dim":
        shape, dims = tuple(p["shape"]), tuple(int(d) for d in p["broadcast_dimensions"])
        expanded = [1] * len(shape)
        for src, dst in enumerate(dims):
            expanded[dst] = o.shape[src]
        return np.broadcast_to(o.reshape(expanded), shape)
    if name == "slice":
        strides = p.get("strides") or (1,) * o.ndim
        return o[tuple(slice(s, e, st) for s, e, st in zip(p["start_indices"], p["limit_indices"], strides, strict=True))]
    if name == "rev":
        return np.flip(o, axis=tuple(p["dimensions"]))
    return None


def _sub_jaxpr(eqn):
    """The (jaxpr, consts) of a call-like equation whose invars map one to one, else ``None``."""
    if eqn.primitive.name not in _CALL_PRIMS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, jcore.ClosedJaxpr):
            j, consts = sub.jaxpr, sub.consts
        elif isinstance(sub, jcore.Jaxpr):
            j, consts = sub, ()
        else:
            continue
        if len(j.invars) == len(eqn.invars) and len(j.outvars) == len(eqn.outvars):
            return j, consts
    return None


def _weight_map(o: np.ndarray, kshape: tuple[int, ...], con: tuple[int, ...]):
    """For a weight operand with index array ``o`` contracted over ``con``: the kernel's input axes and, for
    each contracted position, its flat index among the kernel's input positions (or a reason string)."""
    rest = tuple(a for a in range(o.ndim) if a not in con)
    dc = math.prod(o.shape[a] for a in con)
    o2 = o.transpose(con + rest).reshape(dc, -1)
    coords = np.unravel_index(o2, kshape)
    out_axes = [a for a in range(len(kshape)) if np.any(coords[a] != coords[a][:, :1])]
    in_axes = tuple(a for a in range(len(kshape)) if a not in out_axes)
    for a in out_axes:
        if np.any(coords[a] != coords[a][:1, :]):
            return f"kernel axis {a} is both contracted and kept"
    if not in_axes:
        return "no kernel axis is contracted"
    in_shape = [kshape[a] for a in in_axes]
    idx = np.ravel_multi_index([coords[a][:, 0] for a in in_axes], in_shape)
    return in_axes, idx, math.prod(in_shape)


class _Analysis:
    """Walks a jaxpr once, following index arrays of the selected leaves, and records the matmul sites."""

    def __init__(self, shapes: dict[int, tuple[int, ...]]):
        self.shapes = shapes
        self.sites: dict[tuple[int, ...], _Site] = {}
        self.calls: set[tuple[int, ...]] = set()  # call equations that contain a site
        self.other: dict[int, set[str]] = {}  # leaf -> primitives that consumed it otherwise

    def run(self, jaxpr, origins: dict, prefix: tuple[int, ...]) -> list:
        env = dict(origins)

        def get(v):
            return None if isinstance(v, jcore.Literal) else env.get(v)

        for i, eqn in enumerate(jaxpr.eqns):
            ins = [get(v) for v in eqn.invars]
            if all(x is None for x in ins):
                continue
            key = prefix + (i,)
            name = eqn.primitive.name
            tainted = [k for k, x in enumerate(ins) if x is not None]
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                n_before = len(self.sites)
                outs = self.run(sub[0], {v: x for v, x in zip(sub[0].invars, ins, strict=True) if x is not None}, key)
                if len(self.sites) > n_before:
                    self.calls.add(key)
                for v, x in zip(eqn.outvars, outs, strict=True):
                    if x is not None:
                        env[v] = x
                continue
            if name == "dot_general" and len(tainted) == 1:
                self._dot_site(eqn, key, tainted[0], ins[tainted[0]])
                continue
            if name == "conv_general_dilated" and tainted == [1]:
                self._conv_site(eqn, key, ins[1])
                continue
            if len(tainted) == 1 and len(eqn.outvars) == 1:
                leaf, o = ins[tainted[0]]
                out = _origin_op(eqn, o)
                if out is not None:
                    env[eqn.outvars[0]] = (leaf, out)
                    continue
            for x in ins:
                if x is not None:
                    self.other.setdefault(x[0], set()).add(name)
        return [get(v) for v in jaxpr.outvars]

    def _dot_site(self, eqn, key, w_pos, origin):
        leaf, o = origin
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        w_con, x_con = (tuple(lc), tuple(rc)) if w_pos == 0 else (tuple(rc), tuple(lc))
        if lb or rb:
            self.other.setdefault(leaf, set()).add("dot_general with batch dimensions")
            return
        m = _weight_map(o, self.shapes[leaf], w_con)
        if isinstance(m, str):
            self.other.setdefault(leaf, set()).add(f"dot_general ({m})")
            return
        self.sites[key] = _Site(leaf, "dot", 1 - w_pos, x_con, m[1], m[0], m[2], None)

    def _conv_site(self, eqn, key, origin):
        leaf, o = origin
        p = eqn.params
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            self.other.setdefault(leaf, set()).add("grouped conv_general_dilated")
            return
        rhs_spec = tuple(p["dimension_numbers"].rhs_spec)
        # Patches come out with features ordered (c_in, window...); lay the kernel out the same way.
        oc = o.transpose((rhs_spec[1], *rhs_spec[2:], rhs_spec[0]))
        oc = oc.reshape(-1, oc.shape[-1])
        m = _weight_map(oc, self.shapes[leaf], (0,))
        if isinstance(m, str):
            self.other.setdefault(leaf, set()).add(f"conv_general_dilated ({m})")
            return
        window = tuple(o.shape[a] for a in rhs_spec[2:])
        self.sites[key] = _Site(leaf, "conv", 0, None, m[1], m[0], m[2], window)


# ---------------------------------------------------------------------------------------- evaluation
def _rows_mask(mask, free_shape, path):
    if mask is None:
        return None
    ms = tuple(mask.shape)
    if tuple(free_shape[: len(ms)]) != ms:
        raise ValueError(
            f"row_mask has shape {ms}, which is not the leading dims of the input rows {tuple(free_shape)} of kernel {path!r}"
        )
    m = mask.reshape(ms + (1,) * (len(free_shape) - len(ms)))
    return jnp.broadcast_to(m, free_shape).reshape(-1)


def _site_rows(site: _Site, eqn, invals, mask, path):
    x = invals[site.x_pos]
    if site.kind == "dot":
        free = [a for a in range(x.ndim) if a not in site.x_con]
        x = x.transpose(free + list(site.x_con))
        free_shape = x.shape[: len(free)]
        rows = x.reshape(-1, math.prod(x.shape[len(free):]))
    else:
        p = eqn.params
        dn = p["dimension_numbers"]
        lhs_spec = tuple(dn.lhs_spec)
        x = x.transpose((lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
        nsp = len(lhs_spec) - 2
        sp = "DHW"[-nsp:] if nsp <= 3 else None
        if sp is None:
            raise ValueError(f"kernel {path!r}: convolutions with {nsp} spatial dims are not supported")
        patches = lax.conv_general_dilated_patches(
            x, site.params, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"],
            ("N" + sp + "C", "OI" + sp, "N" + sp + "C"), precision=lax.Precision.HIGHEST,
        )
        free_shape = patches.shape[:-1]
        rows = patches.reshape(-1, patches.shape[-1])
    m = _rows_mask(mask, free_shape, path)
    rows = rows.astype(jnp.float32)
    if m is None:
        return rows, jnp.float32(rows.shape[0])
    return jnp.where(m[:, None], rows, 0.0), jnp.sum(m, dtype=jnp.float32)


class _Evaluator:
    def __init__(self, analysis: _Analysis, paths: list[str]):
        self.an, self.paths = analysis, paths

    def run(self, jaxpr, consts, args, prefix, acc, mask):
        env = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, x in zip(jaxpr.constvars, consts, strict=True):
            env[v] = x
        for v, x in zip(jaxpr.invars, args, strict=True):
            env[v] = x
        for i, eqn in enumerate(jaxpr.eqns):
            key = prefix + (i,)
            invals = [read(v) for v in eqn.invars]
            if key in self.an.calls:
                sub, sub_consts = _sub_jaxpr(eqn)
                outs = self.run(sub, sub_consts, invals, key, acc, mask)
            else:
                bind_params = eqn.primitive.get_bind_params(eqn.params)
                if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
                    sub_fns, bind_params = bind_params
                    invals = [*sub_fns, *invals]
                with eqn.ctx.manager:
                    outs = eqn.primitive.bind(*invals, **bind_params)
                if not eqn.primitive.multiple_results:
                    outs = [outs]
            site = self.an.sites.get(key)
            if site is not None:
                path = self.paths[site.leaf]
                rows, count = _site_rows(site, eqn, invals, mask, path)
                g = jnp.matmul(rows.T, rows, precision=lax.Precision.HIGHEST)
                h, c = acc[site.leaf]
                if site.full:
                    h = h + g
                else:
                    ix = jnp.asarray(site.idx)
                    h = h.at[ix[:, None], ix[None, :]].add(g)
                acc[site.leaf] = (h, c + count)
            for v, x in zip(eqn.outvars, outs, strict=True):
                env[v] = x
        return [read(v) for v in jaxpr.outvars]


# ---------------------------------------------------------------------------------------------- API
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
        where: which leaves to collect for (default: float leaves with ``ndim >= 2``). With the default,
            selected leaves that are not a matmul weight (e.g. embedding tables, which are gathered) get
            ``None``; with an explicit ``where`` such a leaf is an error.
        row_mask: optional ``batch -> bool array`` over the leading (batch, token) dims of the layer inputs;
            rows where it is False (padding) are left out of every Gram matrix and of the counts.
        mesh: optional ``jax.sharding.Mesh``: each batch is split over ``data_axis`` (its leading dim must
            be divisible by that axis' size) and the Gram matrices are summed across devices.
        data_axis: the mesh axis that splits the batch.

    Returns:
        A pytree like ``params`` with a :class:`Hessian` (``h``: float32 ``(d_in, d_in)``, ``count``, ``in_axes``)
        at each selected kernel and ``None`` elsewhere.

    Raises:
        ValueError: ``where`` selects nothing or a leaf that is never a matmul weight (naming it and what it
            was used by), no batches, NaN/Inf reaching a kernel's input (naming the kernel), a ``row_mask`` that
            does not match the leading dims of the layer inputs, a batch not divisible over the mesh.
        TypeError: a non-callable ``apply_fn`` or ``row_mask``, a selected leaf that is not floating point.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be a callable (params, batch) -> output, got {apply_fn!r}")
    if row_mask is not None and not callable(row_mask):
        raise TypeError(f"row_mask must be None or a callable batch -> bool array, got {row_mask!r}")
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
        selected.append(i)
    if not selected:
        raise ValueError(f"where={where!r} selects no float leaf of the params; the tree's leaves are {paths[:8]}{' ...' if len(paths) > 8 else ''}")
    float_leaves = [_dequantized(x) if is_q(x) else x for x in leaves]
    if mesh is not None:
        mesh = auto_mesh(mesh)
        if data_axis not in mesh.axis_names:
            raise ValueError(f"data_axis={data_axis!r} is not an axis of the mesh {mesh.axis_names}")
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        float_leaves = [None if x is None else jax.device_put(x, rep) for x in float_leaves]

    def fn(leaf_list, batch):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaf_list), batch)

    compiled: dict[tuple, tuple] = {}
    acc = None
    found = None
    n_batches = 0
    for batch in batches:
        sig = _batch_signature(batch)
        if sig not in compiled:
            compiled[sig] = _build(fn, float_leaves, batch, selected, paths, where, row_mask, mesh)
        step, found_here = compiled[sig]
        if found is None:
            found = found_here
            acc = {i: (jnp.zeros((d, d), jnp.float32), jnp.zeros((), jnp.float32)) for i, (_, d) in found.items()}
            if mesh is not None:
                acc = jax.device_put(acc, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        elif found_here != found:
            raise ValueError("batches of different shapes use different kernels; collect them in separate calls")
        if mesh is not None:
            batch = _shard_batch(batch, mesh, data_axis)
        acc = step(acc, float_leaves, batch)
        n_batches += 1
    if n_batches == 0:
        raise ValueError("batches is empty: collect_hessians needs at least one calibration batch")
    out = [None] * len(leaves)
    for i, (in_axes, _) in found.items():
        h, c = acc[i]
        if not bool(jnp.all(jnp.isfinite(h))):
            raise ValueError(f"leaf {paths[i]!r}: its layer inputs hold NaN or Inf in the calibration batches (the Hessian is not finite)")
        out[i] = Hessian(h, c, in_axes)
    return jax.tree_util.tree_unflatten(treedef, out)


def auto_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """The same devices and axis names with automatic (GSPMD) sharding propagation on every axis, so that
    the model's jaxpr, traced without shardings, can be evaluated on sharded inputs."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {mesh!r}")
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def _dequantized(q):
    from compressjax.quantization import dequantize

    return dequantize(q)


def _shard_batch(batch, mesh, data_axis):
    n_dev = mesh.shape[data_axis]

    def put(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % n_dev:
            raise ValueError(f"batch leaf of shape {tuple(x.shape)} cannot be split over mesh axis {data_axis!r} of size {n_dev}: its leading dim must be divisible by {n_dev}")
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(data_axis)))

    return jax.tree_util.tree_map(put, batch)


def _build(fn, float_leaves, batch, selected, paths, where, row_mask, mesh):
    """Traces once for a batch shape: the analysis and the jit-compiled accumulation step."""
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
    origins = {}
    for i in selected:
        var = closed.jaxpr.invars[invar_of[i]]
        origins[var] = (i, np.arange(math.prod(shapes[i]), dtype=np.int64).reshape(shapes[i]))
    an = _Analysis(shapes)
    an.run(closed.jaxpr, origins, ())
    found: dict[int, tuple[tuple[int, ...], int]] = {}
    for site in an.sites.values():
        prev = found.get(site.leaf)
        if prev is not None and prev != (site.in_axes, site.d_in):
            raise ValueError(f"leaf {paths[site.leaf]!r} is contracted over different axes in different matmuls ({prev[0]} and {site.in_axes})")
        found[site.leaf] = (site.in_axes, site.d_in)
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
