"""Small checkers for the JSON read from a model file: each returns the checked value or raises ``FormatError``.

Every field a leaf record carries goes through one of these before it is used, so that a forged or
corrupted value ends in one error type naming the leaf and the value (never ``ZeroDivisionError``,
``KeyError`` or an exception from deep inside NumPy or XLA). They are meant to be reused by every leaf
type of the format (dense and sparse arrays, :class:`~compressjax.QArray`, and later ones), e.g.::

    require_keys(meta, what, required={"bits", "shape"}, optional={"group_size"})
    bits = require_int(meta, "bits", 1, 8, what)
    group = require_optional_int(meta, "group_size", 1, shape[axis], what)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from compressjax.export._container import FormatError

__all__ = [
    "is_int", "require_mapping", "require_keys", "require_int", "require_optional_int", "require_bool",
    "require_choice", "require_int_list",
]

_MISSING = object()


def is_int(v: Any) -> bool:
    """A JSON integer: ``int`` but not ``bool`` (``True`` is an ``int`` in Python, never in the format)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def require_mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{what}: expected a JSON object, got {_show(value)}")
    return value


def require_keys(meta: Any, what: str, *, required: Collection[str], optional: Collection[str] = ()) -> Mapping[str, Any]:
    """``meta`` is an object holding every ``required`` key and nothing outside ``required | optional``."""
    meta = require_mapping(meta, what)
    missing = sorted(set(required) - set(meta))
    if missing:
        raise FormatError(f"{what}: missing field(s) {missing}")
    unknown = sorted(str(k) for k in set(meta) - set(required) - set(optional))
    if unknown:
        raise FormatError(f"{what}: unknown field(s) {[_show(k) for k in unknown[:5]]}")
    return meta


def _get(meta: Mapping[str, Any], key: str, what: str) -> Any:
    value = meta.get(key, _MISSING)
    if value is _MISSING:
        raise FormatError(f"{what}: missing field {key!r}")
    return value


def require_int(meta: Mapping[str, Any], key: str, lo: int, hi: int, what: str) -> int:
    """``meta[key]`` is an integer in ``[lo, hi]``."""
    value = _get(meta, key, what)
    if not is_int(value) or not lo <= value <= hi:
        raise FormatError(f"{what}: {key}={_show(value)} is not an integer in [{lo}, {hi}]")
    return value


def require_optional_int(meta: Mapping[str, Any], key: str, lo: int, hi: int, what: str) -> int | None:
    """``meta[key]`` is ``None`` (or absent) or an integer in ``[lo, hi]``."""
    if meta.get(key) is None:
        return None
    return require_int(meta, key, lo, hi, what)


def require_bool(meta: Mapping[str, Any], key: str, what: str) -> bool:
    value = _get(meta, key, what)
    if not isinstance(value, bool):
        raise FormatError(f"{what}: {key}={_show(value)} is not true or false")
    return value


def require_choice(meta: Mapping[str, Any], key: str, choices: Collection[Any], what: str) -> Any:
    """``meta[key]`` is one of ``choices`` (compared by type too, so ``1`` never matches ``True``)."""
    value = _get(meta, key, what)
    if not any(type(value) is type(c) and value == c for c in choices):
        raise FormatError(f"{what}: {key}={_show(value)} is not one of {sorted(map(str, choices))}")
    return value


def require_int_list(meta: Mapping[str, Any], key: str, lo: int, hi: int, what: str, *, max_len: int) -> list[int]:
    """``meta[key]`` is a list of at most ``max_len`` integers, each in ``[lo, hi]``."""
    value = _get(meta, key, what)
    if not isinstance(value, list) or len(value) > max_len or not all(is_int(v) and lo <= v <= hi for v in value):
        raise FormatError(f"{what}: {key}={_show(value)} is not a list of at most {max_len} integers in [{lo}, {hi}]")
    return value
