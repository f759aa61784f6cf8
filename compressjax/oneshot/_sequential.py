"""Sequential calibration in one pass: every kernel compressed right before its first use.

:func:`sequential` evaluates the model's jaxpr once over the whole calibration set: the batches are stacked
and advance together, equation by equation (each equation ``vmap``-ed over the batches and compiled once), and
only the values still needed later are kept. At each matmul whose weight slice has not been compressed yet,
the layer inputs of all batches give that slice's Hessian, ``compress`` solves it, and the compressed slice
is used from then on: later layers (and later iterations of a ``scan``) are calibrated on inputs computed
through the already-compressed earlier ones, as in the papers' sequential mode (Frantar et al., "GPTQ",
ICLR 2023, Sec. 4; Frantar & Alistarh, "SparseGPT", ICML 2023), at the cost of about one forward pass
instead of one pass per stage (:func:`~compressjax.layerwise`).

With ``float_target`` the float model runs alongside (the calibration batches twice over: once through the
compressed kernels, once through the float ones), and each kernel's target moves towards the float model's
outputs: ``W* = W + a (H + lambda I)^-1 (X_q^T X_f - H) W`` minimises ``||X_q W* - X_f W||`` at ``a = 1``
(``X_q``: its inputs through the compressed earlier layers, ``H = X_q^T X_q``; ``X_f``: its inputs in the
float model), so a kernel also corrects the error its inputs carry, as in GPTAQ (Li et al., "GPTAQ: Efficient
Finetuning-Free Quantization for Asymmetric Calibration", ICML 2025) and QEP (Arai & Ichikawa, "Quantization
Error Propagation: Revisiting Layer-Wise Post-Training Quantization", 2025).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from compressjax import tree
from compressjax.checks import check_fraction
from compressjax.hessians import Hessian
from compressjax.hessians._analysis import _sub_jaxpr
from compressjax.hessians._api import _analyse, _batch_signature, _select
from compressjax.hessians._evaluate import _bind, _site_rows
from compressjax.oneshot._common import KernelLayout
from compressjax.oneshot._layerwise import split_result
from compressjax.oneshot._sparsegpt import Pruned
from compressjax.qarray import QArray
from compressjax.quantization import dequantize

__all__ = ["sequential"]


def sequential(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Iterable[Any],
    compress: Callable[[Any, Any], Any],
    *,
    row_mask: Callable[[Any], Any] | None = None,
    where: tree.Where = None,
    float_target: float = 0.0,
) -> Any:
    """Compresses every selected kernel in the order the model first uses it, in one pass over the data.

    Each kernel slice (a plain kernel; one layer of a stacked kernel run by ``lax.scan`` / ``fori_loop``; one
    expert of a batched matmul; one group of a grouped convolution) is compressed right before its first
    use, from the Hessian of its inputs computed through the already-compressed earlier layers. All
    calibration batches advance together (they must share one shape: they are stacked), so the model runs
    about once over the calibration set, and only the activations at the current point are kept.

    ``compress(params, hessians)`` is the callable :func:`~compressjax.layerwise` takes, e.g.
    ``lambda p, h: gptq(p, h, QuantSpec(bits=4, group_size=128))`` or ``lambda p, h: sparsegpt(p, h, 0.5)``.
    It is called once per kernel slice with 2-D sub-problems: ``params`` holds that slice in place of the
    leaf (layer axes removed; for a grouped convolution, the group's block of output channels) and
    ``hessians`` holds one plain ``(d_in, d_in)`` :class:`Hessian` at that leaf and ``None`` elsewhere; the
    leaf keeps its path, so path-keyed rules apply. It returns, as for :func:`~compressjax.layerwise` (see
    :func:`~compressjax.oneshot.split_result`), either the params (the leaf compressed: a float array or a
    ``QArray``; a tree of the structure of ``params``) or a :class:`~compressjax.oneshot.Pruned`
    ``(params, masks)`` (what :func:`~compressjax.sparsegpt` returns); the kind is read from the type of the
    result, never from ``isinstance(out, tuple)``, and must be the same for every call.
    Slices of a stacked leaf are joined back into the stacked layout: float arrays and masks stacked, and
    ``QArray`` slices merged into one ``QArray`` whose scales are per layer (the layer axes become channel
    axes) and per group (the output axis must then have its own scales).

    Args:
        apply_fn: ``(params, batch) -> output`` (see :func:`~compressjax.collect_hessians`); it receives float
            params (``QArray`` leaves of ``params`` are dequantized for it and are not compressed again).
        params: the params pytree.
        batches: the calibration batches, all of the same shapes and dtypes.
        compress: ``(params, hessians) -> params`` or ``-> Pruned(params, masks)`` (see above).
        row_mask: as in :func:`~compressjax.collect_hessians`: ``batch -> bool array`` over the leading dims of
            the layer inputs; False rows are left out of every Hessian.
        where: which leaves to compress (as in :func:`~compressjax.collect_hessians`).
        float_target: ``a`` in ``[0, 1]``: how far each kernel's target moves from the float kernel towards
            the float model's outputs (see the module docstring; QEP's propagation strength). ``0`` (the
            default): each kernel fits its own compressed inputs, as in GPTQ's sequential mode. Above 0 the
            float model runs alongside: twice the forward work and twice the activations, plus one
            ``(d_in, d_in)`` cross-product per slice; ``compress`` receives the corrected ``W*`` as the slice.

    Returns:
        When ``compress`` returns params: the compressed params. When it returns a ``Pruned``: a
        :class:`~compressjax.oneshot.Pruned` ``(params, masks)`` with a keep-mask (stacked like its leaf) at
        every compressed leaf and ``None`` elsewhere.

    Raises:
        ValueError: no batches, batches of different shapes, a branch (``cond``) or loop condition that differs
            between calibration batches, a kernel slice never used by the batches, a Hessian from zero rows,
            ``compress`` returning something else than params or a ``Pruned``, plus what
            :func:`~compressjax.collect_hessians` raises for the model.
        TypeError: a non-callable ``apply_fn``/``compress``/``row_mask``; per-slice results that cannot be
            joined into a stacked leaf (anything but float arrays, ``QArray`` and ``Codebook``); a
            ``float_target`` that is not a real number.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be a callable (params, batch) -> output, got {apply_fn!r}")
    if not callable(compress):
        raise TypeError(f"compress must be a callable (params, hessians) -> params or Pruned(params, masks), got {compress!r}")
    if row_mask is not None and not callable(row_mask):
        raise TypeError(f"row_mask must be None or a callable batch -> bool array, got {row_mask!r}")
    alpha = check_fraction(float_target, "float_target")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: sequential needs at least one calibration batch")
    sigs = [_batch_signature(b) for b in batches]
    for k, s in enumerate(sigs):
        if s != sigs[0]:
            raise ValueError(f"calibration batch {k} has shapes {s[1]}, batch 0 has {sigs[0][1]}: sequential stacks the batches, so they must share one shape")
    treedef, paths, leaves, selected = _select(params, where)
    float_leaves = [dequantize(x) if isinstance(x, QArray) else x for x in leaves]

    def fn(leaf_list, batch):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaf_list), batch)

    closed, an, found = _analyse(fn, float_leaves, batches[0], selected, paths, where)
    # With a float target the batches run twice over: the first half through the compressed kernels, the
    # second through the float ones.
    streams = batches + batches if alpha > 0 else batches
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *streams)
    masks = None
    if row_mask is not None:
        ms = [jnp.asarray(row_mask(b)) for b in batches]
        if any(m.dtype != jnp.bool_ for m in ms):
            raise TypeError(f"row_mask must return a bool array, got dtype {ms[0].dtype}")
        masks = jnp.stack(ms + ms if alpha > 0 else ms)
    p = _Pass(an, found, paths, treedef, float_leaves, compress, masks, len(streams), alpha)
    args = [(x, False) for x in float_leaves if x is not None] + [(x, True) for x in jax.tree_util.tree_leaves(stacked)]
    p.run(closed.jaxpr, closed.consts, args, ())
    return p.result(leaves)


def _decode(x: Any, path: str) -> jax.Array:
    if isinstance(x, QArray):
        return dequantize(x, path=path)
    if tree.is_compressed_leaf(x):
        return x.decode()
    return jnp.asarray(x)


class _Pass:
    """The one pass: evaluates the jaxpr on stacked batches and compresses slices at their first use."""

    def __init__(self, an, found, paths, treedef, float_leaves, compress, masks, n_batches, alpha=0.0):
        self.an, self.found, self.paths, self.treedef = an, found, paths, treedef
        # The float leaves, never written: a site reads its (already compressed) slices back from their
        # results (``done``), decoded for that use only, so no float copy of a kernel is held.
        self.base = list(float_leaves)
        self.compress, self.masks, self.nb = compress, masks, n_batches
        self.alpha = alpha  # > 0: batches [0, nb/2) run through the compressed kernels, the rest through the float ones
        self.done: dict[tuple[int, int], tuple[Any, Any]] = {}
        self.tokens: dict[tuple, int] = {}
        self.kind: str | None = None
        self.fns: dict[tuple, Callable] = {}
        self.last: dict[int, dict] = {}
        self.plans: dict[tuple, list] = {}

    # -- evaluation
    def _last_use(self, jaxpr) -> dict:
        lu = self.last.get(id(jaxpr))
        if lu is None:
            lu = {}
            for i, eqn in enumerate(jaxpr.eqns):
                for v in eqn.invars:
                    if not isinstance(v, jcore.Literal):
                        lu[v] = i
            for v in jaxpr.outvars:
                if not isinstance(v, jcore.Literal):
                    lu[v] = len(jaxpr.eqns)
            self.last[id(jaxpr)] = lu
        return lu

    def _plan(self, jaxpr, prefix) -> list:
        """The equations in runs: a run of plain equations (no site, no run-time index, nothing the pass must
        enter) is evaluated by one compiled function, so compilations follow the sites, not the equations."""
        key = (id(jaxpr), prefix)
        plan = self.plans.get(key)
        if plan is None:
            lu = self._last_use(jaxpr)
            plan, run = [], []

            def close():
                if run:
                    defined = {v for i in run for v in jaxpr.eqns[i].outvars}
                    ins, seen = [], set()
                    for i in run:
                        for v in jaxpr.eqns[i].invars:
                            if not isinstance(v, jcore.Literal) and v not in defined and v not in seen:
                                seen.add(v)
                                ins.append(v)
                    outs = [v for v in defined if lu.get(v, -1) > run[-1]]
                    plan.append(("run", (list(run), ins, outs)))
                    run.clear()

            for i in range(len(jaxpr.eqns)):
                k = prefix + (i,)
                if k in self.an.sites or k in self.an.calls or k in self.an.ds_tokens:
                    close()
                    plan.append(("eqn", i))
                else:
                    run.append(i)
            close()
            self.plans[key] = plan
        return plan

    def _run_plain(self, jaxpr, idx: list[int], ins: list, outs: list, vals: list) -> list:
        in_b = tuple(b for _, b in vals)
        batched = {v for v, b in zip(ins, in_b, strict=True) if b}
        for i in idx:
            eqn = jaxpr.eqns[i]
            if any(not isinstance(v, jcore.Literal) and v in batched for v in eqn.invars):
                batched.update(eqn.outvars)
        out_b = tuple(v in batched for v in outs)
        key = (id(jaxpr), tuple(idx), in_b)
        f = self.fns.get(key)
        if f is None:
            eqns = [jaxpr.eqns[i] for i in idx]

            def fn(*xs):
                env = dict(zip(ins, xs, strict=True))
                for eqn in eqns:
                    res = _bind(eqn, [v.val if isinstance(v, jcore.Literal) else env[v] for v in eqn.invars])
                    env.update(zip(eqn.outvars, res, strict=True))
                return [env[v] for v in outs]

            if any(in_b):
                fn = jax.vmap(fn, in_axes=tuple(0 if b else None for b in in_b), out_axes=[0 if b else None for b in out_b])
            f = jax.jit(fn)
            self.fns[key] = f
        res = f(*[x for x, _ in vals])
        return list(zip(res, out_b, strict=True))

    def run(self, jaxpr, consts, args, prefix) -> list:
        env: dict = {}
        lu = self._last_use(jaxpr)

        def read(v):
            return (v.val, False) if isinstance(v, jcore.Literal) else env[v]

        def free(i):
            for v in jaxpr.eqns[i].invars:
                if not isinstance(v, jcore.Literal) and lu.get(v) == i:
                    env.pop(v, None)

        for v, x in zip(jaxpr.constvars, consts, strict=True):
            env[v] = (x, False)
        for v, x in zip(jaxpr.invars, args, strict=True):
            env[v] = x
        for kind, item in self._plan(jaxpr, prefix):
            if kind == "run":
                idx, ins, outs = item
                res = self._run_plain(jaxpr, idx, ins, outs, [env[v] for v in ins])
                env.update(zip(outs, res, strict=True))
                for i in idx:
                    free(i)
                continue
            i = item
            eqn = jaxpr.eqns[i]
            key = prefix + (i,)
            ins = [read(v) for v in eqn.invars]
            site = self.an.sites.get(key)
            float_w = None
            if site is not None:
                ins, float_w = self._site(site, eqn, ins, key)
            name = eqn.primitive.name
            inside = key in self.an.calls
            if float_w is not None:
                outs = self._apply_streams(eqn, ins, site.w_org[0], float_w)
            elif inside and name == "scan":
                outs = self._scan(eqn, ins, key)
            elif inside and name == "while":
                outs = self._while(eqn, ins, key)
            elif inside and name == "cond":
                b = int(np.clip(self._concrete(ins[0], "the branch index of a cond"), 0, len(eqn.params["branches"]) - 1))
                br = eqn.params["branches"][b]
                outs = self.run(br.jaxpr, br.consts, ins[1:], key + (b,))
            elif inside and _sub_jaxpr(eqn) is not None:
                sub, sub_consts = _sub_jaxpr(eqn)
                outs = self.run(sub, sub_consts, ins, key)
            else:
                outs = self._apply(eqn, ins)
            toks = self.an.ds_tokens.get(key)
            if toks is not None:
                for k, tok in toks:
                    n, s = eqn.invars[0].aval.shape[k], eqn.params["slice_sizes"][k]
                    self.tokens[tok] = int(np.clip(self._concrete(ins[1 + k], "a dynamic_slice index of a kernel"), 0, n - s))
            for v, x in zip(eqn.outvars, outs, strict=True):
                if lu.get(v, -1) > i:
                    env[v] = x
            free(i)
        return [read(v) for v in jaxpr.outvars]

    def _apply(self, eqn, ins) -> list:
        if not any(b for _, b in ins):
            return [(o, False) for o in _bind(eqn, [x for x, _ in ins])]
        axes = tuple(0 if b else None for _, b in ins)
        f = self.fns.get((id(eqn), axes))
        if f is None:
            f = jax.jit(jax.vmap(lambda *a: _bind(eqn, list(a)), in_axes=axes))
            self.fns[(id(eqn), axes)] = f
        return [(o, True) for o in f(*[x for x, _ in ins])]

    def _apply_streams(self, eqn, ins, w_pos: int, float_w) -> list:
        """A site's matmul with the float target: the compressed weight on the first half of the batches, the
        float weight on the second."""
        half = self.nb // 2
        q_ins, f_ins = [], []
        for k, (v, b) in enumerate(ins):
            if k == w_pos:
                q_ins.append((v, b))
                f_ins.append((float_w, False))
            elif b:
                q_ins.append((v[:half], True))
                f_ins.append((v[half:], True))
            else:
                q_ins.append((v, False))
                f_ins.append((v, False))
        q, f = self._apply(eqn, q_ins), self._apply(eqn, f_ins)
        return [(jnp.concatenate([a, c]) if ba else a, ba) for (a, ba), (c, _) in zip(q, f, strict=True)]

    def _concrete(self, x, what: str) -> int:
        v, b = x
        a = np.asarray(v)
        if b:
            if not np.all(a == a[:1]):
                raise ValueError(f"{what} differs between calibration batches ({a.reshape(len(a), -1)[:, 0].tolist()}); sequential needs the same control flow for every batch")
            a = a[0]
        return int(a.reshape(-1)[0]) if a.size else 0

    def _scan(self, eqn, ins, key) -> list:
        p = eqn.params
        nc, nk, n = p["num_consts"], p["num_carry"], p["length"]
        body = p["jaxpr"]
        consts, carry, xs = ins[:nc], ins[nc:nc + nk], ins[nc + nk:]
        ys_all = []
        for it in range(n):
            idx = n - 1 - it if p["reverse"] else it
            self.tokens[("scan", key)] = idx
            x_t = [(v[:, idx] if b else v[idx], b) for v, b in xs]
            outs = self.run(body.jaxpr, body.consts, [*consts, *carry, *x_t], key)
            carry = outs[:nk]
            ys_all.append(outs[nk:])
        if p["reverse"]:
            ys_all.reverse()
        ys = []
        for k in range(len(eqn.outvars) - nk):
            col = [y[k] for y in ys_all]
            if any(b for _, b in col):
                ys.append((jnp.stack([v if b else jnp.broadcast_to(v, (self.nb, *jnp.shape(v))) for v, b in col], axis=1), True))
            else:
                ys.append((jnp.stack([v for v, _ in col]), False))
        return [*carry, *ys]

    def _while(self, eqn, ins, key) -> list:
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
        cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
        while self._concrete(self.run(cj.jaxpr, cj.consts, [*cconsts, *carry], key + ("cond",))[0], "a while_loop condition"):
            carry = self.run(bj.jaxpr, bj.consts, [*bconsts, *carry], key + ("body",))
        return carry

    # -- compression at a site
    def _site(self, site, eqn, ins, key) -> list:
        leaf = site.leaf
        li = np.asarray(site.lbase, np.int64) + sum(step * self.tokens[tok] for step, tok in site.lsteps)
        pending = sorted({int(j) for j in li if (leaf, int(j)) not in self.done})
        fresh = {}
        if pending:
            grams, cross, counts = self._gram(site, eqn, key, ins[site.x_pos])
            for j in pending:
                sel = np.flatnonzero(li == j)
                c = None if cross is None else jnp.sum(cross[sel], axis=0)
                fresh[j] = self._compress(leaf, j, jnp.sum(grams[sel], axis=0), float(jnp.sum(counts[sel])), c)
        w_pos, o, dyn = site.w_org
        off = sum(delta * self.tokens[tok] for delta, tok in dyn)
        flat_index = jnp.asarray(o + off)
        dtype = eqn.invars[w_pos].aval.dtype
        w = self._read(leaf, sorted({int(j) for j in li}), fresh, flat_index).astype(dtype)
        ins = list(ins)
        ins[w_pos] = (w, False)
        float_w = None if self.alpha == 0 else _flat_take(self.base[leaf], flat_index).astype(dtype)
        return ins, float_w

    def _gram(self, site, eqn, key, x):
        """``(H, C, counts)`` per slice of the site, summed over the batches: ``H = X_q^T X_q`` and, with a
        float target, ``C = X_q^T X_f`` (row by row, the two streams see the same tokens), else ``C = None``."""
        v, b = x
        if not b:
            v = jnp.broadcast_to(v, (self.nb, *jnp.shape(v)))
        half = self.nb // 2
        f = self.fns.get(("gram", key))
        if f is None:
            path = self.paths[site.leaf]

            def rows_of(xv, m):
                invals = [None, None]
                invals[site.x_pos] = xv
                return _site_rows(site, eqn, invals, m, path)

            def scatter(g):  # input rows in the matmul's order -> the kernel's input positions
                if site.full:
                    return g
                ix = jnp.asarray(site.idx)
                return jnp.zeros((g.shape[0], site.d_in, site.d_in), g.dtype).at[:, ix[:, None], ix[None, :]].add(g)

            def one(xq, xf, m):
                rows, cnt = rows_of(xq, m)
                g = scatter(jnp.einsum("bnd,bne->bde", rows, rows, precision=jax.lax.Precision.HIGHEST))
                if xf is None:
                    return g, cnt
                rows_f, _ = rows_of(xf, m)
                c = scatter(jnp.einsum("bnd,bne->bde", rows, rows_f, precision=jax.lax.Precision.HIGHEST))
                return g, cnt, c

            def total(xq, xf, m):
                # Batch by batch into one sum: never a (batches, d_in, d_in) stack of Gram matrices.
                def at(i):
                    return xq[i], None if xf is None else xf[i], None if m is None else m[i]

                def add(acc, i):
                    return tuple(a + b for a, b in zip(acc, one(*at(i)), strict=True)), None

                init = tuple(jnp.zeros(a.shape, a.dtype) for a in jax.eval_shape(one, *at(0)))
                return jax.lax.scan(add, init, jnp.arange(xq.shape[0]))[0]

            f = jax.jit(total)
            self.fns[("gram", key)] = f
        if self.alpha == 0:  # no slicing: a slice would copy the activations
            g, cnt = f(v, None, self.masks)
            return g, None, cnt
        g, cnt, c = f(v[:half], v[half:], None if self.masks is None else self.masks[:half])
        return g, c, cnt

    def _read(self, leaf: int, slices: list[int], fresh: dict, flat_index) -> jax.Array:
        """The site's weight operand, ``kernel.reshape(-1)[flat_index]`` of the kernel as compressed so far:
        gathered from the decoded results of ``slices`` (every slice the site reads is compressed by now)."""
        path, kernel = self.paths[leaf], self.base[leaf]
        _, _, layer_axes, _, g = self.found[leaf]
        dense = [fresh[j] if j in fresh else _decode(self.done[(leaf, j)][0], path).astype(kernel.dtype) for j in slices]
        out_axis = -1
        if g > 1:
            out_axis = _out_axis([a for a in range(kernel.ndim) if a not in layer_axes], self.found[leaf][0], path)
        slot = np.zeros(self.found[leaf].n, np.int32)
        slot[slices] = np.arange(len(slices))
        return _gather_slices(jnp.stack([d.reshape(-1) for d in dense]), jnp.asarray(slot), flat_index,
                              tuple(kernel.shape), tuple(layer_axes), int(g), out_axis)

    def _compress(self, leaf: int, j: int, h, count: float, cross=None) -> jax.Array:
        """Compresses slice ``j`` of ``leaf`` from its Hessian (towards the float model's outputs when
        ``cross = X_q^T X_f`` is given); returns the slice decoded (kernel dtype)."""
        in_axes, _, layer_axes, layer_shape, g = self.found[leaf]
        path = self.paths[leaf]
        lc = np.unravel_index(j // g, layer_shape) if layer_shape else ()
        where_ = f" (layer {tuple(int(c) for c in lc)}{f', group {j % g}' if g > 1 else ''})" if layer_shape or g > 1 else ""
        if count == 0:
            raise ValueError(f"leaf {path!r}{where_}: its Hessian is built from zero input rows (a row_mask that is all False?); it cannot calibrate the kernel")
        if not bool(jnp.all(jnp.isfinite(h))):
            raise ValueError(f"leaf {path!r}{where_}: its layer inputs hold NaN or Inf in the calibration batches (the Hessian is not finite)")
        kernel = self.base[leaf]
        # The slice as (start, size) per axis, read by one compiled function per shape (not one per index).
        starts, sizes = [0] * kernel.ndim, list(kernel.shape)
        for a, c in zip(layer_axes, lc, strict=True):
            starts[a], sizes[a] = int(c), 1
        rest = [a for a in range(kernel.ndim) if a not in layer_axes]
        if g > 1:
            out_axis = _out_axis(rest, in_axes, path)
            sizes[out_axis] = kernel.shape[out_axis] // g
            starts[out_axis] = (j % g) * sizes[out_axis]
        sub_shape = tuple(sizes[a] for a in rest)
        starts_arr = jnp.asarray(starts, jnp.int32)
        sub = _take(kernel, starts_arr, tuple(sizes)).reshape(sub_shape)
        sub_in = tuple(rest.index(a) for a in in_axes)
        if cross is not None:
            lay = KernelLayout(sub_shape, sub_in, path)
            sub = lay.from_2d(_float_target(lay.to_2d(sub), h, cross, self.alpha)).astype(kernel.dtype)
        hess = Hessian(h, jnp.float32(count), sub_in)
        sub_leaves = list(self.base)
        sub_leaves[leaf] = sub
        h_leaves = [None] * len(sub_leaves)
        h_leaves[leaf] = hess
        sub_params = jax.tree_util.tree_unflatten(self.treedef, sub_leaves)
        out = self.compress(sub_params, jax.tree_util.tree_unflatten(self.treedef, h_leaves))
        res, mask = self._split(sub_params, out, leaf, path)
        dense = _decode(res, path)
        if tuple(dense.shape) != tuple(sub.shape):
            raise ValueError(f"leaf {path!r}{where_}: compress returned shape {tuple(dense.shape)} for a slice of shape {tuple(sub.shape)}")
        self.done[(leaf, j)] = (res, mask)
        return dense.astype(kernel.dtype)

    def _split(self, sub_params, out, leaf: int, path: str) -> tuple[Any, Any]:
        new_params, masks = split_result(sub_params, out, f"compress (for leaf {path!r})")
        kind = "params" if masks is None else "pruned"
        if self.kind is not None and kind != self.kind:
            raise ValueError(f"compress returned {kind} for leaf {path!r} but {self.kind} before; it must return the same kind every time")
        self.kind = kind
        res = jax.tree_util.tree_leaves(new_params, is_leaf=tree.is_compressed_leaf)[leaf]
        mask = None
        if masks is not None:
            found = [m for pth, m in tree.leaves_with_paths(masks, tree.is_none_or_compressed) if pth == path]
            mask = found[0] if found else None
        return res, mask

    # -- assembling the result
    def result(self, leaves: list) -> Any:
        out = list(leaves)
        mask_leaves: list[Any] = [None] * len(leaves)
        for leaf, lay in self.found.items():
            in_axes, _, layer_axes, layer_shape, g = lay
            path = self.paths[leaf]
            missing = [j for j in range(lay.n) if (leaf, j) not in self.done]
            if missing:
                j = missing[0]
                lc = tuple(int(c) for c in np.unravel_index(j // g, layer_shape)) if layer_shape else ()
                raise ValueError(f"leaf {path!r}: slice {lc}{f' group {j % g}' if g > 1 else ''} is never used by the calibration batches, so it was not compressed")
            parts = {j: self.done[(leaf, j)] for j in range(lay.n)}
            if lay.n == 1:
                out[leaf], mask_leaves[leaf] = parts[0]
                continue
            rest = [a for a in range(len(self.base[leaf].shape)) if a not in layer_axes]
            per_layer = {}
            for li in range(lay.n // g):
                ps = [parts[li * g + k] for k in range(g)]
                if g > 1:
                    k_out = rest.index(_out_axis(rest, in_axes, path))
                    per_layer[li] = tuple(_join([p[t] for p in ps], k_out, False, path) for t in range(2))
                else:
                    per_layer[li] = ps[0]
            coords = {tuple(int(c) for c in np.unravel_index(li, layer_shape)): v for li, v in per_layer.items()}
            for t, a in enumerate(layer_axes):  # insert layer axes in kernel order
                grouped: dict[tuple, list] = {}
                for c in sorted(coords, key=lambda c: c[t]):
                    grouped.setdefault(c[:t] + (None,) + c[t + 1:], []).append(coords[c])
                coords = {c: tuple(_join([v[k] for v in vs], a, True, path) for k in range(2)) for c, vs in grouped.items()}
            out[leaf], mask_leaves[leaf] = next(iter(coords.values()))
        params = jax.tree_util.tree_unflatten(self.treedef, out)
        if self.kind == "pruned":
            return Pruned(params, jax.tree_util.tree_unflatten(self.treedef, mask_leaves))
        return params


@jax.jit
def _flat_take(kernel, flat_index):
    return kernel.reshape(-1)[flat_index]


@jax.jit
def _float_target(w, h, cross, alpha, damp=0.01):
    """``W + alpha (H + lambda I)^-1 (C - H) W`` for ``(d_in, d_out)`` ``W``, ``H = X_q^T X_q``, ``C = X_q^T X_f``:
    at ``alpha = 1`` the least-squares ``W*`` with ``X_q W* ~ X_f W`` (damped by ``lambda = damp * mean(diag H)``,
    GPTQ's default damping)."""
    w32 = w.astype(jnp.float32)
    lam = damp * jnp.mean(jnp.diag(h)) + jnp.finfo(jnp.float32).tiny
    hd = h + lam * jnp.eye(h.shape[0], dtype=h.dtype)
    rhs = jnp.matmul(cross - h, w32, precision=jax.lax.Precision.HIGHEST)
    delta = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(hd, lower=True), rhs)
    return w32 + alpha * delta


@partial(jax.jit, static_argnums=2)
def _take(kernel, starts, sizes):
    return jax.lax.dynamic_slice(kernel, list(starts), sizes)


@partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _gather_slices(stack, slot, flat_index, shape, layer_axes, g, out_axis):
    """``kernel.reshape(-1)[flat_index]`` where the kernel (``shape``) is known only by the slices the indices
    fall in: ``stack[slot[j]]`` is slice ``j`` (one layer of the ``layer_axes``, and with ``g > 1`` one of
    ``g`` blocks of ``out_axis``) flattened. Each index is split into its slice and its place in the slice."""
    m = jnp.unravel_index(flat_index, shape)
    j = jnp.ravel_multi_index([m[a] for a in layer_axes], [shape[a] for a in layer_axes], mode="clip") if layer_axes else 0
    local, sizes = list(m), list(shape)
    for a in layer_axes:
        local[a], sizes[a] = jnp.zeros_like(m[a]), 1
    if g > 1:
        sizes[out_axis] = shape[out_axis] // g
        j = j * g + m[out_axis] // sizes[out_axis]
        local[out_axis] = m[out_axis] % sizes[out_axis]
    within = jnp.ravel_multi_index(local, sizes, mode="clip")
    return stack[slot[j], within]


def _out_axis(rest: list[int], in_axes: tuple[int, ...], path: str) -> int:
    outs = [a for a in rest if a not in in_axes]
    if len(outs) != 1:
        raise ValueError(f"leaf {path!r}: a grouped convolution kernel needs exactly one output axis, got axes {outs}")
    return outs[0]


def _join(parts: list, axis: int, new: bool, path: str) -> Any:
    """Stacks (``new``) or concatenates per-slice results along ``axis``: arrays, masks, or compressed leaves
    that join themselves (``QArray``, ``Codebook``: ``join_slices``)."""
    if all(p is None for p in parts):
        return None
    join = getattr(type(parts[0]), "join_slices", None)
    if join is not None and all(type(p) is type(parts[0]) for p in parts):
        return join(parts, axis, new, path)
    if all(isinstance(p, jax.Array | np.ndarray) for p in parts):
        return jnp.stack(parts, axis) if new else jnp.concatenate(parts, axis)
    kinds = sorted({type(p).__name__ for p in parts})
    raise TypeError(f"leaf {path!r}: sequential cannot join per-slice results of types {kinds} into the stacked leaf (float arrays, QArray and Codebook can be joined)")
