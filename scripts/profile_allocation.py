"""Profile of auto_compress's steps on MiniLM (default menu): each option kind's candidates, the importance
cold and warm, and the plan applied one-shot and sequentially with and without the whole-plan comparison.

    python -m scripts.profile_allocation
    python -m scripts.profile_allocation --steps   # the default search once, cold, with the seconds and calls
                                                    # of each library step (solvers, byte counts, layer errors,
                                                    # capture passes, whole-plan comparison) summed

``--steps`` times a step until its results are ready, so a step that waits on an earlier one's
asynchronous work (a byte count on a solver's result) is charged for that wait.
"""
import collections
import functools
import sys
import time

import jax
import numpy as np

import compressjax as cj
from benchmarks._minilm_oneshot import ENCODER_KERNELS, apply_fn, calibration_split, row_mask
from benchmarks.minilm import length_batches
from compressjax.allocation import _auto, _costs, candidate_importance, from_candidates
from compressjax.models import minilm

STEPS = {_costs: ("solve_option", "_gptq_batches", "leaf_bytes", "layer_error"),
         _auto: ("collect_hessians", "plan_distances", "model_stages", "solve_option", "leaf_bytes", "layer_error")}


def time_steps() -> dict:
    """Wraps the steps of STEPS so that each call adds its seconds (results ready) to the returned dict."""
    totals: dict = collections.defaultdict(lambda: [0.0, 0])

    def wrapped(f, key):
        @functools.wraps(f)
        def timed(*a, **k):
            t0 = time.perf_counter()
            r = jax.block_until_ready(f(*a, **k))
            totals[key][0] += time.perf_counter() - t0
            totals[key][1] += 1
            return r

        return timed

    for module, names in STEPS.items():
        for name in names:
            setattr(module, name, wrapped(getattr(module, name), f"{module.__name__.rsplit('.', 1)[-1]}.{name}"))
    return totals


train, evaluation = minilm.split_sentences()
params = minilm.load_params()
calib, _ = calibration_split(train, 256)
batches = length_batches(calib, 32)
print("batch shapes", [jax.tree.map(lambda x: x.shape, b) for b in batches][:8])
T = {}


def timed(name, fn):
    """``fn()`` with its results ready, its seconds recorded in ``T`` under ``name`` and printed."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    T[name] = round(time.perf_counter() - t0, 1)
    print(name, T[name], flush=True)
    return out


def search_steps(hess, menu):
    """The default search's steps after the capture: candidates, importance (reusing ``hess``)."""
    cands = timed("candidates", lambda: cj.option_costs_and_damages(params, hess, menu, keep_results=True))
    alpha = timed("importance", lambda: candidate_importance(apply_fn, params, batches, cands, row_mask=row_mask,
                                                             method="auto", hessians=hess))
    return cands, alpha


def budget(cands):
    return int(np.floor(3.5 * cands.num_weights / 8))


hess = timed("hessians", lambda: cj.collect_hessians(apply_fn, params, batches, where=ENCODER_KERNELS, row_mask=row_mask))
if "--steps" in sys.argv[1:]:
    totals = time_steps()
    cands, alpha = search_steps(hess, None)
    timed("from_candidates", lambda: from_candidates(apply_fn, params, batches, cands, budget(cands), alpha, row_mask=row_mask)[0])
    print({k: (round(v[0], 1), v[1]) for k, v in totals.items()})
    sys.exit()

timed("gptq-solve", lambda: cj.gptq(params, hess, cj.QuantSpec(bits=4, group_size=128), act_order=True))
menu = cj.default_menu()
kinds = {}
for o in menu:
    kinds.setdefault(o.method if o.method != "float" else "gptq", []).append(o)
for k, opts in kinds.items():
    timed(f"cands-{k}", lambda opts=opts: cj.option_costs_and_damages(params, hess, opts, keep_results=True))
cands, alpha = search_steps(hess, menu)  # the candidates warm now
timed("importance-warm", lambda: candidate_importance(apply_fn, params, batches, cands, row_mask=row_mask, method="auto",
                                                      hessians=hess))
for seq in (False, True):
    for compare in (True, False):
        timed(f"from_candidates-seq{seq}" + ("" if compare else "-nocompare"),
              lambda seq=seq, compare=compare: from_candidates(apply_fn, params, batches, cands, budget(cands), alpha,
                                                               sequential=seq, row_mask=row_mask, compare_uniform=compare)[0])
print(T)
