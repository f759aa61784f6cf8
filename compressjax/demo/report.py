"""The demo's outputs: a table on the terminal (``rich``), a JSON file and a PNG plot (``matplotlib``).

Both libraries are imported inside the functions so that ``import compressjax`` never needs them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from compressjax.demo.pipeline import DemoResult, Stage

__all__ = ["COLUMNS", "table_rows", "print_table", "write_json", "write_plot", "JSON_NAME", "PNG_NAME"]

JSON_NAME = "compressjax-demo.json"
PNG_NAME = "compressjax-demo.png"

#: Column headers of the table, in order.
COLUMNS = ("stage", "accuracy", "params", "nonzero", "bits/weight", "bytes", "ratio", "seconds")


def table_rows(stages: Sequence[Stage]) -> list[tuple[str, ...]]:
    """The table's cells as strings, one tuple per stage, aligned with :data:`COLUMNS`."""
    return [
        (s.name, f"{100 * s.accuracy:.1f}%", f"{s.params:,}", f"{s.nonzero:,}", f"{s.bits_per_weight:.2f}",
         f"{s.bytes:,}", f"{s.ratio_vs_teacher:.1f}x", f"{s.seconds:.1f}")
        for s in stages
    ]


def print_table(result: DemoResult, console: Any = None) -> None:
    """Prints the stages as a ``rich`` table (to ``console``, default a new stdout console)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"compressjax demo on MNIST-1D ({result.seconds:.0f} s)",
                  caption="accuracy on the 1000 test examples; bytes on disk; ratio = teacher's float32 bytes / bytes")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in table_rows(result.stages):
        table.add_row(*row)
    console.print(table)


def write_json(result: DemoResult, out_dir: str | os.PathLike) -> str:
    """Writes ``{"stages": [...], "seconds": total}`` to ``out_dir/compressjax-demo.json``; returns the path.

    Raises:
        ValueError: if a number is not finite (the file must hold real measurements).
    """
    payload = result.to_dict()
    for stage in payload["stages"]:
        for key, value in stage.items():
            if key != "name" and not math.isfinite(value):
                raise ValueError(f"stage {stage['name']!r}: {key} is {value!r}, not a finite number")
    path = os.path.join(os.fspath(out_dir), JSON_NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, allow_nan=False)
        f.write("\n")
    return path


def write_plot(result: DemoResult, out_dir: str | os.PathLike) -> str:
    """Plots test accuracy against bytes on disk (log x), one labelled point per stage; returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never opens a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        xs = [s.bytes for s in result.stages]
        ys = [100 * s.accuracy for s in result.stages]
        ax.plot(xs, ys, "o", color="tab:blue")
        for s, x, y in zip(result.stages, xs, ys, strict=True):
            label = f"{s.name}\n{s.ratio_vs_teacher:.0f}x smaller, {s.seconds:.0f} s" if s.name != "teacher" else s.name
            ax.annotate(label, (x, y),
                        textcoords="offset points", xytext=(6, -4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("bytes on disk (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("compressjax demo: accuracy vs size on MNIST-1D")
        lo, hi = min(xs), max(xs)
        ax.set_xlim(lo / 2, hi * 4)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(os.fspath(out_dir), PNG_NAME)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
