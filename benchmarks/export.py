"""Benchmark of the compact model file: bytes on disk and save/load throughput.

1. Sizes, LeNet-300-100 (784-300-100-10, Han et al. 2016's MNIST network) with random weights (He
   normal kernels, N(0, 0.01^2) biases): the file written by ``compressjax.save`` for float32, 92% global
   magnitude pruning, int8/int4 per-channel quantization and their combinations, against the dense float32
   bytes (4 per weight, what ``model.safetensors`` holds) and, side by side, ``np.savez_compressed`` of the
   same pruned float arrays (zip/deflate). Target: 92% + int4 at least 40x smaller than float32 (Deep
   Compression reached 40x on this network with Huffman coding). Every file is loaded back and checked
   bit-exactly against ``dequantize_params(quantize_params(apply_masks(...)))``.
2. Throughput, a 50M-parameter MLP (12 layers of 2048x2048 + biases): ``save`` and ``load`` of the dense
   float32 model and of the 92% + int4 model (saved from QArrays, loaded dequantized), in MB/s of dense
   float32 equivalent (4 bytes per weight / wall time, fsync included), against ``safetensors`` (or
   ``np.save`` without it) writing and reading the dense float32 arrays, also fsynced, timed in the same
   process. Rounds interleave the variants; each number is the median over rounds after a warm-up round.
   Target: at least 100 MB/s each way. CPU seconds (all threads of the process) are printed too: on a
   shared machine the wall time mostly measures the other tenants.

Run ``python -m benchmarks.export [--quick] [--json PATH]``; the last line printed is JSON.
"""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import finish, interleaved, medians, parser
from compressjax import (
    QArray,
    QuantSpec,
    apply_masks,
    dequantize_params,
    load,
    magnitude_masks,
    quantize_params,
    save,
)

SPARSITY = 0.92


def mlp(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"fc{i}": {
            "kernel": jnp.asarray(rng.standard_normal((a, b), np.float32) * np.float32(np.sqrt(2.0 / a))),
            "bias": jnp.asarray(rng.standard_normal(b, np.float32) * np.float32(0.01)),
        }
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    }


def bit_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and x.shape == y.shape
        and np.array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8))
        for x, y in zip(la, lb, strict=True)
    )


def sizes_table(folder: str) -> dict:
    params = mlp([784, 300, 100, 10])
    n = sum(x.size for x in jax.tree.leaves(params))
    masks = magnitude_masks(params, SPARSITY)
    pruned = apply_masks(params, masks)
    cases = {
        "float32": ({}, params),
        "prune92": ({"masks": masks}, pruned),
        "int8": ({"rules": QuantSpec(bits=8)}, dequantize_params(quantize_params(params, QuantSpec(bits=8)))),
        "int4": ({"rules": QuantSpec(bits=4)}, dequantize_params(quantize_params(params, QuantSpec(bits=4)))),
        "prune92+int8": ({"masks": masks, "rules": QuantSpec(bits=8)},
                         dequantize_params(quantize_params(pruned, QuantSpec(bits=8)))),
        "prune92+int4": ({"masks": masks, "rules": QuantSpec(bits=4)},
                         dequantize_params(quantize_params(pruned, QuantSpec(bits=4)))),
    }
    dense = 4 * n
    print(f"LeNet-300-100: {n:,} weights, dense float32 = {dense:,} bytes; {SPARSITY:.0%} global magnitude pruning,"
          " per-channel symmetric quantization (kernels)")
    print(f"{'case':<14}{'bytes':>10}{'x f32':>9}{'bits/w':>8}{'savez_compressed':>18}{'x f32':>8}  exact")
    out = {}
    for name, (kw, want) in cases.items():
        path = os.path.join(folder, f"lenet-{name}.cjx")
        save(path, params, **kw)
        size = os.path.getsize(path)
        exact = bit_equal(load(path), want)
        npz = os.path.join(folder, f"lenet-{name}.npz")
        np.savez_compressed(npz, **{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(want))})
        zsize = os.path.getsize(npz)
        out[name] = {"bytes": size, "ratio": dense / size, "bits_per_weight": 8 * size / n,
                     "savez_compressed_bytes": zsize, "savez_compressed_ratio": dense / zsize, "exact": exact}
        print(f"{name:<14}{size:>10,}{dense / size:>9.1f}{8 * size / n:>8.2f}{zsize:>18,}{dense / zsize:>8.1f}  {exact}")
    r = out["prune92+int4"]["ratio"]
    print(f"92% + int4: {r:.1f}x smaller than float32 (target >= 40x: {'met' if r >= 40 else 'MISSED'})")
    return out


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def baseline_io():
    try:
        from safetensors.numpy import load_file, save_file

        def write(path, params):
            save_file({str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}, path)
            _fsync(path)

        def read(path):
            return [jnp.asarray(x) for x in load_file(path).values()]

        return "safetensors", write, read
    except ImportError:

        def write(path, params):
            with open(path, "wb") as f:
                for x in jax.tree.leaves(params):
                    np.save(f, np.asarray(x))
                f.flush()
                os.fsync(f.fileno())

        def read(path):
            out = []
            with open(path, "rb") as f:
                while f.peek(1):
                    out.append(jnp.asarray(np.load(f)))
            return out

        return "np.save", write, read


def throughput(folder: str, layers: int, width: int, rounds: int) -> dict:
    params = mlp([width] * (layers + 1), seed=1)
    n = sum(x.size for x in jax.tree.leaves(params))
    mb = 4 * n / 1e6
    qparams = quantize_params(apply_masks(params, magnitude_masks(params, SPARSITY)), QuantSpec(bits=4))
    jax.block_until_ready(jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, QArray)))
    base_name, base_write, base_read = baseline_io()
    paths = {k: os.path.join(folder, f"big-{k}") for k in ("dense", "q", "base")}
    variants = {
        "dense save": lambda: save(paths["dense"], params),
        "dense load": lambda: jax.block_until_ready(load(paths["dense"])),
        "prune92+int4 save": lambda: save(paths["q"], qparams),
        "prune92+int4 load": lambda: jax.block_until_ready(load(paths["q"])),
        f"{base_name} save": lambda: base_write(paths["base"], params),
        f"{base_name} load": lambda: jax.block_until_ready(base_read(paths["base"])),
    }
    cpu: list[list[float]] = []
    wall = interleaved(list(variants.values()), rounds, cpu_out=cpu)  # the warm-up round compiles dequantize
    med = dict(zip(variants, medians(wall), strict=True))
    med_cpu = dict(zip(variants, medians(cpu), strict=True))
    print(f"\nthroughput: MLP {layers} x {width}x{width}, {n:,} weights = {mb:.0f} MB as float32; median of {rounds}"
          f" rounds; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'variant':<24}{'seconds':>9}{'MB/s f32':>10}{'CPU s':>8}{'MB/CPU-s':>10}{'file MB':>9}{f'x {base_name}':>16}")
    out = {"weights": n, "baseline": base_name}
    for k, t in med.items():
        kind = k.split()[0]
        fsize = os.path.getsize(paths["dense" if kind == "dense" else "q" if kind.startswith("prune") else "base"])
        vs = med[f"{base_name} {k.split()[-1]}"] / t
        c = med_cpu[k]
        out[k] = {"seconds": t, "mb_per_s": mb / t, "cpu_seconds": c, "mb_per_cpu_s": mb / c, "file_bytes": fsize,
                  "speed_vs_baseline": vs}
        print(f"{k:<24}{t:>9.3f}{mb / t:>10.0f}{c:>8.3f}{mb / c:>10.0f}{fsize / 1e6:>9.1f}{vs:>16.2f}")
    worst = min(out[k]["mb_per_s"] for k in variants if not k.startswith(base_name))
    print(f"slowest compressjax direction: {worst:.0f} MB/s (target >= 100: {'met' if worst >= 100 else 'MISSED'})")
    return out


def main(argv=None):
    ap = parser(__doc__)  # --quick: tiny throughput model, one round
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; 1 with --quick)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        result = {"benchmark": "export", "quick": bool(args.quick), "sizes": sizes_table(folder)}
        if args.quick:
            result["throughput"] = throughput(folder, 2, 256, args.rounds or 1)
        else:
            result["throughput"] = throughput(folder, 12, 2048, args.rounds or 3)
    tp = result["throughput"]
    result["summary"] = {
        "lenet_prune92_int4_ratio": result["sizes"]["prune92+int4"]["ratio"],
        "save_mb_per_s_dense": tp["dense save"]["mb_per_s"], "load_mb_per_s_dense": tp["dense load"]["mb_per_s"],
        "save_mb_per_s_prune92_int4": tp["prune92+int4 save"]["mb_per_s"],
        "load_mb_per_s_prune92_int4": tp["prune92+int4 load"]["mb_per_s"],
    }
    return finish(result, args.json)


if __name__ == "__main__":
    main()
