"""Uniform 1-8 bit quantization: quantize/dequantize, straight-through fake quantization, parameter rules.

Numerics (see also :mod:`compressjax.qarray`):

* Symmetric b-bit codes ``q = clip(round(x / scale), -(2^(b-1)-1), 2^(b-1)-1)`` with ``round`` = round half to
  even (``jnp.round``); ``x_hat = q * scale``.
* ``calibration="absmax"`` uses ``scale = max|x| / (2^(b-1) - 0.5)`` per scale group, the AQT/Qwix choice:
  the largest value sits half a step beyond the last code and is clipped by at most half a step, which
  lowers the mean error against the textbook ``max|x| / (2^(b-1)-1)`` (on N(0,1) weights per channel, int4
  mean absolute error 0.115 instead of 0.123). Every input then has a round-trip error of at most half a step.
* ``"percentile"`` puts the same boundary at the ``percentile``-th percentile of ``|x|``; ``"mse"`` grid-searches
  the ratio ``alpha`` of that boundary to ``max|x|`` (81 values in ``[0.2, 1]``, ``1`` included, so it is never
  worse than absmax) for the least ``mean|x - x_hat|^error_power`` per scale group (``error_power=1``, the
  mean absolute error, by default; 2 for squared error). Asymmetric specs shrink ``lo`` and ``hi`` together.
* Asymmetric: ``lo = min(min x, 0)``, ``hi = max(max x, 0)`` (zero is always exact),
  ``scale = (hi - lo) / (2^b - 1)``, ``zero_point = clip(-2^(b-1) - round(lo / scale))``,
  ``q = clip(round(x / scale) + zero_point, -2^(b-1), 2^(b-1)-1)``, ``x_hat = (q - zero_point) * scale``.
* 1 bit (XNOR-Net, Rastegari et al., 2016): ``q = sign(x)`` (``+1`` at 0), ``scale = mean|x|`` per scale group.
* A scale group whose values are all zero (or whose range is below ``sqrt(float32 tiny)`` ~ 1e-19) gets
  ``scale = 1`` (1 bit: ``mean|x|``, so ``0``) and dequantizes to exact zeros; nothing divides by zero or by an
  underflowed scale, so no NaN or Inf appears.
* Arithmetic runs in float32 for float32, bfloat16 and float16 inputs; scales are float32 and
  :func:`dequantize` returns the input dtype.
* Every finite float32 input gives finite codes, scales and dequantized values, up to float32's max:
  ranges are formed as ``hi / n - lo / n`` (never ``hi - lo``), codes divide by the scale in a way that
  cannot flush to zero (see ``_div_scale``), and the 1-bit mean cannot overflow.
* float64 leaves (64-bit types on) are rejected with a ``TypeError`` naming the leaf (no silent narrowing);
  zero-size leaves (e.g. shape ``(0, n)``) pass through with scale 1.
* NaN/Inf inputs raise ``ValueError`` in eager calls. Under ``jit`` the values are not visible: a NaN
  propagates into its scale group (the codes are then undefined), so check weights before tracing.

The straight-through estimator (Bengio et al., 2013) of :func:`fake_quant` passes the gradient where
``x`` lies inside the quantizer's range extended by half a step (``|x| <= (2^(b-1) - 0.5) * scale``
symmetric, ``|x| <= 2 * scale`` for 1 bit), boundary included, and gives zero where ``x`` was clipped. It
treats the scale as a constant (no gradient flows into the calibration).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import tree
from compressjax.qarray import Layout, QArray, QuantSpec, clip_finite, code_range, codes_to_storage

__all__ = [
    "DTypeError",
    "quantize",
    "dequantize",
    "fake_quant",
    "compute_scale",
    "quantized_codes",
    "quantize_params",
    "dequantize_params",
    "fake_quant_params",
    "resolve_rules",
    "LayerAxesWarning",
    "check_layer_axes",
]

Rules = QuantSpec | Mapping[Any, QuantSpec | None] | Sequence[tuple[Any, QuantSpec | None]]
MSE_ALPHAS = np.linspace(0.2, 1.0, 81, dtype=np.float32)
DEFAULT_SPEC = QuantSpec()  # int8, symmetric, per output channel, absmax
# Ranges below sqrt(float32 tiny) ~ 1e-19 get scale 1 (their values round to 0), so x / scale never
# divides by an underflowed (zero or subnormal) scale. Qwix uses the same threshold.
_TINY = float(np.sqrt(np.finfo(np.float32).tiny))
_SLACK = 1e-3  # steps of tolerance on the STE boundary so float rounding never zeroes the absmax element


class DTypeError(TypeError, ValueError):
    """A non-floating-point array was given to quantize (a ``TypeError`` that is also a ``ValueError``)."""


def _check_input(x: Any, spec: QuantSpec, path: str) -> Layout:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"leaf {path!r}: spec must be a QuantSpec, got {spec!r}")
    if isinstance(x, QArray):
        raise TypeError(f"leaf {path!r} is already a QArray ({x!r}); dequantize it first")
    if tree.is_compressed_leaf(x):
        raise TypeError(f"leaf {path!r} is already compressed ({type(x).__name__}); decompress it first")
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        got = dtype if dtype is not None else type(x).__name__
        raise DTypeError(f"leaf {path!r} has dtype {got}; quantize needs a floating-point array (float32, bfloat16, float16)")
    if jax.dtypes.canonicalize_dtype(dtype) == jnp.float64:
        raise DTypeError(
            f"leaf {path!r} has dtype float64; quantize works in float32 (scales are float32), so cast the leaf "
            "to float32 first, deliberately (a value such as 1e300 has no float32 code)"
        )
    tree.check_finite(path, x)
    shape = tuple(x.shape)
    return Layout(shape, spec.scale_axes(shape, path), spec.group_size, spec.group_axis, path)


def _grouped(x: jax.Array, lay: Layout) -> jax.Array:
    return x.astype(jnp.float32).reshape(lay.grouped_shape)


def _div_scale(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x / scale`` for any finite ``x`` and positive finite float32 ``scale``, without a flushed reciprocal.

    XLA rewrites ``x / broadcast(scale)`` into ``x * broadcast(1 / scale)``, and ``1 / scale`` is subnormal
    (flushed to zero on CPU) once ``scale > 2**126`` (~8.5e37): every code would become 0. Both sides are
    first multiplied by an exact power of two that brings such a scale below ``2**100`` (scales are normal
    float32, so ``1 / scale`` never overflows); ordinary scales get the factor 1, so their codes are bit for bit
    what ``x * (1 / scale)`` gives, at the cost of one more multiply per element. (A constant factor such as
    ``(x / 4) / (scale / 4)`` does not work: XLA cancels it and flushes again.)
    """
    big = scale > 2.0**100

    def rescaled(_):
        pre = jnp.where(big, jnp.float32(2.0**-64), jnp.float32(1.0))
        return (x * pre) / (scale * pre)

    # Only tensors with such huge scales pay for the extra multiply (it halves the speed of quantize's
    # fused compiled function); the branch is chosen on the device, without retracing.
    return jax.lax.cond(jnp.any(big), rescaled, lambda _: x / scale, None)




def _qdq(xg, scale, zp, spec: QuantSpec):
    """Quantize-dequantize in the grouped view (float32) and the STE mask."""
    if spec.bits == 1:
        y = jnp.where(xg >= 0, scale, -scale)
        mask = jnp.abs(xg) <= (2.0 + _SLACK) * scale
        return y, mask
    qmin, qmax = code_range(spec.bits, spec.symmetric)
    t, q = round_to_grid(xg, scale, zp, spec)
    y = (q - zp) * scale if zp is not None else q * scale
    mask = (t >= qmin - 0.5 - _SLACK) & (t <= qmax + 0.5 + _SLACK)
    return clip_finite(y, jnp.float32), mask


def round_to_grid(x: jax.Array, scale: jax.Array, zp: jax.Array | None, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """The one uniform quantizer of 2-8 bits, shared by ``quantize``, ``fake_quant``, calibration, ``qdot``
    and the one-shot solvers: ``t = x / scale (+ zp)`` by the flush-safe division, and the float code
    ``clip(round_half_even(t), qmin, qmax)``. Returns ``(t, code)``."""
    qmin, qmax = code_range(spec.bits, spec.symmetric)
    t = _div_scale(x, scale)
    if zp is not None:
        t = t + zp.astype(jnp.float32)
    return t, jnp.clip(jnp.round(t), qmin, qmax)


def _codes(xg, scale, zp, spec: QuantSpec) -> jax.Array:
    if spec.bits == 1:
        return jnp.where(xg >= 0, 1, -1).astype(jnp.int8)
    return round_to_grid(xg, scale, zp, spec)[1].astype(jnp.int8)


def _reduce(fn, x, axes):
    return fn(x, axis=axes, keepdims=True) if axes else x


def _scale_from_range(lo, hi, spec: QuantSpec):
    """Scale (and float zero point) whose half-step-extended range covers ``[lo, hi]``; ``lo <= 0 <= hi``."""
    if spec.symmetric:
        m = jnp.maximum(-lo, hi)
        scale = jnp.where(m > _TINY, m / (spec.qmax + 0.5), 1.0)
        return scale, None
    qmin, qmax = code_range(spec.bits, False)
    # hi / n - lo / n, not (hi - lo) / n: the range of finite inputs can exceed float32's max.
    scale = hi / (qmax - qmin) - lo / (qmax - qmin)
    scale = jnp.where(scale > _TINY, scale, 1.0)
    zp = jnp.clip(qmin - jnp.round(_div_scale(lo, scale)), qmin, qmax)
    return scale, zp


def _ranges(xg, spec: QuantSpec, axes):
    if spec.calibration == "percentile":
        p = float(spec.percentile) / 100.0
        if spec.symmetric:
            a = jnp.abs(xg)
            m = jnp.quantile(a, p, axis=axes, keepdims=True) if axes else a
            return -m, m
        # Halved (exactly) before interpolating: the interpolation forms b - a, which can overflow for
        # finite values of opposite signs near float32's max.
        h = xg * 0.5
        hi = 2.0 * jnp.quantile(h, p, axis=axes, keepdims=True) if axes else xg
        lo = 2.0 * jnp.quantile(h, 1.0 - p, axis=axes, keepdims=True) if axes else xg
    else:
        lo, hi = _reduce(jnp.min, xg, axes), _reduce(jnp.max, xg, axes)
        if spec.symmetric:
            m = jnp.maximum(-lo, hi)
            return -m, m
    return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)


@partial(jax.jit, static_argnames=("spec", "axes"))
def _compute_scale_grouped(xg, spec: QuantSpec, axes):
    if xg.size == 0:
        # A zero-size leaf (e.g. an empty kernel of shape (0, n)) has nothing to calibrate: scale 1 (and
        # zero point 0), so it passes through quantize / quantize_params / save instead of failing in an
        # empty reduction.
        shape = tuple(1 if a in axes else d for a, d in enumerate(xg.shape))
        return jnp.ones(shape, jnp.float32), (None if spec.symmetric else jnp.zeros(shape, jnp.float32))
    if spec.bits == 1:
        a = jnp.abs(xg)
        mean = _reduce(jnp.mean, a, axes)
        # The sum behind the mean overflows for huge weights; the mean of a / 2**32 does not.
        scaled = _reduce(jnp.mean, a * 2.0**-32, axes) * 2.0**32
        return jnp.where(jnp.isfinite(mean), mean, scaled), None
    lo, hi = _ranges(xg, spec, axes)
    if spec.calibration != "mse":
        return _scale_from_range(lo, hi, spec)

    def err_of(alpha):
        s, z = _scale_from_range(alpha * lo, alpha * hi, spec)
        y, _ = _qdq(xg, s, z, spec)
        d = jnp.abs(y - xg) * 0.5  # halved: y - xg can exceed float32's max for extreme inputs
        d = d if spec.error_power == 1 else jnp.square(d) if spec.error_power == 2 else d ** spec.error_power
        return _reduce(jnp.sum, d, axes), s, z

    def body(carry, alpha):
        best_e, best_s, best_z = carry
        e, s, z = err_of(alpha)
        better = e < best_e
        best_z = None if z is None else jnp.where(better, z, best_z)
        return (jnp.where(better, e, best_e), jnp.where(better, s, best_s), best_z), None

    init = err_of(jnp.float32(1.0))
    (_, scale, zp), _ = jax.lax.scan(body, init, jnp.asarray(MSE_ALPHAS[:-1]))
    return scale, zp


def compute_scale(x: jax.Array, spec: QuantSpec = DEFAULT_SPEC, *, path: str = "x") -> tuple[jax.Array, jax.Array | None]:
    """The calibrated float32 scale (and int32 zero point, ``None`` when symmetric) of ``x`` under ``spec``.

    Shapes follow ``Layout.scale_shape``: the grouped view of ``x`` (group axis split into
    ``(n_groups, group_size)``) with the reduced axes kept as size 1.
    """
    _, scale, zp = _layout_and_scales(x, spec, None, None, path)
    return scale, None if zp is None else zp.astype(jnp.int32)


def _given_scale(scale, zero_point, spec, lay, path):
    try:
        s = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), lay.scale_shape)
        z = None if zero_point is None else jnp.broadcast_to(jnp.asarray(zero_point, jnp.float32), lay.scale_shape)
    except ValueError as e:
        raise ValueError(f"leaf {path!r}: scale/zero_point do not broadcast to the scale shape {lay.scale_shape}: {e}") from None
    if spec.symmetric != (z is None):
        raise ValueError(f"leaf {path!r}: symmetric={spec.symmetric} spec but zero_point={'missing' if z is None else 'given'}")
    if not isinstance(s, jax.core.Tracer):
        # Codes divide by the scale (1 bit does not: there a zero scale is an all-zero group).
        # Codes divide by the scale, so it must be a normal float32 (CPUs flush subnormals to zero); 1 bit
        # does not divide, and there a zero scale is an all-zero group.
        v = np.asarray(s)
        tiny = float(np.finfo(np.float32).tiny)
        bad = v[~(np.isfinite(v) & ((v >= tiny) | ((v == 0) & (spec.bits == 1))))]
        if bad.size:
            raise ValueError(
                f"leaf {path!r}: a given scale must be finite and > 0 (a normal float32, >= {tiny:.3g}), got {bad.ravel()[0]}"
            )
    return s, z


def quantize(x: jax.Array, spec: QuantSpec = DEFAULT_SPEC, *, scale=None, zero_point=None, path: str = "x") -> QArray:
    """Quantizes ``x`` into a :class:`QArray` (see the module docstring for the exact numerics).

    Args:
        x: a float32, bfloat16 or float16 array.
        spec: bits, symmetry, granularity and calibration.
        scale, zero_point: optional precomputed scale (e.g. from :func:`compressjax.calibrate`), broadcastable
            to the scale shape; ``None`` calibrates from ``x``.
        path: leaf name used in error messages.

    Raises:
        TypeError: ``x`` is not a floating-point array (:class:`DTypeError`, also a ``ValueError``).
        ValueError: NaN/Inf in eager calls, channel axes out of range, a group size that does not divide
            the group axis; all naming ``path``.
    """
    if scale is None:
        # The core (_compute_scale_grouped, then _codes) fused into one compiled function for eager calls.
        lay = _check_input(x, spec, path)
        values, s, z = _quantize_calibrated(x, spec, lay.grouped_shape, lay.reduce_axes)
    else:
        lay, s, z = _layout_and_scales(x, spec, scale, zero_point, path)
        values = _quantize_values(x, s, z, spec, lay.grouped_shape)
        z = None if z is None else z.astype(jnp.int32)
    return QArray(
        values, s, z, bits=spec.bits, shape=lay.shape, dtype=x.dtype,
        channel_axes=lay.channel_axes, group_size=lay.group_size, group_axis=lay.group_axis, path=path,
    )


@partial(jax.jit, static_argnames=("spec", "grouped_shape"))
def _quantize_values(x, s, z, spec, grouped_shape):
    q = _codes(x.astype(jnp.float32).reshape(grouped_shape), s, z, spec)
    return codes_to_storage(q.reshape(x.shape), spec.bits)


@partial(jax.jit, static_argnames=("spec", "grouped_shape", "axes"))
def _quantize_calibrated(x, spec, grouped_shape, axes):
    # One compiled function: the scale reduction and the coding fuse, and eager calls compile once.
    xg = x.astype(jnp.float32).reshape(grouped_shape)
    s, z = _compute_scale_grouped(xg, spec, axes)
    values = codes_to_storage(_codes(xg, s, z, spec).reshape(x.shape), spec.bits)
    return values, s, None if z is None else z.astype(jnp.int32)


def dequantize(q: QArray, *, path: str = "QArray") -> jax.Array:
    """``(codes - zero_point) * scale`` in the original shape and dtype of the quantized array."""
    if not isinstance(q, QArray):
        raise TypeError(f"leaf {path!r}: dequantize needs a QArray, got {type(q).__name__}")
    if not isinstance(q.values, jax.core.Tracer):
        q.validate(path)
    return q.decode()


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fake_quant_core(x, scale, zp, spec):
    y, _ = _qdq(x.astype(jnp.float32), scale, zp, spec)
    return y.astype(x.dtype)


def _fq_fwd(x, scale, zp, spec):
    y, mask = _qdq(x.astype(jnp.float32), scale, zp, spec)
    return y.astype(x.dtype), (mask, scale, zp)


def _fq_bwd(spec, res, g):
    mask, scale, zp = res
    return jnp.where(mask, g, jnp.zeros_like(g)), jnp.zeros_like(scale), None if zp is None else jnp.zeros_like(zp)


_fake_quant_core.defvjp(_fq_fwd, _fq_bwd)


def _layout_and_scales(x, spec: QuantSpec, scale, zero_point, path: str):
    """The quantization core's first half, shared by every entry point: check ``x``, then the float32 scale
    and float zero point in the grouped view, calibrated from ``x`` (``scale=None``) or given; constants
    for autodiff. Returns ``(layout, scale, zero_point)``; the second half is :func:`_codes` (or
    :func:`_qdq` for fake quantization)."""
    lay = _check_input(x, spec, path)
    if scale is None:
        s, z = _compute_scale_grouped(_grouped(jax.lax.stop_gradient(x), lay), spec, lay.reduce_axes)
    else:
        s, z = _given_scale(scale, zero_point, spec, lay, path)
    return lay, jax.lax.stop_gradient(s), None if z is None else jax.lax.stop_gradient(z)


def quantized_codes(x: jax.Array, spec: QuantSpec, *, scale=None, zero_point=None, path: str = "x"):
    """The core for integer kernels (used by :func:`compressjax.quantized_dot_general`'s ``mode="int"``).

    Returns:
        ``(codes, scale, zero_point, layout)``: ``int8`` codes in ``x``'s shape, the float32 scale and float
        zero point (``None`` when symmetric) in the grouped view ``layout.grouped_shape``, and the
        :class:`~compressjax.qarray.Layout`. Errors as in :func:`quantize`.
    """
    lay, s, z = _layout_and_scales(x, spec, scale, zero_point, path)
    q = _codes(_grouped(jax.lax.stop_gradient(x), lay), s, z, spec).reshape(lay.shape)
    return q, s, z, lay


def fake_quant(x: jax.Array, spec: QuantSpec = DEFAULT_SPEC, *, scale=None, zero_point=None, path: str = "x") -> jax.Array:
    """Quantize-dequantize forward, straight-through backward (a ``jax.custom_vjp``).

    The forward value equals ``dequantize(quantize(x, spec))``. The gradient with respect to ``x`` is the
    incoming gradient where ``x`` is inside the representable range extended by half a step (boundary
    included) and zero where ``x`` was clipped; the scale gets no gradient. Works under ``jit``, ``grad``
    and ``vmap``. Args and errors as in :func:`quantize`.

    References:
        Bengio, Leonard & Courville, "Estimating or Propagating Gradients Through Stochastic Neurons", 2013.
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", CVPR 2018.
    """
    lay, s, z = _layout_and_scales(x, spec, scale, zero_point, path)
    return _fake_quant_core(x.reshape(lay.grouped_shape), s, z, spec).reshape(lay.shape)


def ste_surrogate(x: jax.Array, spec: QuantSpec = DEFAULT_SPEC, *, scale=None, zero_point=None, path: str = "x") -> jax.Array:
    """The smooth function whose gradient the STE of :func:`fake_quant` returns: ``x`` clipped to the range.

    A test aid (not part of the public API): it lets the tests check the STE with finite differences.

    ``jax.grad`` of ``fake_quant`` equals ``jax.grad`` of this function almost everywhere, which lets tests
    check the STE against finite differences (``jax.test_util.check_grads``).
    """
    lay, s, z = _layout_and_scales(x, spec, scale, zero_point, path)
    xg = x.reshape(lay.grouped_shape)
    if spec.bits == 1:
        lo, hi = -2.0 * s, 2.0 * s
    else:
        qmin, qmax = code_range(spec.bits, spec.symmetric)
        off = 0.0 if z is None else z
        lo, hi = (qmin - 0.5 - off) * s, (qmax + 0.5 - off) * s
    lo, hi = lo.astype(x.dtype), hi.astype(x.dtype)
    # `where` (not `clip`) so that the boundary itself gets gradient 1, like the STE.
    return jnp.where((xg >= lo) & (xg <= hi), xg, jnp.clip(xg, lo, hi)).reshape(lay.shape)


def resolve_rules(params: Any, rules: Rules, *, on_unmatched: str = "error", is_leaf=None) -> dict[str, QuantSpec]:
    """Which leaf gets which spec: ``{path: QuantSpec}`` for the leaves to quantize.

    ``rules`` is one :class:`QuantSpec` (applied to the default ``where`` selection: float leaves with
    ``ndim >= 2``), or an ordered mapping (or sequence of pairs) from a ``where`` pattern (regex searched in the
    leaf path, or a callable ``(path, leaf) -> bool``) to a ``QuantSpec`` or ``None`` (keep in float). The
    first matching pattern wins; unmatched leaves stay float.

    Already-quantized leaves (:class:`QArray`, or any compressed leaf) are single leaves: the default
    selection (a single ``QuantSpec``) passes them through untouched, so a partly quantized tree can be
    finished; a pattern that maps one of them to a ``QuantSpec`` raises ``TypeError`` (quantizing again
    would quantize its scales). Float64 leaves raise ``TypeError`` (see the module docstring).

    A pattern that matches no leaf, or only leaves already taken by earlier patterns, raises ``ValueError``
    with ``on_unmatched="error"`` (default, it usually means a typo), warns with ``"warn"``, and is silent
    with ``"ignore"``.

    Raises:
        ValueError: an unmatched pattern (see above), or no leaf quantized at all.
        TypeError: a spec that is not a QuantSpec/None, or a pattern that selects a non-float leaf.
    """
    plan = match_rules(params, rules, on_unmatched=on_unmatched, is_leaf=is_leaf)
    if not plan:
        _raise_nothing_to_quantize(params, rules, is_leaf)
    return plan


def match_rules(params: Any, rules: Rules, *, on_unmatched: str = "error", is_leaf=None) -> dict[str, QuantSpec]:
    """:func:`resolve_rules` without its last check: the plan may be empty (every matched leaf kept float)."""
    if on_unmatched not in ("error", "warn", "ignore"):
        raise ValueError(f"on_unmatched must be 'error', 'warn' or 'ignore', got {on_unmatched!r}")
    if isinstance(rules, QuantSpec):
        return {p: rules for p, _ in tree.selected_leaves(params, None, allow_empty=True, is_leaf=is_leaf)}
    if isinstance(rules, Mapping):
        pairs = list(rules.items())
    elif isinstance(rules, Sequence) and not isinstance(rules, str) and all(isinstance(r, tuple) and len(r) == 2 for r in rules):
        pairs = list(rules)
    else:
        raise TypeError(f"rules must be a QuantSpec or a mapping {{pattern: QuantSpec | None}}, got {rules!r}")
    preds: list[tuple[Any, Callable, QuantSpec | None]] = []
    for pattern, spec in pairs:
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(f"rules[{pattern!r}] must be a QuantSpec or None, got {spec!r}")
        if not isinstance(pattern, str) and not callable(pattern):
            raise TypeError(f"rules pattern must be a regex string or a callable (path, leaf) -> bool, got {pattern!r}")
        preds.append((pattern, tree.selector(pattern), spec))
    plan: dict[str, QuantSpec] = {}
    matched = [False] * len(preds)
    taken = [False] * len(preds)
    for path, leaf in tree.leaves_with_paths(params, is_leaf):
        if leaf is None:
            continue
        first = True
        for i, (pattern, pred, spec) in enumerate(preds):
            if pred(path, leaf):
                matched[i] = True
                if first:
                    taken[i], first = True, False
                    if spec is not None and tree.is_compressed_leaf(leaf):
                        raise TypeError(
                            f"leaf {path!r} matched by rules pattern {pattern!r} is already quantized "
                            f"({type(leaf).__name__}); quantizing it again would quantize its scales. Map it "
                            "to None in the rules, or dequantize_params first"
                        )
                    if spec is not None:
                        if not tree.is_float_array(leaf):
                            got = getattr(leaf, "dtype", type(leaf).__name__)
                            raise DTypeError(f"leaf {path!r} matched by rules pattern {pattern!r} has dtype {got}; expected a floating-point array")
                        plan[path] = spec
    for i, (pattern, _, _) in enumerate(preds):
        if taken[i] or on_unmatched == "ignore":
            continue
        why = "only matches leaves taken by earlier patterns" if matched[i] else "matches no leaf"
        paths = [p for p, _ in tree.leaves_with_paths(params, is_leaf)]
        msg = f"rules pattern {pattern!r} {why}; the tree's leaves are {paths[:8]}{' ...' if len(paths) > 8 else ''}"
        if on_unmatched == "error":
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=4)
    return plan


def _raise_nothing_to_quantize(params: Any, rules: Any, is_leaf) -> None:
    done = [p for p, x in tree.leaves_with_paths(params, is_leaf) if tree.is_compressed_leaf(x)]
    hint = f" ({len(done)} leaves are already quantized, e.g. {done[0]!r})" if done else ""
    raise ValueError(f"rules {rules!r} quantize no leaf of the params tree{hint}")


def _map_plan(fn, params, plan, is_leaf=None):
    def visit(kp, leaf):
        p = tree.path_to_str(kp)
        return fn(leaf, plan[p], p) if p in plan and leaf is not None else leaf

    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=tree.with_compressed_leaves(is_leaf))


class LayerAxesWarning(UserWarning):
    """A 3-D leaf was quantized with scales shared across its first two axes and no declared ``layer_axes``."""


def check_layer_axes(path: str, x: Any, spec: QuantSpec) -> None:
    """Warns (:class:`LayerAxesWarning`, naming ``path``) when an undeclared 3-D leaf shares scales across axes 0 and 1.

    Scales never span layers silently: a stacked ``(L, in, out)`` kernel (and an MoE ``(E, in, out)``)
    cannot be told from a conv1d ``(k, in, out)`` kernel by its shape, and per output channel both share
    each scale across their first two axes. Declare ``QuantSpec(layer_axes=(0,))`` for a stacked kernel
    (per-layer scales) or ``layer_axes=()`` for a convolution (shared across ``k``, as before) to silence it.
    Leaves of 4 or more axes are read as convolutions ``(*window, in, out)`` without a warning: a stacked
    4-D kernel (e.g. ``(L, d, heads, head_dim)``) must declare its layer axes.
    """
    if spec.layer_axes is not None or getattr(x, "ndim", 0) != 3:
        return
    lay = Layout(tuple(x.shape), spec.channel_axes, spec.group_size, spec.group_axis, path)
    own = set(lay.channel_axes)
    if 0 not in own and 1 not in own and min(x.shape) > 0:
        warnings.warn(
            f"leaf {path!r} of shape {tuple(x.shape)} gets scales shared across axes 0 and 1 (channel_axes="
            f"{spec.channel_axes}): if it stacks {x.shape[0]} layers or experts, each scale spans them all. Declare "
            "QuantSpec(..., layer_axes=(0,)) for per-layer scales, or layer_axes=() for a conv1d (k, in, out) kernel",
            LayerAxesWarning, stacklevel=3,
        )


def quantize_params(params: Any, rules: Rules = DEFAULT_SPEC, *, on_unmatched: str = "error") -> Any:
    """Replaces the leaves chosen by ``rules`` (see :func:`resolve_rules`) with :class:`QArray` nodes.

    Stacked kernels (scanned layers ``(L, in, out)``, MoE experts ``(E, in, out)``): declare the layer axes
    in the spec, ``QuantSpec(bits=4, group_size=128, layer_axes=(0,))``, so that every layer keeps its own
    scales (without it each scale would span all ``L`` layers). An undeclared 3-D leaf whose scales would
    span its first two axes raises a :class:`LayerAxesWarning` naming it (see :func:`check_layer_axes`).
    """
    plan = resolve_rules(params, rules, on_unmatched=on_unmatched)

    def one(x, spec, p):
        check_layer_axes(p, x, spec)
        return quantize(x, spec, path=p)

    return _map_plan(one, params, plan)


def dequantize_params(qparams: Any) -> Any:
    """Replaces every compressed leaf in ``qparams`` with its decoded array (original shape and dtype).

    A compressed leaf is any object of the compressed-leaf protocol (:func:`compressjax.tree.is_compressed_leaf`
    and a ``decode()`` method): a :class:`QArray` (validated first, as :func:`dequantize` does), a
    weight-shared :class:`~compressjax.Codebook`.
    """

    def visit(kp, x):
        if isinstance(x, QArray):
            return dequantize(x, path=tree.path_to_str(kp))
        return x.decode() if tree.is_compressed_leaf(x) else x

    return jax.tree_util.tree_map_with_path(visit, qparams, is_leaf=tree.is_compressed_leaf)


def fake_quant_params(params: Any, rules: Rules = DEFAULT_SPEC, *, on_unmatched: str = "error") -> Any:
    """:func:`fake_quant` on the leaves chosen by ``rules``; the same tree structure comes back (for QAT).

    Use inside the loss: ``loss(fake_quant_params(params, rules), batch)``. The rule resolution happens at
    trace time, so a jitted step compiles once.
    """
    plan = resolve_rules(params, rules, on_unmatched=on_unmatched)

    def one(x, spec, p):
        check_layer_axes(p, x, spec)
        return fake_quant(x, spec, path=p)

    return _map_plan(one, params, plan)
