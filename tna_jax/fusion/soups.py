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

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import chunking, deprecation
from tna_jax import tree as tree_lib
from tna_jax.evaluation import EvalFn, Metrics
from tna_jax.lmc.paths import check_data
from tna_jax.programs import cached_per_eval_fn

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
                        *, chunk: int | None = None) -> Metrics:
    """Loss and accuracy of each of K stacked models: one jitted ``vmap`` of `eval_fn`.

    Args:
      eval_fn: ``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for one model
        (``evaluation.make_eval_fn``).
      stacked: K models' variables on a leading axis.
      data: ``(x, y)``.
      chunk: evaluate at most this many models at once (``lax.map`` with ``batch_size``).

    Returns:
      :class:`tna_jax.evaluation.Metrics` of (K,) NumPy arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):
      ...     return {"loss": jnp.mean((x * v["w"] - y) ** 2), "accuracy": jnp.mean(x * v["w"] == y)}
      >>> out = evaluate_candidates(eval_fn, {"w": jnp.array([1.0, 2.0])}, (jnp.ones(3), jnp.ones(3)))
      >>> out.accuracy.tolist(), out.loss.tolist()
      ([1.0, 0.0], [0.0, 1.0])
    """
    x, y = check_data(data)
    num_candidates(stacked)
    chunk = chunking.check_chunk(chunk)
    out = _candidates_program(eval_fn, chunk)(stacked, x, y)
    return Metrics(loss=np.asarray(out["loss"]), accuracy=np.asarray(out["accuracy"]))


# One compiled program per (eval_fn, chunk), as in tna_jax.lmc: repeated soups of the same models
# (seeds, arms, benchmark rounds) reuse it instead of tracing and compiling a fresh closure.
@cached_per_eval_fn
def _candidates_program(eval_fn: EvalFn, chunk: int | None) -> Callable[..., Any]:
    return jax.jit(lambda s, x, y: chunking.map_points(lambda v: eval_fn(v, x, y), s, chunk))


@cached_per_eval_fn
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


def _legacy_soups_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Maps the pre-0.2 ``evaluate_soups(eval_fn, stacked, weights, data)`` onto the new order."""
    if len(args) >= 4 or (len(args) == 3 and "data" in kwargs):
        deprecation.warn("evaluate_soups(eval_fn, stacked, weights, data)",
                         "evaluate_soups(eval_fn, stacked, data, weights=...)", stacklevel=4)
        kwargs = {**kwargs, "weights": args[2]}
        args = (*args[:2], args[3] if len(args) >= 4 else kwargs.pop("data"))
    return args, kwargs


@deprecation.legacy_call(_legacy_soups_call)
def evaluate_soups(eval_fn: EvalFn, stacked: PyTree, data: tuple[jax.Array, jax.Array], *, weights: Any,
                   chunk: int | None = None) -> Metrics:
    """Loss and accuracy of S soups of K stacked models, one soup per row of `weights` (S, K).

    Each row is normalised to sum to 1; a one-hot row is a single ingredient, a row of ones the
    uniform soup. The S soups are evaluated with one jitted ``vmap`` over rows (chunked with
    `chunk` to bound memory: each soup in flight is a full copy of the model).

    Args:
      eval_fn: ``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for one model
        (``evaluation.make_eval_fn``).
      stacked: K models' variables on a leading axis.
      data: ``(x, y)``.
      weights: (S, K) non-negative ingredient weights, one soup per row.
      chunk: evaluate at most this many soups at once (``lax.map`` with ``batch_size``).

    Returns:
      :class:`tna_jax.evaluation.Metrics` of (S,) NumPy arrays.

    Raises:
      ValueError: weights of the wrong shape, negative, non-finite or with an all-zero row; a bad
        `chunk`; no candidates or empty data.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):
      ...     return {"loss": jnp.mean((x * v["w"] - y) ** 2), "accuracy": jnp.mean(jnp.abs(x * v["w"] - y) < 0.5)}
      >>> stacked = {"w": jnp.array([0.0, 2.0])}
      >>> out = evaluate_soups(eval_fn, stacked, (jnp.ones(3), jnp.ones(3)), weights=[[1, 0], [1, 1], [1, 3]])
      >>> out.loss.tolist()  # w = 0, the uniform soup w = 1, and w = 1.5
      [1.0, 0.0, 0.25]
      >>> evaluate_soups(eval_fn, stacked, (jnp.ones(3), jnp.ones(3)), weights=[[1, -1]])
      Traceback (most recent call last):
      ...
      ValueError: weights rows must be finite, non-negative and not all zero; row 0 is [1.0, -1.0].
    """
    x, y = check_data(data)
    k = num_candidates(stacked)
    w = _check_weight_rows(weights, k)
    chunk = chunking.check_chunk(chunk)
    out = _soups_program(eval_fn, chunk)(stacked, w, x, y)
    return Metrics(loss=np.asarray(out["loss"]), accuracy=np.asarray(out["accuracy"]))


# ---------------------------------------------------------------------------------------------
# Soups.
# ---------------------------------------------------------------------------------------------


class SoupResult(NamedTuple):
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
      >>> soup.best_index, soup.summary()["ingredients"], round(soup.accuracy_barrier, 3)
      (2, [2, 0], -0.075)
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

    def _weighted(self, values: np.ndarray) -> float:
        values = np.asarray(values, np.float64)
        w = np.asarray(self.weights, np.float64)
        # Equal weights: the plain mean (the numbers reports have always shown for a uniform soup).
        return float(np.mean(values) if np.all(w == w[0]) else np.sum(w * values))

    @property
    def mean_individual_accuracy(self) -> float:
        """The soup-weighted mean of the candidates' held-out accuracies."""
        return self._weighted(self.individual_accuracy)

    @property
    def mean_individual_loss(self) -> float:
        """The soup-weighted mean of the candidates' held-out losses."""
        return self._weighted(self.individual_loss)

    @property
    def accuracy_barrier(self) -> float:
        """Mean individual accuracy minus the soup's (negative: the soup is better)."""
        return self.mean_individual_accuracy - float(self.held_out_accuracy)

    @property
    def loss_barrier(self) -> float:
        """The soup's loss minus the mean individual loss."""
        return float(self.held_out_loss) - self.mean_individual_loss

    def fusion_numbers(self) -> dict[str, Any]:
        """The soup against its candidates, JSON-ready: ``{"fused_loss", "fused_accuracy",
        "individual_loss", "individual_accuracy", "mean_individual_loss",
        "mean_individual_accuracy", "accuracy_barrier", "loss_barrier"}`` (the "fusion" section of
        a train report)."""
        return {"fused_loss": float(self.held_out_loss), "fused_accuracy": float(self.held_out_accuracy),
                "individual_loss": self.individual_loss, "individual_accuracy": self.individual_accuracy,
                "mean_individual_loss": self.mean_individual_loss,
                "mean_individual_accuracy": self.mean_individual_accuracy,
                "accuracy_barrier": self.accuracy_barrier, "loss_barrier": self.loss_barrier}

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (everything but the parameters)."""
        return {"weights": self.weights.tolist(), "ingredients": list(self.ingredients),
                "held_out_accuracy": self.held_out_accuracy, "held_out_loss": self.held_out_loss,
                "individual_accuracy": self.individual_accuracy.tolist(),
                "individual_loss": self.individual_loss.tolist(), "order": self.order.tolist(),
                "trials": list(self.trials)}


def _order(acc: np.ndarray) -> np.ndarray:
    return np.argsort(-np.asarray(acc, np.float64), kind="stable")


def _legacy_soup_call(name: str) -> Callable[[tuple, dict], tuple[tuple, dict]]:
    """Maps pre-0.2 soup calls (``held_out=``, uniform_soup's positional `weights`) onto the new ones."""

    def adapt(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "held_out" in kwargs:
            deprecation.warn(f"{name}(..., held_out=...)", f"{name}(eval_fn, stacked, data)", stacklevel=4)
            kwargs = dict(kwargs)
            kwargs["data"] = kwargs.pop("held_out")
        if name == "uniform_soup" and len(args) >= 4:
            deprecation.warn("uniform_soup(eval_fn, stacked, data, weights)",
                             "uniform_soup(eval_fn, stacked, data, weights=...)", stacklevel=4)
            kwargs = {**kwargs, "weights": args[3]}
            args = args[:3]
        return args, kwargs

    return adapt


@cached_per_eval_fn
def _eval_programs(eval_fn: EvalFn) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Compiled evaluation of K stacked models and of one model."""
    return jax.jit(jax.vmap(eval_fn, in_axes=(0, None, None))), jax.jit(eval_fn)


@deprecation.legacy_call(_legacy_soup_call("uniform_soup"))
def uniform_soup(eval_fn: EvalFn, stacked: PyTree, data: tuple[jax.Array, jax.Array], *,
                 weights: Any = None) -> SoupResult:
    """The uniform soup (1/K) Σ θ_k (or a weighted one), with its held-out metrics.

    The K candidates are evaluated with one jitted ``vmap`` and the soup with one jitted call
    (both compiled once per `eval_fn`).

    Args:
      eval_fn: evaluation of one model (``evaluation.make_eval_fn``).
      stacked: K candidates on a leading axis (see :func:`stack_candidates`).
      data: ``(x, y)`` the soup is evaluated on (held-out data).
      weights: None (uniform) or (K,) non-negative weights (normalised to sum to 1).

    Returns:
      A :class:`SoupResult` (no ``trials``; the ingredients are the candidates with weight > 0).

    Raises:
      ValueError: no candidates, bad weights or empty data.
      TypeError: data that is not a pair ``(x, y)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):
      ...     return {"loss": jnp.mean((x * v["w"] - y) ** 2), "accuracy": jnp.mean(jnp.abs(x * v["w"] - y) < 0.5)}
      >>> soup = uniform_soup(eval_fn, {"w": jnp.array([0.0, 2.0])}, (jnp.ones(4), jnp.ones(4)))
      >>> float(soup.params["w"]), soup.held_out_accuracy, soup.individual_accuracy.tolist()
      (1.0, 1.0, [0.0, 0.0])
    """
    k = num_candidates(stacked)
    x, y = check_data(data)
    fused = tree_lib.weighted_mean(stacked, weights)
    many, one = _eval_programs(eval_fn)
    ind = many(stacked, x, y)
    f = one(fused, x, y)
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    ind_acc = np.asarray(ind["accuracy"], np.float64)
    return SoupResult(params=fused, weights=w, ingredients=[int(i) for i in np.nonzero(w > 0)[0]],
                      held_out_accuracy=float(f["accuracy"]), held_out_loss=float(f["loss"]),
                      individual_accuracy=ind_acc, individual_loss=np.asarray(ind["loss"], np.float64),
                      order=_order(ind_acc), trials=[])


_weighted_mean = jax.jit(tree_lib.weighted_mean)


@cached_per_eval_fn
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


@deprecation.legacy_call(_legacy_soup_call("greedy_soup"))
def greedy_soup(eval_fn: EvalFn, stacked: PyTree, data: tuple[jax.Array, jax.Array],
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
      data: ``(x, y)`` the soup is chosen on (a validation split, not the test split).
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
    x, y = check_data(data)
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


