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

from compressjax.oneshot._common import place
from compressjax.oneshot._sweep import inverse_hessian_factor, run_sweep, sub_block_size
from compressjax.qarray import QuantSpec, code_range
from compressjax.quantization import _compute_scale_grouped, _div_scale, round_to_grid
from compressjax.radix_select import exact_keep_masks

__all__ = ["SolverConfig", "solve", "solve_stacked", "solve_kernel", "solve_kernel_many", "batchable"]


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

    @property
    def lazy_groups(self) -> bool:
        """Group scales computed as the sweep reaches each group (GPTQ's default), not up front."""
        return self.spec is not None and self.group is not None and not self.act_order


def _quant(row, s, z, spec):
    """``(dequantized, code)`` of a row by the library's one quantizer (``round_to_grid``)."""
    _, code = round_to_grid(row, s, z, spec)
    q = code * s if z is None else (code - z) * s
    return q, code


def _solver_scales(x, spec, axes):
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


# Kernels whose largest magnitude exceeds this are solved on w * 2**-e (an exact power of two), so that the
# error feedback (which adds weighted rounding errors to weights near the top of the range) cannot overflow
# float32; scales and float outputs are multiplied back by 2**e. Ordinary kernels get e = 0 (bit for bit).
_BIG = 2.0**64


def _solve(w2d, h, damp, cfg: SolverConfig):
    """One kernel's sweep: dead inputs fixed, rows (optionally) permuted, the inverse Hessian factored, then
    :func:`~compressjax.oneshot._sweep.run_sweep` with the row step of ``cfg`` (:func:`_row_step`)."""
    w, u, ok, perm, w_orig, dead, e = _prepared(w2d, h, damp, cfg)
    diag_u = jnp.diagonal(u)
    d_out = w.shape[1]
    state0 = (_initial_scales(w_orig, dead, cfg), jnp.ones((cfg.block, d_out), bool) if cfg.prune else None)
    step = partial(_row_step, cfg=cfg, diag_u=diag_u, perm=perm)
    hook = partial(_prune_block, cfg=cfg, diag_u=diag_u) if cfg.prune else None
    sizes = tuple(z for z in ((cfg.group if cfg.lazy_groups else None), (cfg.m if cfg.prune == "nm" else None)) if z)
    stored, (scales, _) = run_sweep(w, u, step, state0, cfg.block, _store_dtypes(cfg), hook,
                                    sub=sub_block_size(cfg.block, sizes))
    return _outputs(stored, scales, perm, e, ok, cfg)


def _prepared(w2d, h, damp, cfg: SolverConfig):
    """``(w, u, ok, perm, w_orig, dead, e)``: the kernel with dead inputs fixed (:func:`_dead_inputs_fixed`),
    in sweep order (``perm``: act-order or identity) and padded to ``n_pad`` rows, the inverse Hessian factor
    ``u`` (the identity where the factorisation failed, ``ok`` False, to keep the sweep finite; the caller
    raises)."""
    w, h, w_orig, dead, e = _dead_inputs_fixed(w2d, h, cfg.d_in)
    perm = jnp.argsort(-jnp.diagonal(h), stable=True) if cfg.act_order else jnp.arange(cfg.d_in)
    if cfg.act_order:
        w, h = w[perm], h[perm][:, perm]
    u, _ = inverse_hessian_factor(h, damp, cfg.n_pad)
    ok = jnp.all(jnp.isfinite(u))
    u = jnp.where(ok, u, jnp.eye(cfg.n_pad, dtype=jnp.float32))
    w = jnp.pad(w, ((0, cfg.n_pad - cfg.d_in), (0, 0)))
    return w, u, ok, perm, w_orig, dead, e


def _dead_inputs_fixed(w2d, h, d_in: int):
    """``(w, h, w_orig, dead, e)``: the kernel as float32 scaled by ``2**-e`` (see ``_BIG``), inputs that
    never fire (``H_jj = 0``) zeroed in ``w`` with a unit diagonal in ``h`` (the reference's dead-input fix),
    the unzeroed kernel ``w_orig`` (per-channel scales come from it) and the dead mask."""
    w = w2d.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w))
    e = jnp.where(amax > _BIG, jnp.floor(jnp.log2(amax)).astype(jnp.int32) - 32, 0)
    w_orig = jnp.ldexp(w, -e)
    h = jnp.asarray(h, jnp.float32)
    dead = jnp.diagonal(h) == 0
    h = jnp.where(dead[:, None] & jnp.eye(d_in, dtype=bool), 1.0, h)
    return jnp.where(dead[:, None], 0.0, w_orig), h, w_orig, dead, e


def _initial_scales(w_orig, dead, cfg: SolverConfig):
    """The quantizer state before the sweep: ``(scale, zero point)`` of every group when they are known up
    front (per channel or per tensor from the original weights, as the reference's ``find_params(W)``;
    static act-order groups of contiguous original rows), placeholders for lazy groups (filled as the sweep
    reaches them), ``None`` without quantization."""
    spec, g = cfg.spec, cfg.group
    if spec is None:
        return None
    if g is None:
        return _solver_scales(w_orig, spec, (0, 1) if cfg.per_tensor else (0,))
    d_out = w_orig.shape[1]
    if cfg.act_order:
        wd = jnp.where(dead[:, None], 0.0, w_orig).reshape(cfg.d_in // g, g, d_out)
        s, z = _solver_scales(wd, spec, (1,))
        return s[:, 0], None if z is None else z[:, 0]
    n_groups = cfg.n_pad // g
    return jnp.ones((n_groups, d_out), jnp.float32), None if spec.symmetric else jnp.zeros((n_groups, d_out), jnp.float32)


def _prune_block(b, w1, st, *, cfg: SolverConfig, diag_u):
    """SparseGPT's mask selection at the start of block ``b``: the ``counts[b]`` rows x columns of least
    saliency ``w^2 / [H^-1]_jj^2`` pruned exactly (unstructured), or a fresh all-kept mask (N:M, chosen per
    ``m`` rows by the row step)."""
    scales, keep = st
    if cfg.prune == "unstructured":
        i1 = b * cfg.block
        d1 = lax.dynamic_slice(diag_u, (i1,), (cfg.block,))
        sal = jnp.square(w1) / jnp.square(d1)[:, None]
        real = (i1 + jnp.arange(cfg.block)) < cfg.d_in
        sal = jnp.where(real[:, None], sal, jnp.inf)
        keep = exact_keep_masks([sal], jnp.asarray(cfg.counts, jnp.int32)[b])[0]
    elif cfg.prune == "nm":
        keep = jnp.ones_like(keep)
    return scales, keep


def _nm_update(keep, j, i, view, *, cfg: SolverConfig, diag_u):
    """At the first of every ``m`` rows, keeps the ``n`` most salient of the next ``m`` per column."""

    def new_nm(keep):
        slab = view(i, cfg.m)
        d1 = lax.dynamic_slice(diag_u, (j,), (cfg.m,))
        k = _nm_keep(jnp.square(slab) / jnp.square(d1)[:, None], cfg.n)
        return lax.dynamic_update_slice(keep, k, (i, 0))

    return lax.cond(i % cfg.m == 0, new_nm, lambda k: k, keep)


def _row_scale(scales, j, i, view, keep, *, cfg: SolverConfig, perm):
    """``(scales, s, z)``: the scale and zero point of row ``j``; lazy groups are computed from the current
    (error-corrected, pruned) weights when the sweep enters them."""
    g = cfg.group
    if cfg.lazy_groups:

        def new_group(scales):
            slab = view(i, g)
            if keep is not None:
                slab = jnp.where(lax.dynamic_slice(keep, (i, 0), (g, slab.shape[1])), slab, 0.0)
            s, z = _solver_scales(slab, cfg.spec, (0,))
            out_s = lax.dynamic_update_slice(scales[0], s, (j // g, 0))
            out_z = None if z is None else lax.dynamic_update_slice(scales[1], z, (j // g, 0))
            return out_s, out_z

        scales = lax.cond((j % g == 0) & (j < cfg.d_in), new_group, lambda s: s, scales)
        src = j // g
    elif g is not None:  # static groups in act order: the group of the original row
        src = perm[jnp.minimum(j, cfg.d_in - 1)] // g
    else:
        src = 0
    return scales, scales[0][src], None if scales[1] is None else scales[1][src]


def _row_step(row, j, i, view, st, *, cfg: SolverConfig, diag_u, perm):
    """Row ``j`` (``i`` within its block): pruned by the current mask, then quantized. Returns the
    compressed row, what is stored of it (codes and keep flags, or the float row), and the new state."""
    scales, keep = st
    if cfg.prune == "nm":
        keep = _nm_update(keep, j, i, view, cfg=cfg, diag_u=diag_u)
    kept = row if keep is None else jnp.where(keep[i], row, 0.0)
    if cfg.spec is None:
        return kept, (kept, keep[i]), (scales, keep)
    scales, s, z = _row_scale(scales, j, i, view, keep, cfg=cfg, perm=perm)
    q, code = _quant(kept, s, z, cfg.spec)
    q = jnp.where(j < cfg.d_in, q, row)
    store = (code.astype(jnp.int8),) + (() if keep is None else (keep[i],))
    return q, store, (scales, keep)


def _store_dtypes(cfg: SolverConfig) -> tuple:
    if cfg.spec is None:
        return (jnp.float32, jnp.bool_)
    return (jnp.int8,) + (() if cfg.prune is None else (jnp.bool_,))


def _outputs(stored, scales, perm, e, ok, cfg: SolverConfig) -> dict:
    """The sweep's results in the original row order and scale (``2**e``)."""
    d_in, g = cfg.d_in, cfg.group
    out = {"ok": ok}
    if cfg.spec is None:
        big = float(jnp.finfo(jnp.float32).max)
        out["q"] = jnp.clip(jnp.ldexp(stored[0][:d_in], e), -big, big)
        out["keep"] = stored[1][:d_in]
        return out
    inv = jnp.argsort(perm)
    out["codes"] = stored[0][:d_in][inv]
    if cfg.prune is not None:
        out["keep"] = stored[1][:d_in][inv]
    s, z = scales
    if cfg.lazy_groups:
        s, z = s[: d_in // g], None if z is None else z[: d_in // g]
    out["scale"] = jnp.ldexp(s, e)
    out["zp"] = z
    return out


@partial(jax.jit, static_argnames=("cfg",))
def solve(w2d, h, damp, cfg: SolverConfig):
    """Runs one kernel's sweep. Returns a dict with ``q`` (float rows, compressed), and when quantizing
    ``codes`` (int8), ``scale`` and ``zp`` (per-tensor ``(1,1)``, per-channel ``(1,d_out)`` or per group
    ``(d_in/g, d_out)``), when pruning ``keep`` (bool), and ``ok`` (the factorisation was finite)."""
    return _solve(w2d, h, damp, cfg)


@partial(jax.jit, static_argnames=("cfg",))
def solve_stacked(w3, h3, damp, cfg: SolverConfig):
    """:func:`solve` on each slice of ``w3`` ``(batch, d_in, d_out_g)`` with its own Hessian ``h3[b]``, one slice
    after the other (``lax.map``: one compilation for every slice, the memory of one solve, and the
    per-row ``lax.cond`` of the quantizer stays a branch instead of a ``vmap``'s select). Every output gains
    a leading ``batch`` axis."""
    return lax.map(lambda a: _solve(a[0], a[1], damp, cfg), (w3, h3))


def solve_kernel(leaf, h3, lay, damp, cfg: SolverConfig, mesh=None) -> dict:
    """Solves every slice of one kernel (see :class:`~compressjax.oneshot._common.KernelLayout`): an
    ordinary kernel with :func:`solve`, a stacked one with :func:`solve_stacked`. Every output has a leading
    ``batch`` axis (1 for an ordinary kernel)."""
    if not lay.stacked:
        w2d, hh = place(mesh, lay.to_2d(jnp.asarray(leaf)), h3[0])
        return jax.tree.map(lambda x: x[None], solve(w2d, hh, damp, cfg))
    w3, hh = place(mesh, lay.to_3d(jnp.asarray(leaf)), h3)
    return solve_stacked(w3, hh, damp, cfg)


# ------------------------------------------------------------------ several quantizers in one sweep
def batchable(cfg: SolverConfig) -> bool:
    """Whether ``cfg`` can share a sweep with other quantizers (:func:`solve_kernel_many`): its scales are
    known before the sweep (per channel, per tensor, or static act-order groups) and nothing is pruned."""
    return cfg.spec is not None and cfg.prune is None and not cfg.lazy_groups


def _row_tables(w_orig, dead, perm, cfg: SolverConfig):
    """``(compact, (s_rows, z_rows))``: the up-front scales of ``cfg`` as :func:`_initial_scales` gives them,
    and the same spread to one ``(n_pad, d_out)`` table per row in sweep order (padding rows: scale 1)."""
    s, z = compact = _initial_scales(w_orig, dead, cfg)
    d_in, d_out = w_orig.shape

    def rows(a, fill):
        a = jnp.broadcast_to(a, (d_in, d_out)) if cfg.group is None else jnp.repeat(a, cfg.group, axis=0)
        return jnp.pad(a[perm], ((0, cfg.n_pad - d_in), (0, 0)), constant_values=fill)

    return compact, (rows(s, 1.0), jnp.zeros((cfg.n_pad, d_out), jnp.float32) if z is None else rows(z, 0.0))


def _table_step(row, j, i, view, st, *, tables, d_in):
    """The row step of :func:`_row_step` (no pruning, scales known up front) for one quantizer given by
    traced tables: row ``j``'s scale and zero point, the code range and whether it is symmetric. Bit for bit
    :func:`~compressjax.quantization.round_to_grid` with that quantizer's spec."""
    del i, view
    s_rows, z_rows, lo, hi, sym = tables
    s, z = s_rows[j], z_rows[j]
    t = _div_scale(row, s)
    t = jnp.where(sym, t, t + z)
    code = jnp.clip(jnp.round(t), lo, hi)
    q = jnp.where(sym, code * s, (code - z) * s)
    q = jnp.where(j < d_in, q, row)
    return q, (code.astype(jnp.int8),), st


def _solve_many(w2d, h, damp, cfgs: tuple[SolverConfig, ...]):
    """:func:`_solve` for several batchable quantizers of one kernel (same ``d_in``, ``block``, ``n_pad`` and
    ``act_order``): the dead-input fix, the row order and the inverse Hessian factor are computed once, and
    one sweep runs for all the quantizers at once (``vmap`` over their row tables)."""
    base = cfgs[0]
    w, u, ok, perm, w_orig, dead, e = _prepared(w2d, h, damp, base)
    compact, tables = zip(*(_row_tables(w_orig, dead, perm, c) for c in cfgs), strict=True)
    s_rows, z_rows = (jnp.stack(t) for t in zip(*tables, strict=True))
    ranges = [code_range(c.spec.bits, c.spec.symmetric) for c in cfgs]
    lo, hi = (jnp.asarray(r, jnp.float32) for r in zip(*ranges, strict=True))
    sym = jnp.asarray([c.spec.symmetric for c in cfgs])

    def sweep(*tab):
        step = partial(_table_step, tables=tab, d_in=base.d_in)
        stored, _ = run_sweep(w, u, step, None, base.block, (jnp.int8,), sub=sub_block_size(base.block))
        return stored[0]

    codes = jax.vmap(sweep)(s_rows, z_rows, lo, hi, sym)
    inv = jnp.argsort(perm)
    return tuple({"ok": ok, "codes": codes[k][: base.d_in][inv], "scale": jnp.ldexp(s, e), "zp": z}
                 for k, (s, z) in enumerate(compact))


@partial(jax.jit, static_argnames=("cfgs",))
def _solve_many_2d(w2d, h, damp, cfgs):
    return _solve_many(w2d, h, damp, cfgs)


@partial(jax.jit, static_argnames=("cfgs",))
def _solve_many_stacked(w3, h3, damp, cfgs):
    return lax.map(lambda a: _solve_many(a[0], a[1], damp, cfgs), (w3, h3))


def solve_kernel_many(leaf, h3, lay, damp, cfgs: tuple[SolverConfig, ...], mesh=None) -> tuple[dict, ...]:
    """:func:`solve_kernel` for several batchable quantizers at once (see :func:`batchable`; they share
    ``d_in``, ``block``, ``n_pad`` and ``act_order``): one result dict per config, identical to what
    :func:`solve_kernel` gives for it alone, from one factorisation and one compiled sweep."""
    if not lay.stacked:
        w2d, hh = place(mesh, lay.to_2d(jnp.asarray(leaf)), h3[0])
        return jax.tree.map(lambda x: x[None], _solve_many_2d(w2d, hh, damp, cfgs))
    w3, hh = place(mesh, lay.to_3d(jnp.asarray(leaf)), h3)
    return _solve_many_stacked(w3, hh, damp, cfgs)
