"""How sequential GPTQ's time and memory grow with depth and width, on a synthetic scanned decoder.

The decoder of ``benchmarks/sequential.py`` (random weights, Llama-style: RMSNorm, causal attention, SwiGLU
FFN, the layers stacked and run by ``lax.scan``) is compressed with ``sequential`` GPTQ int4 (groups of 64),
each configuration in a fresh process so that it pays its compilations as a user does. Two sweeps:

* depth: 4, 8 and 16 layers at hidden 576 (FFN 1536, SmolLM2-135M's widths);
* width: hidden 576, 1024 and 2048 at 4 layers (FFN 8/3 of the hidden width, rounded up to 64).

The fit is ``seconds = fixed + layers * per_layer(width)`` with ``per_layer(width) = c * width^p`` (least
squares on the logs; ``fixed`` from the depth sweep), and the peak resident memory's growth over the
process' baseline, linear in the params' bytes; the JSON also holds the
extrapolation of both laws to a 7B decoder (32 layers, hidden 4096, FFN 11008), to be read as an order of
magnitude.

    python -m benchmarks.llm_scaling --json benchmarks/results/llm-scaling-cpu.json
    python -m benchmarks.llm_scaling --quick        # smoke test (tiny widths)
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from benchmarks._common import finish, parser

BASE = {"heads": 9, "vocab": 1024, "seq": 128, "batch": 2, "n_batches": 4, "group": 64}
DEPTHS = (4, 8, 16)
WIDTHS = (576, 1024, 2048)
SEVEN_B = {"layers": 32, "hidden": 4096, "ffn": 11008}


def ffn_width(hidden: int) -> int:
    return -(-hidden * 8 // 3 // 64) * 64


def params_mib(layers: int, hidden: int, ffn: int, vocab: int = 0) -> float:
    """float32 MiB of the decoder's kernels (q, k, v, o, gate, up, down per layer) and its embedding."""
    return 4 * (layers * (4 * hidden * hidden + 3 * hidden * ffn) + vocab * hidden) / 2**20


def configs(quick: bool) -> list[dict]:
    if quick:
        small = dict(BASE, heads=2, vocab=64, seq=16, n_batches=2, group=16)
        return [dict(small, layers=1, hidden=32, ffn=64), dict(small, layers=2, hidden=32, ffn=64),
                dict(small, layers=1, hidden=64, ffn=128)]
    out = [dict(BASE, layers=n, hidden=576, ffn=1536) for n in DEPTHS]
    out += [dict(BASE, layers=4, hidden=w, ffn=ffn_width(w), heads=w // 64) for w in WIDTHS if w != 576]
    return out


def run(cfg: dict) -> dict:
    """One fresh ``benchmarks.sequential --mode sequential`` process: its JSON row plus the config."""
    cmd = [sys.executable, "-m", "benchmarks.sequential", "--mode", "sequential"]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{cfg} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row.update(cfg, params_mib=params_mib(cfg["layers"], cfg["hidden"], cfg["ffn"], cfg["vocab"]))
    return row


def fit(rows: list[dict]) -> dict:
    """The laws in the module docstring, fitted on the rows, and their value at 7B."""
    depth = [r for r in rows if r["hidden"] == rows[0]["hidden"]]
    n = np.array([r["layers"] for r in depth], float)
    slope, intercept = np.polyfit(n, [r["seconds"] for r in depth], 1)
    base = [r for r in rows if r["layers"] == min(r["layers"] for r in rows)]
    widths = np.array([r["hidden"] for r in base], float)
    per_layer = np.array([(r["seconds"] - intercept) / r["layers"] for r in base])
    p, log_c = np.polyfit(np.log(widths), np.log(np.maximum(per_layer, 1e-3)), 1) if len(base) > 1 else (0.0, 0.0)
    # Peak growth over the process' baseline, linear in the params' bytes (compiled code is the constant).
    mem_slope, mem_const = np.polyfit([r["params_mib"] for r in rows], [r["peak_mib"] - r["peak_mib_before"] for r in rows], 1)
    seven_per_layer = float(np.exp(log_c) * SEVEN_B["hidden"] ** p)
    seven_params_mib = params_mib(**SEVEN_B)  # kernels only, as in the JSON of the run reported
    return {"seconds_per_layer_at_depth_width": float(slope), "fixed_seconds": float(intercept),
            "per_layer_width_exponent": float(p), "peak_growth_mib_per_param_mib": float(mem_slope),
            "peak_growth_fixed_mib": float(mem_const),
            "seven_b": {"seconds": float(intercept + SEVEN_B["layers"] * seven_per_layer),
                        "seconds_per_layer": seven_per_layer, "params_mib": seven_params_mib,
                        "peak_growth_mib": float(mem_const + mem_slope * seven_params_mib)}}


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    rows = []
    for cfg in configs(args.quick):
        rows.append(run(cfg))
        r = rows[-1]
        print(f"layers {r['layers']:3d} hidden {r['hidden']:5d}: {r['seconds']:7.1f} s "
              f"(solves {r['solver_seconds']:.1f} s), peak {r['peak_mib']:.0f} MiB", flush=True)
    return finish({"benchmark": "llm_scaling", "quick": bool(args.quick), "rows": rows, "fit": fit(rows)}, args.json)


if __name__ == "__main__":
    main()
