"""The allocator: one option per kernel, least total damage, total bytes at most the budget.

A multiple-choice knapsack (Sinha & Zoltners, 1979), solved by dynamic programming over a byte grid.
Each kernel's costs are taken above its cheapest option (the cheapest plan is always paid, only the
excess is allocated), and rounded *up* to the grid, so every plan the program accepts fits the budget in
exact bytes. When the excess budget is at most ``max_cells`` bytes and all costs are integers, the grid
is one byte and the result is exactly optimal. Otherwise the grid step is ``excess / cells`` with
``cells >= 200 * kernels``: the result is optimal among the plans that use at most
``budget - kernels * step`` bytes, i.e. at least as good as the exact optimum at a budget 0.5% smaller. A
final pass of single-kernel changes (exact bytes) only improves it.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np

__all__ = ["allocate", "check_budget", "plan_bytes"]


def check_budget(budget: Any, name: str = "budget") -> float:
    """A finite, non-negative real number of bytes (``TypeError``/``ValueError`` naming the value)."""
    if isinstance(budget, bool) or not isinstance(budget, Real | np.integer | np.floating):
        raise TypeError(f"{name} must be a real number, got {budget!r}")
    b = float(budget)
    if math.isnan(b):
        raise ValueError(f"{name} is NaN")
    if math.isinf(b):
        raise ValueError(f"{name} must be finite, got {budget!r}")
    if b < 0:
        raise ValueError(f"{name} must be >= 0, got {budget!r}")
    return b


def _rows(costs: Any, damages: Any) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per kernel: (option indices, costs, damages) of the usable options (cost >= 0, damage < inf)."""
    if len(costs) != len(damages):
        raise ValueError(f"costs has {len(costs)} kernels but damages has {len(damages)}")
    if len(costs) == 0:
        raise ValueError("no kernels to allocate (costs is empty)")
    rows = []
    for k, (c, d) in enumerate(zip(costs, damages, strict=True)):
        c = np.asarray(c, np.float64).reshape(-1)
        d = np.asarray(d, np.float64).reshape(-1)
        if c.shape != d.shape:
            raise ValueError(f"kernel {k}: {c.size} costs but {d.size} damages")
        if np.isnan(c).any() or np.isnan(d).any():
            raise ValueError(f"kernel {k}: NaN in costs {c.tolist()} or damages {d.tolist()}")
        if (d < 0).any():
            raise ValueError(f"kernel {k}: negative damage in {d.tolist()}")
        ok = (c >= 0) & np.isfinite(c) & np.isfinite(d)
        if not ok.any():
            raise ValueError(f"kernel {k}: no usable option (costs {c.tolist()}, damages {d.tolist()})")
        idx = np.flatnonzero(ok)
        order = np.lexsort((d[idx], c[idx]))  # cheapest first, then least damage: ties go to the cheaper
        idx = idx[order]
        rows.append((idx, c[idx], d[idx]))
    return rows


def plan_bytes(costs: Any, choice: Any) -> float:
    return float(sum(np.asarray(c, np.float64).reshape(-1)[j] for c, j in zip(costs, choice, strict=True)))


def allocate(costs: Any, damages: Any, budget: Any, *, max_cells: int = 1 << 18) -> np.ndarray:
    """One option per kernel minimising the total damage with total cost at most ``budget``.

    Args:
        costs: per kernel, the cost (bytes) of each option: a ``(kernels, options)`` array or a list of
            sequences (ragged allowed). A negative cost, or an infinite damage, marks an option that does not
            apply to that kernel.
        damages: the same shape: each option's damage (non-negative; e.g. ``tr(dW^T H dW)``).
        budget: the most total cost allowed.
        max_cells: the largest byte grid; with integer costs and an excess budget (over the cheapest plan)
            of at most this many bytes, the grid is one byte and the result exact.

    Returns:
        ``int64`` array: the chosen option (column index) of each kernel. Its total cost is at most
        ``budget``; its damage is optimal (exact grid) or at most the optimum at ``0.995 * budget`` (coarser
        grid; see the module docstring).

    Raises:
        ValueError: a NaN, negative or infinite budget, a budget smaller than the cheapest plan (naming both),
            NaN costs or damages, negative damages, mismatched shapes, a kernel without a usable option.
        TypeError: a budget that is not a real number.

    References:
        Sinha & Zoltners, "The Multiple-Choice Knapsack Problem", Operations Research 27(3), 1979.
    """
    budget = check_budget(budget)
    rows = _rows(costs, damages)
    base = sum(float(c[0]) for _, c, _ in rows)
    if base > budget:
        raise ValueError(f"budget {budget:,.0f} bytes is smaller than the cheapest plan ({base:,.0f} bytes): raise the budget")
    excess = [c - c[0] for _, c, _ in rows]
    spare = budget - base
    integral = all(np.all(c == np.round(c)) for _, c, _ in rows)
    if integral and spare <= max_cells:
        step, cells = 1.0, int(math.floor(spare + 1e-9))
    else:
        cells = int(min(max_cells, max(20000, 200 * len(rows))))
        step = spare / cells if spare > 0 else 1.0
    # Costs in grid cells, rounded up (so every accepted plan fits); options beyond the capacity dropped.
    w = [np.ceil(e / step - 1e-9).astype(np.int64) if step != 1.0 else e.astype(np.int64) for e in excess]
    dp = np.zeros(cells + 1, np.float64)
    choice = np.zeros((len(rows), cells + 1), np.int16)
    for k, (_, _, d) in enumerate(rows):
        new = np.full(cells + 1, np.inf)
        pick = np.zeros(cells + 1, np.int16)
        for o in range(len(d)):
            wo = int(w[k][o])
            if wo > cells:
                continue
            cand = dp[: cells + 1 - wo] + d[o]
            better = cand < new[wo:]
            new[wo:] = np.where(better, cand, new[wo:])
            pick[wo:] = np.where(better, o, pick[wo:])
        dp = new
        choice[k] = pick
    sel = np.zeros(len(rows), np.int64)
    c = cells
    for k in range(len(rows) - 1, -1, -1):
        o = int(choice[k, c])
        sel[k] = o
        c -= int(w[k][o])
    # Single-kernel improvements in exact costs (the grid rounded costs up; reclaim what it left).
    total = base + sum(float(excess[k][sel[k]]) for k in range(len(rows)))
    for _ in range(2 * len(rows)):
        best = None
        for k, (_, cst, d) in enumerate(rows):
            for o in range(len(d)):
                t = total - cst[sel[k]] + cst[o]
                gain = d[sel[k]] - d[o]
                if t <= budget and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, k, o, t)
        if best is None:
            break
        _, k, o, total = best
        sel[k] = o
    return np.asarray([rows[k][0][sel[k]] for k in range(len(rows))], np.int64)
