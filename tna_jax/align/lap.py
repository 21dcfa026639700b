"""Exact linear assignment solvers, pluggable.

Every matching method here ends in linear assignment problems (LAPs): given a cost matrix
$C \\in \\mathbb{R}^{n \\times n}$, find the permutation $\\sigma$ maximising
$\\sum_i C_{i,\\sigma(i)}$. The solvers are exact (shortest augmenting paths, Jonker-Volgenant) and
run on the host in float64:

* ``"scipy"``: `scipy.optimize.linear_sum_assignment` (always available);
* ``"lapx"``: `lap.lapjvr` from the [lapx](https://pypi.org/project/lapx/) package (a Rust
  Jonker-Volgenant core, float64 when given float64; ``pip install -e ".[fast]"``). lapx
  installs under the module name ``lap``, the name of the older ``lap`` package, so it is
  recognised by its ``lapjvr`` function;
* ``"auto"`` (the default): ``"lapx"`` when it is installed, else ``"scipy"``;
* any callable ``cost -> cols`` that maximises (for experiments).

Both named solvers release the GIL, so independent problems can be solved in threads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["SOLVERS", "get_solver", "solve_assignment", "solve_nested"]

SOLVERS = ("auto", "scipy", "lapx")

Solver = Callable[[np.ndarray], np.ndarray]


def _scipy(cost: np.ndarray) -> np.ndarray:
    return linear_sum_assignment(cost, maximize=True)[1]


@functools.lru_cache(maxsize=1)
def _lapx_module() -> Any:
    try:
        import lap  # lapx installs as "lap"
    except ImportError:
        return None
    return lap if hasattr(lap, "lapjvr") else None


def _lapx(cost: np.ndarray) -> np.ndarray:
    lap = _lapx_module()
    _, cols = lap.lapjvr(np.negative(cost), return_cost=False, precision="float64")
    return np.asarray(cols)


def get_solver(solver: str | Solver = "auto") -> Solver:
    """The assignment function ``cost (n, n) float64 -> cols (n,)`` maximising ``Σ_i cost[i, cols[i]]``.

    Args:
      solver: ``"auto"``, ``"scipy"``, ``"lapx"`` (see the module docstring) or a callable.

    Returns:
      the solver as a function of the cost matrix.

    Raises:
      ValueError: an unknown name, or ``"lapx"`` when lapx is not installed.

    Examples:
      >>> import numpy as np
      >>> get_solver("scipy")(np.array([[1.0, 5.0], [4.0, 1.0]])).tolist()
      [1, 0]
    """
    if callable(solver):
        return solver
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS} or a callable cost -> cols; got {solver!r}.")
    if solver == "scipy":
        return _scipy
    if _lapx_module() is None:
        if solver == "lapx":
            raise ValueError("solver='lapx' needs the lapx package (pip install -e \".[fast]\"); "
                             "the importable 'lap' module, if any, has no lapjvr.")
        return _scipy
    return _lapx


def solve_assignment(cost: np.ndarray, solver: str | Solver = "auto") -> tuple[np.ndarray, float]:
    """``(cols, value)`` maximising ``Σ_i cost[i, cols[i]]`` exactly.

    Args:
      cost: a square cost matrix (converted to float64).
      solver: see `get_solver`.

    Returns:
      the column of every row (int32) and the optimal value (float64 sum).

    Examples:
      >>> import numpy as np
      >>> cols, value = solve_assignment(np.array([[1.0, 5.0], [4.0, 1.0]]))
      >>> cols.tolist(), value
      ([1, 0], 9.0)
    """
    cost = np.asarray(cost, np.float64)
    cols = np.asarray(get_solver(solver)(cost)).astype(np.int32)
    return cols, float(cost[np.arange(cost.shape[0]), cols].sum())


def solve_nested(c0: np.ndarray, children: Mapping[str, np.ndarray], solver: str | Solver = "auto"
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """The exact joint assignment of a parent permutation and its nested children.

    For every pair of parent units $(y, y')$ the best assignment of their children is a small LAP;
    the parent is then assigned with those optimal values added to its own costs, which is exact
    because the children of different parent units are independent.

    Args:
      c0: ``(g, g)`` costs of the parent's units alone.
      children: ``{child: (g, d, g, d)}`` costs ``C[y, x, y', x']`` of unit ``x`` of parent unit
        ``y`` of A against unit ``x'`` of parent unit ``y'`` of B.
      solver: see `get_solver`.

    Returns:
      ``(parent perm (g,), {child: (g, d)}, value)``.

    Examples:
      >>> import numpy as np
      >>> c = np.zeros((2, 2, 2, 2)); c[0, 0, 1, 1] = c[0, 1, 1, 0] = c[1, 0, 0, 0] = c[1, 1, 0, 1] = 1.0
      >>> parent, kids, value = solve_nested(np.zeros((2, 2)), {"head_dim": c}, "scipy")
      >>> parent.tolist(), kids["head_dim"].tolist(), value
      ([1, 0], [[1, 0], [0, 1]], 4.0)
    """
    g = c0.shape[0]
    total = np.asarray(c0, np.float64).copy()
    best: dict[str, np.ndarray] = {}
    for name, c in children.items():
        d = c.shape[1]
        best[name] = np.zeros((g, g, d), np.int32)
        for y in range(g):
            for y2 in range(g):
                cols, value = solve_assignment(c[y, :, y2, :], solver)
                best[name][y, y2] = cols
                total[y, y2] += value
    parent, value = solve_assignment(total, solver)
    return parent, {n: b[np.arange(g), parent] for n, b in best.items()}, value


def nested_value(c0: np.ndarray, children: Mapping[str, np.ndarray], parent: np.ndarray,
                 kids: Mapping[str, np.ndarray]) -> float:
    """The value of a given (parent, children) assignment under the costs of `solve_nested`."""
    g = c0.shape[0]
    value = float(np.asarray(c0, np.float64)[np.arange(g), parent].sum())
    for name, c in children.items():
        sigma = np.asarray(kids[name])
        d = c.shape[1]
        yy = np.repeat(np.arange(g), d)
        xx = np.tile(np.arange(d), g)
        value += float(np.asarray(c, np.float64)[yy, xx, np.asarray(parent)[yy], sigma.reshape(-1)].sum())
    return value
