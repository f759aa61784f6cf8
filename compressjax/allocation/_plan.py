"""The plan: which option each kernel got, its bytes and estimated damage; a rich table and a plot."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from compressjax.allocation._menu import Option

__all__ = ["Plan", "PlanEntry", "pareto_front"]


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One kernel of a :class:`Plan`.

    Attributes:
        path: the kernel's path. shape: its shape.
        option: the chosen option's name.
        bytes: the kernel's bytes in the file (``size_report``'s ``stored_bytes`` of this leaf).
        damage: the estimated damage used by the allocator (``importance * layer_error``).
        layer_error: ``tr(dW^T H dW)`` of the chosen option.
        importance: the kernel's weight (1.0 without importance weighting).
        candidates: ``(option, bytes, damage)`` of every option that applies to the kernel.
    """

    path: str
    shape: tuple[int, ...]
    option: str
    bytes: int
    damage: float
    layer_error: float
    importance: float
    candidates: tuple[tuple[str, int, float], ...]

    @property
    def num_weights(self) -> int:
        return math.prod(self.shape)


def pareto_front(points: list[tuple[int, float]]) -> list[int]:
    """Indices of the points not dominated in (bytes, damage), by increasing bytes."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


@dataclasses.dataclass(frozen=True)
class Plan:
    """The allocation: per kernel the chosen option, its exact bytes and estimated damage.

    Attributes:
        entries: one :class:`PlanEntry` per kernel, in model order.
        budget_bytes: the budget over the selected kernels' bytes.
        options: the menu.
        sequential: whether the kernels were compressed stage by stage (see :func:`auto_compress`).
        importance: whether damages are importance-weighted.
        masks: keep-masks at the pruned kernels (``None`` elsewhere), a tree like the params, or ``None``.
        compared: whole plans measured at the model's output before the choice, ``(name, bytes, distance)``:
            ``"allocated"`` (the allocator's plan) and ``"uniform <option>"`` for every uniform setting that
            fits the budget; the plan kept is the one with the least distance (empty when nothing was compared).
    """

    entries: tuple[PlanEntry, ...]
    budget_bytes: int
    options: tuple[Option, ...] = ()
    sequential: bool = False
    importance: bool = False
    masks: Any = dataclasses.field(default=None, compare=False, repr=False)
    compared: tuple[tuple[str, int, float], ...] = ()

    @property
    def choices(self) -> dict[str, str]:
        """``{path: option name}``."""
        return {e.path: e.option for e in self.entries}

    @property
    def kept(self) -> str:
        """The name of the compared plan that was applied (the least distance, the allocated plan on a tie);
        ``"allocated"`` when nothing was compared."""
        return min(self.compared, key=lambda c: c[2])[0] if self.compared else "allocated"

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    @property
    def total_damage(self) -> float:
        return float(sum(e.damage for e in self.entries))

    @property
    def num_weights(self) -> int:
        return sum(e.num_weights for e in self.entries)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / self.num_weights

    def counts(self) -> dict[str, int]:
        """How many kernels got each option."""
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.option] = out.get(e.option, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "total_bytes": self.total_bytes, "num_weights": self.num_weights,
                "bits_per_weight": self.bits_per_weight, "total_damage": self.total_damage,
                "sequential": self.sequential, "importance": self.importance,
                "compared": [{"plan": n, "bytes": b, "distance": d} for n, b, d in self.compared],
                "kernels": [{"path": e.path, "shape": list(e.shape), "option": e.option, "bytes": e.bytes,
                             "damage": e.damage, "layer_error": e.layer_error, "importance": e.importance}
                            for e in self.entries]}

    def table(self) -> Any:
        """A ``rich.table.Table``: kernel, shape, option, bytes, bits per weight, damage; totals in the footer."""
        from rich.table import Table  # optional dependency (the ``demo`` extra)

        t = Table(title=f"allocation: {self.total_bytes:,} of {self.budget_bytes:,} bytes "
                        f"({self.bits_per_weight:.3f} bits/weight)", show_footer=True)
        t.add_column("kernel", footer="total")
        t.add_column("shape", footer=f"{self.num_weights:,} w")
        t.add_column("option", footer=", ".join(f"{k} x{v}" for k, v in sorted(self.counts().items())))
        t.add_column("bytes", justify="right", footer=f"{self.total_bytes:,}")
        t.add_column("bits/w", justify="right", footer=f"{self.bits_per_weight:.2f}")
        t.add_column("damage", justify="right", footer=f"{self.total_damage:.4g}")
        for e in self.entries:
            t.add_row(e.path, "x".join(map(str, e.shape)), e.option, f"{e.bytes:,}", f"{8 * e.bytes / e.num_weights:.2f}",
                      f"{e.damage:.4g}")
        return t

    def __str__(self) -> str:
        head = f"{'kernel':40s} {'option':26s} {'bytes':>11s} {'bits/w':>7s} {'damage':>10s}"
        rows = [f"{e.path[-40:]:40s} {e.option:26s} {e.bytes:>11,} {8 * e.bytes / e.num_weights:>7.2f} {e.damage:>10.4g}"
                for e in self.entries]
        tail = (f"{'total':40s} {'':26s} {self.total_bytes:>11,} {self.bits_per_weight:>7.2f} {self.total_damage:>10.4g}"
                f"   (budget {self.budget_bytes:,} bytes)")
        compared = [f"compared at the output: {n} {b:,} bytes, distance {d:.4g}" for n, b, d in self.compared]
        return "\n".join([head, *rows, tail, *compared])

    def plot(self, path: Any, *, max_kernels: int | None = None) -> Any:
        """Writes a figure: for each kernel, estimated damage against bytes of every option, the Pareto front
        as a line and the chosen option as a red star. Returns ``path``."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        entries = self.entries if max_kernels is None else self.entries[:max_kernels]
        n = len(entries)
        cols = max(1, math.ceil(math.sqrt(n)))
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False)
        positive = [d for e in entries for _, _, d in e.candidates if d > 0]
        floor = min(positive) / 10 if positive else 1e-12
        for ax, e in zip(axes.flat, entries, strict=False):
            pts = [(b, d) for _, b, d in e.candidates]
            xs = np.array([b for b, _ in pts], float) / 1e3
            ys = np.maximum(np.array([d for _, d in pts], float), floor)
            ax.scatter(xs, ys, s=10, c="0.6", label="options")
            front = pareto_front(pts)
            ax.plot(xs[front], ys[front], "-", c="tab:blue", lw=1, label="Pareto front")
            ax.plot(e.bytes / 1e3, max(e.damage, floor), "*", c="tab:red", ms=12, label=f"chosen: {e.option}")
            ax.set_yscale("log")
            ax.set_title(f"{e.path[-34:]}\n{e.option}", fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.supxlabel("kB in the file")
        fig.supylabel("estimated damage (log)")
        fig.suptitle(f"{self.total_bytes:,} of {self.budget_bytes:,} bytes, {self.bits_per_weight:.2f} bits/weight", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
