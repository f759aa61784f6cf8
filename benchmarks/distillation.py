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

With ``--batches 256,2048,8192`` the plain and the compressed step are also timed at each of those batch
sizes (same models; interleaved, median of rounds): step time, FLOP rate and the compressed step over the
plain one (``batches`` in the JSON). The FLOP rate uses the analytic count of matmul FLOPs above (what a
step must do); XLA's ``cost_analysis()`` count of the compiled step is reported beside it
(``xla_cost_gflop``) but not used, since it depends on the backend (on a GPU it omits the GEMM custom
calls).

Run ``python -m benchmarks.distillation [--quick] [--json PATH] [--batches 256,2048,8192]``; the last line
printed is JSON.
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


def xla_gflop(jitted, *args) -> float | None:
    """The compiled computation's FLOPs from XLA's ``cost_analysis()`` (GFLOP), or None if unavailable."""
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"]) / 1e9 if cost and cost.get("flops") else None
    except Exception:  # noqa: BLE001 - cost analysis is informational only
        return None


def batch_sweep(t_sizes, s_sizes, batches, rounds, inner, mm_rate=None) -> list[dict]:
    """Plain and compressed (90% masks + 4-bit) distillation steps at each batch size: time, FLOP rate, ratio."""
    loss_fn = functools.partial(distillation_loss, temperature=TEMPERATURE, alpha=ALPHA)
    k = jax.random.split(jax.random.key(1), 4)
    teacher, student = mlp_init(k[0], t_sizes), mlp_init(k[1], s_sizes)
    masks = magnitude_masks(student, 0.9)
    spec = QuantSpec(bits=4)
    tx, tx_c = optax.adam(LR), optax.chain(optax.adam(LR), keep_masked(masks))
    plain = make_distill_step(mlp_apply, mlp_apply, tx, loss_fn=loss_fn)
    compress = make_distill_step(
        mlp_apply, mlp_apply, tx_c, loss_fn=loss_fn,
        student_transform=lambda p, s: fake_quant_params(apply_masks(p, masks), spec),
    )
    rows = []
    for batch in batches:
        x = jax.random.normal(k[2], (batch, t_sizes[0]), jnp.float32)
        y = jax.random.randint(k[3], (batch,), 0, t_sizes[-1], jnp.int32)
        state = {"plain": DistillState.create(student, tx), "compress": DistillState.create(student, tx_c)}

        def run(name, step, x=x, y=y, state=state):
            state[name], m = step(state[name], teacher, (x, y))
            return m["loss"]

        fns = [repeated(functools.partial(run, "plain", plain), inner), repeated(functools.partial(run, "compress", compress), inner)]
        t_plain, t_comp = (v / inner for v in medians(interleaved(fns, rounds, warmup=2)))
        flop = matmul_flops(t_sizes, batch) + matmul_flops(s_sizes, batch) + matmul_flops(s_sizes, batch, backward=True)
        row = {
            "batch": batch, "plain_ms": 1e3 * t_plain, "compress_ms": 1e3 * t_comp, "compress_ratio": t_comp / t_plain,
            "step_gflop": flop / 1e9, "xla_cost_gflop": xla_gflop(plain.jitted, state["plain"], teacher, (x, y)),
            "gflops_per_s": flop / t_plain / 1e9, "compress_gflops_per_s": flop / t_comp / 1e9,
        }
        if mm_rate:
            row["flops_ratio"] = flop / t_plain / mm_rate
        rows.append(row)
        print(
            f"  batch {batch:6d}: plain {row['plain_ms']:9.3f} ms ({row['gflops_per_s']:9.1f} GFLOP/s)  compressed "
            f"{row['compress_ms']:9.3f} ms  compressed / plain {row['compress_ratio']:.3f}"
            + (f"  FLOP rate / matmul {row['flops_ratio']:.3f}" if mm_rate else "")
        )
    return rows


def main(argv=None):
    ap = parser(__doc__)  # --quick: tiny sizes, a few seconds
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15; 3 with --quick)")
    ap.add_argument("--inner", type=int, default=None, help="back-to-back calls per sample (default 5; 2 with --quick)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes for the step-time sweep, e.g. 256,2048,8192")
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")] if args.batches else []
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if any(b < 1 for b in batches):
        ap.error(f"--batches must be positive, got {args.batches!r}")
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
    xla_gf = xla_gflop(step.jitted, state["plain"], teacher, (x, y))
    mm_rate = 2 * n_mm**3 / med["matmul"]
    step_rate = step_flops / med["distill_step"]

    results = {
        "benchmark": "distillation",
        "sizes": {"teacher": t_sizes, "student": s_sizes, "batch": batch, "matmul": n_mm, "quick": args.quick},
        "rounds": rounds,
        "inner": inner,
        "ms": {name: 1e3 * v for name, v in med.items()},
        "step_gflop": step_flops / 1e9,
        "xla_cost_gflop": xla_gf,
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
    if batches:
        print(f"batch sweep (teacher {t_sizes}, student {s_sizes}; rounds {rounds} x {inner} calls, median):")
        results["batches"] = batch_sweep(t_sizes, s_sizes, batches, rounds, inner, mm_rate)
        results["ratios"] |= {f"compress_b{r['batch']}": r["compress_ratio"] for r in results["batches"]}
    return finish(results, args.json)


if __name__ == "__main__":
    main()
