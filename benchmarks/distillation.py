"""Benchmark of the distillation step: overhead vs its parts, vs PyTorch eager, FLOP rate, compression cost.

Teacher MLP 784-1200-1200-10, student 784-800-800-10 (Hinton et al. 2015's MNIST sizes), batch 256,
float32, Adam. Measured in one process, interleaved (every round times each variant once, in turn) so that
load from other processes on a shared machine hits all variants alike; each number is the median over
rounds of the mean time of ``--inner`` back-to-back calls, after a compile-and-warm-up call.

Printed ratios and their targets:

* ``parts``: distill step / (teacher forward alone + student train step alone on given teacher logits);
  target <= 1.1;
* ``torch``: the same step as a plain PyTorch eager loop / the jit step (skipped without ``torch``);
  target >= 1.0 (the jit step is not slower). PyTorch is timed with its default thread count and with
  one thread, and the faster of the two is the baseline;
* ``pipeline`` (information): distill step / the two parts called one after the other;
* ``flops``: the step's achieved FLOP rate (matmul FLOPs of teacher forward + student forward and
  backward) / a large float32 matmul's FLOP rate on this machine; target >= 0.8;
* ``compress``: the step with ``student_transform`` = 90% magnitude masks + 4-bit fake quantization (and
  ``keep_masked`` in ``tx``) / the plain step; target <= 1.25.

Run ``python -m benchmarks.distillation [--quick] [--json PATH]``; the last line printed is JSON.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._common import finish, interleaved, medians, parser
from compressjax import (
    DistillState,
    QuantSpec,
    apply_masks,
    distillation_loss,
    fake_quant_params,
    keep_masked,
    magnitude_masks,
    make_distill_step,
)

TEMPERATURE, ALPHA, LR = 4.0, 0.9, 1e-3


def mlp_init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"kernel": jax.random.normal(k, (a, b), jnp.float32) * np.sqrt(2.0 / a), "bias": jnp.zeros(b, jnp.float32)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_apply(params, x):
    for i, layer in enumerate(params):
        x = x @ layer["kernel"] + layer["bias"]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return x


def matmul_flops(sizes, batch, backward=False):
    """Multiply-add FLOPs (2 per MAC) of an MLP's forward, or of its backward (weight grads + input grads
    of every layer but the first, whose input needs no gradient)."""
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    fwd = sum(2 * batch * a * b for a, b in pairs)
    if not backward:
        return fwd
    return fwd + sum(2 * batch * a * b for a, b in pairs[1:])


def repeated(fn, inner):
    """``fn`` called ``inner`` times back to back (one timed sample is their mean)."""

    def run():
        out = None
        for _ in range(inner):
            out = fn()
        return out

    return run


def torch_step_factory(t_sizes, s_sizes, batch, x_np, y_np):
    """The same distillation step as a user would write it in PyTorch (eager, CPU); None without torch."""
    try:
        import torch
        import torch.nn.functional as F  # noqa: N812
    except ImportError:
        return {}, None

    torch.manual_seed(0)

    def mlp(sizes):
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(torch.nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(torch.nn.ReLU())
        return torch.nn.Sequential(*layers)

    teacher, student = mlp(t_sizes).eval(), mlp(s_sizes)
    opt = torch.optim.Adam(student.parameters(), lr=LR)
    x, y = torch.from_numpy(np.array(x_np)), torch.from_numpy(np.array(y_np)).long()

    def step():
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        kd = F.kl_div(
            F.log_softmax(s_logits / TEMPERATURE, -1),
            F.log_softmax(t_logits / TEMPERATURE, -1),
            log_target=True,
            reduction="batchmean",
        ) * (TEMPERATURE**2)
        loss = ALPHA * kd + (1 - ALPHA) * F.cross_entropy(s_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    threads = torch.get_num_threads()

    def step_one_thread():
        # OpenMP threads spin-wait; on an oversubscribed machine one thread can be much faster.
        torch.set_num_threads(1)
        try:
            return step()
        finally:
            torch.set_num_threads(threads)

    return {f"torch_step_{threads}t": step, "torch_step_1t": step_one_thread}, f"torch {torch.__version__}"


def main(argv=None):
    ap = parser(__doc__)  # --quick: tiny sizes, a few seconds
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15; 3 with --quick)")
    ap.add_argument("--inner", type=int, default=None, help="back-to-back calls per sample (default 5; 2 with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        t_sizes, s_sizes, batch, n_mm = [64, 128, 128, 10], [64, 64, 64, 10], 32, 256
        rounds, inner = args.rounds or 3, args.inner or 2
    else:
        t_sizes, s_sizes, batch, n_mm = [784, 1200, 1200, 10], [784, 800, 800, 10], 256, 2048
        rounds, inner = args.rounds or 15, args.inner or 5

    k = jax.random.split(jax.random.key(0), 4)
    teacher, student = mlp_init(k[0], t_sizes), mlp_init(k[1], s_sizes)
    x = jax.random.normal(k[2], (batch, t_sizes[0]), jnp.float32)
    y = jax.random.randint(k[3], (batch,), 0, t_sizes[-1], jnp.int32)
    loss_fn = functools.partial(distillation_loss, temperature=TEMPERATURE, alpha=ALPHA)
    tx = optax.adam(LR)

    # 1. The distillation step.
    step = make_distill_step(mlp_apply, mlp_apply, tx, loss_fn=loss_fn)
    state = {"plain": DistillState.create(student, tx)}

    # 2. Its parts: the teacher forward alone, and the student's train step on given teacher logits.
    teacher_fwd = jax.jit(mlp_apply)
    t_logits = teacher_fwd(teacher, x)
    student_only = make_distill_step(mlp_apply, lambda logits, _: logits, tx, loss_fn=loss_fn)
    state["student"] = DistillState.create(student, tx)

    # 3. Distill + prune 90% + fake-quantize to 4 bits in the same step.
    masks = magnitude_masks(student, 0.9)
    spec = QuantSpec(bits=4)
    tx_c = optax.chain(optax.adam(LR), keep_masked(masks))
    compress = make_distill_step(
        mlp_apply,
        mlp_apply,
        tx_c,
        loss_fn=loss_fn,
        student_transform=lambda p, s: fake_quant_params(apply_masks(p, masks), spec),
    )
    state["compress"] = DistillState.create(student, tx_c)

    # 4. A large float32 matmul: the machine's attainable FLOP rate.
    a = jax.random.normal(k[0], (n_mm, n_mm), jnp.float32)
    b = jax.random.normal(k[1], (n_mm, n_mm), jnp.float32)
    matmul = jax.jit(jnp.matmul)

    torch_steps, torch_info = torch_step_factory(t_sizes, s_sizes, batch, np.asarray(x), np.asarray(y))

    def run_plain():
        state["plain"], m = step(state["plain"], teacher, (x, y))
        return m["loss"]

    def run_student():
        state["student"], m = student_only(state["student"], t_logits, (x, y))
        return m["loss"]

    def run_compress():
        state["compress"], m = compress(state["compress"], teacher, (x, y))
        return m["loss"]

    def run_pipeline():  # the parts called one after the other, as without make_distill_step
        state["student"], m = student_only(state["student"], teacher_fwd(teacher, x), (x, y))
        return m["loss"]

    variants = {
        "distill_step": run_plain,
        "teacher_forward": lambda: teacher_fwd(teacher, x),
        "student_step": run_student,
        "parts_pipeline": run_pipeline,
        "compress_step": run_compress,
        "matmul": lambda: matmul(a, b),
    }
    variants.update(torch_steps)
    mm_inner = max(1, inner // 2)
    calls = {name: mm_inner if name == "matmul" else inner for name in variants}
    # Two warm-up calls (compile, then first-run allocations), then rounds that time each variant in turn.
    times = interleaved([repeated(fn, calls[name]) for name, fn in variants.items()], rounds, warmup=2)
    samples = {name: [t / calls[name] for t in ts] for name, ts in zip(variants, times, strict=True)}
    med = dict(zip(samples, medians(list(samples.values())), strict=True))
    best = {name: min(v) for name, v in samples.items()}

    step_flops = (
        matmul_flops(t_sizes, batch) + matmul_flops(s_sizes, batch) + matmul_flops(s_sizes, batch, backward=True)
    )
    xla_flops = None
    try:
        cost = step.jitted.lower(state["plain"], teacher, (x, y)).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        xla_flops = float(cost.get("flops")) if cost and cost.get("flops") else None
    except Exception:  # noqa: BLE001 - cost analysis is informational only
        pass
    mm_rate = 2 * n_mm**3 / med["matmul"]
    step_rate = step_flops / med["distill_step"]

    results = {
        "benchmark": "distillation",
        "sizes": {"teacher": t_sizes, "student": s_sizes, "batch": batch, "matmul": n_mm, "quick": args.quick},
        "rounds": rounds,
        "inner": inner,
        "ms": {name: 1e3 * v for name, v in med.items()},
        "step_gflop": step_flops / 1e9,
        "xla_cost_gflop": None if xla_flops is None else xla_flops / 1e9,
        "step_gflops_per_s": step_rate / 1e9,
        "matmul_gflops_per_s": mm_rate / 1e9,
        "ratios": {
            "parts": med["distill_step"] / (med["teacher_forward"] + med["student_step"]),
            "pipeline": med["distill_step"] / med["parts_pipeline"],
            "flops": step_rate / mm_rate,
            "compress": med["compress_step"] / med["distill_step"],
        },
        "targets": {"parts": "<= 1.1", "flops": ">= 0.8", "compress": "<= 1.25", "torch": ">= 1.0"},
    }
    results["best_ms"] = {name: 1e3 * v for name, v in best.items()}
    results["best_ratios"] = {
        "parts": best["distill_step"] / (best["teacher_forward"] + best["student_step"]),
        "compress": best["compress_step"] / best["distill_step"],
    }
    if torch_steps:
        # The baseline is PyTorch's faster thread setting, the one most favourable to it.
        fastest = min(torch_steps, key=lambda name: med[name])
        results["ratios"]["torch"] = med[fastest] / med["distill_step"]
        results["torch"] = f"{torch_info}, {fastest}"
        torch_info = results["torch"]
    else:
        results["torch"] = "skipped: torch is not installed"

    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; rounds {rounds} x {inner} calls; median and best round")
    for name, v in results["ms"].items():
        print(f"  {name:16s} {v:9.3f} ms  (best {results['best_ms'][name]:9.3f} ms)")
    r = results["ratios"]
    print(
        f"distill step / (teacher fwd + student step) = {r['parts']:.3f}   (target <= 1.1)\n"
        f"distill step / (teacher fwd then student step, two jitted calls) = {r['pipeline']:.3f}\n"
        f"step FLOP rate {step_rate / 1e9:.1f} GFLOP/s ({step_flops / 1e9:.3f} GFLOP/step) / matmul "
        f"{mm_rate / 1e9:.1f} GFLOP/s = {r['flops']:.3f}   (target >= 0.8)\n"
        f"prune 90% + 4-bit fake-quant step / plain step = {r['compress']:.3f}   (target <= 1.25)"
    )
    if "torch" in r:
        print(f"PyTorch eager step / jit step = {r['torch']:.3f}   (target >= 1.0; {torch_info})")
    else:
        print("PyTorch eager comparison skipped: torch is not installed")
    return finish(results, args.json)


if __name__ == "__main__":
    main()
