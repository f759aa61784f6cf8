"""The ``compressjax`` command. ``compressjax demo`` runs the whole library on MNIST-1D in one go.

``compressjax demo`` trains a CNN teacher, a 15x smaller student on labels (the baseline), the same
student distilled from the teacher, then prunes it gradually and trains it through 4-bit fake
quantization while distilling, saves it with :func:`compressjax.save`, loads it back and evaluates it. It
prints a table (accuracy, parameters, non-zeros, bits per weight, bytes on disk, ratio against the
teacher's float32 bytes) and writes ``compressjax-demo.json`` and ``compressjax-demo.png`` into ``--out``.
Needs the ``demo`` extra: ``pip install "compressjax[demo]"``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _bits(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"must be an integer in 1..8, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``compressjax`` command."""
    parser = argparse.ArgumentParser(
        prog="compressjax", description="compressjax: pruning, quantization, distillation and compact export for JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="teacher -> student -> distill -> prune + 4-bit QAT -> save/load, on MNIST-1D",
        description="Runs the full compression pipeline on MNIST-1D (generated locally, cached under "
        "$XDG_CACHE_HOME/compressjax) and writes compressjax-demo.json and compressjax-demo.png.",
    )
    demo.add_argument("--quick", action="store_true", help="tiny models and 2 epochs: a smoke run in well under a minute")
    demo.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed (default 0)")
    demo.add_argument("--sparsity", type=_fraction, default=None, help="final sparsity of the compressed student (default 0.8)")
    demo.add_argument("--bits", type=_bits, default=None, help="weight bits of the compressed student (default 4)")
    demo.add_argument("--epochs", type=_positive, default=None,
                      help="epochs of the 4000 labelled examples per training stage (default 64; 2 with --quick)")
    demo.add_argument("--codebook-bits", type=_bits, default=None,
                      help="replace uniform QAT by weight sharing: k-means codebooks of this many bits (default: off)")
    demo.add_argument("--out", default=".", help="folder for the JSON, PNG and model files (default: current folder)")
    return parser


def _demo(args: argparse.Namespace) -> int:
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        print('compressjax demo needs the demo extra: pip install "compressjax[demo]"', file=sys.stderr)
        return 2
    from compressjax.demo import report
    from compressjax.demo.pipeline import DemoConfig, run_demo

    overrides = {"seed": args.seed}
    for name in ("sparsity", "bits", "epochs", "codebook_bits"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)
    os.makedirs(args.out, exist_ok=True)

    console = Console()
    console.print(f"[bold]compressjax demo[/bold]: {cfg.steps} steps per stage, sparsity {cfg.sparsity:g}, "
                  f"{f'{cfg.codebook_bits}-bit codebooks' if cfg.codebook_bits else f'{cfg.bits}-bit weights'}, seed {cfg.seed}{' (quick)' if args.quick else ''}")
    columns = (TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as bars:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int, metrics: dict[str, float]) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total, info="")
            info = "  ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()))
            bars.update(tasks[stage], completed=done, info=info)

        result = run_demo(cfg, args.out, progress=progress)
    report.print_table(result, console)
    json_path = report.write_json(result, args.out)
    png_path = report.write_plot(result, args.out)
    console.print(f"wrote {json_path}, {png_path} and {result.model_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compressjax`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
