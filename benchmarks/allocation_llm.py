"""Benchmark: compress to a budget on a real decoder LLM (SmolLM2-135M, stacked layers run by ``lax.scan``).

Issue 20's LLM row: perplexity at 3.0 and 3.5 bits per weight over the seven stacked kernels (106M weights),
allocated by ``auto_compress``'s steps, against every uniform setting of the menu that fits the same budget.
Model, data and metrics are :mod:`benchmarks.llm`'s (calibration: pydoc topics, 128 x 256 tokens;
evaluation: package descriptions, 32 x 512 tokens; the tied embedding and the norms stay float).

Each stacked kernel ``(30, in, out)`` is one allocation unit (every option keeps per-layer scales or
codebooks; the seven units get one option each). The menu is written for this model before the first run:
``default_menu()``'s group sizes 128 and 64 become 64 and 192 (128 does not divide the 576-wide inputs),
and the sparse and k-means options are left out to keep the run under an hour on 2 CPU cores (each option
is a GPTQ pass over 106M weights); its names say what each option is. The plans are applied one-shot
(``sequential=False``: the candidates' own results), or with ``--sequential`` sequentially, as
``auto_compress`` does by default (the stacked kernels in one pass of :func:`compressjax.sequential`, layer
after layer), and then compared with the best three fitting uniform settings applied sequentially too.
As ``auto_compress`` does by default, the allocator's plan is compared, whole, with the fitting uniform
settings at the output on two calibration batches (the KL divergence of the logits; ``--no-compare`` keeps
the allocator's plan), and the closest to the float model is applied. The importance (``--importance``) is measured on the
logits with :func:`compressjax.softmax_kl` (``kl``, the default: the second-order change of the predicted
distribution, what perplexity feels), or as the squared change of the final hidden states (``hidden``, the
library's default metric on the model without its tied head, as the calibration is).

Usage::

    python -m benchmarks.allocation_llm --json benchmarks/results/allocation-llm-cpu.json   # about 45 min, 2 cores
    python -m benchmarks.allocation_llm --quick                                             # smoke test
    python -m benchmarks.allocation_llm --damage measured --uniform-json benchmarks/results/allocation-llm-hidden-cpu.json
    python -m benchmarks.allocation_llm --sequential --uniform-json benchmarks/results/allocation-llm-hidden-cpu.json \
        --json benchmarks/results/allocation-llm-seq-cpu.json                              # plans applied sequentially
    # the same with another importance metric, reusing the uniform rows of a run on the same data:
    python -m benchmarks.allocation_llm --importance hidden --uniform-json benchmarks/results/allocation-llm-cpu.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import compressjax as cj  # noqa: E402
from benchmarks._common import finish, parser  # noqa: E402
from benchmarks.llm import KERNELS, data, evaluate  # noqa: E402
from compressjax.allocation import (  # noqa: E402
    candidate_importance,
    from_candidates,
    output_damages,
    softmax_kl_distance,
)
from compressjax.models import smollm  # noqa: E402
from compressjax.tree import replace_leaves  # noqa: E402


def llm_menu() -> list[cj.Option]:
    """GPTQ (act-order) options in the spirit of ``default_menu()``, with group sizes dividing 576 and 1536."""
    Q = cj.QuantSpec
    menu = [cj.Option("float", "float"), cj.Option("gptq-int8", "gptq", Q(bits=8)),
            cj.Option("gptq-int4", "gptq", Q(bits=4, calibration="mse", error_power=2.0))]
    for g in (192, 64):
        menu.append(cj.Option(f"gptq-int4-g{g}", "gptq", Q(bits=4, group_size=g)))
    for b in (3, 2):
        menu.append(cj.Option(f"gptq-int{b}", "gptq", Q(bits=b, symmetric=False)))
        for g in (192, 64):
            menu.append(cj.Option(f"gptq-int{b}-g{g}", "gptq", Q(bits=b, group_size=g, symmetric=False)))
    return menu


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--budgets", default="3.0,3.5", help="bits per weight over the stacked kernels")
    ap.add_argument("--importance", choices=("kl", "hidden"), default="kl",
                    help="output metric of the importance: softmax_kl of the logits, or the hidden states' squared change")
    ap.add_argument("--uniform-json", default=None,
                    help="take the uniform rows from this earlier run's JSON (same data and menu) instead of evaluating them")
    ap.add_argument("--damage", choices=("estimate", "measured"), default="estimate",
                    help="allocate with the first-order estimate (importance x layer error) or with output_damages: the "
                         "KL divergence of the logits with each kernel alone compressed, over 2 calibration batches")
    ap.add_argument("--sequential", action="store_true",
                    help="apply the plans sequentially (auto_compress's default) and compare them with the best fitting "
                         "uniform settings applied sequentially too")
    ap.add_argument("--no-compare", action="store_true",
                    help="keep the allocator's plan (compare_uniform=False) instead of comparing it at the output with "
                         "the fitting uniform settings")
    args = ap.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    sizes = SimpleNamespace(n_calib=128, calib_len=256, n_eval=32, eval_len=512)
    calib_batch, eval_batch, menu = 8, 4, llm_menu()
    if args.quick:
        sizes = SimpleNamespace(n_calib=8, calib_len=64, n_eval=4, eval_len=128)
        calib_batch, menu = 4, [menu[0], menu[4], menu[9]]  # float, int4 g64, int3 g64

    params, config, tok = smollm.load_smollm2()
    apply, hidden = smollm.make_apply(config), smollm.make_apply(config, head=False)
    calib, evaluation, info = data(tok, sizes)
    batches = [calib[i:i + calib_batch] for i in range(0, len(calib), calib_batch)]
    float_ppl, float_top = evaluate(apply, params, evaluation, eval_batch)

    def quality(p) -> dict:
        ppl, top = evaluate(apply, cj.dequantize_params(p), evaluation, eval_batch)
        return {"ppl": round(ppl, 3), "top1": round(float((top == float_top).mean()), 4)}

    t = time.perf_counter()
    hess = cj.collect_hessians(hidden, params, batches, where=KERNELS)
    cands = cj.option_costs_and_damages(params, hess, menu, keep_results=True)
    t_cands = time.perf_counter() - t
    if args.importance == "kl":
        alpha = candidate_importance(apply, params, batches, cands, output_metric=cj.softmax_kl)
    else:
        alpha = candidate_importance(hidden, params, batches, cands)
    t_alpha = time.perf_counter() - t - t_cands
    print(f"candidates {t_cands:.1f} s, importance {t_alpha:.1f} s", flush=True)
    damages = None
    if args.damage == "measured":
        t = time.perf_counter()
        damages = output_damages(apply, params, batches, cands, distance=softmax_kl_distance, max_batches=2)
        print(f"measured damages {time.perf_counter() - t:.1f} s", flush=True)
    n_w = cands.num_weights

    uniform = []
    if args.uniform_json:
        earlier = json.loads(Path(args.uniform_json).read_text())
        if earlier["data"] != info or earlier["menu"] != [o.name for o in menu]:
            raise SystemExit(f"{args.uniform_json} was measured on other data or another menu")
        uniform = earlier["uniform"]
    for j, opt in enumerate(cands.options if not uniform else ()):
        if np.any(cands.costs[:, j] < 0):
            continue  # the option skips a kernel: no uniform setting
        nbytes = int(cands.costs[:, j].sum())
        p = replace_leaves(params, {p: cands.results[(p, opt.name)][0] for p in cands.paths})
        row = {"name": opt.name, "bits_per_weight": round(8 * nbytes / n_w, 4), **quality(p)}
        print(row, flush=True)
        uniform.append(row)

    allocated = []
    for bpw in budgets:
        budget = int(np.floor(bpw * n_w / 8))
        t = time.perf_counter()
        # The whole-plan comparison measures the KL of the logits one-shot; applied sequentially, the model
        # runs without its head (the logits of all 128 sequences would take 6.4 GB), so the comparison
        # measures the final hidden states' squared distance instead.
        compare_fn, distance = (hidden, None) if args.sequential else (apply, softmax_kl_distance)
        out, plan = from_candidates(compare_fn, params, batches, cands, budget, alpha, sequential=args.sequential,
                                    damages=damages, compare_uniform=not args.no_compare, distance=distance)
        seconds = time.perf_counter() - t
        fitting = [u for u in uniform if u["bits_per_weight"] <= bpw]
        kept = {e.option for e in plan.entries}
        row = {"budget_bpw": bpw, "bits_per_weight": round(8 * plan.total_bytes / n_w, 4), **quality(out),
               "plan": {e.path: e.option for e in plan.entries}, "apply_seconds": round(seconds, 1),
               "compared": [{"plan": n, "bytes": b, "distance": round(d, 4)} for n, b, d in plan.compared],
               "kept": f"uniform {next(iter(kept))}" if len(kept) == 1 else "allocated"}
        if len(kept) == 1:
            # The comparison kept a uniform setting: this row is that setting, measured again in this run (the
            # uniform rows may come from another machine, whose floating point differs in the last digits).
            fitting = [dict(u, ppl=row["ppl"], measured_here=True) if u["name"] in kept else u for u in fitting]
        best = min(fitting, key=lambda u: u["ppl"]) if fitting else None
        row.update({"best_fitting_uniform": best and best["name"], "best_fitting_uniform_ppl": best and best["ppl"]})
        if args.sequential and fitting:
            # The fair comparison: the fitting uniform settings applied sequentially as well (the best three
            # one-shot ones; one pass each, all kernels in one stage, layer after layer).
            seq_rows = []
            for u in sorted(fitting, key=lambda u: u["ppl"])[:3]:
                q, _ = cj.apply_plan(params, {p: u["name"] for p in cands.paths}, menu=menu, apply_fn=hidden,
                                     batches=batches, stages=[list(cands.paths)])
                seq_rows.append({"name": u["name"], **quality(q)})
                print("sequential uniform", seq_rows[-1], flush=True)
            best_seq = min(seq_rows, key=lambda u: u["ppl"])
            row.update({"fitting_uniform_sequential": seq_rows, "best_fitting_uniform_sequential": best_seq["name"],
                        "best_fitting_uniform_sequential_ppl": best_seq["ppl"]})
            best = best_seq
        row["beats_every_fitting_uniform"] = best is None or row["ppl"] <= best["ppl"]
        print(row, flush=True)
        allocated.append(row)

    return finish({
        "benchmark": "allocation_llm", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)",
        "compressed": f"{KERNELS} (7 stacked kernels x {config.num_layers} layers, {n_w} weights)",
        "menu": [o.name for o in menu], "float": {"ppl": round(float_ppl, 3)}, "uniform": uniform,
        "allocated": allocated, "importance_metric": args.importance, "damage": args.damage,
        "measured_damages": None if damages is None else {"paths": list(cands.paths), "options": [o.name for o in menu],
                                                          "kl": np.where(np.isfinite(damages), damages, -1).tolist()},
        "importance": {p: float(a) for p, a in alpha.items()}, "data": info,
        "candidates_seconds": round(t_cands, 1), "importance_seconds": round(t_alpha, 1), "quick": bool(args.quick),
        "sequential": bool(args.sequential), "compare_uniform": not args.no_compare,
        "note": ("plans and the best fitting uniform settings applied sequentially" if args.sequential else
                 "plans applied one-shot from the candidates (sequential=False)") + "; times on a shared machine",
    }, args.json)


if __name__ == "__main__":
    main()
