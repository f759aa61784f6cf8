"""Distillation losses: soft-target KL (Hinton), hard-label mix, MSE, FitNets hints and cosine.

The losses follow optax's conventions (``optax.losses``): they take ``ArrayLike`` inputs, return one loss
per example as a ``jax.Array`` (the class / feature axis reduced, every other axis kept), accept ``axis=``
and ``where=``, and are built on ``log_softmax`` so they stay finite for large logits and temperatures.

Bad arguments raise ``ValueError`` / ``TypeError`` naming the value. Checks on *values* (a temperature, an
``alpha``, the range of the labels) run when those values are concrete (eager calls, Python numbers);
under ``jax.jit`` only static facts (shapes, dtypes) can be checked, so pass hyperparameters as Python
numbers (closed over, or static) to keep their checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "kd_loss",
    "distillation_loss",
    "softmax_cross_entropy_with_integer_labels",
    "mse_loss",
    "hint_loss",
    "cosine_loss",
]

Axis = int | tuple[int, ...] | None


def _concrete(x: Any) -> np.ndarray | None:
    """The value of ``x`` as NumPy when it is known now (not a tracer), else ``None``."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # noqa: BLE001 - anything that cannot become an array is checked elsewhere
        return None


def _check_temperature(temperature: Any) -> None:
    t = _concrete(temperature)
    if t is None:
        return
    if t.ndim != 0:
        raise ValueError(f"temperature must be a scalar, got an array of shape {t.shape}")
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got temperature={t.item()!r}")


def _check_alpha(alpha: Any) -> None:
    a = _concrete(alpha)
    if a is None:
        return
    if a.ndim != 0:
        raise ValueError(f"alpha must be a scalar, got an array of shape {a.shape}")
    if not (0.0 <= a <= 1.0):
        raise ValueError(f"alpha must lie in [0, 1], got alpha={a.item()!r}")


def _as_float(x: ArrayLike, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x


def _check_same_shape(a: jax.Array, b: jax.Array, name_a: str, name_b: str, hint: str = "") -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; they must match{hint}")


def _norm_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
    """``axis`` as a tuple of non-negative axes; ``None`` means every axis but the leading (batch) one."""
    if axis is None:
        return tuple(range(1, ndim)) if ndim > 1 else tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis={axis!r} is out of range for an array with {ndim} dimension(s)")
        out.append(a % ndim)
    return tuple(out)


def kd_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float | ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Hinton's soft-target distillation loss, one value per example.

    .. math:: T^2 \, \mathrm{KL}\big(\mathrm{softmax}(t / T) \,\|\, \mathrm{softmax}(s / T)\big)

    The :math:`T^2` factor keeps the gradient's magnitude roughly independent of :math:`T` (the gradient
    of the KL term alone shrinks as :math:`1/T^2` for large :math:`T`), so the soft and hard terms can be
    mixed with one fixed weight. Both distributions come from ``log_softmax``, so large logits and large
    temperatures do not overflow; the loss is exactly zero when the two logits are equal, and teacher
    probabilities that are zero (``-inf`` teacher logits) are handled exactly. A NaN or ``+inf`` teacher
    logit (in a class that ``where`` keeps) gives a NaN loss for that example, as a non-finite student
    logit does, so a broken teacher shows in the metrics instead of silently training nothing. The KL is summed as
    non-negative terms (see the code), so it keeps its precision for large ``T`` where the naive sum
    cancels catastrophically. The loss and its gradient are finite for every finite ``T > 0`` and finite
    logits, under ``jit`` too: everything is computed in units of ``T`` (``T log softmax(x / T)``), so
    neither ``x / T`` (``T = 1e-30``) nor ``T^2`` (``T = 1e20``) is ever formed; as ``T`` grows the loss
    tends to half the variance of ``s - t`` over the classes, as ``T -> 0`` to ``0``.

    Args:
        student_logits: logits of the student, shape ``(..., num_classes)``.
        teacher_logits: logits of the teacher, same shape.
        temperature: softening temperature ``T > 0``.
        axis: the class axis.
        where: optional boolean mask broadcastable to the logits; classes where it is False are left out of
            both softmaxes (e.g. padded vocabulary entries).

    Returns:
        The per-example loss, shape of the logits without ``axis``.

    Raises:
        ValueError: if the shapes differ or ``temperature`` is not a positive finite number.
        TypeError: if the logits are not floating point.

    References:
        Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015,
        https://arxiv.org/abs/1503.02531
    """
    s = _as_float(student_logits, "student_logits")
    t = _as_float(teacher_logits, "teacher_logits")
    _check_same_shape(s, t, "student_logits", "teacher_logits")
    _check_temperature(temperature)
    temperature = jnp.asarray(temperature, dtype=jnp.result_type(s.dtype, t.dtype))
    valid = jnp.ones(jnp.broadcast_shapes(s.shape, t.shape), bool) if where is None else \
        jnp.broadcast_to(jnp.asarray(where, bool), jnp.broadcast_shapes(s.shape, t.shape))
    # Everything is computed in "T units": ell = T * (log softmax(x / T) + log n), which stays finite for
    # every finite T > 0 (x / T itself overflows for T = 1e-30, and T^2 overflows float32 for T = 1e20).
    log_p_s, ell_s = _tempered_log_softmax(s, temperature, valid, axis)
    log_p_t, ell_t = _tempered_log_softmax(t, temperature, valid, axis)
    p_s, p_t = jnp.exp(log_p_s), jnp.exp(log_p_t)
    pos = jnp.logical_and(valid, p_t > 0)
    # T^2 KL = T^2 sum_i p_i (r_i - 1 - log r_i) with r = q / p (the added terms sum to zero), written with
    # d = log p - log q as T^2 p (expm1(-d) + d): every term is >= 0, so nothing cancels (the naive sum
    # p (log p - log q) loses all its digits for large T, where d ~ 1/T). With u = T d = ell_t - ell_s
    # (accurate at any T), T^2 (expm1(-d) + d) = u^2 phi(d), phi(d) = (expm1(-d) + d) / d^2 (a series for
    # small d, where T^2 alone would overflow); for |d| >= 1 the equivalent T^2 (q - p) + T p u avoids
    # overflowing exp(-d). The inner `where`s keep -inf and inf (masked classes, zero probabilities, d at
    # tiny T) out of the value and the gradient.
    u = jnp.where(pos, ell_t - ell_s, 0.0)
    d = jnp.where(pos, u / temperature, 0.0)
    ad = jnp.abs(d)
    tiny, small = ad < 1e-2, ad < 1
    dt = jnp.where(tiny, d, 0.0)
    dm = jnp.where(small & ~tiny, d, 1.0)
    phi = jnp.where(tiny, 0.5 - dt / 6 + dt * dt / 24 - dt**3 / 120, (jnp.expm1(-dm) + dm) / (dm * dm))
    # T is zeroed where a branch is not taken: its T^2 may be inf (T = 1e20), and 0 * inf in the gradient is NaN.
    t_big = jnp.where(small, 0.0, temperature)
    u_small = jnp.where(small, u, 0.0)  # u^2 may overflow where |d| >= 1 (logits of 1e30)
    term = jnp.where(small, p_t * u_small * u_small * phi, t_big * (t_big * (p_s - p_t) + p_t * u))
    # Classes the teacher gives probability 0 contribute T^2 q (the r_i term of the identity above).
    t_zero = jnp.where(pos | ~valid, 0.0, temperature)
    term = jnp.where(pos, term, t_zero * t_zero * p_s)
    kl = jnp.sum(term, axis=axis)
    # A NaN or +inf teacher logit (-inf is a legitimate zero probability) would otherwise give a finite
    # constant loss with zero gradient: the student would silently learn nothing. Make it visible as NaN,
    # like a non-finite student logit.
    bad_t = jnp.any(jnp.logical_and(valid, jnp.isnan(t) | (t == jnp.inf)), axis=axis)
    return jnp.where(bad_t, jnp.nan, kl)


def _tempered_log_softmax(x: jax.Array, temperature: jax.Array, valid: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """``(log softmax(x / T), T * (log softmax(x / T) + log n))`` over the ``valid`` classes (``n`` of them),
    finite for every finite ``T > 0``: ``x / T`` is never formed from unshifted logits, and when ``T`` exceeds
    the logits' spread the log-sum-exp is taken as ``log1p(mean(expm1(y / T)))`` (no cancellation, and
    ``T`` times it tends to the mean shifted logit instead of losing every digit)."""
    x = jnp.broadcast_to(x, valid.shape)
    m = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # all -inf (or masked) rows: any finite shift
    y = jnp.where(valid, x - m, -jnp.inf)  # <= 0
    n = jnp.maximum(jnp.sum(valid, axis=axis, keepdims=True), 1).astype(x.dtype)
    finite = valid & jnp.isfinite(y)
    spread = jnp.max(jnp.where(finite, -y, 0.0), axis=axis, keepdims=True)
    all_finite = jnp.all(finite | ~valid, axis=axis, keepdims=True)
    flat = spread < temperature  # every y / T in (-1, 0]
    # T >> spread: y / T may be below the smallest float32 (T = 1e38); T log mean exp(y / T) is then the
    # cumulant series mean + var / (2T) + k3 / (6T^2), exact to (spread / T)^3 < 1e-9.
    series = all_finite & (spread < 1e-3 * temperature)
    y0 = jnp.where(finite & series, y, 0.0)  # (only where the series is used: c^3 may overflow elsewhere)
    mean = jnp.sum(y0, axis=axis, keepdims=True) / n
    c = jnp.where(finite & series, y0 - mean, 0.0)
    var = jnp.sum(c * c, axis=axis, keepdims=True) / n
    k3 = jnp.sum(c * c * c, axis=axis, keepdims=True) / n
    t_s = jnp.where(series, temperature, 1.0)  # T^2 may underflow where the series is not used (0 * inf = NaN)
    t_lse_series = mean + var / (2 * t_s) + k3 / (6 * t_s * t_s)
    z = jnp.where(valid, y / temperature, -jnp.inf)
    z_flat = jnp.where(flat & valid, z, 0.0)
    mean_expm1 = jnp.sum(jnp.where(valid, jnp.expm1(z_flat), 0.0), axis=axis, keepdims=True) / n
    lse_flat = jnp.log1p(mean_expm1)  # log(mean(exp(z))), in (-1, 0]
    lse_steep = jnp.log(jnp.sum(jnp.where(valid, jnp.exp(z), 0.0), axis=axis, keepdims=True)) - jnp.log(n)
    lse = jnp.where(flat, lse_flat, lse_steep)  # log(sum exp z) - log n
    t_lse = jnp.where(series, t_lse_series, temperature * lse)
    lse = jnp.where(series, t_lse_series / t_s, lse)
    ell = jnp.where(valid, y - t_lse, -jnp.inf)
    log_p = jnp.where(valid, z - jnp.log(n) - lse, -jnp.inf)
    return log_p, ell



def _check_labels(labels: ArrayLike, logits: jax.Array, axis: int) -> jax.Array:
    labels = jnp.asarray(labels) if not isinstance(labels, jax.Array) else labels
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}; for soft targets use kd_loss")
    ax = axis % logits.ndim
    expected = logits.shape[:ax] + logits.shape[ax + 1 :]
    if labels.shape != expected:
        raise ValueError(
            f"labels have shape {labels.shape}; logits of shape {logits.shape} need labels of shape {expected}"
        )
    num_classes = logits.shape[ax]
    values = _concrete(labels)
    if values is not None and values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels must lie in [0, {num_classes - 1}] for {num_classes} classes, got label {bad}")
    return labels


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike, labels: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Cross-entropy of ``logits`` against integer ``labels``, one value per example.

    Named as in optax (``optax.losses.softmax_cross_entropy_with_integer_labels``).

    Args:
        logits: shape ``(..., num_classes)``.
        labels: integer class indices, shape of ``logits`` without ``axis``.
        axis: the class axis.
        where: optional boolean mask of valid classes (see :func:`kd_loss`).

    Raises:
        TypeError: if ``labels`` are not integers or ``logits`` not floating point.
        ValueError: on a shape mismatch or (for concrete labels) a label outside ``[0, num_classes)``.
            Under ``jax.jit`` the labels are not known; there an out-of-range label gives a NaN loss.
    """
    logits = _as_float(logits, "logits")
    labels = _check_labels(labels, logits, axis)
    log_p = jax.nn.log_softmax(logits, axis=axis, where=where)
    num_classes = logits.shape[axis % logits.ndim]
    in_range = jnp.logical_and(labels >= 0, labels < num_classes)
    safe = jnp.where(in_range, labels, 0)
    picked = -jnp.squeeze(jnp.take_along_axis(log_p, jnp.expand_dims(safe, axis), axis=axis), axis=axis)
    # Traced labels cannot be checked here; a label out of range gives NaN (never a silent wrap-around of
    # -1 to the last class), which shows in the loss.
    return jnp.where(in_range, picked, jnp.nan)


def distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    temperature: float | ArrayLike = 1.0,
    alpha: float | ArrayLike = 0.5,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    """``alpha * kd_loss + (1 - alpha) * cross_entropy(student_logits, labels)``, one value per example.

    With ``labels=None`` there is no hard term and the result is the soft term :func:`kd_loss` alone
    (not scaled by ``alpha``).

    Args:
        student_logits: logits of the student, shape ``(..., num_classes)``.
        teacher_logits: logits of the teacher, same shape.
        labels: optional integer class indices, shape of the logits without ``axis``.
        temperature: softening temperature of the soft term (the hard term uses ``T = 1``).
        alpha: weight of the soft term, in ``[0, 1]``.
        axis: the class axis.
        where: optional boolean mask of valid classes.

    Raises:
        ValueError: on shape mismatches, ``temperature <= 0``, ``alpha`` outside ``[0, 1]`` or labels out of
            range (concrete labels only).
        TypeError: if the labels are not integers.

    References:
        Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015,
        https://arxiv.org/abs/1503.02531
    """
    total, _ = _distillation_with_terms(
        student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha, axis=axis, where=where
    )
    return total


def _distillation_with_terms(
    student_logits: ArrayLike, teacher_logits: ArrayLike, labels: ArrayLike | None = None, **keywords: Any
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`distillation_loss` (same arguments, as keywords) and its terms: ``(total, {"kd", "ce"})`` per
    example (no ``"ce"`` without labels)."""
    alpha = keywords.pop("alpha", 0.5)
    _check_alpha(alpha)
    kd = kd_loss(student_logits, teacher_logits, **keywords)
    if labels is None:
        return kd, {"kd": kd}
    keywords.pop("temperature", None)  # the hard term uses T = 1
    ce = softmax_cross_entropy_with_integer_labels(student_logits, labels, **keywords)
    alpha = jnp.asarray(alpha, kd.dtype)
    return alpha * kd + (1 - alpha) * ce, {"kd": kd, "ce": ce}


def mse_loss(
    predictions: ArrayLike, targets: ArrayLike, *, axis: Axis = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Mean squared error over ``axis``, one value per example (logit matching or regression distillation).

    Args:
        predictions: the student's outputs.
        targets: the teacher's outputs (or regression targets), same shape.
        axis: axis or axes averaged over; ``None`` averages every axis except the leading (batch) one.
        where: optional boolean mask broadcastable to the inputs; only True entries are averaged.

    Raises:
        ValueError: if the shapes differ.

    References:
        Ba & Caruana, "Do Deep Nets Really Need to be Deep?", 2014 (logit regression),
        https://arxiv.org/abs/1312.6184
    """
    p = _as_float(predictions, "predictions")
    t = _as_float(targets, "targets")
    _check_same_shape(p, t, "predictions", "targets")
    axes = _norm_axes(axis, p.ndim)
    return jnp.mean(jnp.square(p - t), axis=axes, where=where)


def hint_loss(
    student_features: ArrayLike,
    teacher_features: ArrayLike,
    projection: ArrayLike | Callable[[jax.Array], jax.Array] | None = None,
    *,
    where: ArrayLike | None = None,
) -> jax.Array:
    """FitNets hint loss: mean squared error between (projected) student and teacher features, per example.

    The student's intermediate features usually have fewer channels than the teacher's; a learned
    *regressor* maps them to the teacher's width first.

    Args:
        student_features: intermediate features of the student, shape ``(batch, ..., c_s)``.
        teacher_features: the teacher's features at the hint layer, shape ``(batch, ..., c_t)``.
        projection: ``None`` (widths must already match), a matrix of shape ``(c_s, c_t)`` applied on the
            last axis (keep it in the student's params so it trains), or any callable
            ``features -> projected`` (e.g. a closure over a Dense layer's params).
        where: optional boolean mask broadcastable to the teacher's features.

    Returns:
        The mean over every non-batch axis, shape ``(batch,)``.

    Raises:
        ValueError: if the (projected) shapes differ, or the projection matrix does not fit.

    References:
        Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, https://arxiv.org/abs/1412.6550
    """
    s = _as_float(student_features, "student_features")
    t = _as_float(teacher_features, "teacher_features")
    if projection is not None:
        if callable(projection):
            s = projection(s)
        else:
            w = _as_float(projection, "projection")
            if w.ndim != 2 or w.shape[0] != s.shape[-1]:
                raise ValueError(
                    f"projection matrix has shape {w.shape}; student features of width {s.shape[-1]} "
                    f"need a matrix of shape ({s.shape[-1]}, {t.shape[-1]})"
                )
            s = s @ w
    hint = "" if projection is not None else "; pass projection= to map student features to the teacher's width"
    _check_same_shape(
        s, t, "student_features (projected)" if projection is not None else "student_features", "teacher_features", hint
    )
    return jnp.mean(jnp.square(s - t), axis=_norm_axes(None, s.ndim), where=where)


def cosine_loss(
    predictions: ArrayLike,
    targets: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    epsilon: float = 1e-8,
) -> jax.Array:
    """``1 - cosine_similarity(predictions, targets)`` along ``axis``, one value per example.

    Used to distill embedding models (sentence embeddings), where only the direction matters. Norms are
    clamped below by ``epsilon``, so an all-zero vector gives loss 1 and a finite gradient, never NaN.

    Args:
        predictions: student embeddings, shape ``(..., dim)``.
        targets: teacher embeddings, same shape.
        axis: the embedding axis.
        where: optional boolean mask broadcastable to the inputs; only True entries enter the dot products.
        epsilon: lower bound for each vector's norm.

    Raises:
        ValueError: if the shapes differ.

    References:
        Reimers & Gurevych, "Making Monolingual Sentence Embeddings Multilingual using Knowledge
        Distillation", EMNLP 2020, https://arxiv.org/abs/2004.09813
    """
    p = _as_float(predictions, "predictions")
    t = _as_float(targets, "targets")
    _check_same_shape(p, t, "predictions", "targets")
    if where is not None:
        where = jnp.broadcast_to(jnp.asarray(where, bool), p.shape)
        p = jnp.where(where, p, 0.0)
        t = jnp.where(where, t, 0.0)
    eps2 = jnp.asarray(epsilon, p.dtype) ** 2
    # sqrt(max(|x|^2, eps^2)): the max keeps the gradient finite at the zero vector.
    p_norm = jnp.sqrt(jnp.maximum(jnp.sum(p * p, axis=axis), eps2))
    t_norm = jnp.sqrt(jnp.maximum(jnp.sum(t * t, axis=axis), eps2))
    return 1.0 - jnp.sum(p * t, axis=axis) / (p_norm * t_norm)


# How compressjax.make_distill_step reports the soft and hard terms separately for this loss (and for
# keyword partials of it): a protocol attribute, not an identity test.
distillation_loss._cj_with_terms = _distillation_with_terms
