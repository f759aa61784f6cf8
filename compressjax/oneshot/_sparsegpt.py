"""SparseGPT: one-shot pruning (unstructured or N:M), optionally joint with quantization (Frantar & Alistarh, 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from compressjax.checks import check_fraction, check_positive_int
from compressjax.oneshot._common import (
    build_qarray,
    check_factorised,
    hessian_items,
    map_hessian_leaves,
    spec_plan,
    zero_size_result,
)
from compressjax.oneshot._solver import SolverConfig, solve_kernel
from compressjax.oneshot._sweep import check_damp, padded_block

__all__ = ["sparsegpt", "check_nm", "Pruned"]


class Pruned(NamedTuple):
    """The result of :func:`sparsegpt`: the compressed params and their keep-masks.

    A distinct type (not a plain tuple) so that :func:`layerwise` and ``sequential`` tell "params and masks"
    from params that happen to be a 2-tuple. Return ``Pruned(params, masks)`` from your own ``compress``
    callable to have the masks merged across stages.
    """

    params: Any
    masks: Any


def check_nm(sparsity: Any, n: Any, m: Any) -> tuple[float | None, int | None, int | None]:
    """Validates ``sparsity`` or ``n:m`` (``n`` kept of every ``m``); returns ``(sparsity, n, m)``."""
    if (n is None) != (m is None):
        raise ValueError(f"give both n and m for N:M sparsity, got n={n!r}, m={m!r}")
    if n is None:
        if sparsity is None:
            raise ValueError("give a sparsity in [0, 1] or n and m")
        return check_fraction(sparsity), None, None
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be a positive int, got {v!r}")
        if v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if n > m:
        raise ValueError(f"n must be <= m (n weights kept of every m), got n={n}, m={m}")
    if sparsity is not None and abs(check_fraction(sparsity) - (1 - n / m)) > 1e-9:
        raise ValueError(f"sparsity={sparsity} disagrees with n:m = {n}:{m} (which prunes {1 - n / m}); pass sparsity=None")
    return 1 - n / m, n, m


def block_counts(d_in: int, d_out: int, block: int, n_pad: int, sparsity: float) -> tuple[int, ...]:
    """Weights to prune in each block so that the kernel loses exactly ``round(sparsity * d_in * d_out)``
    (round half to even), spread over the blocks in proportion to their real rows."""
    total = d_in * d_out
    k = round(sparsity * total)
    cum = [min(b * block, d_in) * d_out for b in range(n_pad // block + 1)]
    marks = [k * c // total for c in cum]
    return tuple(marks[b + 1] - marks[b] for b in range(n_pad // block))


def sparsegpt(
    params: Any, hessians: Any, sparsity: float | None, *, n: int | None = None, m: int | None = None, rules: Any = None,
    block_size: int = 128, damp: float = 0.01, mesh=None,
) -> Pruned:
    """Prunes every kernel that has a Hessian with SparseGPT; returns ``(params, masks)``.

    The mask is chosen block by block of ``block_size`` input rows by the OBS saliency
    ``w^2 / [U]_jj^2`` (``U`` the Cholesky factor of the damped inverse Hessian, as in the reference
    implementation) over the whole block, and each pruned weight's error is spread over the rows not yet
    processed, exactly like GPTQ's sweep. Unstructured: exactly ``round(sparsity * size)`` weights of each
    kernel (of each layer slice and group of a stacked kernel, solved on its own Hessian as in :func:`gptq`)
    are pruned (spread over the blocks in proportion to their rows; ties pruned in row-major order).
    ``n``/``m``: in every ``m`` consecutive entries of the kernel's last input axis, per output channel, the
    ``n`` with the largest saliency are kept (chosen when the sweep reaches them). With ``rules`` the kept
    weights are quantized in the same sweep (joint sparsification and quantization; pruned weights get the
    code of zero, so they stay exactly zero).

    Args:
        params: the params pytree (leaves without a Hessian pass through unchanged).
        hessians: from :func:`collect_hessians`, or a tree of ``(d_in, d_in)`` arrays.
        sparsity: fraction of each kernel to prune, in ``[0, 1]`` (``None`` or ``1 - n/m`` with ``n``, ``m``).
        n, m: N:M sparsity, ``n`` kept of every ``m`` (``m`` must divide the last input axis).
        rules: optional :class:`QuantSpec` or ``{pattern: QuantSpec}`` as for :func:`gptq`; per-channel scales
            come from the original weights (the reference), group scales from the current kept weights.
        block_size: rows per block (rounded to a multiple of ``m`` and of the group size).
        damp: relative dampening of ``H`` (see :func:`gptq`).
        mesh: optional ``jax.sharding.Mesh`` over which each kernel's output channels are sharded.

    Returns:
        A :class:`Pruned` ``(params, masks)`` (a ``NamedTuple``, so ``p, masks = sparsegpt(...)`` works):
        params with the pruned (and possibly quantized) kernels, and a tree like ``params`` with a bool
        keep-mask at each compressed kernel (stacked like the kernel) and ``None`` elsewhere (the convention
        of ``magnitude_masks``; use it with ``apply_masks``/``keep_masked`` to keep the zeros while training).
        :func:`layerwise` recognises the ``Pruned`` type (never a plain tuple) as "params and masks".

    Raises:
        ValueError: a sparsity outside ``[0, 1]``, ``n > m``, only one of ``n``/``m``, ``m`` not dividing the
            input axis, plus everything :func:`gptq` raises.
        TypeError: non-numeric sparsity, non-int ``n``/``m``.

    References:
        Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
        ICML 2023 (arXiv:2301.00774).
    """
    sparsity, n, m = check_nm(sparsity, n, m)
    block_size = check_positive_int("block_size", block_size)
    damp = check_damp(damp)
    items = hessian_items(params, hessians)
    plan = spec_plan(items, rules) if rules is not None else {}
    new, masks = {}, {}
    for path, (leaf, h, lay) in items.items():
        spec = plan.get(path)
        g = None if spec is None else spec.group_size
        if m is not None and lay.shape[lay.last_in] % m:
            raise ValueError(f"leaf {path!r}: m={m} does not divide the input axis {lay.last_in} of length {lay.shape[lay.last_in]} (shape {lay.shape})")
        if lay.size == 0:
            out = zero_size_result(lay, spec, leaf, prune=True)
        else:
            mult = _lcm(g or 1, m or 1)
            block, n_pad = padded_block(lay.d_in, block_size, mult)
            # Per slice: each layer slice (and group) of a stacked kernel loses exactly its own share.
            counts = None if m is not None else block_counts(lay.d_in, lay.d_out_g, block, n_pad, sparsity)
            cfg = SolverConfig(
                d_in=lay.d_in, block=block, n_pad=n_pad, spec=spec, per_tensor=spec is not None and spec.channel_axes == () and g is None,
                group=g, prune="nm" if m is not None else "unstructured", counts=counts, n=n or 0, m=m or 0,
            )
            out = solve_kernel(leaf, h, lay, damp, cfg, mesh)
        check_factorised(path, out["ok"], damp, lay)
        masks[path] = lay.from_3d(out["keep"])
        if spec is None:
            big = float(jnp.finfo(leaf.dtype).max)  # error feedback may push a weight past a float16 max
            new[path] = jnp.clip(lay.from_3d(out["q"]), -big, big).astype(leaf.dtype)
        else:
            new[path] = build_qarray(path, leaf, lay, spec, out["codes"], out["scale"], out["zp"])
    return Pruned(map_hessian_leaves(params, new), map_hessian_leaves(params, masks, fill=lambda p, x: None))


def _lcm(a: int, b: int) -> int:
    from math import gcd

    return a * b // gcd(a, b)
