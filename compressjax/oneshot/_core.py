"""The jit-compiled per-kernel solver behind :func:`gptq` and :func:`sparsegpt` (one sweep, both jobs).

One compiled function per (kernel shape, configuration): the configuration is a frozen dataclass passed
as a static argument, ``damp`` is traced, so kernels of the same shape share one compilation.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from compressjax.oneshot._sweep import inverse_hessian_factor, run_sweep, sub_block_size
from compressjax.qarray import QuantSpec
from compressjax.quantization import _compute_scale_grouped
from compressjax.radix_select import exact_keep_masks

__all__ = ["SolverConfig", "solve"]


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Static configuration of one kernel's sweep.

    Attributes:
        d_in: real input rows. block, n_pad: rows per block and padded rows (``padded_block``).
        spec: the quantizer (``None``: no quantization). per_tensor: one scale for the kernel.
        group: rows per scale group (``None``: per channel). act_order: GPTQ's descending-``diag(H)`` order,
            with static groups (scales of contiguous original rows, computed before the sweep).
        prune: ``None``, ``"unstructured"`` (``counts[b]`` weights pruned in block ``b``) or ``"nm"``
            (keep ``n`` of every ``m`` consecutive rows, per output channel).
    """

    d_in: int
    block: int
    n_pad: int
    spec: QuantSpec | None = None
    per_tensor: bool = False
    group: int | None = None
    act_order: bool = False
    prune: str | None = None
    counts: tuple[int, ...] | None = None
    n: int = 0
    m: int = 0


def _quant(row, s, z, spec):
    qmin, qmax = (-spec.qmax, spec.qmax) if spec.symmetric else (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1)
    t = row / s if z is None else row / s + z
    code = jnp.clip(jnp.round(t), qmin, qmax)
    q = code * s if z is None else (code - z) * s
    return q, code


def _scales(x, spec, axes):
    s, z = _compute_scale_grouped(x, spec, axes)
    return s, (None if z is None else z.astype(jnp.float32))


def _nm_keep(sal, n):
    """Keeps the ``n`` largest of the ``m`` rows of ``sal`` per column; ties keep the later row."""
    m = sal.shape[0]
    ai, aj = sal[:, None, :], sal[None, :, :]
    idx = jnp.arange(m)
    later = (idx[None, :] > idx[:, None])[:, :, None]
    rank = jnp.sum((aj > ai) | ((aj == ai) & later), axis=1)
    return rank < n


@partial(jax.jit, static_argnames=("cfg",))
def solve(w2d, h, damp, cfg: SolverConfig):
    """Runs one kernel's sweep. Returns a dict with ``q`` (float rows, compressed), and when quantizing
    ``codes`` (int8), ``scale`` and ``zp`` (per-tensor ``(1,1)``, per-channel ``(1,d_out)`` or per group
    ``(d_in/g, d_out)``), when pruning ``keep`` (bool), and ``ok`` (the factorisation was finite)."""
    d_in, n_pad, block, spec, g = cfg.d_in, cfg.n_pad, cfg.block, cfg.spec, cfg.group
    d_out = w2d.shape[1]
    w = w2d.astype(jnp.float32)
    h = jnp.asarray(h, jnp.float32)
    dead = jnp.diagonal(h) == 0
    eye = jnp.eye(d_in, dtype=bool)
    h = jnp.where(dead[:, None] & eye, 1.0, h)
    w_orig = w
    w = jnp.where(dead[:, None], 0.0, w)
    if cfg.act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
        w, h = w[perm], h[perm][:, perm]
    else:
        perm = jnp.arange(d_in)
    u, _ = inverse_hessian_factor(h, damp, n_pad)
    ok = jnp.all(jnp.isfinite(u))
    u = jnp.where(ok, u, jnp.eye(n_pad, dtype=jnp.float32))  # keep the sweep finite; the caller raises
    w = jnp.pad(w, ((0, n_pad - d_in), (0, 0)))
    diag_u = jnp.diagonal(u)

    # Quantizer state: the scales of every group (static), or of the groups filled in as the sweep
    # reaches them (lazy, from the current weights).
    lazy = spec is not None and g is not None and not cfg.act_order
    if spec is None:
        scales0 = None
    elif g is None:
        # Per channel / per tensor, from the original weights (the reference's find_params(W) up front).
        s, z = _scales(w_orig, spec, (0, 1) if cfg.per_tensor else (0,))
        scales0 = (s, z)
    elif cfg.act_order:
        # Static groups: contiguous original rows, after dead rows are zeroed.
        wd = jnp.where(dead[:, None], 0.0, w_orig).reshape(d_in // g, g, d_out)
        s, z = _scales(wd, spec, (1,))
        scales0 = (s[:, 0], None if z is None else z[:, 0])
    else:
        n_groups = n_pad // g
        scales0 = (jnp.ones((n_groups, d_out), jnp.float32), None if spec.symmetric else jnp.zeros((n_groups, d_out), jnp.float32))

    keep0 = jnp.ones((block, d_out), bool) if cfg.prune else None
    counts = jnp.asarray(cfg.counts, jnp.int32) if cfg.prune == "unstructured" else None

    def block_hook(b, w1, st):
        scales, keep = st
        if cfg.prune == "unstructured":
            i1 = b * block
            d1 = lax.dynamic_slice(diag_u, (i1,), (block,))
            sal = jnp.square(w1) / jnp.square(d1)[:, None]
            real = (i1 + jnp.arange(block)) < d_in
            sal = jnp.where(real[:, None], sal, jnp.inf)
            keep = exact_keep_masks([sal], counts[b])[0]
        elif cfg.prune == "nm":
            keep = jnp.ones((block, d_out), bool)
        return scales, keep

    def step(row, j, i, view, st):
        scales, keep = st
        if cfg.prune == "nm":
            i1 = j - i

            def new_nm(keep):
                slab = view(i, cfg.m)
                d1 = lax.dynamic_slice(diag_u, (i1 + i,), (cfg.m,))
                k = _nm_keep(jnp.square(slab) / jnp.square(d1)[:, None], cfg.n)
                return lax.dynamic_update_slice(keep, k, (i, 0))

            keep = lax.cond(i % cfg.m == 0, new_nm, lambda k: k, keep)
        kept = row if keep is None else jnp.where(keep[i], row, 0.0)
        if spec is None:
            return kept, (kept, keep[i]), (scales, keep)
        if lazy:

            def new_group(scales):
                slab = view(i, g)
                if keep is not None:
                    slab = jnp.where(lax.dynamic_slice(keep, (i, 0), (g, d_out)), slab, 0.0)
                s, z = _scales(slab, spec, (0,))
                out_s = lax.dynamic_update_slice(scales[0], s, (j // g, 0))
                out_z = None if z is None else lax.dynamic_update_slice(scales[1], z, (j // g, 0))
                return out_s, out_z

            scales = lax.cond((j % g == 0) & (j < d_in), new_group, lambda s: s, scales)
            s = scales[0][j // g]
            z = None if scales[1] is None else scales[1][j // g]
        elif g is not None:  # static groups in act order: the group of the original row
            src = perm[jnp.minimum(j, d_in - 1)] // g
            s = scales[0][src]
            z = None if scales[1] is None else scales[1][src]
        else:
            s = scales[0][0]
            z = None if scales[1] is None else scales[1][0]
        q, code = _quant(kept, s, z, spec)
        q = jnp.where(j < d_in, q, row)
        store = (code.astype(jnp.int8),) + (() if keep is None else (keep[i],))
        return q, store, (scales, keep)

    if spec is None:
        store_dtype = (jnp.float32, jnp.bool_)
    else:
        store_dtype = (jnp.int8,) + (() if cfg.prune is None else (jnp.bool_,))
    hook = block_hook if cfg.prune else None
    sizes = tuple(z for z in ((g if lazy else None), (cfg.m if cfg.prune == "nm" else None)) if z)
    stored, (scales, _) = run_sweep(w, u, step, (scales0, keep0), block, store_dtype, hook, sub=sub_block_size(block, sizes))
    inv = jnp.argsort(perm)
    out = {"ok": ok}
    if spec is None:
        out["q"] = stored[0][:d_in]
        out["keep"] = stored[1][:d_in]
        return out
    out["codes"] = stored[0][:d_in][inv]
    if cfg.prune is not None:
        out["keep"] = stored[1][:d_in][inv]
    s, z = scales
    if lazy:
        s, z = s[: d_in // g], None if z is None else z[: d_in // g]
    out["scale"] = s
    out["zp"] = z
    return out
