"""Profile of auto_compress's steps on MiniLM (default menu): each option kind's candidates, the importance
cold and warm, and the plan applied one-shot and sequentially with and without the whole-plan comparison.

    python -m scripts.profile_allocation
"""
import time

import jax
import numpy as np

import compressjax as cj
from benchmarks._minilm_oneshot import ENCODER_KERNELS, apply_fn, calibration_split, row_mask
from benchmarks.minilm import length_batches
from compressjax.allocation import candidate_importance, from_candidates
from compressjax.models import minilm

train, evaluation = minilm.split_sentences()
params = minilm.load_params()
calib, _ = calibration_split(train, 256)
batches = length_batches(calib, 32)
print("batch shapes", [jax.tree.map(lambda x: x.shape, b) for b in batches][:8])
T = {}


def tick(name, t0):
    T[name] = round(time.perf_counter() - t0, 1)
    print(name, T[name], flush=True)


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
