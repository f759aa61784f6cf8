"""Tree structure <-> JSON for the file format, with no code execution on load.

Supported containers (anything else raises ``TypeError`` at save time, naming the path):

* ``dict`` with ``str`` or ``int`` keys (linen ``params``), ``flax.core.FrozenDict``;
* ``list`` and ``tuple`` (exact types; named tuples and dataclasses are refused, since rebuilding them
  would mean importing a class named in the file);
* ``flax.nnx.State`` (rebuilt as ``nnx.State``, so ``nnx.update(model, load(path))`` works) and the Flax
  NNX variable types (``nnx.Param``, ``nnx.BatchStat``, ... looked up in a fixed table of ``flax.nnx``'s
  own classes) with their JSON-representable metadata;
* leaves: ``None``, ``bool``/``int``/``float`` Python scalars (kept inline in the JSON), NumPy and JAX
  arrays of the dtypes in ``_codec`` and :class:`compressjax.QArray`.

Equinox modules and other custom pytrees are not supported: save ``eqx.filter(model, eqx.is_array)``
leaves as a list (``jax.tree.leaves``) and rebuild with ``jax.tree.unflatten``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from compressjax.export._container import FormatError

MAX_DEPTH = 256
# Flax's own variable flags: anything but a bool there would reach Flax's internals unchecked.
_BOOL_METADATA = {"hijax", "ref", "eager_sharding", "mutable"}
_SCALAR = (bool, int, float)


def _nnx():
    from flax import nnx

    return nnx


def variable_types() -> dict[str, type]:
    """The NNX variable classes a file may name: ``flax.nnx``'s own subclasses of ``nnx.Variable``."""
    nnx = _nnx()
    out = {}
    for name in dir(nnx):
        obj = getattr(nnx, name)
        if isinstance(obj, type) and issubclass(obj, nnx.Variable) and not name.startswith("_"):
            out[name] = obj
    return out


def _json_meta(value: Any, path: str, key: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple) and all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
        return {"tuple": list(value)}
    raise TypeError(
        f"leaf {path!r}: NNX variable metadata {key}={value!r} cannot be stored (only None, bool, int, float, "
        "str and tuples of those); drop it from the variable before saving"
    )


def _meta_from_json(value: Any, what: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and set(value) == {"tuple"} and isinstance(value["tuple"], list):
        if all(v is None or isinstance(v, (bool, int, float, str)) for v in value["tuple"]):
            return tuple(value["tuple"])
    raise FormatError(f"{what}: invalid variable metadata {value!r}")


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def flatten(tree: Any, is_array_leaf) -> tuple[dict, list[tuple[str, Any]]]:
    """``(node, leaves)``: the JSON description of ``tree`` and its array/QArray leaves with path strings."""
    leaves: list[tuple[str, Any]] = []
    nnx = _nnx()
    from flax.core import FrozenDict

    var_types = None

    def visit(x: Any, path: str, depth: int) -> dict:
        nonlocal var_types
        if depth > MAX_DEPTH:
            raise ValueError(f"the params tree is nested deeper than {MAX_DEPTH} levels at {path!r}")
        if x is None:
            return {"t": "none"}
        if is_array_leaf(x):
            leaves.append((path, x))
            return {"t": "leaf", "i": len(leaves) - 1}
        if isinstance(x, _SCALAR) and not isinstance(x, np.generic):
            return {"t": "py", "v": x}
        if isinstance(x, nnx.Variable):
            if var_types is None:
                var_types = variable_types()
            name = type(x).__name__
            if var_types.get(name) is not type(x):
                raise TypeError(
                    f"leaf {path!r}: NNX variable type {type(x).__module__}.{type(x).__qualname__} is not one of "
                    f"flax.nnx's own variable types {sorted(var_types)}; convert it (e.g. to nnx.Param) before saving"
                )
            meta = {k: _json_meta(v, path, k) for k, v in x.get_metadata().items()}
            return {"t": "var", "cls": name, "m": meta, "v": visit(x.get_value(), path, depth + 1)}
        kind = None
        if type(x) is nnx.State:
            kind = "state"
        elif type(x) is dict:
            kind = "dict"
        elif isinstance(x, FrozenDict):
            kind = "frozendict"
        if kind is not None:
            items = []
            # A State keeps nested levels as plain dicts (and wraps them on access): store what it holds.
            mapping = x.raw_mapping if kind == "state" and hasattr(x, "raw_mapping") else x
            for k, v in mapping.items():
                if not (isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool))):
                    raise TypeError(f"key {k!r} at {path!r} has type {type(k).__name__}; only str and int keys can be saved")
                items.append([k, visit(v, _join(path, k), depth + 1)])
            if len({type(k) for k, _ in items}) > 1:
                raise TypeError(f"the {kind} at {path or 'the params root'!r} mixes int and str keys, which JAX cannot flatten")
            return {"t": kind, "k": items}
        if type(x) in (list, tuple):
            return {"t": type(x).__name__, "c": [visit(v, _join(path, i), depth + 1) for i, v in enumerate(x)]}
        raise TypeError(
            f"{path or 'the params root'!r} has type {type(x).__module__}.{type(x).__qualname__}, which the file format "
            "does not store; supported: dict, FrozenDict, list, tuple, nnx.State, nnx variables, None, Python "
            "scalars, arrays and QArray (for other pytrees save jax.tree.leaves(tree) and unflatten on load)"
        )

    return visit(tree, "", 0), leaves


def unflatten(node: Any, leaves: list[Any]) -> Any:
    """Rebuilds the tree described by ``node`` with the decoded ``leaves``; validates every field."""
    used: set[int] = set()
    tree = _unflatten(node, leaves, used, "", 0)
    if len(used) != len(leaves):
        raise FormatError(f"{len(leaves) - len(used)} leaves of the header are not placed in the tree")
    return tree


# Long (about 65 lines) on purpose: one branch per node kind of the file's tree, each validating what it
# reads from an untrusted file before building anything; read it as a table.
def _unflatten(node: Any, leaves: list[Any], used: set[int], path: str, depth: int) -> Any:
    what = repr(path or "the params root")
    if depth > MAX_DEPTH:
        raise FormatError(f"the tree is nested deeper than {MAX_DEPTH} levels at {what}")
    if not isinstance(node, dict) or not isinstance(node.get("t"), str):
        raise FormatError(f"malformed tree node at {what}: {str(node)[:80]}")
    t = node["t"]
    if t == "none":
        return None
    if t == "leaf":
        i = node.get("i")
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(leaves):
            raise FormatError(f"leaf index {i!r} at {what} is out of range ({len(leaves)} leaves)")
        if i in used:
            raise FormatError(f"leaf {i} is placed twice in the tree (again at {what})")
        used.add(i)
        return leaves[i]
    if t == "py":
        v = node.get("v")
        if not isinstance(v, _SCALAR):
            raise FormatError(f"invalid Python scalar at {what}: {v!r}")
        return v
    if t == "var":
        cls = variable_types().get(node.get("cls"))
        meta = node.get("m")
        if cls is None or not isinstance(meta, dict):
            raise FormatError(f"unknown NNX variable type {node.get('cls')!r} at {what}")
        value = _unflatten(node.get("v"), leaves, used, path, depth + 1)
        kwargs = {str(k): _meta_from_json(v, what) for k, v in meta.items()}
        for flag in _BOOL_METADATA & set(kwargs):
            if not isinstance(kwargs[flag], bool):
                raise FormatError(f"NNX variable metadata {flag}={kwargs[flag]!r} at {what} is not true or false")
        try:
            var = cls(value, **kwargs)
        except (TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"cannot rebuild the {cls.__name__} variable at {what}: {e}") from e
        if type(var) is not cls:  # e.g. hijax=True turns an nnx.Param into another class
            raise FormatError(f"the metadata {sorted(kwargs)} at {what} rebuild a {type(var).__name__}, not a {cls.__name__}")
        return var
    if t in ("dict", "frozendict", "state"):
        items = node.get("k")
        if not isinstance(items, list):
            raise FormatError(f"malformed {t} node at {what}")
        out: dict = {}
        for item in items:
            if not (isinstance(item, list) and len(item) == 2):
                raise FormatError(f"malformed {t} entry at {what}")
            k, child = item
            if not (isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool))) or k in out:
                raise FormatError(f"invalid or repeated key {k!r} at {what}")
            out[k] = _unflatten(child, leaves, used, _join(path, k), depth + 1)
        if len({type(k) for k in out}) > 1:
            raise FormatError(f"the {t} at {what} mixes int and str keys, which JAX cannot flatten")
        if t == "dict":
            return out
        if t == "frozendict":
            from flax.core import FrozenDict

            return FrozenDict(out)
        return _nnx().State(out)
    if t in ("list", "tuple"):
        children = node.get("c")
        if not isinstance(children, list):
            raise FormatError(f"malformed {t} node at {what}")
        seq = [_unflatten(c, leaves, used, _join(path, i), depth + 1) for i, c in enumerate(children)]
        return seq if t == "list" else tuple(seq)
    raise FormatError(f"unknown tree node type {t!r} at {what}")


def is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic, jax.Array))
