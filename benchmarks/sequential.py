"""One-pass ``sequential`` GPTQ vs one ``collect_hessians`` pass plus the solves, on a scanned decoder.

A synthetic Llama-style decoder (random weights; RMSNorm, causal attention, SwiGLU FFN, the layers stacked
``(L, in, out)`` and run by ``lax.scan``, tied embeddings) is compressed with GPTQ int4, groups of 64, in
two ways, each in a fresh process (so both pay their compilations, as a user does):

* ``capture``: one ``collect_hessians`` pass (stacked Hessians), then GPTQ on every layer slice (2-D
  sub-problems, the same ones ``sequential`` solves);
* ``sequential``: ``sequential(apply, params, batches, compress)``, every slice calibrated on the outputs of
  the already-quantized earlier layers.

Reports wall time, the solver part, and the process' peak resident memory (``ru_maxrss``).

    python -m benchmarks.sequential                # 8 layers, hidden 256, 8 x 128 tokens
    python -m benchmarks.sequential --layers 4 --hidden 128 --json out.json
    python -m benchmarks.sequential --quick        # smoke test (2 layers, 64 wide)
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks._common import finish, parser

KERNELS = r"layers/(q|k|v|o|gate|up|down)$"


def decoder(cfg: dict):
    """``(params, apply, batches)`` of a random scanned decoder."""
    L, d, f, v, t, nh = cfg["layers"], cfg["hidden"], cfg["ffn"], cfg["vocab"], cfg["seq"], cfg["heads"]
    rng = np.random.default_rng(0)

    def w(*shape, fan_in):
        return jnp.asarray(rng.normal(size=shape) / np.sqrt(fan_in), jnp.float32)

    params = {
        "embed": w(v, d, fan_in=1) * 0.5,
        "layers": {
            "attn_norm": jnp.ones((L, d)), "ffn_norm": jnp.ones((L, d)),
            "q": w(L, d, d, fan_in=d), "k": w(L, d, d, fan_in=d), "v": w(L, d, d, fan_in=d), "o": w(L, d, d, fan_in=d),
            "gate": w(L, d, f, fan_in=d), "up": w(L, d, f, fan_in=d), "down": w(L, f, d, fan_in=f),
        },
        "final_norm": jnp.ones((d,)),
    }

    def rms(x, g):
        return x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * g

    def layer(x, p):
        b = x.shape[0]
        h = rms(x, p["attn_norm"])
        q, k, vv = ((h @ p[n]).reshape(b, t, nh, d // nh) for n in ("q", "k", "v"))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // nh)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), vv).reshape(b, t, d)
        x = x + a @ p["o"]
        h = rms(x, p["ffn_norm"])
        return x + (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"], None

    def apply(p, ids):
        x = p["embed"][ids]
        x, _ = lax.scan(layer, x, p["layers"])
        return rms(x, p["final_norm"]) @ p["embed"].T

    batches = [jnp.asarray(rng.integers(0, v, size=(cfg["batch"], t)), jnp.int32) for _ in range(cfg["n_batches"])]
    return params, apply, batches


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_mode(mode: str, cfg: dict) -> dict:
    import compressjax as cj

    params, apply, batches = decoder(cfg)
    spec = cj.QuantSpec(bits=4, group_size=cfg["group"])

    def compress(p, h):
        return cj.gptq(p, h, spec)

    jax.block_until_ready(params)
    base = _peak_mib()
    t0 = time.perf_counter()
    solve_s = 0.0
    if mode == "capture":
        H = cj.collect_hessians(apply, params, batches, where=KERNELS)
        jax.block_until_ready(H)
        capture_s = time.perf_counter() - t0
        layers = params["layers"]
        out = {}
        for name, hs in H["layers"].items():
            if hs is None:
                continue
            parts = []
            for li in range(cfg["layers"]):
                sub = {"layers": {name: layers[name][li]}}
                hl = {"layers": {name: cj.Hessian(hs.h[li], hs.count[li], (0,))}}
                parts.append(compress(sub, hl)["layers"][name])
            out[name] = parts
        jax.block_until_ready(out)
        solve_s = time.perf_counter() - t0 - capture_s
    else:
        calls = {"n": 0}

        def counted(p, h):
            calls["n"] += 1
            t = time.perf_counter()
            r = compress(p, h)
            jax.block_until_ready(r)
            nonlocal solve_s
            solve_s += time.perf_counter() - t
            return r

        q = cj.sequential(apply, params, batches, counted, where=KERNELS)
        jax.block_until_ready(q)
        capture_s = time.perf_counter() - t0 - solve_s
    total = time.perf_counter() - t0
    return {"mode": mode, "seconds": total, "solver_seconds": solve_s, "pass_seconds": capture_s,
            "peak_mib": _peak_mib(), "peak_mib_before": base}


QUICK = {"layers": 2, "hidden": 64, "ffn": 128, "vocab": 128, "seq": 16, "n_batches": 2, "group": 32}


def main(argv=None) -> dict:
    ap = parser(__doc__.splitlines()[0])  # --quick: a 2-layer, 64-wide decoder (a smoke test)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--n-batches", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--mode", choices=("capture", "sequential"), default=None, help="run one mode in this process")
    a = ap.parse_args(argv)
    cfg = {k: getattr(a, k) for k in ("layers", "hidden", "ffn", "heads", "vocab", "seq", "batch", "n_batches", "group")}
    if a.quick:
        cfg.update(QUICK)
    if a.mode is not None:
        r = run_mode(a.mode, cfg)
        print(json.dumps(r))
        return r
    rows = []
    for mode in ("capture", "sequential"):
        cmd = [sys.executable, "-m", "benchmarks.sequential", "--mode", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{mode} run failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cap, seq = rows
    return finish({"benchmark": "sequential", "quick": bool(a.quick), "config": cfg, "rows": rows,
                   "ratio_total": seq["seconds"] / cap["seconds"],
                   "ratio_pass": seq["pass_seconds"] / cap["pass_seconds"]}, a.json)


if __name__ == "__main__":
    main()
