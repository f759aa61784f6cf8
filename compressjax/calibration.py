"""Activation-range calibration for post-training quantization (PTQ).

Run the float model on a few batches, collect the activations you want to quantize, and compute one
static scale (and zero point) per activation with the same calibrations as weights (``"absmax"``,
``"percentile"``, ``"mse"``). The result feeds ``quantized_dot_general(..., activation_scale=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from compressjax import tree
from compressjax.qarray import QuantSpec
from compressjax.quantization import compute_scale

__all__ = ["ActivationRange", "calibrate", "DEFAULT_ACTIVATION_SPEC"]

DEFAULT_ACTIVATION_SPEC = QuantSpec(bits=8, channel_axes=())  # per-tensor int8 absmax


class ActivationRange(NamedTuple):
    """A static activation range: float32 ``scale`` and int32 ``zero_point`` (``None`` when symmetric)."""

    scale: jax.Array
    zero_point: jax.Array | None


def calibrate(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Iterable[Any],
    spec: QuantSpec = DEFAULT_ACTIVATION_SPEC,
    *,
    max_batches: int | None = None,
    jit: bool = True,
) -> Any:
    """Collects activations over ``batches`` and returns their calibrated ranges.

    Args:
        apply_fn: ``apply_fn(params, batch)`` returning a pytree of the activation arrays to calibrate, for
            example the inputs of each Dense layer recorded with linen's ``self.sow("intermediates", ...)``
            (``lambda p, x: model.apply(p, x, mutable="intermediates")[1]``) or returned by an NNX module.
        params: the float parameters.
        batches: an iterable of batches (a few hundred examples in total is typical).
        spec: the activation spec; per tensor (``channel_axes=()``) by default. Its channel axes refer to one
            activation array; activations are concatenated along axis 0 (the batch axis), which must not be
            a channel axis.
        max_batches: stop after this many batches.
        jit: compile ``apply_fn`` once (default).

    Returns:
        A pytree with the structure of ``apply_fn``'s output where each activation array is replaced by an
        :class:`ActivationRange` (scale shape: the activation's scale shape under ``spec``).

    Raises:
        ValueError: no batch, activations whose shapes differ beyond axis 0 across batches, NaN/Inf in an
            activation (naming its path), or a channel axis on the batch axis.
        TypeError: a non-floating-point activation.
    """
    fn = jax.jit(apply_fn) if jit else apply_fn
    collected: list[list[np.ndarray]] | None = None
    treedef = None
    paths: list[str] = []
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        out = fn(params, batch)
        flat = tree.leaves_with_paths(out)
        if treedef is None:
            treedef = jax.tree.structure(out)
            paths = [p for p, _ in flat]
            collected = [[] for _ in flat]
        elif jax.tree.structure(out) != treedef:
            raise ValueError(f"apply_fn returned a different activation tree on batch {i}: {jax.tree.structure(out)} vs {treedef}")
        for j, (p, a) in enumerate(flat):
            if not tree.is_float_array(a):
                raise TypeError(f"activation {p!r} has dtype {getattr(a, 'dtype', type(a).__name__)}; expected floating point")
            if collected[j] and collected[j][0].shape[1:] != a.shape[1:]:
                raise ValueError(f"activation {p!r} has shape {a.shape} on batch {i}, but {collected[j][0].shape} before (only axis 0 may change)")
            collected[j].append(a)
    if treedef is None:
        raise ValueError("calibrate got no batch: `batches` is empty")
    ranges = []
    for p, arrays in zip(paths, collected, strict=True):
        x = jnp.concatenate(arrays, axis=0) if arrays[0].ndim else jnp.stack(arrays)
        axes = tuple(a % x.ndim for a in spec.channel_axes) if x.ndim else ()
        if 0 in axes and x.ndim > 1:
            raise ValueError(f"activation {p!r}: channel axis 0 of spec {spec.channel_axes} is the batch axis; use negative axes for features")
        scale, zp = compute_scale(x, spec, path=p)
        ranges.append(ActivationRange(scale, zp))
    return jax.tree.unflatten(treedef, ranges)
