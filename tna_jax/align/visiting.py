"""Weight matching's visiting orders: which permutations a sweep solves, in which order and batches.

A sweep is cut into batches of mutually independent permutations (no array carries two of them),
which are solved together with the result of visiting them one at a time.
"""

from __future__ import annotations

from collections.abc import Collection

import jax
import numpy as np

from tna_jax.align import costs as costs_lib

__all__ = ["order_generator", "sweep_batches", "independent_runs", "leaves_out_neighbours"]


def order_generator(key: jax.Array) -> np.random.Generator:
    """The NumPy generator that draws weight matching's visiting orders from `key`.

    Each random sweep visits the top-level permutations (in the spec's order) in the order of
    the generator's next ``.permutation(len(names))``: one host draw per sweep, no device call
    (a forward first sweep draws nothing, so the ``k``-th draw orders the ``k``-th random sweep).

    Args:
      key: the PRNG key given to `weight_matching`.

    Returns:
      A fresh ``numpy.random.Generator`` seeded with the key's data (the same key, the same orders).

    Examples:
      >>> import jax
      >>> a, b = order_generator(jax.random.key(0)), order_generator(jax.random.key(0))
      >>> a.permutation(3).tolist() == b.permutation(3).tolist()
      True
    """
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())


def sweep_batches(order: str, names: list[str], plans: dict[str, costs_lib.GroupPlan],
                  classes: list[tuple[str, ...]], orders: np.random.Generator) -> list[list[str]]:
    """One sweep's visiting order, cut into batches of mutually independent permutations.

    Args:
      order: ``"random"`` (a fresh random order from `orders`) or ``"classes"`` (the fixed classes).
      names: the top-level permutations, in the spec's order.
      plans: their cost-matrix plans (`costs.plan_groups`), whose ``deps`` say who depends on whom.
      classes: the colour classes of the dependency graph (``order="classes"``).
      orders: the generator of `order_generator`; one permutation is drawn per random sweep.

    Returns:
      the batches, in visiting order.
    """
    if order == "classes":
        return [list(c) for c in classes]
    return independent_runs([names[int(i)] for i in orders.permutation(len(names))], plans)


def independent_runs(seq: list[str], plans: dict[str, costs_lib.GroupPlan]) -> list[list[str]]:
    """`seq` cut into batches of consecutive mutually independent permutations.

    Args:
      seq: permutation names in visiting order.
      plans: their cost-matrix plans (`costs.plan_groups`).

    Returns:
      the batches, in order; visiting a batch at once gives the result of visiting its members
      one at a time.
    """
    out: list[list[str]] = []
    for g in seq:
        if out and not any(g in plans[h].deps or h in plans[g].deps for h in out[-1]):
            out[-1].append(g)
        else:
            out.append([g])
    return out


def leaves_out_neighbours(plan: costs_lib.GroupPlan, solved: Collection[str]) -> bool:
    """Whether a forward first sweep solves `plan`'s permutation without some neighbour's term.

    Args:
      plan: the permutation's cost-matrix plan (`costs.plan_groups`).
      solved: the permutations solved so far.

    Returns:
      True when its matrix is a sum of per-neighbour terms (no nested permutations or terms of
      several) and some neighbour is not in `solved`: that neighbour's term is left out.
    """
    return not plan.full and any(h not in solved for h in plan.singles)
