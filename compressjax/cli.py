"""The ``compressjax`` command. ``compressjax demo`` runs the whole library on MNIST-1D in one go.

``compressjax demo`` trains a CNN teacher, a 15x smaller student on labels (the baseline), the same
student distilled from the teacher, then prunes it gradually and trains it through 4-bit fake
quantization while distilling, saves it with :func:`compressjax.save`, loads it back and evaluates it;
as the alternative without training, it also compresses the distilled student one-shot with GPTQ from
512 calibration inputs. It prints a table (one row per stage: teacher, student, distilled, compressed,
one-shot; accuracy, parameters, non-zeros, bits per weight, bytes on disk, ratio against the teacher's
float32 bytes) and writes ``compressjax-demo.json`` and ``compressjax-demo.png`` into ``--out``.
Needs the ``demo`` extra: ``pip install "compressjax[demo]"``.

``compressjax inspect FILE`` shows what a saved model file holds, without writing code: a table of each
leaf's path, shape, dtype, encoding, bits per weight, sparsity and bytes, with the totals
(:func:`compressjax.size_report`); ``--json`` prints the same as one JSON object. A file that is not a valid
model file prints a one-line error and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from compressjax.demo import report
from compressjax.demo.pipeline import DemoConfig, run_demo
from compressjax.export import FormatError, size_report

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


BITS = range(1, 9)
MAX_SEED = 2**32 - 1  # compressjax.demo.pipeline.MAX_SEED (not imported: the demo extra may be missing)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {text!r}")
    return value


def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in BITS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, BITS))} (an integer), got {text!r}")
    return value


def _check_out_dir(path: str) -> str | None:
    """Why ``path`` cannot take the demo's output files, or ``None`` when it can (created if missing).

    Checked before any training, by actually creating (and removing) a file there: permission bits alone
    do not tell (root ignores them; a read-only mount does not show in them).
    """
    import tempfile

    if os.path.exists(path) and not os.path.isdir(path):
        return f"--out {path!r} is a file, not a folder"
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".compressjax-write-test-"):
            pass
    except OSError as e:
        return f"--out {path!r} is not a writable folder ({e.strerror or e})"
    return None


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
    demo.add_argument("--seed", type=_seed, default=0,
                      help=f"initialisation and batch-order seed, an integer in [0, {MAX_SEED}] (default 0)")
    demo.add_argument("--sparsity", type=_fraction, default=None, help="final sparsity of the compressed student (default 0.8)")
    demo.add_argument("--bits", type=_bits, default=None, metavar="{1..8}",
                      help="weight bits of the compressed student, an integer in 1..8 (default 4)")
    demo.add_argument("--epochs", type=_positive, default=None,
                      help="epochs of the 4000 labelled examples per training stage (default 64; 2 with --quick)")
    demo.add_argument("--codebook-bits", type=_bits, default=None,
                      help="replace uniform QAT by weight sharing: k-means codebooks of this many bits (default: off)")
    demo.add_argument("--budget", type=float, default=None, metavar="BITS",
                      help="add an 'allocated' stage: auto_compress of the distilled student to BITS bits per kernel weight")
    demo.add_argument("--out", default=".", help="folder for the JSON, PNG and model files (default: current folder)")

    inspect = sub.add_parser(
        "inspect", help="what a saved .cjx file holds: each leaf's shape, dtype, encoding, bits per weight, bytes",
        description="Prints a table of the leaves of a file written by compressjax.save (path, shape, dtype, "
        "encoding, bits per weight, sparsity, bytes) and the totals. Validates the header as load does; streams the payload through the checksum (memory stays bounded).",
    )
    inspect.add_argument("file", help="a model file written by compressjax.save")
    inspect.add_argument("--json", action="store_true", help="print the report as one JSON object instead of a table")
    return parser


def _demo(args: argparse.Namespace) -> int:
    problem = _check_out_dir(args.out)
    if problem is not None:  # before any training: a bad folder must not cost a whole run
        print(f"compressjax demo: error: {problem}", file=sys.stderr)
        return 2
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        print('compressjax demo needs the demo extra: pip install "compressjax[demo]"', file=sys.stderr)
        return 2

    overrides = {"seed": args.seed}
    for name in ("sparsity", "bits", "epochs", "codebook_bits"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.budget is not None:
        overrides["budget_bits"] = args.budget
    cfg = DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)

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


# ----------------------------------------------------------------------------------------------- inspect


def _sparsity(leaf) -> float:
    """The fraction of the leaf's elements stored as implicit zeros by the sparse encoding (the header does
    not count the zeros of a leaf stored dense, which shows 0)."""
    return 1.0 - leaf.nnz / leaf.num_elements if leaf.num_elements else 0.0


def inspect_dict(report, file: str) -> dict:
    """The ``--json`` output of ``compressjax inspect``: :meth:`SizeReport.to_dict` plus the file name, each
    leaf's sparsity and bytes, and the total sparsity (fractions of the elements stored as implicit zeros)."""
    out = {"file": file, **report.to_dict()}
    out["sparsity"] = 1.0 - sum(leaf.nnz for leaf in report.leaves) / report.num_weights if report.num_weights else 0.0
    for row, leaf in zip(out["leaves"], report.leaves, strict=True):
        row["sparsity"] = _sparsity(leaf)
        row["bytes"] = leaf.stored_bytes  # the table's column name (same as stored_bytes)
    return out


def _inspect_table(report, file: str):
    from rich.table import Table

    zeros = inspect_dict(report, file)["sparsity"]
    table = Table(title=file, title_justify="left")
    table.add_column("leaf", overflow="fold")
    for name in ("shape", "dtype", "encoding"):
        table.add_column(name, no_wrap=True)
    for name in ("bits/w", "sparsity", "bytes"):
        table.add_column(name, justify="right", no_wrap=True)
    for leaf in report.leaves:
        table.add_row(leaf.path or "<root>", "x".join(map(str, leaf.shape)) or "()", leaf.dtype, leaf.encoding,
                      f"{leaf.bits_per_weight:.2f}", f"{_sparsity(leaf):.1%}", f"{leaf.stored_bytes:,}")
    table.add_section()
    table.add_row("(header)", "", "", "", "", "", f"{report.overhead_bytes:,}")
    table.add_row("total", f"{report.num_weights:,} w", "", "", f"{report.bits_per_weight:.2f}", f"{zeros:.1%}",
                  f"{report.total_bytes:,}", style="bold")
    return table


def _inspect(args: argparse.Namespace) -> int:
    import json

    try:
        report = size_report(args.file)
    except (FormatError, OSError, MemoryError) as e:  # size_report validates the header as load does
        reason = e.strerror or str(e) if isinstance(e, OSError) else str(e) or type(e).__name__
        kind = "" if isinstance(e, FormatError) else f"{type(e).__name__}: "
        print(f"compressjax inspect: {args.file}: {kind}{reason}".replace("\n", " "), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(inspect_dict(report, args.file)))
        return 0
    try:
        from rich.console import Console
    except ImportError:  # rich comes with flax; without it, the plain table of SizeReport
        print(report)
        return 0
    console = Console()
    if not console.is_terminal:  # piped or captured: no terminal width to respect, so do not fold the paths
        longest = max((len(leaf.path) for leaf in report.leaves), default=0)
        console = Console(width=max(console.width, 100 + longest))
    console.print(_inspect_table(report, args.file))
    console.print(f"{len(report.leaves)} leaves, {report.num_weights:,} weights in {report.total_bytes:,} bytes: "
                  f"{report.bits_per_weight:.2f} bits per weight, {report.ratio:.1f}x smaller than float32", soft_wrap=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``compressjax`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "inspect":
        return _inspect(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
