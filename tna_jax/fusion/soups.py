"""Model soups: uniform and greedy averages of K fine-tuned models, one compiled program each.

**Model soups** (Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time", ICML 2022). K models fine-tuned from one
pretrained model, stacked on a leading axis θ ∈ R^{K×P}:

* uniform soup  θ_soup = (1/K) Σ_k θ_k;
* greedy soup   sort the candidates by held-out accuracy, start from the best one, and add the
  next candidate to the soup only if the held-out accuracy of the new average is not lower:
  S ← S ∪ {k} iff Acc(mean(θ_{S∪{k}})) ≥ Acc(mean(θ_S)) (their Algorithm 1). The greedy soup is
  never worse on the held-out set than its first ingredient, the best single model.

A soup with ingredient weights w ∈ R^K is ``tree.weighted_mean(stacked, w)``, so every soup,
ingredient (one-hot w) and trial of the greedy loop is "a weight row, averaged, then
evaluated". Candidates are evaluated with ONE ``jax.vmap`` of ``evaluation.make_eval_fn`` over the
candidate axis; the greedy loop itself is sequential by definition (each decision depends on the
previous ones) and runs as a ``lax.scan`` inside the same jitted program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import chunking, lmc
from tna_jax import tree as tree_lib
from tna_jax.evaluation import EvalFn

PyTree = Any


__all__ = ["SoupResult", "stack_candidates", "num_candidates", "evaluate_candidates", "evaluate_soups",
           "uniform_soup", "greedy_soup"]


# ---------------------------------------------------------------------------------------------
# Candidates.
# ---------------------------------------------------------------------------------------------


def stack_candidates(candidates: Sequence[PyTree]) -> PyTree:
    """Stacks K models of the same structure on a new leading axis.

    Args:
      candidates: a list (or tuple) of K models' params or variables, all of one structure.

    Returns:
      One pytree of that structure whose leaves have a new leading axis of size K.

    Raises:
      TypeError: `candidates` is not a sequence of models (e.g. a dict, or one stacked pytree).
      ValueError: no candidates; candidates whose structure or shapes differ (the message names
        the candidate and the first mismatching parameter path).

    Examples:
      >>> import jax.numpy as jnp
      >>> stack_candidates([{"w": jnp.zeros(2)}, {"w": jnp.ones(2)}])["w"].shape
      (2, 2)
    """
    if isinstance(candidates, Mapping) or not isinstance(candidates, Sequence):
        raise TypeError(f"candidates must be a list of models (pytrees); got {type(candidates).__name__}.")
    if len(candidates) == 0:
        raise ValueError("candidates must hold at least one model; got an empty list.")
    for i, c in enumerate(candidates[1:], start=1):
        tree_lib.check_same_structure(candidates[0], c, names=("candidate 0", f"candidate {i}"))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *candidates)


def num_candidates(stacked: PyTree, name: str = "stacked") -> int:
    """K, the size of the leading (candidate) axis; checks that every leaf has it.

    Args:
      stacked: K models stacked on a leading axis (:func:`stack_candidates`).
      name: how to call `stacked` in error messages.

    Returns:
      K.

    Raises:
      ValueError: no arrays, an empty list, a scalar leaf, K = 0, or leaves with different leading sizes.
      TypeError: a list or tuple of models instead of one stacked pytree.

    Examples:
      >>> import jax.numpy as jnp
      >>> num_candidates({"w": jnp.zeros((3, 2))})
      3
    """
    if isinstance(stacked, (list, tuple)):
        if len(stacked) == 0:
            raise ValueError(f"{name} is an empty list; a soup needs at least one candidate model.")
        raise TypeError(f"{name} must be K models stacked on a leading axis; got a {type(stacked).__name__} of "
                        f"{len(stacked)} models: stack them with fusion.stack_candidates(models).")
    named = tree_lib.named_leaves(stacked)
    if not named:
        raise ValueError(f"{name} holds no arrays; it must be K models stacked on a leading axis.")
    sizes = {}
    for path, leaf in named:
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(f"{name} leaf {path!r} is a scalar; every leaf needs the leading candidate axis.")
        sizes.setdefault(shape[0], path)
    if len(sizes) > 1:
        shown = ", ".join(f"{k} at {p!r}" for k, p in sizes.items())
        raise ValueError(f"{name} leaves disagree on the number of candidates: {shown}.")
    k = next(iter(sizes))
    if k == 0:
        raise ValueError(f"{name} holds 0 candidates; a soup needs at least one.")
    return int(k)


def evaluate_candidates(eval_fn: EvalFn, stacked: PyTree, data: tuple[jax.Array, jax.Array],
                        *, chunk: int | None = None) -> dict[str, np.ndarray]:
    """Loss and accuracy of each of K stacked models: one jitted ``vmap`` of `eval_fn`.

    Args:
      eval_fn: ``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for one model
        (``evaluation.make_eval_fn``).
      stacked: K models' variables on a leading axis.
      data: ``(x, y)``.
      chunk: evaluate at most this many models at once (``lax.map`` with ``batch_size``).

    Returns:
      ``{"loss": (K,), "accuracy": (K,)}`` NumPy arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):
      ...     return {"loss": jnp.mean((x * v["w"] - y) ** 2), "accuracy": jnp.mean(x * v["w"] == y)}
      >>> out = evaluate_candidates(eval_fn, {"w": jnp.array([1.0, 2.0])}, (jnp.ones(3), jnp.ones(3)))
      >>> out["accuracy"].tolist(), out["loss"].tolist()
      ([1.0, 0.0], [0.0, 1.0])
    """
    x, y = lmc.check_data(data)
    num_candidates(stacked)
    chunk = chunking.check_chunk(chunk)
    out = _candidates_program(eval_fn, chunk)(stacked, x, y)
    return {k: np.asarray(v) for k, v in out.items()}


# One compiled program per (eval_fn, chunk), as in tna_jax.lmc: repeated soups of the same models
# (seeds, arms, benchmark rounds) reuse it instead of tracing and compiling a fresh closure.
@functools.lru_cache(maxsize=64)
def _candidates_program(eval_fn: EvalFn, chunk: int | None) -> Callable[..., Any]:
    return jax.jit(lambda s, x, y: chunking.map_points(lambda v: eval_fn(v, x, y), s, chunk))


@functools.lru_cache(maxsize=64)
def _soups_program(eval_fn: EvalFn, chunk: int | None) -> Callable[..., Any]:
    def compute(stacked, w, x, y):
        return chunking.map_points(lambda row: eval_fn(tree_lib.weighted_mean(stacked, row), x, y), w, chunk)

    return jax.jit(compute)


def _check_weight_rows(weights: Any, k: int) -> jax.Array:
    w = np.asarray(weights, np.float64)
    if w.ndim != 2 or w.shape[1] != k or w.shape[0] == 0:
        raise ValueError(f"weights must have shape (num_soups, {k}) for {k} candidates; got {w.shape}.")
    if not np.isfinite(w).all() or (w < 0).any() or (w.sum(axis=1) <= 0).any():
        bad = int(np.argmax(~np.isfinite(w).all(axis=1) | (w < 0).any(axis=1) | (w.sum(axis=1) <= 0)))
        raise ValueError(f"weights rows must be finite, non-negative and not all zero; row {bad} is {w[bad].tolist()}.")
    return jnp.asarray(w, jnp.float32)


def evaluate_soups(eval_fn: EvalFn, stacked: PyTree, weights: Any, data: tuple[jax.Array, jax.Array],
                   *, chunk: int | None = None) -> dict[str, np.ndarray]:
    """Loss and accuracy of S soups of K stacked models, one soup per row of `weights` (S, K).

    Each row is normalised to sum to 1; a one-hot row is a single ingredient, a row of ones the
    uniform soup. The S soups are evaluated with one jitted ``vmap`` over rows (chunked with
    `chunk` to bound memory: each soup in flight is a full copy of the model).

    Args:
      eval_fn: ``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for one model
        (``evaluation.make_eval_fn``).
      stacked: K models' variables on a leading axis.
      weights: (S, K) non-negative ingredient weights, one soup per row.
      data: ``(x, y)``.
      chunk: evaluate at most this many soups at once (``lax.map`` with ``batch_size``).

    Returns:
      ``{"loss": (S,), "accuracy": (S,)}`` NumPy arrays.

    Raises:
      ValueError: weights of the wrong shape, negative, non-finite or with an all-zero row; a bad
        `chunk`; no candidates or empty data.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):
      ...     return {"loss": jnp.mean((x * v["w"] - y) ** 2), "accuracy": jnp.mean(jnp.abs(x * v["w"] - y) < 0.5)}
      >>> stacked = {"w": jnp.array([0.0, 2.0])}
      >>> out = evaluate_soups(eval_fn, stacked, [[1, 0], [1, 1], [1, 3]], (jnp.ones(3), jnp.ones(3)))
      >>> out["loss"].tolist()  # w = 0, the uniform soup w = 1, and w = 1.5
      [1.0, 0.0, 0.25]
      >>> evaluate_soups(eval_fn, stacked, [[1, -1]], (jnp.ones(3), jnp.ones(3)))
      Traceback (most recent call last):
      ...
      ValueError: weights rows must be finite, non-negative and not all zero; row 0 is [1.0, -1.0].
    """
    x, y = lmc.check_data(data)
    k = num_candidates(stacked)
    w = _check_weight_rows(weights, k)
    chunk = chunking.check_chunk(chunk)
    out = _soups_program(eval_fn, chunk)(stacked, w, x, y)
    return {k_: np.asarray(v) for k_, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Soups.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SoupResult:
    """A soup and how it was made.

    Attributes:
      params: the soup's variables (one model).
      weights: (K,) ingredient weights, summing to 1 (uniform over the ingredients).
      ingredients: candidate indices in the soup, in the order they were added.
      held_out_accuracy, held_out_loss: the soup's metrics on the held-out data it was chosen on.
      individual_accuracy, individual_loss: (K,) each candidate's held-out metrics.
      order: (K,) candidates sorted by held-out accuracy, best first (ties: lower index first).
      trials: the greedy loop, one dict per tried candidate: ``{"candidate", "accuracy", "loss",
        "accepted"}`` (empty for the uniform soup).

    Examples:
      >>> import numpy as np
      >>> soup = SoupResult(params={"w": 1.0}, weights=np.array([0.5, 0.0, 0.5]), ingredients=[2, 0],
      ...                   held_out_accuracy=0.9, held_out_loss=0.3,
      ...                   individual_accuracy=np.array([0.8, 0.5, 0.85]), individual_loss=np.array([0.4, 0.9, 0.35]),
      ...                   order=np.array([2, 0, 1]), trials=[])
      >>> soup.best_index, soup.summary()["ingredients"]
      (2, [2, 0])
    """

    params: PyTree
    weights: np.ndarray
    ingredients: list[int]
    held_out_accuracy: float
    held_out_loss: float
    individual_accuracy: np.ndarray
    individual_loss: np.ndarray
    order: np.ndarray
    trials: list[dict[str, Any]]

    @property
    def best_index(self) -> int:
        """The candidate with the best held-out accuracy (the greedy soup's first ingredient)."""
        return int(self.order[0])

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (everything but the parameters)."""
        return {"weights": self.weights.tolist(), "ingredients": list(self.ingredients),
                "held_out_accuracy": self.held_out_accuracy, "held_out_loss": self.held_out_loss,
                "individual_accuracy": self.individual_accuracy.tolist(),
                "individual_loss": self.individual_loss.tolist(), "order": self.order.tolist(),
                "trials": list(self.trials)}


def _order(acc: np.ndarray) -> np.ndarray:
    return np.argsort(-np.asarray(acc, np.float64), kind="stable")


def uniform_soup(eval_fn: EvalFn, stacked: PyTree, held_out: tuple[jax.Array, jax.Array],
                 weights: Any = None) -> SoupResult:
    """The uniform soup (1/K) Σ θ_k (or a weighted one), with its held-out metrics.

    A thin wrapper of ``lmc.fuse``, which evaluates the K candidates (vmapped) and their average.

    Args:
      eval_fn: evaluation of one model (``evaluation.make_eval_fn``).
      stacked: K candidates on a leading axis (see :func:`stack_candidates`).
      held_out: ``(x, y)`` the soup is evaluated on.
      weights: None (uniform) or (K,) non-negative weights (normalised to sum to 1).

    Returns:
      A :class:`SoupResult` (no ``trials``; the ingredients are the candidates with weight > 0).

    Raises:
      ValueError: no candidates, bad weights or empty held-out data (from ``lmc.fuse``).

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):
      ...     return {"loss": jnp.mean((x * v["w"] - y) ** 2), "accuracy": jnp.mean(jnp.abs(x * v["w"] - y) < 0.5)}
      >>> soup = uniform_soup(eval_fn, {"w": jnp.array([0.0, 2.0])}, (jnp.ones(4), jnp.ones(4)))
      >>> float(soup.params["w"]), soup.held_out_accuracy, soup.individual_accuracy.tolist()
      (1.0, 1.0, [0.0, 0.0])
    """
    k = num_candidates(stacked)
    fused = lmc.fuse(eval_fn, stacked, held_out, weights)
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    ind_acc = np.asarray(fused["individual_accuracy"])
    return SoupResult(params=fused["fused"], weights=w, ingredients=[int(i) for i in np.nonzero(w > 0)[0]],
                      held_out_accuracy=fused["fused_accuracy"], held_out_loss=fused["fused_loss"],
                      individual_accuracy=ind_acc, individual_loss=np.asarray(fused["individual_loss"]),
                      order=_order(ind_acc), trials=[])


_weighted_mean = jax.jit(tree_lib.weighted_mean)


@functools.lru_cache(maxsize=64)
def _greedy_program(eval_fn: EvalFn, chunk: int | None) -> Callable[..., Any]:
    """The whole greedy soup (candidate evaluation, sort, scan over candidates) as one program."""

    def compute(stacked, x, y):
        ind = chunking.map_points(lambda v: eval_fn(v, x, y), stacked, chunk)
        k = ind["accuracy"].shape[0]
        order = jnp.argsort(-ind["accuracy"], stable=True)
        w0 = jax.nn.one_hot(order[0], k, dtype=jnp.float32)
        first = (w0, ind["accuracy"][order[0]], ind["loss"][order[0]])

        def step(carry, cand):
            w, acc, loss = carry
            trial = w.at[cand].set(1.0)
            m = eval_fn(tree_lib.weighted_mean(stacked, trial), x, y)
            accept = m["accuracy"] >= acc
            new = (jnp.where(accept, trial, w), jnp.where(accept, m["accuracy"], acc),
                   jnp.where(accept, m["loss"], loss))
            return new, (m["accuracy"], m["loss"], accept)

        (w, acc, loss), trials = jax.lax.scan(step, first, order[1:])
        return ind, order, w, acc, loss, trials

    return jax.jit(compute)


def greedy_soup(eval_fn: EvalFn, stacked: PyTree, held_out: tuple[jax.Array, jax.Array],
                *, chunk: int | None = None) -> SoupResult:
    """Wortsman et al.'s greedy soup, chosen on `held_out`, as one jitted program.

    1. Evaluate the K candidates on the held-out data (one ``vmap`` over candidates).
    2. Sort them by held-out accuracy, best first; the soup starts as the best candidate.
    3. For each next candidate k in that order: if the held-out accuracy of the uniform average
       of soup ∪ {k} is ≥ the current soup's, add k (ties are accepted, as in the paper).

    Step 3 is a ``lax.scan`` over the sorted candidates whose carry is the soup's weight vector,
    so the soup is never materialised on the host until the end. By construction the result's
    held-out accuracy is ≥ that of the best single candidate, its first ingredient.

    Args:
      eval_fn: evaluation of one model (``evaluation.make_eval_fn``).
      stacked: K candidates on a leading axis (see :func:`stack_candidates`).
      held_out: ``(x, y)`` the soup is chosen on (a validation split, not the test split).
      chunk: evaluate at most this many candidates at once in step 1.

    Returns:
      A :class:`SoupResult`.

    Raises:
      ValueError: no candidates, candidates of different structure, empty held-out data.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):  # accuracy = fraction of targets within 0.5 of w
      ...     return {"loss": jnp.mean((v["w"] - y) ** 2), "accuracy": jnp.mean(jnp.abs(v["w"] - y) < 0.5)}
      >>> cands = {"w": jnp.array([0.9, 5.0, 1.2])}
      >>> soup = greedy_soup(eval_fn, cands, (jnp.zeros(4), jnp.array([1.0, 1.0, 1.0, 2.0])))
      >>> soup.ingredients, [t["accepted"] for t in soup.trials]
      ([0, 2], [True, False])
    """
    x, y = lmc.check_data(held_out)
    num_candidates(stacked)
    chunk = chunking.check_chunk(chunk)
    ind, order, w, acc, loss, trials = _greedy_program(eval_fn, chunk)(stacked, x, y)
    order = np.asarray(order)
    w = np.asarray(w, np.float64)
    t_acc, t_loss, t_ok = (np.asarray(t) for t in trials)
    trial_rows = [{"candidate": int(c), "accuracy": float(a), "loss": float(lo), "accepted": bool(ok)}
                  for c, a, lo, ok in zip(order[1:], t_acc, t_loss, t_ok)]
    ingredients = [int(order[0])] + [r["candidate"] for r in trial_rows if r["accepted"]]
    weights = w / w.sum()
    params = _weighted_mean(stacked, jnp.asarray(weights, jnp.float32))
    return SoupResult(params=params, weights=weights, ingredients=ingredients,
                      held_out_accuracy=float(acc), held_out_loss=float(loss),
                      individual_accuracy=np.asarray(ind["accuracy"]), individual_loss=np.asarray(ind["loss"]),
                      order=order, trials=trial_rows)


