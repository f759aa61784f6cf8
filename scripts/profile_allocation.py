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


def tick(name, t0):
    T[name] = round(time.perf_counter() - t0, 1)
    print(name, T[name], flush=True)


if "--steps" in sys.argv[1:]:
    totals = time_steps()
    t = time.perf_counter()
    hess = jax.block_until_ready(cj.collect_hessians(apply_fn, params, batches, where=ENCODER_KERNELS, row_mask=row_mask))
    tick("hessians", t)
    t = time.perf_counter()
    cands = cj.option_costs_and_damages(params, hess, None, keep_results=True)
    tick("candidates", t)
    t = time.perf_counter()
    alpha = candidate_importance(apply_fn, params, batches, cands, row_mask=row_mask, method="auto", hessians=hess)
    tick("importance", t)
    t = time.perf_counter()
    jax.block_until_ready(from_candidates(apply_fn, params, batches, cands, int(np.floor(3.5 * cands.num_weights / 8)), alpha,
                                          row_mask=row_mask)[0])
    tick("from_candidates", t)
    print({k: (round(v[0], 1), v[1]) for k, v in totals.items()})
    sys.exit()

t = time.perf_counter()
hess = cj.collect_hessians(apply_fn, params, batches, where=ENCODER_KERNELS, row_mask=row_mask)
jax.block_until_ready(jax.tree.leaves(hess))
tick("hessians", t)
t = time.perf_counter()
q = cj.gptq(params, hess, cj.QuantSpec(bits=4, group_size=128), act_order=True)
jax.block_until_ready(jax.tree.leaves(q))
tick("gptq-solve", t)
menu = cj.default_menu()
kinds = {}
for o in menu:
    kinds.setdefault(o.method if o.method != "float" else "gptq", []).append(o)
for k, opts in kinds.items():
    t = time.perf_counter()
    cj.option_costs_and_damages(params, hess, opts, keep_results=True)
    tick(f"cands-{k}", t)
t = time.perf_counter()
cands = cj.option_costs_and_damages(params, hess, menu, keep_results=True)
tick("cands-all-warm", t)
t = time.perf_counter()
alpha = candidate_importance(apply_fn, params, batches, cands, row_mask=row_mask, method="auto", hessians=hess)
tick("importance", t)
t = time.perf_counter()
candidate_importance(apply_fn, params, batches, cands, row_mask=row_mask, method="auto", hessians=hess)
tick("importance-warm", t)
n_w = cands.num_weights
for seq in (False, True):
    t = time.perf_counter()
    out, plan = from_candidates(apply_fn, params, batches, cands, int(np.floor(3.5 * n_w / 8)), alpha, sequential=seq, row_mask=row_mask)
    jax.block_until_ready(jax.tree.leaves(out))
    tick(f"from_candidates-seq{seq}", t)
    t = time.perf_counter()
    out, plan = from_candidates(apply_fn, params, batches, cands, int(np.floor(3.5 * n_w / 8)), alpha, sequential=seq, row_mask=row_mask, compare_uniform=False)
    jax.block_until_ready(jax.tree.leaves(out))
    tick(f"from_candidates-seq{seq}-nocompare", t)
print(T)
