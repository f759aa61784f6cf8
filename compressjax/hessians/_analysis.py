"""Trace-time analysis: which ``dot_general`` / ``conv_general_dilated`` takes which params leaf as its weight,
followed through shape-only operations and into control flow."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from jax.extend import core as jcore

_IDENTITY_PRIMS = {"convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier", "pvary", "pbroadcast"}
_CALL_PRIMS = {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}



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
    # In blocks of about 2^22 indices along ``axis``: no temporary as large as a stacked kernel's indices.
    first = first.astype(np.int64)
    block = max(1, 2**22 // max(1, o.size // n))
    shape = [-1 if a == axis else 1 for a in range(o.ndim)]
    for k0 in range(0, n, block):
        ks = np.arange(k0, min(n, k0 + block)).reshape(shape)
        if not np.array_equal(np.take(o, ks.reshape(-1), axis=axis), first + ks * step):
            return None
    return step


def _owned(o: np.ndarray) -> np.ndarray:
    """``o``, copied when it views a larger array (one layer of a stacked kernel's indices), so that a site
    keeps only its own indices alive, not those of every layer."""
    base = o.base
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return o.copy() if isinstance(base, np.ndarray) and base.size > o.size else o


def _weight_map(o: np.ndarray, kshape: tuple[int, ...], con: tuple[int, ...], bat: tuple[int, ...], dyn: tuple):
    """Classifies the kernel axes of a weight operand with index array ``o`` contracted over ``con`` and
    batched over ``bat``: input axes (vary along ``con``), output axes (vary along the free dims) and layer
    axes (vary along ``bat``, indexed at run time, or fixed to one index of a length > 1 axis). Returns a
    dict, or a reason string."""
    free = tuple(a for a in range(o.ndim) if a not in con and a not in bat)
    nb = math.prod(o.shape[a] for a in bat)
    nc = math.prod(o.shape[a] for a in con)
    o3 = o.transpose(bat + con + free).reshape(nb, nc, -1)
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
    # One kernel axis's coordinates at a time (what np.unravel_index would give for all axes at once, in the
    # index arrays' dtype): a stacked kernel's index array is as large as the kernel.
    along_con, along_bat, varies_con = {}, {}, {}
    for a in range(len(kshape)):
        c = (o3 // strides[a]) % kshape[a]
        along_con[a], along_bat[a] = c[0, :, 0], c[:, 0, 0]
        vb = bool(np.any(c != c[:1])) if nb > 1 else False
        vc = varies_con[a] = bool(np.any(c != c[:, :1]))
        vf = bool(np.any(c != c[:, :, :1]))
        del c
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
    if not any(kshape[a] > 1 or varies_con[a] for a in in_axes) and nc > 1:
        return "no kernel axis is contracted"
    if not in_axes:
        return "no kernel axis is contracted"
    in_shape = [kshape[a] for a in in_axes]
    idx = np.ravel_multi_index([along_con[a].astype(np.int64) for a in in_axes], in_shape)
    lcoords = np.stack([along_bat[a].astype(np.int64) for a in layer_axes], axis=-1) if layer_axes else np.zeros((nb, 0), np.int64)
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
                self.sites[key].w_org = (w_pos, _owned(o), dyn)
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
        self.sites[key].w_org = (1, _owned(o), dyn)
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
