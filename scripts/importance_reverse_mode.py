"""Experiment (issue 20, cost): MiniLM's per-kernel importance, exact against a reverse-mode estimate.

Exact: ``kernel_importance`` (one forward-mode tangent pass per kernel and batch: 36 x 4 on MiniLM).
Estimate: for each sample ``s`` and a Gaussian probe ``v_s`` over its output,
``c_ls = <d(v_s . y_s)/dW_l, dW_l> = v_s . J_ls X_ls dW_l`` has ``E[c_ls^2] = ||J_ls X_ls dW_l||^2``, and one
per-sample backward pass per batch gives ``c_ls`` for every kernel at once. The probe ``dW_l`` is each
kernel's GPTQ int3 g128 error; the denominators are the same for both. Not used by the library (yet): the
estimate assumes a leading sample axis with independent samples.

    python -m scripts.importance_reverse_mode --json benchmarks/results/importance-reverse-mode-cpu.json
"""
import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import spearmanr

import compressjax as cj
from benchmarks._minilm_oneshot import ENCODER_KERNELS, apply_fn, calibration_split, row_mask
from benchmarks.minilm import length_batches
from compressjax import tree
from compressjax.allocation._costs import _exact
from compressjax.allocation._importance import kernel_importance, spaced_batches
from compressjax.models import minilm

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--json", default=None)
args = ap.parse_args()
train, _ = minilm.split_sentences()
params = minilm.load_params()
calib, _ = calibration_split(train, 256)
batches = length_batches(calib, 32)
hess = cj.collect_hessians(apply_fn, params, batches, where=ENCODER_KERNELS, row_mask=row_mask)
Q = cj.QuantSpec
menu = [cj.Option("float", "float"), cj.Option("gptq-int3-g128", "gptq", Q(bits=3, group_size=128, symmetric=False)),
        cj.Option("gptq-int4-g128", "gptq", Q(bits=4, group_size=128))]
cands = cj.option_costs_and_damages(params, hess, menu, keep_results=True)
leaves = dict(tree.leaves_with_paths(params, tree.is_compressed_leaf))
probes = {p: cj.dequantize(cands.results[(p, "gptq-int3-g128")][0]) - leaves[p] for p in cands.paths}

t = time.perf_counter()
exact = kernel_importance(apply_fn, params, batches, probes, row_mask=row_mask)
t_exact = time.perf_counter() - t

# Reverse mode: for each sample s and Gaussian v_s, c_ls = <d(v_s . y_s)/dW_l, dW_l> = v_s . J_ls X_ls dW_l,
# so E[c_ls^2] = ||J_ls X_ls dW_l||^2; sum over samples and batches, then the same denominators.
paths = list(cands.paths)
flat, treedef = jax.tree_util.tree_flatten_with_path(params)
lp = [tree.path_to_str(k) for k, _ in flat]
sel = [lp.index(p) for p in paths]
dws = [probes[p] for p in paths]


@jax.jit
def per_sample(ks, others, batch, key):
    def one(ids, mask, v):
        def f(ks):
            ls = list(others)
            for j, i in enumerate(sel):
                ls[i] = ks[j]
            y = apply_fn(jax.tree_util.tree_unflatten(treedef, ls), (ids[None], mask[None]))
            return jnp.sum(y[0] * v)
        g = jax.grad(f)(ks)
        return jnp.stack([jnp.vdot(a, b) for a, b in zip(g, dws, strict=True)])
    ids, mask = batch
    out_dim = jax.eval_shape(lambda: apply_fn(params, (ids[:1], mask[:1]))).shape[-1]
    v = jax.random.normal(key, (ids.shape[0], out_dim))
    c = jax.lax.map(lambda a: jax.vmap(one)(*a), (ids.reshape(4, -1, ids.shape[1]), mask.reshape(4, -1, mask.shape[1]), v.reshape(4, -1, out_dim)))
    return jnp.sum(c.reshape(-1, len(sel)) ** 2, axis=0)


others = [x for _, x in flat]
ks = [others[i] for i in sel]
results = {}
for probes_per_batch, nb in ((1, 4), (4, 4), (1, 8)):
    t = time.perf_counter()
    use = spaced_batches(batches, nb, "x")
    num = np.zeros(len(sel))
    key = jax.random.PRNGKey(0)
    for b in use:
        for _ in range(probes_per_batch):
            key, sub = jax.random.split(key)
            num += np.asarray(per_sample(ks, others, b, sub))
    num /= probes_per_batch
    t_rev = time.perf_counter() - t
    # denominators over the same batches
    h2 = cj.collect_hessians(apply_fn, params, use, where=_exact(paths), row_mask=row_mask)
    hs = dict(tree.leaves_with_paths(h2, lambda x: x is None or isinstance(x, cj.Hessian)))
    est = {}
    for j, p in enumerate(paths):
        dw = np.asarray(dws[j], np.float64)
        den = float(np.sum((np.asarray(hs[p].h, np.float64) @ dw) * dw))
        est[p] = num[j] / den
    a = np.array([exact[p] for p in paths])
    e = np.array([est[p] for p in paths])
    rel = np.abs(e / a - 1)
    results[f"{probes_per_batch} probe(s) x {nb} batches"] = dict(seconds=round(t_rev, 1), median_rel_err=round(float(np.median(rel)), 3),
                                           max_rel_err=round(float(rel.max()), 3), spearman_alphas=round(float(spearmanr(a, e)[0]), 4))
    print(probes_per_batch, nb, results[f"{probes_per_batch} probe(s) x {nb} batches"], flush=True)
out = {"exact_seconds": round(t_exact, 1), "exact": "kernel_importance, 36 kernels x 4 batches of tangent passes",
       "estimates": results, "machine": {"cpu": platform.processor() or platform.machine(), "jax": jax.__version__},
       "note": "each row's seconds include compiling one backward pass per new batch shape"}
print(out)
if args.json:
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
