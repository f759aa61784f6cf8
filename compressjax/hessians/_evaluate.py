"""Run-time evaluation: an interpreter over the jaxpr that adds ``X^T X`` at every matmul site."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from compressjax.hessians._analysis import _Analysis, _Site, _sub_jaxpr


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
