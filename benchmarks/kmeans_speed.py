"""Speed of ``kmeans_codebooks``: exact 1-D Lloyd to convergence (issue 12's targets).

Two cases, N(0, 0.02^2) weights like a pretrained transformer's:

1. a 1536x384 kernel (MiniLM's FFN output) with one 3-bit codebook per output channel (384 codebooks of
   1536 weights): target <= 1 s;
2. a 10M-weight kernel (2500x4000) with one 5-bit codebook: target <= 5 s.

Each is timed cold (first call: tracing and XLA compilation included) and warm (median of the next
calls, the cost of every further kernel of the same shape), with the Lloyd iteration count and the mean
squared error against the density (quantile) initialisation alone. ``--quick`` uses 1/16 of the sizes.

Run ``python -m benchmarks.kmeans_speed [--quick] [--json PATH]``; the last line printed is JSON.

``--memory`` measures instead the peak memory of entropy-constrained k-means (issue 22, item 11): one
8-bit codebook per output channel of a 4096x11008 kernel (11,008 codebooks of 256 centroids), with
``entropy_weight=0.01`` and ``0``, each in its own process (peak RSS growth over the process after the
kernel is made, ``VmHWM``), with ``iterations`` fixed (default 3: every Lloyd update has the same
working set, so the peak does not depend on it) and the time of that call (compilation included).
``--quick`` uses a 1024x2752 kernel.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compressjax as cj  # noqa: E402
from benchmarks._common import finish, parser  # noqa: E402
from compressjax.codebook._kmeans import _lloyd, _rows  # noqa: E402


def case(shape, bits, per_channel, repeats):
    w = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32) * np.float32(0.02))
    jax.block_until_ready(w)
    run = lambda: cj.kmeans_codebooks({"w": w}, bits, per_channel=per_channel)["w"]  # noqa: E731
    t0 = time.perf_counter()
    cb = jax.block_until_ready(run())
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        warm.append(time.perf_counter() - t0)
    rows = _rows(w, per_channel)
    valid = jnp.ones(rows.shape, bool)
    its = int(_lloyd(rows, valid, None, jax.random.key(0), 0.0, k=1 << bits, iterations=1000, init="density",
                     has_mask=False, has_weights=False, has_rate=False)[2])
    init_only = cj.kmeans_codebooks({"w": w}, bits, per_channel=per_channel, iterations=1)["w"]
    mse = float(jnp.mean((cb.decode() - w) ** 2))
    mse1 = float(jnp.mean((init_only.decode() - w) ** 2))
    return {"shape": list(shape), "bits": bits, "per_channel": per_channel, "cold_seconds": round(cold, 3),
            "warm_seconds": round(statistics.median(warm), 3), "lloyd_iterations": its,
            "mse": mse, "mse_after_one_update": mse1}


MEMORY_CHILD = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
import compressjax as cj
from benchmarks._common import peak_rss  # VmHWM: this process' own (its ru_maxrss counts the parent's)
shape, bits, rate, iterations = json.loads(sys.argv[1])
w = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32) * np.float32(0.02))
jax.block_until_ready(w)
base = peak_rss()
t0 = time.perf_counter()
cb = jax.block_until_ready(cj.kmeans_codebooks({"w": w}, bits, per_channel=True, entropy_weight=rate,
                                               iterations=iterations)["w"])
seconds = time.perf_counter() - t0
peak = peak_rss()
print(json.dumps({"peak_growth_mib": round((peak - base) / 2**20, 1), "seconds": round(seconds, 2),
                  "kernel_mib": round(w.nbytes / 2**20, 1)}))
"""


def memory_case(shape, bits, rate, iterations) -> dict:
    import json
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, json.dumps([list(shape), bits, rate, iterations])],
                         capture_output=True, text=True, check=True, env=env, cwd=root)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["peak_over_kernel"] = round(res["peak_growth_mib"] / res["kernel_mib"], 2)
    return {"shape": list(shape), "bits": bits, "entropy_weight": rate, "iterations": iterations, **res}


def main_memory(args) -> dict:
    shape = (1024, 2752) if args.quick else (4096, 11008)
    result = {"entropy": memory_case(shape, 8, 0.01, args.iterations),
              "plain": memory_case(shape, 8, 0.0, args.iterations),
              "load_average": os.getloadavg()[0], "quick": bool(args.quick)}
    result["summary"] = {f"{k}_{m}": result[k][m] for k in ("entropy", "plain") for m in ("peak_growth_mib", "seconds")}
    return finish(result, args.json)


def main(argv=None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--memory", action="store_true", help="peak memory of 8-bit entropy-constrained k-means instead")
    ap.add_argument("--iterations", type=int, default=3, help="Lloyd updates in --memory mode (default 3)")
    args = ap.parse_args(argv)
    if args.memory:
        return main_memory(args)
    scale = 4 if args.quick else 1
    repeats = 2 if args.quick else 3
    result = {
        "per_channel_3bit": case((1536 // scale, 384 // scale), 3, True, repeats),
        "one_5bit_codebook": case((2500 // scale, 4000 // scale), 5, False, repeats),
        "load_average": os.getloadavg()[0],
        "quick": bool(args.quick),
    }
    result["summary"] = {f"{k}_{t}_s": result[k][f"{t}_seconds"] for k in ("per_channel_3bit", "one_5bit_codebook")
                         for t in ("cold", "warm")}
    return finish(result, args.json)


if __name__ == "__main__":
    main()
