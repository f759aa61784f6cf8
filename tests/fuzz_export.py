"""Fuzzes ``compressjax.load`` with real saved files whose every field is mutated and re-signed.

Run by ``tests/test_export_hardening.py`` in a subprocess (so that ``resource.getrusage`` measures this
process alone); also usable by hand::

    python tests/fuzz_export.py --cases 3000 --seed 0

(Linux: memory is read from ``/proc/self/statm`` and ``/proc/self/status``'s ``VmHWM``, reset before the
cases, with ``resource.getrusage`` as the fallback.)

Each case takes one of several real files (dense, sparse with each position encoding, quantized with
1/3/4/8 bits, groups, asymmetric, NNX variables, Python scalars), picks one field anywhere in its JSON
header (the tree, the leaf records, the quantization metadata, the stream table) and replaces it
(other types, boundary integers, huge values, deletion, an unknown key, list edits), then signs the file
with a valid checksum so that the validation behind the checksum is what is tested. One case in ten
edits the binary preamble instead. A load must either succeed with a tree of arrays or raise
``FormatError``, and so must ``size_report`` of the same file; anything else is a failure. Prints one JSON line: counts, failures, slowest case, memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's compressjax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from compressjax.export import FormatError, _container, load, save, size_report  # noqa: E402
from compressjax.qarray import QArray, QuantSpec  # noqa: E402
from compressjax.quantization import quantize_params  # noqa: E402

MAX_BYTES = 64 << 20


def sample_trees() -> list:
    """Small trees that together use every encoding and record type of the format."""
    from flax import nnx

    rng = np.random.default_rng(0)

    def sparse(shape, density):
        x = rng.standard_normal(shape).astype(np.float32)
        return np.where(rng.random(shape) < density, x, np.float32(0))

    k = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    trees = [
        {"dense": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32), "b": jnp.zeros(5), "i": np.arange(4, dtype=np.int16),
         "py": [1, 2.5, True, None], "t": (jnp.ones(2, jnp.bfloat16),)},
        {"bitmask": sparse((40, 8), 0.3), "delta8": sparse(4000, 0.03), "delta16": sparse(70000, 0.0005)},
        {"q4": quantize_params({"k": k}, QuantSpec(bits=4))["k"],
         "g2": quantize_params({"k": k}, QuantSpec(bits=2, group_size=4))["k"],
         "a3": quantize_params({"k": k}, QuantSpec(bits=3, symmetric=False))["k"],
         "b1": quantize_params({"k": k}, QuantSpec(bits=1))["k"],
         "q8": quantize_params({"k": jnp.asarray(sparse((16, 8), 0.2))}, QuantSpec(bits=8, channel_axes=()))["k"]},
        nnx.State({"lin": {"kernel": nnx.Param(jnp.ones((3, 2))), "bias": nnx.Param(jnp.zeros(2))},
                   "bn": {"mean": nnx.BatchStat(jnp.zeros(2))}}),
    ]
    return trees


def slots(node, path=()):
    """Every position in a JSON value: ``(path, value)`` pairs, the root excluded."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        out.append(((*path, key), value))
        out.extend(slots(value, (*path, key)))
    return out


REPLACEMENTS = [
    0, 1, -1, 2, 3, 7, 8, 9, 255, 65535, 2**31, 2**32 + 1, 2**48, 2**63, -(2**63), 10**30, True, False, None,
    0.5, -0.0, 1e308, float("inf"), "", "x" * 300, "float32", "float64", "int8", "complex128", "object", "dense",
    "sparse", "bitmask", "delta8", "delta16", "q", "leaf", "none", "dict", "var", "Param", "compressjax.qarray/1",
    [], [0], [0, 0, 0], [1, 1, 1], [[0, 0, 0]], [-1], [2**40, 2**40], {}, {"t": "none"}, {"t": "leaf", "i": 0},
    {"tuple": [1, 2]}, json.loads("[" * 300 + "]" * 300),
]


def mutate(header: dict, rnd: random.Random) -> tuple[dict, str]:
    """One edit of one field; returns the new header and a description of the edit."""
    header = copy.deepcopy(header)
    path, value = rnd.choice(slots(header))
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    op = rnd.random()
    if op < 0.08 and isinstance(parent, dict):
        del parent[key]
        return header, f"delete {path}"
    if op < 0.12 and isinstance(parent, dict):
        parent["zz_unknown"] = 1
        return header, f"add a key beside {path}"
    if op < 0.18 and isinstance(parent, list):
        parent.insert(rnd.randrange(len(parent) + 1), copy.deepcopy(value))
        return header, f"duplicate {path}"
    if op < 0.22 and isinstance(parent, list):
        parent.pop(key)
        return header, f"remove {path}"
    if op < 0.45 and isinstance(value, int) and not isinstance(value, bool):
        new = value + rnd.choice([-1, 1, -2, 2, 7, -value - 1, value, 1 << rnd.randrange(64)])
    else:
        new = copy.deepcopy(rnd.choice(REPLACEMENTS))
    parent[key] = new
    return header, f"set {path} = {str(new)[:40]}"


def resign(original: bytes, header: dict) -> bytes:
    header_json, payload, *_ = _container.parse(original)
    return b"".join(bytes(c) for c in _container.assemble(json.dumps(header).encode(), [bytes(payload)]))


def mutate_preamble(original: bytes, rnd: random.Random) -> tuple[bytes, str]:
    blob = bytearray(original)
    field = rnd.choice([(8, "<H"), (10, "<H"), (12, "<I"), (16, "<I"), (20, "<Q")])
    size = struct.calcsize(field[1])
    value = rnd.choice([0, 1, 2, 2**(8 * size) - 1, rnd.randrange(2**(8 * size))])
    struct.pack_into(field[1], blob, field[0], value)
    return bytes(blob), f"preamble[{field[0]}] = {value}"


def _rss_kib() -> int:
    """Resident memory now, in KiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> None:
    """Resets this process's peak-RSS mark (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``), if allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_kib() -> int:
    """Peak resident memory of this process in KiB: ``VmHWM`` (this process's own mapping, reset by
    :func:`_reset_peak`), else ``resource.getrusage``. getrusage alone is not enough when the process was
    started by a large one: Linux carries the parent's high-water mark across fork and exec, so under a
    pytest run that has grown to gigabytes ``ru_maxrss`` reports the parent's peak."""
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def check_tree(tree) -> None:
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QArray)):
        # A jax Ref is what a saved nnx variable with ref=True holds.
        assert isinstance(leaf, (jax.Array, np.ndarray, QArray, bool, int, float)) or hasattr(leaf, "shape"), type(leaf)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rnd = random.Random(args.seed)
    folder = tempfile.mkdtemp(prefix="cjx-fuzz-")
    files = []
    for i, tree in enumerate(sample_trees()):
        path = os.path.join(folder, f"orig{i}.cjx")
        save(path, tree)
        original = open(path, "rb").read()
        files.append((original, json.loads(_container.parse(original)[0])))
        check_tree(load(path))  # warm up: imports, compiled kernels
        check_tree(load(path, dequantize=False))
    base = _rss_kib()  # resident now (ru_maxrss would be the high-water mark of importing jax)
    _reset_peak()
    counts = {"loaded": 0, "FormatError": 0, "failed": 0}
    failures, slowest = [], (0.0, "")
    target = os.path.join(folder, "case.cjx")
    for case in range(args.cases):
        original, header = rnd.choice(files)
        if rnd.random() < 0.1:
            blob, what = mutate_preamble(original, rnd)
        else:
            edited, what = mutate(header, rnd)
            try:
                blob = resign(original, edited)
            except ValueError:  # the writer refuses an oversized header: nothing to load
                continue
        with open(target, "wb") as f:
            f.write(blob)
        dequantize = bool(case % 2)
        start = time.perf_counter()
        try:
            check_tree(load(target, dequantize=dequantize, max_bytes=MAX_BYTES))
            counts["loaded"] += 1
        except FormatError:
            counts["FormatError"] += 1
        except Exception as e:  # noqa: BLE001 - the point of the fuzzer
            counts["failed"] += 1
            failures.append(f"{what} (dequantize={dequantize}): {type(e).__name__}: {str(e)[:200]}")
        try:  # the header-only reader must hold too
            size_report(target)
        except FormatError:
            pass
        except Exception as e:  # noqa: BLE001
            counts["failed"] += 1
            failures.append(f"{what} (size_report): {type(e).__name__}: {str(e)[:200]}")
        took = time.perf_counter() - start
        if took > slowest[0]:
            slowest = (took, what)
    peak = _peak_kib()
    print(json.dumps({
        "cases": args.cases, **counts, "failures": failures[:20], "slowest_s": round(slowest[0], 4),
        "slowest_case": slowest[1], "peak_rss_mib": round(peak / 1024, 1),
        # an upper bound on what the fuzzed loads added: the peak over the whole run minus the resident size
        # before the first case
        "peak_growth_mib": round((peak - base) / 1024, 1),
    }))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
