"""Speed of ``kmeans_codebooks``: exact 1-D Lloyd to convergence (issue 12's targets).

Two cases, N(0, 0.02^2) weights like a pretrained transformer's:

1. a 1536x384 kernel (MiniLM's FFN output) with one 3-bit codebook per output channel (384 codebooks of
   1536 weights): target <= 1 s;
2. a 10M-weight kernel (2500x4000) with one 5-bit codebook: target <= 5 s.

Each is timed cold (first call: tracing and XLA compilation included) and warm (median of the next
calls, the cost of every further kernel of the same shape), with the Lloyd iteration count and the mean
squared error against the density (quantile) initialisation alone. ``--quick`` uses 1/16 of the sizes.

Run ``python -m benchmarks.kmeans_speed [--quick] [--json PATH]``; the last line printed is JSON.
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


def main(argv=None) -> dict:
    args = parser(__doc__).parse_args(argv)
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
