"""Deep Compression's pipeline, reproduced on MNIST-1D: pruning, weight sharing, entropy-coded file.

An MLP 40-300-100-10 (LeNet-300-100 with MNIST-1D's 40 inputs; Han et al., 2016, "Deep Compression",
ICLR) is trained on MNIST-1D's 4000 training signals (shift augmentation, AdamW; 6000 steps), then:

1. pruned to 92% of its kernel weights with ``gradual_pruning`` (Zhu & Gupta's cubic schedule over the
   first half of 12000 steps, one global magnitude threshold over the three kernels) while training goes
   on, with Hinton's distillation loss from the float model (T = 2, alpha = 0.5) added to the labels;
2. **weight sharing**: ``kmeans_codebooks(params, 5, masks=masks, init="linear")``, one 5-bit codebook per
   kernel fitted to its surviving weights (pruned ones on the reserved exact zero), and 3-bit codebooks
   for the biases; ``WS_ENTROPY=λ`` makes it entropy-constrained (``entropy_weight=λ``, Choi et al., 2017):
   fewer bits per entropy-coded index, at some accuracy;
3. centroid fine-tuning (3000 steps, same loss): the centroids alone (``split_centroids``), each receiving
   the summed gradient of the weights that share it; indices fixed;
4. saved with ``compressjax.save`` (centroids in float16; indices entropy coded, sparse positions).

Side by side, the same pruned network with **4-bit uniform QAT** (per-channel int4 fake quantization,
int8 biases, masks kept, 3000 steps, same loss) in place of steps 2-3, saved the same way. Reported:
test accuracy (1000 signals) of the float model, of the weight-shared model loaded back from its file and
of the uniform one, file bytes and the ratio to float32 (4 bytes per parameter). Targets: at least 40x
with at most 0.5 points of accuracy lost.

Environment knobs for experiments (defaults in brackets): ``WS_SPARSITY`` [0.92], ``WS_INIT`` [linear],
``WS_BIAS_BITS`` [3], ``WS_SCOPE`` [global], ``WS_PRUNE_LR`` [3e-3], ``WS_TUNE_LR`` [3e-4], ``WS_KD`` [1],
``WS_KD_ALPHA`` [0.5], ``WS_ENTROPY`` [0].

The entropy weight was chosen with ``--sweep``, which never looks at the test set: it holds out the last
500 of the 4000 training signals, trains the float and pruned models on the other 3500, and reports, for
each entropy weight, validation accuracy and file size; the default is the largest weight whose validation
accuracy, averaged over three seeds (``--seeds``), stays within 0.5 points of the pruned model's. That was
0: 0.005 lost 0.53 points, 0.01 1.4 and 0.015 (the first above 40x) 2.0.

Run ``python -m benchmarks.weight_sharing [--quick] [--json PATH]``; the last line printed is JSON with
``float_accuracy``, ``accuracy``, ``bytes``, ``ratio`` and ``uniform: {accuracy, bytes, ratio}``.
``python -m benchmarks.weight_sharing --sweep [--seeds 0,1,2]`` prints the validation table instead;
``--seed S`` changes the main run's seed.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compressjax as cj  # noqa: E402
from benchmarks._common import finish, parser  # noqa: E402
from compressjax.demo.data import load_mnist1d  # noqa: E402
from compressjax.demo.pipeline import shift_signals  # noqa: E402

SIZES = (40, 300, 100, 10)
SPARSITY = float(os.environ.get("WS_SPARSITY", "0.92"))
BITS = 5
BIAS_BITS = int(os.environ.get("WS_BIAS_BITS", "3"))
UNIFORM_BITS = 4
KERNELS = r"kernel"
SCOPE = os.environ.get("WS_SCOPE", "global")
INIT = os.environ.get("WS_INIT", "linear")
TUNE_LR = float(os.environ.get("WS_TUNE_LR", "3e-4"))
PRUNE_LR = float(os.environ.get("WS_PRUNE_LR", "3e-3"))
KD_ALPHA = float(os.environ.get("WS_KD_ALPHA", "0.5"))
ENTROPY_WEIGHT = float(os.environ.get("WS_ENTROPY", "0"))  # what --sweep chose (see the docstring)
SWEEP_WEIGHTS = (0.0, 0.005, 0.01, 0.015, 0.02, 0.04)
N_VALIDATION = 500
USE_KD = os.environ.get("WS_KD", "1") == "1"
CHUNK = [250]


def init_mlp(key, sizes=SIZES):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, k = jax.random.split(key)
        params[f"fc{i}"] = {"kernel": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), "bias": jnp.zeros(b)}
    return params


def apply_mlp(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"fc{i}"]["kernel"] + params[f"fc{i}"]["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def accuracy(params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(apply_mlp(params, x), -1) == y))


def train(params, x, y, *, steps, lr, key, transform=None, extra=None, teacher=None, chunk=None, batch=128, max_shift=3):
    """AdamW (warm-up, cosine decay) on ``loss(transform(params))``; ``extra`` is chained after it.

    The loss is cross-entropy on the labels, or with ``teacher`` (float params) Hinton's distillation loss
    (``cj.distillation_loss``, T = 2, alpha = 0.5) against the float model's logits on the same batch.
    """
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps)
    tx = optax.adamw(sched, weight_decay=1e-4, mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p))
    if extra is not None:
        tx = optax.chain(tx, extra)
    transform = transform or (lambda p: p)
    chunk = chunk or CHUNK[0]
    x, y = jnp.asarray(x), jnp.asarray(y)

    def loss_fn(p, xb, yb):
        logits = apply_mlp(transform(p), xb)
        if teacher is None:
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        t_logits = jax.lax.stop_gradient(apply_mlp(teacher, xb))
        return cj.distillation_loss(logits, t_logits, yb, temperature=2.0, alpha=KD_ALPHA).mean()

    @jax.jit
    def run(carry, key):
        def body(carry, key):
            p, s = carry
            k1, k2 = jax.random.split(key)
            idx = jax.random.randint(k1, (batch,), 0, x.shape[0])
            xb = shift_signals(k2, x[idx], max_shift)
            loss, g = jax.value_and_grad(loss_fn)(p, xb, y[idx])
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        return jax.lax.scan(body, carry, jax.random.split(key, chunk))

    carry = (params, tx.init(params))
    for i in range(-(-steps // chunk)):
        carry, _ = run(carry, jax.random.fold_in(key, i))
    return carry


def float_and_pruned(x, y, key, steps_float: int, steps_prune: int):
    """Stages 1-2: the float model, then gradual pruning to ``SPARSITY`` while training goes on.

    Returns ``(params, pruned, masks, teacher)``; ``teacher`` is the float model when distilling.
    """
    k_init, k_float, k_prune = jax.random.split(key, 3)
    params, _ = train(init_mlp(k_init), x, y, steps=steps_float, lr=3e-3, key=k_float)
    # One global magnitude threshold over the three kernels, Zhu & Gupta's cubic schedule over the first
    # half of the stage.
    every = max(steps_prune // 200, 1)
    schedule = cj.polynomial_sparsity(SPARSITY, begin_step=0, end_step=steps_prune // 2)
    pruner = cj.gradual_pruning(schedule, update_every=every, where=KERNELS, scope=SCOPE)
    teacher = params if USE_KD else None
    pruned, state = train(params, x, y, steps=steps_prune, lr=PRUNE_LR, key=k_prune, extra=pruner, teacher=teacher)
    masks = cj.masks_from_state(state)
    return params, cj.apply_masks(pruned, masks), masks, teacher


def weight_share(pruned, masks, x, y, key, *, steps_tune: int, teacher, entropy_weight: float):
    """Stages 3-4: 5-bit codebooks on the surviving kernel weights (3-bit ones for the biases), then the
    centroids fine-tuned with the indices fixed. Returns ``(tuned with float16 centroids, shared)``."""
    shared = cj.kmeans_codebooks(pruned, BITS, where=KERNELS, masks=masks, init=INIT, entropy_weight=entropy_weight)
    shared = cj.kmeans_codebooks(shared, BIAS_BITS, where=r"bias", init=INIT)
    trainable, frozen = cj.split_centroids(shared)
    merge = functools.partial(cj.merge_centroids, frozen=frozen)
    trainable, _ = train(trainable, x, y, steps=steps_tune, lr=TUNE_LR, key=key, teacher=teacher,
                         transform=lambda t: cj.decode_params(merge(t)))
    return cj.cast_centroids(merge(trainable), jnp.float16), shared


def saved_size_and_accuracy(tree, x, y, **save_kw) -> tuple[int, float, object]:
    """``(file bytes, accuracy of the model loaded back, size report)`` of ``cj.save(tree)``."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.cjx")
        report = cj.save(path, tree, **save_kw)
        return os.path.getsize(path), accuracy(cj.load(path), x, y), report


def sweep(args) -> dict:
    """Validation table over the entropy weight: train on 3500 signals, evaluate on the held-out 500.

    Per seed, the float and pruned models are trained once and every entropy weight is applied to the same
    pruned model; the table averages the seeds. The chosen weight is the largest whose mean validation
    accuracy stays within 0.5 points of the pruned model's (weight sharing should cost nothing on top of
    pruning; the pruning stage's own cost is reported apart).
    """
    data = load_mnist1d()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xv, yv, x, y = x[-N_VALIDATION:], y[-N_VALIDATION:], x[:-N_VALIDATION], y[:-N_VALIDATION]
    steps_float, steps_prune, steps_tune = (200, 200, 100) if args.quick else (6000, 12000, 3000)
    CHUNK[0] = 100 if args.quick else 250
    weights = SWEEP_WEIGHTS[:2] if args.quick else SWEEP_WEIGHTS
    seeds = [int(v) for v in args.seeds.split(",")]
    per_seed = []
    for seed in seeds:
        _, k_stages, k_tune = jax.random.split(jax.random.key(seed), 3)
        params, pruned, masks, teacher = float_and_pruned(x, y, k_stages, steps_float, steps_prune)
        float_bytes = 4 * sum(a.size for a in jax.tree.leaves(params))
        run = {"seed": seed, "float": accuracy(params, xv, yv), "pruned": accuracy(pruned, xv, yv), "rows": []}
        print(f"seed {seed}: validation accuracy float {run['float']:.3f}, pruned {run['pruned']:.3f}", flush=True)
        for weight in weights:
            tuned, _ = weight_share(pruned, masks, x, y, k_tune, steps_tune=steps_tune, teacher=teacher,
                                    entropy_weight=weight)
            nbytes, acc, _ = saved_size_and_accuracy(tuned, xv, yv)
            run["rows"].append({"entropy_weight": weight, "accuracy": acc, "bytes": nbytes})
            print(f"  entropy_weight {weight:<6} validation accuracy {acc:.3f}, {nbytes} bytes "
                  f"({float_bytes / nbytes:.1f}x)", flush=True)
        per_seed.append(run)
    mean = lambda vals: sum(vals) / len(vals)  # noqa: E731
    pruned_acc = mean([r["pruned"] for r in per_seed])
    table = []
    for i, weight in enumerate(weights):
        acc = mean([r["rows"][i]["accuracy"] for r in per_seed])
        nbytes = mean([r["rows"][i]["bytes"] for r in per_seed])
        table.append({"entropy_weight": weight, "validation_accuracy": acc, "bytes": nbytes,
                      "ratio": float_bytes / nbytes})
    ok = [r["entropy_weight"] for r in table if r["validation_accuracy"] >= pruned_acc - 0.005]
    result = {"table": table, "per_seed": per_seed, "float_validation_accuracy": mean([r["float"] for r in per_seed]),
              "pruned_validation_accuracy": pruned_acc, "seeds": seeds, "chosen": max(ok) if ok else 0.0,
              "quick": bool(args.quick)}
    return finish(result, args.json)


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--sweep", action="store_true", help="validation table over the entropy weight (no test data)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the --sweep runs (averaged)")
    p.add_argument("--seed", type=int, default=0, help="seed of the main run (its test accuracy is reported)")
    args = p.parse_args(argv)
    if args.sweep:
        return sweep(args)
    t0 = time.perf_counter()
    data = load_mnist1d()
    x, y, xt, yt = (jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test))
    steps_float, steps_prune, steps_tune = (200, 200, 100) if args.quick else (6000, 12000, 3000)
    CHUNK[0] = 100 if args.quick else 250  # steps per compiled scan (the full run's numbers use 250)
    k_stages, k_tune, k_qat = jax.random.split(jax.random.key(args.seed), 3)

    # 1-2. Float model; gradual pruning to 92% of all kernel weights.
    params, pruned, masks, teacher = float_and_pruned(x, y, k_stages, steps_float, steps_prune)
    float_acc = accuracy(params, xt, yt)
    pruned_acc = accuracy(pruned, xt, yt)

    # 3-4. Weight sharing and centroid fine-tuning (indices fixed, pruned weights on the reserved zero).
    t_km = time.perf_counter()
    tuned, shared = weight_share(pruned, masks, x, y, k_tune, steps_tune=steps_tune, teacher=teacher,
                                 entropy_weight=ENTROPY_WEIGHT)
    shared_acc = accuracy(cj.decode_params(shared), xt, yt)
    tuned_acc = accuracy(cj.decode_params(tuned), xt, yt)
    share_s = time.perf_counter() - t_km

    # 5. The alternative: 4-bit uniform QAT (per-channel int4 kernels, int8 biases) on the same pruned net.
    rules = {KERNELS: cj.QuantSpec(bits=UNIFORM_BITS), "bias": cj.QuantSpec(bits=8, channel_axes=())}
    qat, _ = train(pruned, x, y, steps=steps_tune, lr=TUNE_LR, key=k_qat, extra=cj.keep_masked(masks), teacher=teacher,
                   transform=lambda p: cj.fake_quant_params(p, rules))
    qat = cj.apply_masks(qat, masks)

    float_bytes = 4 * sum(a.size for a in jax.tree.leaves(params))
    ws_bytes, acc, report = saved_size_and_accuracy(tuned, xt, yt)
    uq_bytes, uq_acc, uq_report = saved_size_and_accuracy(qat, xt, yt, rules=rules)
    print(report)
    print(uq_report)
    leaves = {s.path: s for s in report.leaves}
    result = {
        "float_accuracy": float_acc,
        "accuracy": acc,
        "bytes": ws_bytes,
        "ratio": float_bytes / ws_bytes,
        "uniform": {"accuracy": uq_acc, "bytes": uq_bytes, "ratio": float_bytes / uq_bytes},
        "float_bytes": float_bytes,
        "pruned_accuracy": pruned_acc,
        "shared_before_tuning_accuracy": shared_acc,
        "shared_after_tuning_accuracy": tuned_acc,
        "sparsity": float(cj.sparsity_summary(masks).fraction),
        "bits": BITS,
        "entropy_weight": ENTROPY_WEIGHT,
        "index_bits": {p: s.index_bits for p, s in leaves.items() if s.index_bits is not None},
        "index_entropy": {p: s.index_entropy for p, s in leaves.items() if s.index_entropy is not None},
        "weight_sharing_seconds": share_s,
        "seed": args.seed,
        "steps": {"float": steps_float, "prune": steps_prune, "tune": steps_tune},
        "quick": bool(args.quick),
        "seconds": time.perf_counter() - t0,
    }
    return finish(result, args.json)


if __name__ == "__main__":
    main()
