"""Calibration statistics for any JAX model: the input Gram matrix of every matmul weight.

:func:`collect_hessians` traces ``apply_fn(params, batch)`` to a jaxpr and finds each ``dot_general`` and
``conv_general_dilated`` whose weight operand derives from a selected params leaf through shape-only
operations (``reshape``, ``transpose``, ``broadcast_in_dim``, ``squeeze``, ``slice``, ``rev`` and dtype
casts). It then evaluates the jaxpr with a small interpreter that, besides computing every equation, adds
``X^T X`` of the other operand (the layer input; for a convolution, its patches) to that leaf's Gram
matrix. The interpreter recurses into ``jit``/``pjit``, ``closed_call``, ``remat``, ``custom_jvp_call`` and
``custom_vjp_call`` sub-jaxprs. No model code changes: Flax linen, Flax NNX (``nnx.split`` state with an
``nnx.merge`` closure), equinox modules and plain functions of a dict all work alike.

Control flow: a kernel is followed into ``scan`` (its slice per iteration: the index array of iteration 0
plus a run-time step times the iteration), ``while`` (``fori_loop``) bodies that ``dynamic_slice`` a stacked
leaf by the loop counter (the clamped start read at run time), ``cond``/``switch`` branches, batched
``dot_general`` (the batch axes of the weight are layer axes: MoE experts), grouped convolutions and
``shard_map`` bodies. Loops and branches holding a kernel are evaluated as ``lax.scan`` /
``lax.while_loop`` / ``lax.switch`` / ``shard_map`` with the accumulators in the carry, never unrolled, so
compile time does not grow with the number of layers. What cannot be followed is tracked too: a value
computed from a selected leaf (and not from the batch) by anything but a shape-only operation, that reaches
a matmul or convolution, is an error naming the leaf and the primitive, with any ``where``; values that
depend on the batch (an embedding lookup, a norm scale times activations) are data.

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

_IDENTITY_PRIMS = {"convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier", "pvary", "pbroadcast"}
_CALL_PRIMS = {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}


@jax.tree_util.register_pytree_node_class
class Hessian:
    """The input Gram matrix of one kernel: ``h = sum x x^T`` over ``count`` input rows.

    A stacked kernel (layers scanned over, MoE experts in a batched matmul, a grouped convolution) has one
    Gram matrix per slice (and group); see ``layer_axes`` and ``groups``.

    Attributes:
        h: float32 ``(*layer_shape, [groups,] d_in, d_in)``, indexed by the kernel's input positions (see the
            module docstring); the ``groups`` axis is there only when ``groups > 1``.
        count: float32 ``(*layer_shape, [groups])``: the number of input rows summed per matrix (over every
            use of the kernel).
        in_axes: the kernel axes that are contracted with the input (static), in kernel order.
        layer_axes: the kernel axes that index independent kernels (static), in kernel order: the scan axis of
            a stacked kernel (``(0,)`` for ``(L, in, out)``, ``(1,)`` for MaxText's ``(in, L, out)``), the
            expert axis of a batched matmul; ``()`` for a plain kernel.
        groups: ``feature_group_count`` of a grouped or depthwise convolution (static): the single output
            axis splits into ``groups`` contiguous blocks, block ``g`` sees only its group's input channels.
    """

    def __init__(self, h, count, in_axes: tuple[int, ...], layer_axes: tuple[int, ...] = (), groups: int = 1):
        self.h = h
        self.count = count
        self.in_axes = tuple(int(a) for a in in_axes)
        self.layer_axes = tuple(int(a) for a in layer_axes)
        self.groups = int(groups)

    def tree_flatten(self):
        return (self.h, self.count), (self.in_axes, self.layer_axes, self.groups)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def d_in(self) -> int:
        return int(self.h.shape[-1])

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """The shape of the leading axes of ``h`` that index layers (not groups)."""
        return tuple(int(d) for d in self.h.shape[: len(self.layer_axes)])

    def __repr__(self) -> str:
        extra = ""
        if self.layer_axes:
            extra += f", layer_axes={self.layer_axes}, layer_shape={self.layer_shape}"
        if self.groups > 1:
            extra += f", groups={self.groups}"
        return f"Hessian(d_in={self.d_in}, in_axes={self.in_axes}{extra}, count={self.count})"


# ------------------------------------------------------------------------------------------- analysis
class _V:
    """What the analysis knows of one jaxpr value.

    ``org``: ``(leaf, o, dyn)`` when the value is a view of selected leaf ``leaf`` through shape-only
    operations: ``o`` holds, for every element, its flat index in the leaf, and ``dyn`` is a tuple of
    ``(delta, token)``: at run time the flat index is ``o + delta * value(token)`` (a scan iteration, a
    ``dynamic_slice`` start). ``lost``: ``{leaf: primitive}`` for a value computed from selected leaves, not
    from the batch, through something the capture cannot follow. ``batch``: the value depends on the batch.
    """

    __slots__ = ("org", "lost", "batch")

    def __init__(self, org=None, lost=None, batch=False):
        self.org, self.lost, self.batch = org, dict(lost or {}), bool(batch)


class _Site:
    """A matmul whose weight operand comes from params leaf ``leaf`` (static facts found at trace time)."""

    def __init__(self, leaf, kind, x_pos, x_con, x_bat, m, params, groups):
        self.leaf, self.kind, self.x_pos, self.x_con, self.x_bat = leaf, kind, x_pos, x_con, x_bat
        self.in_axes, self.idx, self.d_in = m["in_axes"], m["idx"], m["d_in"]
        self.layer_axes, self.lcoords, self.ldyn = m["layer_axes"], m["lcoords"], m["ldyn"]
        self.params, self.groups = params, groups
        self.full = len(self.idx) == self.d_in and np.array_equal(self.idx, np.arange(self.d_in))
        self.lbase: np.ndarray | None = None  # (B,) flat index into the leaf's (layers * groups) matrices
        self.lsteps: list[tuple[int, Any]] = []  # (flat step, token) added at run time
        self.w_org: tuple = ()  # (operand position, index array, run-time steps) of the weight operand


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
    if name == "expand_dims":
        return np.expand_dims(o, tuple(p["dimensions"]))
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


def _has_jaxpr(params) -> bool:
    for v in params.values():
        vs = v if isinstance(v, tuple | list) else (v,)
        if any(isinstance(x, jcore.Jaxpr | jcore.ClosedJaxpr) for x in vs):
            return True
    return False


def _progression(o: np.ndarray, axis: int) -> int | None:
    """The flat step ``delta`` when ``o`` along ``axis`` is ``o[0] + k * delta`` everywhere, else ``None``."""
    n = o.shape[axis]
    if n == 1:
        return 0
    first = np.take(o, [0], axis=axis)
    delta = np.take(o, [1], axis=axis) - first
    if not np.all(delta == delta.flat[0]):
        return None
    step = int(delta.flat[0])
    k = np.arange(n).reshape([-1 if a == axis else 1 for a in range(o.ndim)])
    return step if np.array_equal(o, first + k * step) else None


def _weight_map(o: np.ndarray, kshape: tuple[int, ...], con: tuple[int, ...], bat: tuple[int, ...], dyn: tuple):
    """Classifies the kernel axes of a weight operand with index array ``o`` contracted over ``con`` and
    batched over ``bat``: input axes (vary along ``con``), output axes (vary along the free dims) and layer
    axes (vary along ``bat``, indexed at run time, or fixed to one index of a length > 1 axis). Returns a
    dict, or a reason string."""
    free = tuple(a for a in range(o.ndim) if a not in con and a not in bat)
    nb = math.prod(o.shape[a] for a in bat)
    nc = math.prod(o.shape[a] for a in con)
    o3 = o.transpose(bat + con + free).reshape(nb, nc, -1)
    coords = np.unravel_index(o3, kshape)
    strides = [math.prod(kshape[a + 1:]) for a in range(len(kshape))]
    dyn_axes: list[tuple[int, int, Any]] = []
    for delta, token in dyn:
        if delta == 0:
            continue
        hit = None
        for a in range(len(kshape)):
            if delta % strides[a] == 0 and abs(delta) < strides[a] * kshape[a]:
                hit = a
                break
        if hit is None:
            return f"a run-time index moves by {delta} elements, which is not a step along one kernel axis"
        dyn_axes.append((hit, delta // strides[hit], token))
    dyn_set = {a for a, _, _ in dyn_axes}
    in_axes, out_axes, layer_axes = [], [], []
    for a in range(len(kshape)):
        c = coords[a]
        vb = bool(np.any(c != c[:1])) if nb > 1 else False
        vc = bool(np.any(c != c[:, :1]))
        vf = bool(np.any(c != c[:, :, :1]))
        if vb + vc + vf > 1:
            return f"kernel axis {a} is used as more than one of contracted, batch and output axis"
        if a in dyn_set and vf and all(tok[0] == "shard" for b, _, tok in dyn_axes if b == a):
            dyn_axes = [t for t in dyn_axes if t[0] != a]  # an output axis split over shard_map devices
            dyn_set.discard(a)
        if a in dyn_set and any(tok[0] == "shard" for b, _, tok in dyn_axes if b == a):
            return f"kernel axis {a} is split over the devices of a shard_map and {'contracted' if vc else 'used as a layer axis'} (only output axes may be split)"
        if a in dyn_set and (vc or vf):
            return f"kernel axis {a} is indexed at run time and also {'contracted' if vc else 'kept'}"
        if vc:
            in_axes.append(a)
        elif vf:
            out_axes.append(a)
        elif vb or a in dyn_set or kshape[a] > 1:
            layer_axes.append(a)
        else:  # a constant axis of length 1 counts as an input axis (e.g. a 1x1 convolution window)
            in_axes.append(a)
    if not any(kshape[a] > 1 or np.any(coords[a] != coords[a][:, :1]) for a in in_axes) and nc > 1:
        return "no kernel axis is contracted"
    if not in_axes:
        return "no kernel axis is contracted"
    in_shape = [kshape[a] for a in in_axes]
    idx = np.ravel_multi_index([coords[a][0, :, 0] for a in in_axes], in_shape)
    lcoords = np.stack([coords[a][:, 0, 0] for a in layer_axes], axis=-1) if layer_axes else np.zeros((nb, 0), np.int64)
    ldyn = [(layer_axes.index(a), m, tok) for a, m, tok in dyn_axes]
    return {"in_axes": tuple(in_axes), "idx": idx, "d_in": math.prod(in_shape), "layer_axes": tuple(layer_axes), "lcoords": lcoords, "ldyn": ldyn}


class _Analysis:
    """Walks a jaxpr once, following index arrays of the selected leaves (into call, scan, while and cond
    sub-jaxprs), and records the matmul sites, the run-time indices they need, and what cannot be followed."""

    def __init__(self, shapes: dict[int, tuple[int, ...]]):
        self.shapes = shapes
        self.sites: dict[tuple, _Site] = {}
        self.ds_tokens: dict[tuple, list[tuple[int, tuple]]] = {}  # dynamic_slice key -> [(operand axis, token)]
        self.calls: set[tuple] = set()  # equations with a site or a run-time index inside: interpreted
        self.other: dict[int, set[str]] = {}  # leaf -> primitives that consumed it otherwise
        self.errors: dict[int, str] = {}  # leaf -> why the capture cannot follow it into a matmul
        self.marks = 0

    def _use(self, leaf: int, name: str) -> None:
        self.other.setdefault(leaf, set()).add(name)

    def _fail(self, leaf: int, msg: str) -> None:
        self.errors.setdefault(leaf, msg)

    def run(self, jaxpr, ins: list, prefix: tuple) -> list:
        env = {v: x for v, x in zip(jaxpr.invars, ins, strict=True) if x is not None}

        def get(v):
            return None if isinstance(v, jcore.Literal) else env.get(v)

        for i, eqn in enumerate(jaxpr.eqns):
            vals = [get(v) for v in eqn.invars]
            if all(x is None for x in vals):
                continue
            key = prefix + (i,)
            before = self.marks
            outs = self._eqn(eqn, vals, key)
            if self.marks > before:
                self.calls.add(key)
            for v, x in zip(eqn.outvars, outs, strict=True):
                if x is not None:
                    env[v] = x
        return [get(v) for v in jaxpr.outvars]

    # -- propagation helpers
    def _mix(self, vals, name: str, n_out: int, keep_lost: bool = False) -> list:
        """Default rule: outputs depend on every input; a followed leaf is no longer followed (lost at
        ``name``); values that depend on the batch are data (an embedding lookup, a norm scale times x)."""
        lost: dict[int, str] = {}
        batch = False
        for x in vals:
            if x is None:
                continue
            batch |= x.batch
            for leaf, prim in x.lost.items():
                lost.setdefault(leaf, prim)
            if x.org is not None:
                self._use(x.org[0], name)
                lost.setdefault(x.org[0], name)
        if batch and not keep_lost:
            lost = {}
        if not lost and not batch:
            return [None] * n_out
        return [_V(None, lost, batch) for _ in range(n_out)]

    def _fail_lost(self, vals, name: str) -> None:
        for x in vals:
            if x is not None:
                for leaf, prim in x.lost.items():
                    self._fail(leaf, f"it reaches {name} through {prim!r}, which collect_hessians cannot follow")

    def _eqn(self, eqn, vals, key) -> list:
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            return self.run(sub[0], vals, key)
        if name == "scan":
            return self._scan(eqn, vals, key)
        if name == "while":
            return self._while(eqn, vals, key)
        if name == "cond":
            return self._cond(eqn, vals, key)
        if name == "shard_map":
            return self._shard_map(eqn, vals, key)
        if name == "dot_general":
            return self._dot(eqn, vals, key)
        if name == "conv_general_dilated":
            return self._conv(eqn, vals, key)
        if _has_jaxpr(eqn.params):  # a higher-order primitive the capture does not enter (e.g. shard_map)
            for x in vals:
                if x is not None:
                    leaves = ([x.org[0]] if x.org is not None else []) + list(x.lost)
                    for leaf in leaves:
                        self._fail(leaf, f"it enters {name!r}, which collect_hessians cannot look into")
            return self._mix(vals, name, n_out)
        tracked = [k for k, x in enumerate(vals) if x is not None and x.org is not None]
        if name == "dynamic_slice" and tracked == [0]:
            return [self._dynamic_slice(eqn, vals, key)]
        if len(tracked) == 1 and n_out == 1 and all(x is None for k, x in enumerate(vals) if k != tracked[0]):
            leaf, o, dyn = vals[tracked[0]].org
            out = _origin_op(eqn, o)
            if out is not None:
                return [_V((leaf, out, dyn))]
        if name == "gather" and vals[0] is not None and (vals[0].org is not None or vals[0].lost):
            # Gathering whole matrices (MoE weights picked per token) keeps them weights; rows (embeddings) are data.
            if sum(1 for s in eqn.params["slice_sizes"] if s > 1) >= 2:
                return self._mix(vals, name, n_out, keep_lost=True)
        return self._mix(vals, name, n_out)

    def _dynamic_slice(self, eqn, vals, key):
        x = vals[0]
        leaf, o, dyn = x.org
        sizes = tuple(eqn.params["slice_sizes"])
        starts = eqn.invars[1:]
        sl, toks = [], []
        for k, (n, s) in enumerate(zip(o.shape, sizes, strict=True)):
            v = starts[k]
            if s == n:
                sl.append(slice(None))
                continue
            if isinstance(v, jcore.Literal):
                st = int(np.clip(int(v.val), 0, n - s))
                sl.append(slice(st, st + s))
                continue
            step = _progression(o, k)
            if step is None:
                self._use(leaf, "dynamic_slice")
                return _V(None, {leaf: "dynamic_slice (a run-time slice of a non-uniform axis)"}, any(v is not None and v.batch for v in vals[1:]))
            sl.append(slice(0, s))
            tok = ("ds", key, k)
            toks.append((k, tok))
            dyn = dyn + ((step, tok),)
        if toks:
            self.ds_tokens[key] = toks
            self.marks += 1
        return _V((leaf, o[tuple(sl)], dyn))

    def _dot(self, eqn, vals, key):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        t = [x is not None and x.org is not None for x in vals]
        if t[0] and t[1]:
            for x in vals:
                self._use(x.org[0], "dot_general with another params leaf")
            return self._mix(vals, "dot_general", 1)
        self._fail_lost(vals, "dot_general")
        if t[0] or t[1]:
            w_pos = 0 if t[0] else 1
            leaf, o, dyn = vals[w_pos].org
            w_con, x_con = (tuple(lc), tuple(rc)) if w_pos == 0 else (tuple(rc), tuple(lc))
            w_bat, x_bat = (tuple(lb), tuple(rb)) if w_pos == 0 else (tuple(rb), tuple(lb))
            m = _weight_map(o, self.shapes[leaf], w_con, w_bat, dyn)
            if isinstance(m, str):
                self._fail(leaf, f"it is the weight of a dot_general where {m}")
            else:
                self.sites[key] = _Site(leaf, "dot", 1 - w_pos, x_con, x_bat, m, None, 1)
                self.sites[key].w_org = (w_pos, o, dyn)
                self.marks += 1
            x = vals[1 - w_pos]
            return [None if x is None or not x.batch else _V(None, None, True)]
        return self._mix(vals, "dot_general", 1)

    def _conv(self, eqn, vals, key):
        lhs, rhs = vals
        p = eqn.params
        if lhs is not None and lhs.org is not None:
            self._fail(lhs.org[0], "it is the input (not the kernel) of a conv_general_dilated")
        self._fail_lost(vals, "conv_general_dilated")
        if rhs is None or rhs.org is None:
            return self._mix(vals, "conv_general_dilated", 1)
        leaf, o, dyn = rhs.org
        if p["batch_group_count"] != 1:
            self._fail(leaf, f"it is the kernel of a conv_general_dilated with batch_group_count={p['batch_group_count']}")
            return self._mix(vals, "conv_general_dilated", 1)
        rhs_spec = tuple(p["dimension_numbers"].rhs_spec)
        # Patches come out with features ordered (c_in, window...); lay the kernel out the same way.
        oc = o.transpose((rhs_spec[1], *rhs_spec[2:], rhs_spec[0]))
        oc = oc.reshape(-1, oc.shape[-1])
        m = _weight_map(oc, self.shapes[leaf], (0,), (), dyn)
        if isinstance(m, str):
            self._fail(leaf, f"it is the kernel of a conv_general_dilated where {m}")
            return self._mix(vals, "conv_general_dilated", 1)
        window = tuple(o.shape[a] for a in rhs_spec[2:])
        self.sites[key] = _Site(leaf, "conv", 0, None, (), m, window, int(p["feature_group_count"]))
        self.sites[key].w_org = (1, o, dyn)
        self.marks += 1
        return [None if lhs is None or not lhs.batch else _V(None, None, True)]

    # -- control flow
    def _loop_body(self, jaxpr, fixed: list, carry: list, tail: list, key, name: str) -> tuple[list, list]:
        """Runs a loop body until what the carry depends on stops changing; a followed leaf in the carry
        stays followed only when the body passes it through unchanged."""
        carry = list(carry)
        for _ in range(8):
            outs = self.run(jaxpr, [*fixed, *carry, *tail], key)
            new, changed = [], False
            for c, o in zip(carry, outs[: len(carry)], strict=True):
                if o is c:
                    new.append(c)
                    continue
                m = self._mix([c, o], f"{name} carry", 1)[0]
                if m is None or (c is not None and c.org is None and m.batch == c.batch and m.lost.keys() == c.lost.keys()):
                    new.append(c if m is not None else None)
                    changed |= m is None and c is not None
                    continue
                new.append(m)
                changed = True
            carry = new
            if not changed:
                break
        return carry, outs[len(carry):]

    def _scan(self, eqn, vals, key):
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        body = p["jaxpr"].jaxpr
        xs = []
        for x in vals[nc + nk:]:
            if x is None or x.org is None:
                xs.append(x)
                continue
            leaf, o, dyn = x.org
            step = _progression(o, 0)
            if step is None:
                self._use(leaf, "scan")
                xs.append(_V(None, {leaf: "scan (over a kernel axis that is not uniform)"}, False))
                continue
            xs.append(_V((leaf, o[0], dyn + ((step, ("scan", key)),) if step else dyn)))
        carry, ys = self._loop_body(body, vals[:nc], vals[nc:nc + nk], xs, key, "scan")
        outs = list(carry)
        for y in ys:
            outs.append(self._mix([y], "scan output", 1)[0] if y is not None and y.org is not None else y)
        return outs

    def _while(self, eqn, vals, key):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, init = vals[:cn], vals[cn:cn + bn], vals[cn + bn:]
        carry, _ = self._loop_body(p["body_jaxpr"].jaxpr, bconsts, init, [], key + ("body",), "while")
        before = self.marks
        self.run(p["cond_jaxpr"].jaxpr, [*cconsts, *carry], key + ("cond",))
        if self.marks > before:
            for s in [k for k in self.sites if k[: len(key) + 1] == key + ("cond",)]:
                self._fail(self.sites.pop(s).leaf, "it is used in the condition of a while_loop")
        return carry

    def _shard_map(self, eqn, vals, key):
        p = eqn.params
        body = p["jaxpr"]
        body = body.jaxpr if isinstance(body, jcore.ClosedJaxpr) else body
        ins = []
        for i, x in enumerate(vals):
            if x is None or x.org is None:
                ins.append(x)
                continue
            leaf, o, dyn = x.org
            local = body.invars[i].aval.shape
            sl = []
            for dim in range(o.ndim):
                if o.shape[dim] == local[dim]:
                    sl.append(slice(None))
                    continue
                step = _progression(o, dim)
                if step is None:
                    self._fail(leaf, "it enters a shard_map split along a kernel axis collect_hessians cannot follow")
                    step = 0
                sl.append(slice(0, local[dim]))
                dyn = dyn + ((step * local[dim], ("shard", key, i, dim)),)
            ins.append(_V((leaf, o[tuple(sl)], dyn)))
        before = self.marks
        outs = self.run(body, ins, key)
        if self.marks > before and not p.get("check_vma", True):
            for k, site in self.sites.items():
                if k[: len(key)] == key:
                    self._fail(site.leaf, "it is used inside a shard_map with check_vma=False (which rows vary over which devices is unknown)")
        return [self._mix([y], "shard_map output", 1)[0] if y is not None and y.org is not None else y for y in outs]

    def _cond(self, eqn, vals, key):
        branches = eqn.params["branches"]
        results = [self.run(br.jaxpr, vals[1:], key + (b,)) for b, br in enumerate(branches)]
        outs = []
        idx = vals[0]
        for k in range(len(eqn.outvars)):
            rs = [r[k] for r in results]
            if all(r is None for r in rs):
                outs.append(None if idx is None or not idx.batch else _V(None, None, True))
                continue
            if all(r is not None and r.org is not None and r.org is rs[0].org for r in rs) and any(x is not None and x.org is rs[0].org for x in vals[1:]):
                outs.append(rs[0])
                continue
            outs.append(self._mix([*rs, idx], "cond output", 1)[0])
        return outs


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
    """The layer-input rows of one matmul, ``(B, n, d_in)`` float32 (``B``: batch positions of a batched
    matmul or groups of a grouped convolution, else 1), and their counts ``(B,)``."""
    x = invals[site.x_pos]
    if site.kind == "dot":
        bat = list(site.x_bat)
        free = [a for a in range(x.ndim) if a not in site.x_con and a not in bat]
        x = x.transpose(bat + free + list(site.x_con))
        nb = math.prod(x.shape[: len(bat)])
        free_shape = x.shape[len(bat): len(bat) + len(free)]
        rows = x.reshape(nb, math.prod(free_shape), math.prod(x.shape[len(bat) + len(free):]))
    else:
        p = eqn.params
        lhs_spec = tuple(p["dimension_numbers"].lhs_spec)
        x = x.transpose((lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
        nsp = len(lhs_spec) - 2
        if nsp == 0:  # a convolution without spatial dims is a matmul over the channels
            patches = x
        elif nsp <= 3:
            sp = "DHW"[-nsp:]
            patches = lax.conv_general_dilated_patches(
                x, site.params, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"],
                ("N" + sp + "C", "OI" + sp, "N" + sp + "C"), precision=lax.Precision.HIGHEST,
            )
        else:
            raise ValueError(f"kernel {path!r}: convolutions with {nsp} spatial dims are not supported (at most 3)")
        free_shape = patches.shape[:-1]
        g = site.groups
        # Patch features are ordered (c_in, window); group g owns input channels [g*c, (g+1)*c).
        rows = patches.reshape(-1, g, patches.shape[-1] // g).transpose(1, 0, 2)
    m = _rows_mask(mask, free_shape, path)
    rows = rows.astype(jnp.float32)
    nb, n = rows.shape[0], rows.shape[1]
    if m is None:
        return rows, jnp.full((nb,), n, jnp.float32)
    return jnp.where(m[None, :, None], rows, 0.0), jnp.broadcast_to(jnp.sum(m, dtype=jnp.float32), (nb,))


def _varying(x) -> frozenset:
    """The shard_map mesh axes over which ``x`` holds different values on different devices."""
    try:
        aval = jax.typeof(x)
    except TypeError:
        return frozenset()
    mat = getattr(aval, "manual_axis_type", None)
    v = getattr(mat, "varying", None) if mat is not None else getattr(aval, "vma", None)
    return frozenset(v or ())


def _accumulate(site: _Site, rows, counts, h, c, tokens, varying=frozenset()):
    """Adds ``rows^T rows`` of every batch position / group to its matrix of the leaf's stacked accumulator."""
    g = jnp.einsum("bnd,bne->bde", rows, rows, precision=lax.Precision.HIGHEST)
    if varying:  # inside a shard_map: every device holds other rows; sum them (the result is the same everywhere)
        g, counts = lax.psum((g, counts), tuple(sorted(varying)))
    same = _varying(g) - varying  # typed as varying, equal in value (see pvary in _Evaluator.run)
    if same:
        g, counts = lax.pmax((g, counts), tuple(sorted(same)))
    li = jnp.asarray(site.lbase, jnp.int32)
    for step, tok in site.lsteps:
        li = li + jnp.int32(step) * jnp.asarray(tokens[tok], jnp.int32)
    if site.full:
        h = h.at[li].add(g)
    else:
        ix = jnp.asarray(site.idx)
        h = h.at[li[:, None, None], ix[None, :, None], ix[None, None, :]].add(g)
    return h, c.at[li].add(counts)


class _Evaluator:
    """Evaluates a jaxpr and, at every site, adds the layer inputs' Gram matrix to ``acc`` (``{leaf: (h, count)}``
    with ``h`` of shape ``(layers * groups, d_in, d_in)``). Loops and branches that hold a site run as
    ``lax.scan`` / ``lax.while_loop`` / ``lax.switch`` with the accumulators in their carry, so the traced
    size does not grow with the number of iterations."""

    def __init__(self, analysis: _Analysis, paths: list[str]):
        self.an, self.paths = analysis, paths
        self.tokens: dict[tuple, Any] = {}

    def run(self, jaxpr, consts, args, prefix, acc, mask):
        env = {}
        pre_vary: dict = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, x in zip(jaxpr.constvars, consts, strict=True):
            env[v] = x
        for v, x in zip(jaxpr.invars, args, strict=True):
            env[v] = x
        for i, eqn in enumerate(jaxpr.eqns):
            key = prefix + (i,)
            invals = [read(v) for v in eqn.invars]
            if key in self.an.calls and eqn.primitive.name in ("scan", "while", "cond", "shard_map"):
                outs = getattr(self, "_" + eqn.primitive.name)(eqn, invals, key, acc, mask)
            elif key in self.an.calls and _sub_jaxpr(eqn) is not None:
                sub, sub_consts = _sub_jaxpr(eqn)
                outs = self.run(sub, sub_consts, invals, key, acc, mask)
            else:
                outs = _bind(eqn, invals)
            toks = self.an.ds_tokens.get(key)
            if toks is not None:
                op = invals[0]
                for k, tok in toks:
                    n, s = op.shape[k], eqn.params["slice_sizes"][k]
                    self.tokens[tok] = jnp.clip(jnp.asarray(invals[1 + k], jnp.int32), 0, n - s)
            if eqn.primitive.name in ("pvary", "pbroadcast"):
                # shard_map marks a device-invariant value as varying before it meets a split weight; its rows
                # are still the same on those devices, so sum them only over the axes they truly vary over.
                for v, x in zip(eqn.outvars, eqn.invars, strict=True):
                    pre_vary[v] = pre_vary.get(x, None) if not isinstance(x, jcore.Literal) and x in pre_vary else _varying(read(x))
            site = self.an.sites.get(key)
            if site is not None:
                rows, counts = _site_rows(site, eqn, invals, mask, self.paths[site.leaf])
                xv = eqn.invars[site.x_pos]
                varying = pre_vary[xv] if not isinstance(xv, jcore.Literal) and xv in pre_vary else _varying(invals[site.x_pos])
                acc[site.leaf] = _accumulate(site, rows, counts, *acc[site.leaf], self.tokens, varying)
            for v, x in zip(eqn.outvars, outs, strict=True):
                env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def _scan(self, eqn, invals, key, acc, mask):
        p = eqn.params
        nc, nk, n = p["num_consts"], p["num_carry"], p["length"]
        body = p["jaxpr"]
        consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
        tok = ("scan", key)

        def step(carry, x):
            i, a, c = carry
            a = dict(a)
            self.tokens[tok] = (n - 1 - i) if p["reverse"] else i
            outs = self.run(body.jaxpr, body.consts, [*consts, *c, *x], key, a, mask)
            return (i + 1, a, outs[:nk]), outs[nk:]

        (_, a, carry), ys = lax.scan(step, (jnp.int32(0), dict(acc), list(init)), list(xs), length=n,
                                     reverse=p["reverse"], unroll=p["unroll"])
        acc.update(a)
        return [*carry, *ys]

    def _while(self, eqn, invals, key, acc, mask):
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
        cj, bj = p["cond_jaxpr"], p["body_jaxpr"]

        def cond(st):
            return self.run(cj.jaxpr, cj.consts, [*cconsts, *st[1]], key + ("cond",), {}, mask)[0]

        def body(st):
            a = dict(st[0])
            outs = self.run(bj.jaxpr, bj.consts, [*bconsts, *st[1]], key + ("body",), a, mask)
            return a, outs

        a, outs = lax.while_loop(cond, body, (dict(acc), list(init)))
        acc.update(a)
        return outs

    def _shard_map(self, eqn, invals, key, acc, mask):
        p = eqn.params
        if mask is not None:
            raise ValueError("row_mask is not supported for kernels used inside a shard_map (the mask is global, the rows there are per device)")
        body = p["jaxpr"]
        jaxpr, consts = (body.jaxpr, body.consts) if isinstance(body, jcore.ClosedJaxpr) else (body, ())
        P = jax.sharding.PartitionSpec

        def f(acc_in, *args):
            inc = {k: (jnp.zeros_like(h), jnp.zeros_like(c)) for k, (h, c) in acc_in.items()}
            outs = self.run(jaxpr, consts, list(args), key, inc, None)
            return list(outs), {k: (acc_in[k][0] + inc[k][0], acc_in[k][1] + inc[k][1]) for k in acc_in}

        kw = {}
        if p.get("newly_manual_axes"):
            kw["axis_names"] = set(p["newly_manual_axes"])
        sm = jax.shard_map(f, mesh=p["mesh"], in_specs=(P(), *p["in_specs"]), out_specs=(list(p["out_specs"]), P()),
                           check_vma=True, **kw)
        outs, a = sm(dict(acc), *invals)
        acc.update(a)
        return outs

    def _cond(self, eqn, invals, key, acc, mask):
        def branch(b, br):
            def f(a, ops):
                a = dict(a)
                return a, self.run(br.jaxpr, br.consts, ops, key + (b,), a, mask)
            return f

        fns = [branch(b, br) for b, br in enumerate(eqn.params["branches"])]
        a, outs = lax.switch(invals[0], fns, dict(acc), list(invals[1:]))
        acc.update(a)
        return outs


def _bind(eqn, invals):
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bind_params, tuple):  # older jax: (subfuns, params)
        sub_fns, bind_params = bind_params
        invals = [*sub_fns, *invals]
    with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **bind_params)
    return outs if eqn.primitive.multiple_results else [outs]


# ---------------------------------------------------------------------------------------------- API
# Traced and compiled accumulation steps, reused across calls with the same apply_fn, params shapes,
# selection and batch shape (so calling collect_hessians again, e.g. per layerwise stage or per sweep point,
# does not retrace the model). Small and first-in-first-out: it holds references to apply_fn.
_CACHE: dict[tuple, tuple] = {}
_CACHE_SIZE = 16
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
    float_leaves = [_dequantized(x) if is_q(x) else x for x in leaves]
    if mesh is not None:
        mesh = auto_mesh(mesh)
        if data_axis not in mesh.axis_names:
            raise ValueError(f"data_axis={data_axis!r} is not an axis of the mesh {mesh.axis_names}")
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        float_leaves = [None if x is None else jax.device_put(x, rep) for x in float_leaves]

    def fn(leaf_list, batch):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaf_list), batch)

    leaf_sig = tuple(None if x is None else (tuple(x.shape), str(x.dtype)) for x in float_leaves)
    base_key = (apply_fn, row_mask, treedef, leaf_sig, tuple(selected), where if isinstance(where, str | None) else id(where), mesh)
    acc = None
    found = None
    n_batches = 0
    for batch in batches:
        if mesh is not None:  # before tracing: the jaxpr then sees the batch on the (automatic) mesh
            batch = _shard_batch(batch, mesh, data_axis)
        key = (*base_key, _batch_signature(batch))
        try:
            hit = _CACHE.get(key)
        except TypeError:  # an unhashable part (e.g. a where callable's closure): no cross-call cache
            key, hit = None, None
        if hit is None:
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
    ins = [None] * len(closed.jaxpr.invars)
    for i in selected:
        ins[invar_of[i]] = _V((i, np.arange(math.prod(shapes[i]), dtype=np.int64).reshape(shapes[i]), ()))
    for k in range(n_leaves, len(closed.jaxpr.invars)):
        ins[k] = _V(None, None, True)
    an = _Analysis(shapes)
    an.run(closed.jaxpr, ins, ())
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
