"""Distillation vs labels alone for the demo's student on MNIST-1D, over several seeds.

Trains the demo's teacher once, then for each seed the student on labels alone (the baseline) and the
same student, from the same initialisation and for the same number of optimizer steps, distilled with
``make_distill_step`` on the transfer set (the 4000 labelled inputs plus 16000 extra MNIST-1D inputs the
teacher labels). Target: the distilled student's mean test accuracy >= the baseline's.

Run ``python -m benchmarks.demo [--quick] [--seeds 3] [--json PATH]``; the last line printed is JSON.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from benchmarks._common import finish, parser
from compressjax import DistillState
from compressjax.demo import models
from compressjax.demo.data import load_mnist1d, load_transfer_inputs
from compressjax.demo.pipeline import DemoConfig, accuracy, distill, make_optimizer, train_supervised, transfer_set


def main(argv=None) -> dict:
    ap = parser(__doc__)  # --quick: the demo's --quick sizes, 2 seeds
    ap.add_argument("--seeds", type=int, default=None, help="number of student seeds (default 3; 2 with --quick)")
    args = ap.parse_args(argv)
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    n_seeds = args.seeds or (2 if args.quick else 3)

    t0 = time.perf_counter()
    data = load_mnist1d()
    extra = load_transfer_inputs(cfg.transfer_size, cfg.transfer_seed)
    teacher, student = models.make_model(cfg.teacher), models.make_model(cfg.student)
    k_init, k_train = jax.random.split(jax.random.key(cfg.seed))
    t_params = train_supervised(teacher, models.init_params(cfg.teacher, k_init), data.x_train, data.y_train, cfg,
                                k_train, "teacher")
    teacher_acc = accuracy(teacher, t_params, data.x_test, data.y_test)
    print(f"teacher {teacher_acc:.4f} ({models.count_params(t_params):,} params)", flush=True)
    x_transfer, y_transfer = transfer_set(teacher, t_params, data.x_train, data.y_train, extra)

    rows = []
    for seed in range(n_seeds):
        k_s, k_base, k_dist = jax.random.split(jax.random.key(1000 + seed), 3)
        s_init = models.init_params(cfg.student, k_s)
        base = train_supervised(student, s_init, data.x_train, data.y_train, cfg, k_base, "student")
        tx = make_optimizer(cfg.learning_rate, cfg.steps)
        state = distill(student, teacher, t_params, DistillState.create(s_init, tx), tx, x_transfer, y_transfer, cfg,
                        k_dist, "distilled")
        row = {"seed": seed, "student": accuracy(student, base, data.x_test, data.y_test),
               "distilled": accuracy(student, state.params, data.x_test, data.y_test)}
        rows.append(row)
        print(f"seed {seed}: student {row['student']:.4f}  distilled {row['distilled']:.4f}", flush=True)

    s_mean = float(np.mean([r["student"] for r in rows]))
    d_mean = float(np.mean([r["distilled"] for r in rows]))
    result = {
        "benchmark": "demo",
        "quick": bool(args.quick),
        "steps": cfg.steps,
        "temperature": cfg.temperature,
        "alpha": cfg.alpha,
        "transfer_size": cfg.transfer_size,
        "teacher": teacher_acc,
        "seeds": rows,
        "student_mean": s_mean,
        "distilled_mean": d_mean,
        "ratios": {"distilled_over_student": d_mean / s_mean, "distilled_minus_student_points": 100 * (d_mean - s_mean)},
        "seconds": time.perf_counter() - t0,
    }
    print(f"mean: student {s_mean:.4f}  distilled {d_mean:.4f}  "
          f"(distilled - student = {100 * (d_mean - s_mean):+.2f} points; target >= 0)")
    return finish(result, args.json)


if __name__ == "__main__":
    main()
