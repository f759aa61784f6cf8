"""Argument checks shared by every technique: a bad argument is an error naming it and its value."""

from __future__ import annotations

from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_positive_int", "check_fraction", "check_sparsity"]


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int; ``TypeError`` for a bool or non-integer, ``ValueError`` for ``value <= 0``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_fraction(value: Any, name: str = "sparsity") -> float:
    """A Python real in ``[0, 1]`` as a float (static arguments: arrays are refused).

    Raises:
        TypeError: a bool or not a real number.
        ValueError: NaN or outside ``[0, 1]``.
    """
    if isinstance(value, bool | np.bool_) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {value!r}")
    s = float(value)
    if not 0.0 <= s <= 1.0:  # also catches NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return s


def check_sparsity(sparsity: Any, name: str = "sparsity") -> float | jax.Array:
    """A sparsity: a Python real is checked as by :func:`check_fraction`; a scalar array is checked when
    concrete.

    A traced sparsity cannot be checked; it is clipped to ``[0, 1]`` and NaN counts as 0 (no pruning).

    Raises:
        TypeError: if it is a bool, not a real number or not a scalar.
        ValueError: if a concrete value is NaN or outside ``[0, 1]``.
    """
    if isinstance(sparsity, bool | np.bool_) or isinstance(sparsity, Real):
        return check_fraction(sparsity, name)
    arr = sparsity if isinstance(sparsity, jax.Array | np.ndarray) else None
    if arr is None or arr.ndim != 0:
        raise TypeError(f"{name} must be a float or a scalar array, got {sparsity!r}")
    if not isinstance(arr, jax.core.Tracer):
        s = float(arr)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {s!r}")
    s = jnp.asarray(arr, jnp.float32)
    return jnp.where(jnp.isnan(s), 0.0, jnp.clip(s, 0.0, 1.0))
