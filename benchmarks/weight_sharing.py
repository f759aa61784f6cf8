"""Deep Compression's pipeline, reproduced on MNIST-1D: pruning, weight sharing, entropy-coded file.

An MLP 40-300-100-10 (LeNet-300-100 with MNIST-1D's 40 inputs; Han et al., 2016, "Deep Compression",
ICLR) is trained on MNIST-1D's 4000 training signals (shift augmentation, AdamW; 6000 steps), then:

1. pruned to 92% of its kernel weights with ``gradual_pruning`` (Zhu & Gupta's cubic schedule over the
   first half of 12000 steps, one global magnitude threshold over the three kernels) while training goes
   on, with Hinton's distillation loss from the float model (T = 2, alpha = 0.5) added to the labels;
2. **weight sharing**: ``kmeans_codebooks(params, 5, masks=masks, init="linear")``, one 5-bit codebook per
   kernel fitted to its surviving weights (pruned ones on the reserved exact zero), and 3-bit codebooks
   for the two large bias vectors;
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
``WS_KD_ALPHA`` [0.5].

Run ``python -m benchmarks.weight_sharing [--quick] [--json PATH]``; the last line printed is JSON with
``float_accuracy``, ``accuracy``, ``bytes``, ``ratio`` and ``uniform: {accuracy, bytes, ratio}``.
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


def main(argv=None) -> dict:
    args = parser(__doc__).parse_args(argv)
    t0 = time.perf_counter()
    data = load_mnist1d()
    x, y, xt, yt = (jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test))
    steps_float, steps_prune, steps_tune = (200, 200, 100) if args.quick else (6000, 12000, 3000)
    CHUNK[0] = 100 if args.quick else 250  # steps per compiled scan (the full run's numbers use 250)
    key = jax.random.key(0)
    k_init, k_float, k_prune, k_tune, k_qat = jax.random.split(key, 5)

    # 1. Float model.
    params, _ = train(init_mlp(k_init), x, y, steps=steps_float, lr=3e-3, key=k_float)
    float_acc = accuracy(params, xt, yt)

    # 2. Gradual pruning to 92% of all kernel weights (one global magnitude threshold over the three
    # kernels, Zhu & Gupta's cubic schedule over the first half of the stage), training on.
    every = max(steps_prune // 200, 1)
    schedule = cj.polynomial_sparsity(SPARSITY, begin_step=0, end_step=steps_prune // 2)
    pruner = cj.gradual_pruning(schedule, update_every=every, where=KERNELS, scope=SCOPE)
    teacher = params if USE_KD else None
    pruned, state = train(params, x, y, steps=steps_prune, lr=PRUNE_LR, key=k_prune, extra=pruner, teacher=teacher)
    masks = cj.masks_from_state(state)
    pruned = cj.apply_masks(pruned, masks)
    pruned_acc = accuracy(pruned, xt, yt)

    # 3. Weight sharing: 5-bit codebooks on the surviving kernel weights, 4-bit ones for the biases.
    t_km = time.perf_counter()
    shared = cj.kmeans_codebooks(pruned, BITS, where=KERNELS, masks=masks, init=INIT)
    shared = cj.kmeans_codebooks(shared, BIAS_BITS, where=r"fc[01]/bias", init=INIT)  # fc2 has only 10
    kmeans_s = time.perf_counter() - t_km
    shared_acc = accuracy(cj.decode_params(shared), xt, yt)

    # 4. Centroid fine-tuning (indices fixed, pruned weights on the reserved zero).
    trainable, frozen = cj.split_centroids(shared)
    merge = functools.partial(cj.merge_centroids, frozen=frozen)
    trainable, _ = train(trainable, x, y, steps=steps_tune, lr=TUNE_LR, key=k_tune, teacher=teacher,
                         transform=lambda t: cj.decode_params(merge(t)))
    tuned = merge(trainable)
    tuned = cj.cast_centroids(tuned, jnp.float16)
    tuned_acc = accuracy(cj.decode_params(tuned), xt, yt)

    # 5. The alternative: 4-bit uniform QAT (per-channel int4 kernels, int8 biases) on the same pruned net.
    rules = {KERNELS: cj.QuantSpec(bits=UNIFORM_BITS), "bias": cj.QuantSpec(bits=8, channel_axes=())}
    qat, _ = train(pruned, x, y, steps=steps_tune, lr=TUNE_LR, key=k_qat, extra=cj.keep_masked(masks), teacher=teacher,
                   transform=lambda p: cj.fake_quant_params(p, rules))
    qat = cj.apply_masks(qat, masks)

    float_bytes = 4 * sum(a.size for a in jax.tree.leaves(params))
    with tempfile.TemporaryDirectory() as d:
        ws_path, uq_path = os.path.join(d, "shared.cjx"), os.path.join(d, "uniform.cjx")
        report = cj.save(ws_path, tuned)
        loaded = cj.load(ws_path)
        ws_bytes = os.path.getsize(ws_path)
        uq_report = cj.save(uq_path, qat, rules=rules)
        uq_loaded = cj.load(uq_path)
        uq_bytes = os.path.getsize(uq_path)
    acc = accuracy(loaded, xt, yt)
    uq_acc = accuracy(uq_loaded, xt, yt)
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
        "index_bits": {p: s.index_bits for p, s in leaves.items() if s.index_bits is not None},
        "index_entropy": {p: s.index_entropy for p, s in leaves.items() if s.index_entropy is not None},
        "kmeans_seconds": kmeans_s,
        "steps": {"float": steps_float, "prune": steps_prune, "tune": steps_tune},
        "quick": bool(args.quick),
        "seconds": time.perf_counter() - t0,
    }
    return finish(result, args.json)


if __name__ == "__main__":
    main()
