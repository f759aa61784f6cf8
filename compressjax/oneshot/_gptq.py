"""GPTQ: one-shot weight quantization with second-order error feedback (Frantar et al., 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from compressjax.checks import check_positive_int
from compressjax.oneshot._common import (
    build_qarray,
    check_factorised,
    hessian_items,
    map_hessian_leaves,
    spec_plan,
    zero_size_result,
)
from compressjax.oneshot._solver import SolverConfig, batchable, solve_kernel, solve_kernel_many
from compressjax.oneshot._sweep import check_damp, padded_block
from compressjax.qarray import QuantSpec

__all__ = ["gptq", "gptq_many"]


def gptq(params: Any, hessians: Any, rules: Any, *, block_size: int = 128, damp: float = 0.01, act_order: bool = False, mesh=None) -> Any:
    """Quantizes every kernel that has a Hessian with GPTQ; returns params with :class:`QArray` leaves.

    Each selected kernel is quantized one input row at a time (a "column" of the paper's ``(out, in)``
    weight); after each row its rounding error is spread over the rows not yet quantized through the
    Cholesky factor of the damped inverse Hessian, with lazy block updates (``block_size`` rows per block,
    a ``lax.fori_loop`` over blocks and over rows, so compile time does not grow with the kernel).

    Scales: per output channel (the kernel's non-input axes) from the original weights, or per tensor
    when the spec's ``channel_axes`` is ``()``; with ``group_size=g``, one scale per output channel and per
    ``g`` consecutive entries of the kernel's last input axis, computed when the sweep reaches the group
    from the weights as updated so far (as the reference implementation does; its stale-within-a-block
    weights are replaced by the current ones, identical when ``block_size == g``). With ``act_order`` rows are
    processed by decreasing ``diag(H)`` and group scales are "static groups": computed before the sweep from
    contiguous rows of the original weights, so every group still covers contiguous input rows. The spec's
    ``calibration`` (``absmax``, ``percentile``, ``mse`` clipping search) chooses each scale. The returned
    ``QArray`` holds GPTQ's own codes and scales (never a re-quantization of the updated weights).

    Stacked kernels (scanned layers ``(L, in, out)``, MaxText's ``(in, L, out)``, MoE experts ``(E, in, out)``,
    grouped convolutions): given a stacked Hessian (``layer_axes``, ``groups``: ``h`` of shape
    ``(*layer_shape, [groups,] d_in, d_in)``), each layer slice (and group) is solved on its own Hessian, one
    after the other in one compiled ``lax.map`` (one compilation per slice shape, whatever the number of
    layers), exactly as if each slice were a 2-D kernel of its own. The result keeps the stacked layout: the
    ``QArray``'s scales are per layer (the layer axes join its ``channel_axes``, so no scale spans layers).
    Kernels beyond ``2**64`` in magnitude are solved on an exactly rescaled copy (codes unchanged, scales
    multiplied back), so finite weights up to float32's max give finite codes and scales.

    Args:
        params: the params pytree (leaves without a Hessian, floats or ``QArray``, pass through unchanged;
            zero-size kernels with a Hessian come back as a ``QArray`` of scale 1, as ``quantize`` does).
        hessians: from :func:`collect_hessians` (the selection), or a tree of ``(d_in, d_in)`` arrays.
        rules: a :class:`QuantSpec` or a ``{pattern: QuantSpec}`` mapping as for ``quantize_params``
            (bits 2-8, symmetric or asymmetric, per channel or per group along the input axis).
        block_size: rows per lazy-update block (rounded to a multiple of the group size).
        damp: ``damp * mean(diag(H))`` is added to the diagonal of ``H`` (dead inputs first get ``H_jj = 1``
            and a zero weight row, as in the reference).
        act_order: process rows by decreasing ``diag(H)`` (the reference's ``--act-order``).
        mesh: optional ``jax.sharding.Mesh``; each kernel's output channels are sharded over all its
            devices (the channels are independent).

    Returns:
        ``params`` with a :class:`QArray` at each leaf that has a Hessian.

    Raises:
        ValueError: a leaf with a Hessian and no quantizing rule, bits outside 2-8, a group size that does
            not divide the input axis, a Hessian at a missing or already quantized leaf, mismatched shapes,
            NaN/Inf in weights or Hessians, a Hessian not positive definite after damping, a Hessian built
            from zero rows (``count == 0`` in any slice), a spec whose ``layer_axes`` disagree with the
            Hessian's, a negative ``damp`` (a float or a concrete 0-d array; a traced one is not checked: a
            failed factorisation then raises), all naming the leaf.
        TypeError: a bad ``block_size`` or ``damp`` type, a non-float kernel.

    References:
        Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
        Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323).
    """
    # One quantizer is gptq_many's single-entry case: it solves it alone, on the one-quantizer sweep.
    return gptq_many(params, hessians, [rules], block_size=block_size, damp=damp, act_order=act_order, mesh=mesh)[0]


def _config(lay, spec, block_size: int, act_order: bool) -> SolverConfig:
    g = spec.group_size
    block, n_pad = padded_block(lay.d_in, block_size, g or 1)
    return SolverConfig(d_in=lay.d_in, block=block, n_pad=n_pad, spec=spec, per_tensor=spec.channel_axes == () and g is None,
                        group=g, act_order=act_order)


def gptq_many(params: Any, hessians: Any, rules: Sequence[Any], *, block_size: int = 128, damp: float = 0.01,
              act_order: bool = False, mesh=None) -> list[Any]:
    """:func:`gptq` with several quantizers: ``[gptq(params, hessians, r, ...) for r in rules]``, the same
    codes and scales, for about the cost of one.

    Each kernel's Hessian is factorised once, and the quantizers whose scales are known before the sweep
    (per output channel or per tensor, with any ``calibration``; groups with ``act_order``) share one
    compiled sweep that quantizes the kernel with all of them at once (vectorised over their scale tables and
    code ranges), so a menu of bit widths compiles once per kernel shape instead of once per width. The
    quantizers with lazy groups (``group_size`` without ``act_order``: scales computed as the sweep reaches
    each group) and any whose block layout differs are solved on their own. This is how the allocation
    (:func:`compressjax.option_costs_and_damages`) solves its GPTQ options.

    Args:
        params, hessians, block_size, damp, act_order, mesh: as for :func:`gptq`.
        rules: a non-empty sequence; each entry a :class:`QuantSpec` or a ``{pattern: QuantSpec}`` mapping, as
            :func:`gptq`'s ``rules``.

    Returns:
        One params tree per entry of ``rules``, in order, each as :func:`gptq` returns it.

    Raises:
        What :func:`gptq` raises for any entry; ``ValueError`` for an empty ``rules``, ``TypeError`` for
        ``rules`` that is not a sequence.
    """
    if isinstance(rules, dict | QuantSpec) or not isinstance(rules, Sequence) or isinstance(rules, str | bytes):
        raise TypeError(f"rules must be a sequence of QuantSpec or rule mappings (one per result), got {rules!r}")
    if len(rules) == 0:
        raise ValueError("rules is empty: give at least one QuantSpec")
    block_size = check_positive_int("block_size", block_size)
    damp = check_damp(damp)
    if not isinstance(act_order, bool):
        raise TypeError(f"act_order must be a bool, got {act_order!r}")
    items = hessian_items(params, hessians)
    plans = [spec_plan(items, r) for r in rules]
    new: list[dict[str, Any]] = [{} for _ in rules]
    for path, (leaf, h, lay) in items.items():
        specs = [plan[path] for plan in plans]
        outs: dict[int, dict] = {}
        if lay.size == 0:
            outs = {k: zero_size_result(lay, spec, leaf, prune=False) for k, spec in enumerate(specs)}
        cfgs = [None if lay.size == 0 else _config(lay, spec, block_size, act_order) for spec in specs]
        shared: dict[tuple, list[int]] = {}
        for k, cfg in enumerate(cfgs):
            if k not in outs and batchable(cfg):
                shared.setdefault((cfg.block, cfg.n_pad), []).append(k)
        for ks in shared.values():
            if len(ks) > 1:
                unique = list(dict.fromkeys(cfgs[k] for k in ks))  # equal specs are solved once
                got = solve_kernel_many(leaf, h, lay, damp, tuple(unique), mesh)
                outs.update({k: got[unique.index(cfgs[k])] for k in ks})
        for k, cfg in enumerate(cfgs):
            if k not in outs:
                outs[k] = solve_kernel(leaf, h, lay, damp, cfg, mesh)
        for k, spec in enumerate(specs):
            check_factorised(path, outs[k]["ok"], damp, lay)
            new[k][path] = build_qarray(path, leaf, lay, spec, outs[k]["codes"], outs[k]["scale"], outs[k]["zp"])
    return [map_hessian_leaves(params, n) for n in new]
