"""SmolLM2-135M: ``kernel_importance`` by forward mode (exact) against reverse mode (``auto_compress``'s default
where the samples allow), on the logits with ``softmax_kl``, over the seven stacked kernels.

Data as ``benchmarks/allocation_llm.py`` (128 x 256 calibration tokens in batches of 8). The probe of each
kernel is its round-to-nearest int4 g64 error (per-layer scales), so no solver runs. Times include
compilation; peak RSS is read after each method (forward first).

    python -m scripts.importance_methods_llm --json benchmarks/results/importance-methods-llm-cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from types import SimpleNamespace

import jax

import compressjax as cj
from benchmarks._common import alpha_agreement
from benchmarks.llm import KERNELS, data
from compressjax.allocation import candidate_importance
from compressjax.models import smollm


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    params, config, tok = smollm.load_smollm2()
    apply, hidden = smollm.make_apply(config), smollm.make_apply(config, head=False)
    calib, _, _ = data(tok, SimpleNamespace(n_calib=128, calib_len=256, n_eval=32, eval_len=512))
    batches = [calib[i:i + 8] for i in range(0, len(calib), 8)]
    hess = cj.collect_hessians(hidden, params, batches, where=KERNELS)
    menu = [cj.Option("float", "float"), cj.Option("rtn-int4-g64", "rtn", cj.QuantSpec(bits=4, group_size=64))]
    cands = cj.option_costs_and_damages(params, hess, menu, keep_results=True)
    out = {"kernels": list(cands.paths), "start_peak_rss_mb": round(peak_mb())}
    alphas = {}
    for method in ("forward", "reverse"):
        t = time.perf_counter()
        alphas[method] = candidate_importance(apply, params, batches, cands, output_metric=cj.softmax_kl, method=method)
        out[method] = {"seconds": round(time.perf_counter() - t, 1), "peak_rss_mb": round(peak_mb())}
        print(method, out[method], flush=True)
    out["reverse_against_forward"] = alpha_agreement(alphas["forward"], alphas["reverse"])
    out["alphas"] = {m: {p: float(f"{v:.4g}") for p, v in al.items()} for m, al in alphas.items()}
    out["machine"] = {"cpu": platform.processor() or platform.machine(), "jax": jax.__version__}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
