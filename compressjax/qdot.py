"""Quantized ``dot_general`` for ``flax.linen.Dense(dot_general=...)`` and ``flax.nnx.Linear(dot_general=...)``.

Two modes share the same numerics (see :mod:`compressjax.quantization`):

* ``mode="fake"`` (QAT): both operands go through :func:`~compressjax.fake_quant` (straight-through
  gradients) and a float ``lax.dot_general`` follows.
* ``mode="int"`` (inference): both operands become int8 codes, ``lax.dot_general`` multiplies them with
  ``preferred_element_type=jnp.int32`` (exact integer sums), and the float scales are applied to the int32
  result. Scales must therefore be constant along the contraction: weight scales per output channel
  (``channel_axes=(-1,)``, the default) and per-tensor or per-row activation scales factor out exactly, so
  the int path equals the fake path up to float rounding. A weight ``group_size`` along the contraction axis
  is handled with per-group int32 partial sums (the groups become a batch dimension of the integer
  ``dot_general``) that are rescaled per group and summed in float32. Asymmetric activations are handled
  with the zero-point correction ``sum(q_x q_w) - z_x * sum(q_w)``; asymmetric weights and scales that vary
  along the contraction axis in other ways are rejected with a ``ValueError``.

The fake path's float matmul runs at the default matmul precision, which is TF32 on recent GPUs; compare
the two paths under ``jax.default_matmul_precision("highest")`` (the int path's sums are exact).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from compressjax.qarray import QuantSpec
from compressjax.quantization import DEFAULT_SPEC, fake_quant, quantized_codes

__all__ = ["quantized_dot_general"]

MODES = ("fake", "int")


def _to_out(a, batch, contract, free, side: str, n_other_free: int, what: str):
    """Moves a per-operand array (size 1 on the contraction axes) into the ``dot_general`` output layout."""
    for c in contract:
        if a.shape[c] != 1:
            raise ValueError(
                f"mode='int': the {what} varies along contraction axis {c} (scale shape {a.shape}); only per-output "
                "channel weight scales, per-tensor/per-row activation scales and weight groups along the contraction "
                "axis factor out of an integer matmul. Use mode='fake' or change channel_axes."
            )
    a = jnp.transpose(a, tuple(batch) + tuple(free) + tuple(contract))
    nb, nf = len(batch), len(free)
    a = a.reshape(a.shape[: nb + nf])
    ones = (1,) * n_other_free
    if side == "lhs":
        return a.reshape(a.shape + ones)
    return a.reshape(a.shape[:nb] + ones + a.shape[nb:])


def _int_dot(lhs, rhs, dimension_numbers, wspec, aspec, a_scale, a_zp, preferred_element_type, kwargs):
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(a) % n for a in axes) for axes, n in ((lc, lhs.ndim), (rc, rhs.ndim), (lb, lhs.ndim), (rb, rhs.ndim)))
    ql, sl, zl, lay_l = quantized_codes(lhs, aspec, scale=a_scale, zero_point=a_zp, path="dot_general lhs (activations)")
    qr, sr, zr, lay_r = quantized_codes(rhs, wspec, path="dot_general rhs (weights)")
    if zr is not None:
        raise ValueError("mode='int' needs a symmetric weight spec (asymmetric weights: use mode='fake')")
    if lay_l.group_axis is not None:
        raise ValueError("mode='int' does not support an activation group_size; group the weights instead")
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    sl = sl.reshape(lay_l.scale_shape)  # ungrouped lhs: grouped view == original view
    zl = None if zl is None else zl.reshape(lay_l.scale_shape)
    grouped = lay_r.group_axis is not None
    if grouped:
        ga = lay_r.group_axis
        if rc != (ga,):
            raise ValueError(f"mode='int': the weight group axis {ga} must be the only contraction axis {rc} of the rhs")
        k = lc[0]
        gsize, ngroups = lay_r.group_size, rhs.shape[ga] // lay_r.group_size
        # Split the contraction axis into (groups, group_size) on both sides; groups become a batch dimension.
        ql = ql.reshape(ql.shape[:k] + (ngroups, gsize) + ql.shape[k + 1 :])
        qr = qr.reshape(lay_r.grouped_shape)
        sl = jnp.expand_dims(sl, k + 1)
        zl = None if zl is None else jnp.expand_dims(zl, k + 1)
        shift_l = lambda axes: tuple(a + 1 if a > k else a for a in axes)  # noqa: E731
        shift_r = lambda axes: tuple(a + 1 if a > ga else a for a in axes)  # noqa: E731
        lb, rb = (k,) + shift_l(lb), (ga,) + shift_r(rb)
        lc, rc = (k + 1,), (ga + 1,)
    l_free = tuple(a for a in range(ql.ndim) if a not in lb and a not in lc)
    r_free = tuple(a for a in range(qr.ndim) if a not in rb and a not in rc)
    acc = lax.dot_general(ql, qr, ((lc, rc), (lb, rb)), preferred_element_type=jnp.int32, **kwargs)
    if zl is not None:
        colsum = jnp.sum(qr.astype(jnp.int32), axis=rc, keepdims=True)
        z_out = _to_out(zl.astype(jnp.int32), lb, lc, l_free, "lhs", len(r_free), "activation zero point")
        acc = acc - z_out * _to_out(colsum, rb, rc, r_free, "rhs", len(l_free), "weight column sum")
    s_out = _to_out(sl, lb, lc, l_free, "lhs", len(r_free), "activation scale") * _to_out(
        sr, rb, rc, r_free, "rhs", len(l_free), "weight scale"
    )
    y = acc.astype(jnp.float32) * s_out
    if grouped:
        y = jnp.sum(y, axis=0)
    return y.astype(out_dtype)


def quantized_dot_general(
    weight_spec: QuantSpec | None = DEFAULT_SPEC,
    activation_spec: QuantSpec | None = None,
    *,
    mode: str = "fake",
    activation_scale: Any = None,
    activation_zero_point: Any = None,
) -> Callable[..., jax.Array]:
    """A ``dot_general`` replacement that quantizes the weights (rhs) and optionally the activations (lhs).

    Pass the result as ``flax.linen.Dense(..., dot_general=fn)`` or ``flax.nnx.Linear(..., dot_general=fn)``.
    The returned function has ``lax.dot_general``'s signature and forwards extra keyword arguments (NNX
    passes ``out_sharding=``) to the underlying ``lax.dot_general``.

    Args:
        weight_spec: spec for the rhs (the kernel ``(in, out)``: the default is int8 per output channel);
            ``None`` leaves the weights in float (``mode="fake"`` only).
        activation_spec: spec for the lhs, e.g. ``QuantSpec(8, channel_axes=())`` (per tensor); ``None`` leaves
            activations in float (``mode="fake"`` only). Without ``activation_scale`` the range is calibrated
            from each call's activations (dynamic quantization).
        mode: ``"fake"`` (fake quantization with straight-through gradients, for QAT) or ``"int"`` (int8 x int8
            -> int32 ``lax.dot_general`` then rescaling; equal to ``"fake"`` up to float rounding).
        activation_scale, activation_zero_point: a static activation range, e.g. from
            :func:`compressjax.calibrate` (PTQ); broadcast to the activation scale shape.

    Raises:
        ValueError: an unknown mode, ``mode="int"`` without both specs or with an asymmetric weight spec, or
            scales that do not factor out of the integer matmul (raised at trace time).

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", CVPR 2018.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, spec in (("weight_spec", weight_spec), ("activation_spec", activation_spec)):
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(f"{name} must be a QuantSpec or None, got {spec!r}")
    if mode == "int":
        if weight_spec is None or activation_spec is None:
            raise ValueError("mode='int' multiplies integer codes and needs both weight_spec and activation_spec")
        if not weight_spec.symmetric:
            raise ValueError(f"mode='int' needs a symmetric weight spec, got {weight_spec!r}")
    if activation_scale is not None and activation_spec is None:
        raise ValueError("activation_scale was given but activation_spec is None")

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
        lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
        if mode == "int":
            return _int_dot(lhs, rhs, dimension_numbers, weight_spec, activation_spec, activation_scale, activation_zero_point, preferred_element_type, kwargs)
        if activation_spec is not None:
            lhs = fake_quant(lhs, activation_spec, scale=activation_scale, zero_point=activation_zero_point, path="dot_general lhs (activations)")
        if weight_spec is not None:
            rhs = fake_quant(rhs, weight_spec, path="dot_general rhs (weights)")
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type, **kwargs)

    return dot_general

