"""Benchmark: compress all-MiniLM-L6-v2 to a budget (``auto_compress``) against the menu's uniform settings.

Data (as the one-shot MiniLM benchmark, ``benchmarks/_minilm_oneshot.py``): calibration on 256 sentences
sampled from the first 80% of the training split of ``pydoc_data.topics``; quality measured on the
evaluation split (every 5th sentence) and, as a second source of text never used for anything else, on
prose sentences from NumPy's docstrings. The menu is ``default_menu()`` as written before any run; no
setting is tuned on the evaluation sentences. Quality: mean cosine of each sentence's embedding to the
float model's. The budget covers the encoder's 36 Dense kernels (bytes in the file); the embeddings stay
float32 in every row.

Rows:

* ``uniform``: every option of the menu applied to every kernel (one-shot, float-model Hessians), its
  bits per weight over the kernels and its quality;
* ``allocated``: ``auto_compress`` at 2.5, 3.0, 3.5 and 4.0 bits per weight (sequential, importance
  weighted), and the same allocations applied one-shot with and without importance weighting;
* ``estimate_vs_measured``: over random plans, the Spearman rank correlation between the estimated total
  damage (layer errors, with and without importance weights) and the measured loss of mean cosine;
* ``cost``: wall time and peak memory of ``auto_compress`` (cold, compilation included) against one GPTQ
  int4 g128 pass (``collect_hessians`` + ``gptq``, cold; with ``--cost-only`` also a sequential one, each
  in a fresh process).

Usage::

    python -m benchmarks.allocation --json benchmarks/results/allocation-cpu.json   # over an hour on 2 loaded cores (57 solver compilations)
    python -m benchmarks.allocation --quick                                  # smoke test
    python -m benchmarks.allocation --cost-only --json out.json              # only the search, cold, and one-shot and
                                                                             # sequential GPTQ passes, each cold in a fresh
                                                                             # process (then the plans compared at each
                                                                             # budget, the menu's GPTQ options: gptq each vs
                                                                             # gptq_many, and a sequential GPTQ pass, warm)
    python -m benchmarks.allocation --pass-only sequential                   # one GPTQ int4 g128 pass, cold, alone
    python -m benchmarks.allocation --fast --json out.json                   # the GPTQ pass and the cheapest search
    python -m benchmarks.allocation --importance-only --json out.json        # importance: forward vs reverse mode
    python -m benchmarks.allocation --warm --json out.json                   # the work without compilation: each pass
                                                                             # and search run twice, the second timed
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import compressjax as cj  # noqa: E402
from benchmarks._common import alpha_agreement, finish, parser, peak_rss, spearman  # noqa: E402
from benchmarks._minilm_oneshot import ENCODER_KERNELS, apply_fn, calibration_split, row_mask  # noqa: E402
from benchmarks.minilm import length_batches  # noqa: E402
from compressjax.allocation import candidate_importance, from_candidates, model_stages  # noqa: E402
from compressjax.models import minilm  # noqa: E402
from compressjax.tree import replace_leaves  # noqa: E402


def other_sentences(n: int = 200, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Prose sentences from the docstrings of NumPy's public functions (a second source of text)."""
    docs = (inspect.getdoc(obj) for obj in (getattr(np, name, None) for name in sorted(dir(np))) if callable(obj))
    out = minilm.prose_sentences((d for d in docs if d), min_words=min_words, max_words=max_words,
                                 skip_prefixes=(" ", "\t", ">>>", "..", "-", "="))
    rng = np.random.default_rng(0)
    idx = sorted(rng.permutation(len(out))[:n].tolist())
    return [out[i] for i in idx]


def peak_mb() -> float:
    """This process' peak resident memory in MiB (reported as MB)."""
    return peak_rss() / 2**20


def fast_search(params, batches, bpw, t_gptq, quality) -> dict:
    """``auto_compress`` in its cheapest form, timed cold after the GPTQ pass: the default menu's GPTQ
    options only (solved together by ``gptq_many``), no importance, one-shot, the plan compared at the output
    with the fitting uniform settings (the default)."""
    menu = [o for o in cj.default_menu() if o.method in ("float", "gptq")]
    t = time.perf_counter()
    out, plan = cj.auto_compress(apply_fn, params, batches, bits_per_weight=bpw, menu=menu, where=ENCODER_KERNELS,
                                 row_mask=row_mask, sequential=False, importance=False)
    jax.block_until_ready(jax.tree.leaves(out))
    seconds = time.perf_counter() - t
    row = {"bits_per_weight": bpw, "menu": [o.name for o in menu], "seconds": round(seconds, 1),
           "gptq_int4_g128_seconds": round(t_gptq, 1), "ratio": round(seconds / t_gptq, 2), "kept": plan.kept,
           "plan_bits_per_weight": round(plan.bits_per_weight, 4), **quality(out), "peak_rss_mb": round(peak_mb())}
    print(f"fast search: {row}", flush=True)
    return row


def estimate_vs_measured(params, cands, alphas: dict, plans: int, ref, sentences) -> dict:
    """Over ``plans`` random plans (each kernel a random non-float option; seed 0), the Spearman rank
    correlation between the estimated total damage (unweighted, and weighted by each of ``alphas``) and the
    measured loss of mean cosine to the float embeddings ``ref`` of ``sentences``."""
    rng = np.random.default_rng(0)
    est = {"unweighted": [], **{name: [] for name in alphas}}
    measured = []
    for _ in range(plans):
        choice = {}
        for i, path in enumerate(cands.paths):
            ok = np.flatnonzero(cands.costs[i] >= 0)
            ok = [j for j in ok if cands.options[j].method != "float"] or list(ok)
            choice[path] = int(rng.choice(ok))
        p = replace_leaves(params, {path: cands.results[(path, cands.options[j].name)][0] for path, j in choice.items()})
        idx = [(cands.paths.index(path), j) for path, j in choice.items()]
        est["unweighted"].append(float(sum(cands.errors[i, j] for i, j in idx)))
        for name, alpha in alphas.items():
            est[name].append(float(sum(alpha[cands.paths[i]] * cands.errors[i, j] for i, j in idx)))
        measured.append(float(1 - minilm.cosines(ref, minilm.embed(sentences, p)).mean()))
    corr = {"plans": plans, **{f"spearman_{name}": round(spearman(e, measured), 4) for name, e in est.items()},
            "loss_of_mean_cosine_range": [round(min(measured), 5), round(max(measured), 5)]}
    print(f"estimate vs measured: {corr}", flush=True)
    return corr


def importance_methods(params, batches, menu, plans, ref, sentences) -> dict:
    """``kernel_importance`` by forward mode (exact) and by reverse mode (estimated; three seeds), each timed
    warm after a first call that compiles it, their alphas compared, and the Spearman test of each."""
    hess = cj.collect_hessians(apply_fn, params, batches, where=ENCODER_KERNELS, row_mask=row_mask)
    cands = cj.option_costs_and_damages(params, hess, menu, keep_results=True)
    alphas, seconds = {}, {}
    runs = [("forward", "forward", 0), *((f"reverse_seed{s}", "reverse", s) for s in range(3))]
    for name, method, seed in runs:
        for _ in range(2):  # cold, then warm
            t = time.perf_counter()
            alphas[name] = candidate_importance(apply_fn, params, batches, cands, row_mask=row_mask, method=method, seed=seed,
                                               hessians=hess)
            seconds.setdefault(name, []).append(round(time.perf_counter() - t, 1))
        print(f"importance {name}: {seconds[name]} s (cold, warm)", flush=True)
    agreement = {name: alpha_agreement(alphas["forward"], al) for name, al in alphas.items() if name != "forward"}
    print(f"alphas against forward mode: {agreement}", flush=True)
    corr = estimate_vs_measured(params, cands, alphas, plans, ref, sentences)
    return {"seconds_cold_warm": seconds, "alphas_against_forward": agreement, "estimate_vs_measured": corr,
            "alphas": {name: {p: float(f"{a:.4g}") for p, a in al.items()} for name, al in alphas.items()}}


def compared_at_every_budget(params, batches, cands, alpha, budgets) -> dict:
    """For each budget, the one-shot plans ``from_candidates`` compares at the output (the allocated plan
    and the fitting uniform settings: ``(name, bytes, squared distance)``) and which one it keeps."""
    out = {}
    for bpw in budgets:
        _, plan = from_candidates(apply_fn, params, batches, cands, int(np.floor(bpw * cands.num_weights / 8)), alpha,
                                  sequential=False, row_mask=row_mask)
        out[str(bpw)] = {"kept": plan.kept, "compared": [[n, b, round(d, 4)] for n, b, d in plan.compared]}
        print(f"{bpw} bpw: kept {plan.kept} of {len(plan.compared)} compared", flush=True)
    return out


def one_shot_gptq_pass(params, batches):
    """The cost baseline: one GPTQ int4 g128 pass (act-order), ``collect_hessians`` then ``gptq``."""
    hess = cj.collect_hessians(apply_fn, params, batches, where=ENCODER_KERNELS, row_mask=row_mask)
    return cj.gptq(params, hess, cj.QuantSpec(bits=4, group_size=128), act_order=True)


def sequential_gptq_pass(params, batches, paths) -> dict:
    """A GPTQ int4 g128 pass in sequential mode (``layerwise`` over ``model_stages``: what ``auto_compress``'s
    default ``sequential=True`` runs after its search); cold in a fresh process (``--pass-only``), else warm
    for what this process has compiled already."""
    stages = model_stages(apply_fn, params, batches[0], paths)
    wheres = ["^(?:" + "|".join(re.escape(p) for p in s) + ")$" for s in stages]
    t = time.perf_counter()
    q = cj.layerwise(apply_fn, params, batches, lambda p, h: cj.gptq(p, h, cj.QuantSpec(bits=4, group_size=128), act_order=True),
                     stages=wheres, row_mask=row_mask)
    jax.block_until_ready(jax.tree.leaves(q))
    seconds = time.perf_counter() - t
    print(f"sequential GPTQ int4 g128 pass ({len(stages)} stages): {seconds:.1f} s", flush=True)
    return {"gptq_int4_g128_sequential_seconds": round(seconds, 1), "sequential_stages": len(stages)}


def cold_pass_in_fresh_process(mode: str, quick: bool) -> dict:
    """One GPTQ int4 g128 pass (``mode``: one-shot or sequential) in a new Python process, so that nothing is
    compiled before it (``--pass-only``): ``{"seconds", "peak_rss_mb", ...}``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pass.json"
        cmd = [sys.executable, "-m", "benchmarks.allocation", "--pass-only", mode, "--json", str(out)] + (["--quick"] if quick else [])
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["pass"]


def gptq_options_side_by_side(params, batches, menu) -> dict:
    """The menu's GPTQ options solved one ``gptq`` call each against one ``gptq_many`` call, both cold (their
    compiled programs differ) and then warm, from the same Hessians, in this process (after the search, so
    that neither warms the search up)."""
    specs = [o.spec for o in (menu or cj.default_menu()) if o.method == "gptq"]
    hess = cj.collect_hessians(apply_fn, params, batches, where=ENCODER_KERNELS, row_mask=row_mask)
    jax.block_until_ready(jax.tree.leaves(hess))
    out = {"options": len(specs)}
    for run in ("cold", "warm"):
        t = time.perf_counter()
        for spec in specs:
            jax.block_until_ready(jax.tree.leaves(cj.gptq(params, hess, spec, act_order=True)))
        loop = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(jax.tree.leaves(cj.gptq_many(params, hess, specs, act_order=True)))
        many = time.perf_counter() - t
        out[run] = {"gptq_each_seconds": round(loop, 1), "gptq_many_seconds": round(many, 1), "speedup": round(loop / many, 2)}
    print(f"GPTQ options side by side: {out}", flush=True)
    return out


def warm_seconds(label: str, fn) -> float:
    """``fn()`` run twice; the seconds of the second run (every program compiled by the first)."""
    for run in ("cold", "warm"):
        t = time.perf_counter()
        jax.block_until_ready(jax.tree.leaves(fn()))
        seconds = time.perf_counter() - t
        print(f"{label} ({run}): {seconds:.1f} s", flush=True)
    return round(seconds, 1)


def warm_costs(params, batches, bpw: float) -> dict:
    """The work of the search and of the GPTQ passes without compilation (``--warm``): each is run twice in
    this process and the second run timed. The search as ``auto_compress`` runs it by default, with the
    default menu and with its GPTQ options only (importance and sequential application either way)."""
    kernels = [p for p, _ in cj.tree.leaves_with_paths(params) if re.search(ENCODER_KERNELS, p)]
    gptq_menu = [o for o in cj.default_menu() if o.method in ("float", "gptq")]
    out = {"one_shot_pass_seconds": warm_seconds("one-shot GPTQ int4 g128 pass", lambda: one_shot_gptq_pass(params, batches)),
           "sequential_pass_seconds": warm_seconds(
               "sequential GPTQ int4 g128 pass", lambda: sequential_gptq_pass(params, batches, kernels))}
    for name, menu in (("default_menu", None), ("gptq_options", gptq_menu)):
        out[f"search_{name}_seconds"] = warm_seconds(f"auto_compress, {name}", lambda menu=menu: cj.auto_compress(
            apply_fn, params, batches, bits_per_weight=bpw, menu=menu, where=ENCODER_KERNELS, row_mask=row_mask)[0])
        for base in ("one_shot", "sequential"):
            out[f"ratio_{name}_to_{base}"] = round(out[f"search_{name}_seconds"] / out[f"{base}_pass_seconds"], 2)
    print(out, flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__)
    ap.add_argument("--budgets", default="2.5,3.0,3.5,4.0", help="bits per weight over the encoder kernels")
    ap.add_argument("--seq-budgets", default="all", help="budgets also applied sequentially (the others one-shot only)")
    ap.add_argument("--other", type=int, default=200, help="sentences from NumPy's docstrings")
    ap.add_argument("--plans", type=int, default=20, help="random plans for the estimate-vs-measured correlation")
    ap.add_argument("--cost-only", action="store_true", help="only time the GPTQ pass and the search (a quiet rerun)")
    ap.add_argument("--fast", action="store_true",
                    help="only time the GPTQ pass and auto_compress's cheapest form (GPTQ options, no importance, one-shot)")
    ap.add_argument("--importance-method", default="auto", choices=("forward", "reverse", "auto"),
                    help="kernel_importance's method for the search")
    ap.add_argument("--importance-only", action="store_true",
                    help="only the importance by forward and reverse mode: time, agreement, Spearman test of each")
    ap.add_argument("--warm", action="store_true",
                    help="only the passes and the search run twice each, the second (compiled) run timed")
    ap.add_argument("--pass-only", choices=("one-shot", "sequential"), default=None,
                    help="only one GPTQ int4 g128 pass, cold (the cost baseline of --cost-only, run in a fresh process)")
    args = ap.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    seq_budgets = budgets if args.seq_budgets == "all" else [float(b) for b in args.seq_budgets.split(",")]
    train, evaluation = minilm.split_sentences()
    other = other_sentences(args.other)
    n_calib, menu, plans = 256, None, args.plans
    if args.quick:
        evaluation, other, n_calib, plans, budgets = evaluation[:32], other[:32], 32, 3, budgets[2:3]
        Q = cj.QuantSpec
        menu = [cj.Option("float", "float"), cj.Option("gptq-int4-g128", "gptq", Q(bits=4, group_size=128)),
                cj.Option("gptq-int3-g128", "gptq", Q(bits=3, group_size=128, symmetric=False)),
                cj.Option("rtn-int8", "rtn", Q(bits=8))]
    params = minilm.load_params()
    calib, _ = calibration_split(train, n_calib)
    batches = length_batches(calib, 32)
    refs = {"eval": minilm.embed(evaluation, params), "other": minilm.embed(other, params)}
    texts = {"eval": evaluation, "other": other}

    def quality(p) -> dict:
        p = cj.dequantize_params(p)  # QArray and Codebook leaves to floats (embed decodes QArrays only)
        out = {}
        for k in texts:
            cos = minilm.cosines(refs[k], minilm.embed(texts[k], p))
            out[f"{k}_mean_cosine"] = round(float(cos.mean()), 6)
            out[f"{k}_min_cosine"] = round(float(cos.min()), 6)
        return out

    if args.warm:
        return finish({"benchmark": "allocation", "quick": bool(args.quick),
                       "warm": warm_costs(params, batches, 3.5)}, args.json)
    if args.importance_only:
        return finish({"benchmark": "allocation", "quick": bool(args.quick),
                       "importance_methods": importance_methods(params, batches, menu, plans, refs["eval"], evaluation)}, args.json)

    if args.pass_only == "sequential":
        kernels = [p for p, _ in cj.tree.leaves_with_paths(params) if re.search(ENCODER_KERNELS, p)]
        row = sequential_gptq_pass(params, batches, kernels)
        return finish({"benchmark": "allocation", "quick": bool(args.quick),
                       "pass": {"mode": "sequential", "seconds": row["gptq_int4_g128_sequential_seconds"],
                                "stages": row["sequential_stages"], "peak_rss_mb": round(peak_mb())}}, args.json)
    # Cost reference: one GPTQ int4 g128 pass, cold (Hessians + solve), in a process that has compiled nothing.
    # --cost-only runs it (and the sequential pass) in fresh processes after the search instead, so that the
    # search is cold too (here it would find the capture program and GPTQ's solver compiled).
    t_gptq, mem_gptq = 0.0, 0.0
    if not args.cost_only:
        t = time.perf_counter()
        q = jax.block_until_ready(jax.tree.leaves(one_shot_gptq_pass(params, batches)))
        t_gptq = time.perf_counter() - t
        mem_gptq = peak_mb()
        print(f"GPTQ int4 g128 pass: {t_gptq:.1f} s, peak RSS {mem_gptq:.0f} MB", flush=True)
        del q

    if args.pass_only == "one-shot":
        return finish({"benchmark": "allocation", "quick": bool(args.quick),
                       "pass": {"mode": "one-shot", "seconds": round(t_gptq, 1), "peak_rss_mb": round(mem_gptq)}}, args.json)
    if args.fast:
        return finish({"benchmark": "allocation", "quick": bool(args.quick),
                       "fast": fast_search(params, batches, 3.5, t_gptq, quality)}, args.json)

    # The whole search: exactly the steps of auto_compress (collect_hessians, option_costs_and_damages,
    # candidate_importance, from_candidates), run through its pieces so that the candidates are measured
    # once and reused for the other budgets, the uniform rows and the random plans below.
    timed_bpw = 3.5 if 3.5 in budgets else budgets[0]
    t = time.perf_counter()
    hess = cj.collect_hessians(apply_fn, params, batches, where=ENCODER_KERNELS, row_mask=row_mask)
    cands = cj.option_costs_and_damages(params, hess, menu, keep_results=True)
    t_cands = time.perf_counter() - t
    alpha = candidate_importance(apply_fn, params, batches, cands, row_mask=row_mask, method=args.importance_method,
                                 hessians=hess)
    t_alpha = time.perf_counter() - t - t_cands
    n_w = cands.num_weights
    auto_params, auto_plan = from_candidates(apply_fn, params, batches, cands, int(np.floor(timed_bpw * n_w / 8)), alpha,
                                             sequential=True, row_mask=row_mask)
    jax.block_until_ready(jax.tree.leaves(auto_params))
    t_auto = time.perf_counter() - t
    cost = {"gptq_int4_g128_seconds": round(t_gptq, 1), "auto_compress_seconds": round(t_auto, 1),
            "candidates_seconds": round(t_cands, 1), "importance_seconds": round(t_alpha, 1),
            "ratio": round(t_auto / t_gptq, 2) if t_gptq else None, "peak_rss_mb_after_gptq": round(mem_gptq),
            "peak_rss_mb_after_auto": round(peak_mb()),
            "bits_per_weight": timed_bpw}
    print(f"auto_compress at {timed_bpw} bpw: {cost}", flush=True)
    print(auto_plan, flush=True)
    if args.cost_only:
        # Both baselines cold, each in a fresh process. Like for like: the default search ends in a sequential
        # application, so its baseline is a sequential GPTQ pass.
        one_shot = cold_pass_in_fresh_process("one-shot", bool(args.quick))
        cold = cold_pass_in_fresh_process("sequential", bool(args.quick))
        cost.update({"gptq_int4_g128_seconds": one_shot["seconds"], "ratio": round(t_auto / one_shot["seconds"], 2),
                     "peak_rss_mb_after_gptq": one_shot["peak_rss_mb"],
                     "gptq_int4_g128_sequential_cold_seconds": cold["seconds"],
                     "ratio_to_sequential_gptq_cold": round(t_auto / cold["seconds"], 2)})
        cost["compared_one_shot"] = compared_at_every_budget(params, batches, cands, alpha, budgets)
        cost["gptq_options"] = gptq_options_side_by_side(params, batches, menu)
        cost.update(sequential_gptq_pass(params, batches, list(cands.paths)))
        cost["ratio_to_sequential_gptq"] = round(t_auto / cost["gptq_int4_g128_sequential_seconds"], 2)
        print(cost, flush=True)
        return finish({"benchmark": "allocation", "quick": bool(args.quick), "cost": cost}, args.json)
    results = cands.results

    uniform = []
    for j, o in enumerate(cands.options):
        if np.any(cands.costs[:, j] < 0):
            continue
        nbytes = int(cands.costs[:, j].sum())
        p = replace_leaves(params, {path: results[(path, o.name)][0] for path in cands.paths})
        row = {"name": o.name, "bytes": nbytes, "bits_per_weight": round(8 * nbytes / n_w, 4), **quality(p)}
        uniform.append(row)
        print(f"uniform {row}", flush=True)

    allocated = []
    for bpw in budgets:
        budget = int(np.floor(bpw * n_w / 8))
        for seq, weights in ((True, alpha), (False, alpha), (False, None)):
            if seq and bpw not in seq_budgets:
                continue
            if seq and bpw == timed_bpw:
                p, plan = auto_params, auto_plan
            else:
                p, plan = from_candidates(apply_fn, params, batches, cands, budget, weights, sequential=seq, row_mask=row_mask)
            saved = sum(s.stored_bytes for s in cj.size_report(p).leaves if re.search(ENCODER_KERNELS, s.path))
            row = {"budget_bits_per_weight": bpw, "sequential": seq, "importance": weights is not None,
                   "budget_bytes": budget, "plan_bytes": plan.total_bytes, "saved_kernel_bytes": int(saved),
                   "bits_per_weight": round(plan.bits_per_weight, 4), **quality(p), "options": plan.counts(),
                   "compared": [[n, b, round(d, 4)] for n, b, d in plan.compared]}
            for k in texts:
                fits = [u for u in uniform if u["bytes"] <= budget]
                best = max(fits, key=lambda u: u[f"{k}_mean_cosine"]) if fits else None
                row[f"{k}_best_uniform"] = None if best is None else {"name": best["name"], "mean_cosine": best[f"{k}_mean_cosine"]}
                row[f"{k}_beats_every_fitting_uniform"] = best is None or row[f"{k}_mean_cosine"] >= best[f"{k}_mean_cosine"]
            allocated.append(row)
            print(f"allocated {row}", flush=True)

    corr = estimate_vs_measured(params, cands, {"importance_weighted": alpha}, plans, refs["eval"], evaluation)

    result = {"benchmark": "allocation", "quick": bool(args.quick), "calib_sentences": len(calib),
              "eval_sentences": len(evaluation), "other_sentences": len(other), "kernel_weights": n_w,
              "menu": [o.name for o in cands.options], "uniform": uniform, "allocated": allocated,
              "estimate_vs_measured": corr, "cost": cost, "seq_budgets": seq_budgets,
              "importance": {p: float(f"{a:.4g}") for p, a in alpha.items()},
              "plan_3_5": auto_plan.to_dict()}
    return finish(result, args.json)


if __name__ == "__main__":
    main()
