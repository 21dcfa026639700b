"""Linear mode connectivity: interpolation paths vmapped over α, barriers, pairwise tables, fusion.

Definitions (as in the papers; see DESIGN.md). With θ_α = (1 − α) θ_A + α θ_B,

* loss barrier     B_L = max_α [ L(θ_α) − ((1 − α) L(θ_A) + α L(θ_B)) ]
* accuracy barrier B_A = max_α [ ((1 − α) Acc(θ_A) + α Acc(θ_B)) − Acc(θ_α) ]

Both are ≥ 0 because the endpoints contribute 0. "Avg. Acc." is the mean accuracy of the two
endpoints and "Interp. Acc." the accuracy at α = 0.5 (the paper's Figure 2). Multi-model fusion
is the uniform (or weighted) average of K models against the mean of their individual metrics.

Every function is pure and takes an ``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for one
model (``tna_jax.training.make_eval_fn``). α is a batch axis: a path is ``jax.vmap`` over α of
"interpolate, then evaluate", optionally chunked with ``jax.lax.map(..., batch_size=chunk)`` to
bound memory; a table over N seeds is a vmap over pairs. α outside [0, 1] is allowed and means
extrapolation along the same line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import tree as tree_lib

PyTree = Any
EvalFn = Callable[[PyTree, jax.Array, jax.Array], dict[str, jax.Array]]

__all__ = [
    "interpolate", "default_alphas", "lmc_path", "barriers", "pairwise_barriers", "fuse",
    "check_compatible", "check_data",
]


def default_alphas(num: int = 25) -> np.ndarray:
    """``num`` evenly spaced α in [0, 1] (25 by default, as in the paper's plots)."""
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 2:
        raise ValueError(f"num_alphas must be an integer >= 2; got {num!r}.")
    return np.linspace(0.0, 1.0, int(num))


def check_compatible(a: PyTree, b: PyTree) -> None:
    """Raises ValueError naming the first path where two models' variables differ in structure."""
    tree_lib.check_same_structure(a, b, names=("model a", "model b"))


def check_data(data: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"data must be a pair (x, y); got {type(data).__name__}.")
    x, y = data
    if np.shape(x)[0] == 0:
        raise ValueError("data is empty: x has 0 examples.")
    if np.shape(x)[0] != np.shape(y)[0]:
        raise ValueError(f"data x and y differ in length: {np.shape(x)[0]} vs {np.shape(y)[0]}.")
    return x, y


def _check_chunk(chunk: int | None) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise ValueError(f"chunk must be a positive integer or None; got {chunk!r}.")


def interpolate(a: PyTree, b: PyTree, alpha: float | jax.Array) -> PyTree:
    """θ_α = (1 − α) a + α b over whole variable trees (params and BatchNorm statistics).

    Examples:
      >>> import jax.numpy as jnp
      >>> interpolate({"w": jnp.zeros(2)}, {"w": jnp.full(2, 4.0)}, 0.25)["w"].tolist()
      [1.0, 1.0]
    """
    return tree_lib.lerp(a, b, alpha)


def _map(fn: Callable[[Any], Any], xs: Any, chunk: int | None) -> Any:
    if chunk is None:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=int(chunk))


def lmc_path(eval_fn: EvalFn, a: PyTree, b: PyTree, alphas: Sequence[float] | jax.Array | None = None,
             data: tuple[jax.Array, jax.Array] | None = None, chunk: int | None = None) -> dict[str, Any]:
    """Loss and accuracy of θ_α for every α, vmapped over α.

    Args:
      eval_fn: ``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for one model.
      a, b: the endpoint variables (same structure).
      alphas: the α grid; default 25 points in [0, 1]. Values outside [0, 1] extrapolate.
      data: ``(x, y)`` to evaluate on.
      chunk: evaluate at most this many α at once (bounds memory); None = all at once.

    Returns:
      ``{"alpha": (K,), "loss": (K,), "accuracy": (K,)}`` as jax arrays (jit-compatible).

    Raises:
      ValueError: models of different structure (naming the first mismatching path), empty data,
        chunk < 1.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):
      ...     loss = jnp.mean((x * v["w"] - y) ** 2)
      ...     return {"loss": loss, "accuracy": (loss < 0.5).astype(jnp.float32)}
      >>> data = (jnp.ones(4), jnp.ones(4))
      >>> path = lmc_path(eval_fn, {"w": jnp.array(0.0)}, {"w": jnp.array(2.0)}, [0.0, 0.5, 1.0], data)
      >>> path["loss"].tolist()
      [1.0, 0.0, 1.0]
    """
    if data is None:
        raise ValueError("lmc_path needs data=(x, y) to evaluate on.")
    x, y = check_data(data)
    _check_chunk(chunk)
    check_compatible(a, b)
    alphas = jnp.asarray(default_alphas() if alphas is None else alphas, jnp.float32)
    if alphas.ndim != 1 or alphas.shape[0] == 0:
        raise ValueError(f"alphas must be a non-empty 1-D sequence; got shape {alphas.shape}.")

    def at(alpha):
        return eval_fn(interpolate(a, b, alpha), x, y)

    out = _map(at, alphas, chunk)
    return {"alpha": alphas, "loss": out["loss"], "accuracy": out["accuracy"]}


def barriers(path: dict[str, Any]) -> dict[str, float]:
    """Barriers and summary numbers of one path (the output of :func:`lmc_path`).

    The path must contain α = 0 and α = 1 (the endpoints). Accuracy at α = 0.5 is read off the
    path (linearly interpolated if 0.5 is not on the grid).

    Returns:
      ``{"loss_barrier", "accuracy_barrier", "avg_endpoint_accuracy", "interp_accuracy",
      "avg_endpoint_loss", "interp_loss", "argmax_alpha_loss", "argmax_alpha_accuracy"}``.
    """
    alpha = np.asarray(path["alpha"], np.float64)
    loss = np.asarray(path["loss"], np.float64)
    acc = np.asarray(path["accuracy"], np.float64)
    i0 = np.where(np.isclose(alpha, 0.0))[0]
    i1 = np.where(np.isclose(alpha, 1.0))[0]
    if not len(i0) or not len(i1):
        raise ValueError("barriers() needs a path that contains alpha = 0 and alpha = 1 (the endpoints); "
                         f"got alphas {alpha.tolist()}.")
    la, lb, aa, ab = loss[i0[0]], loss[i1[0]], acc[i0[0]], acc[i1[0]]
    loss_gap = loss - ((1 - alpha) * la + alpha * lb)
    acc_gap = ((1 - alpha) * aa + alpha * ab) - acc
    order = np.argsort(alpha)
    return {
        "loss_barrier": float(max(loss_gap.max(), 0.0)),
        "accuracy_barrier": float(max(acc_gap.max(), 0.0)),
        "avg_endpoint_accuracy": float((aa + ab) / 2),
        "interp_accuracy": float(np.interp(0.5, alpha[order], acc[order])),
        "avg_endpoint_loss": float((la + lb) / 2),
        "interp_loss": float(np.interp(0.5, alpha[order], loss[order])),
        "argmax_alpha_loss": float(alpha[int(np.argmax(loss_gap))]),
        "argmax_alpha_accuracy": float(alpha[int(np.argmax(acc_gap))]),
    }


def all_pairs(n: int, max_pairs: int | None = None) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of n models in a fixed order, at most `max_pairs` of them."""
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return pairs[:max_pairs] if max_pairs else pairs


def pairwise_barriers(eval_fn: EvalFn, stacked: PyTree, data: tuple[jax.Array, jax.Array], *,
                      pairs: Sequence[tuple[int, int]] | None = None,
                      alphas: Sequence[float] | None = None, chunk: int | None = None,
                      jit: bool = True) -> dict[str, Any]:
    """LMC between pairs of N stacked models, vmapped over pairs and α.

    Args:
      eval_fn: evaluation of one model.
      stacked: variables of N models with a leading model axis.
      data: ``(x, y)``.
      pairs: which (i, j) to compare; default all i < j.
      alphas: the α grid (default 25 points in [0, 1]).
      chunk: evaluate at most this many (pair, α) points at once.

    Returns:
      ``{"pairs": [(i, j)...], "paths": {"alpha", "loss" (P, K), "accuracy" (P, K)},
      "per_pair": [barriers dicts], "loss_barrier": (N, N), "accuracy_barrier": (N, N)}``
      where the N×N tables are symmetric with NaN where a pair was not evaluated and 0 on the
      diagonal.
    """
    x, y = check_data(data)
    _check_chunk(chunk)
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        raise ValueError("stacked has no arrays.")
    n = int(np.shape(leaves[0])[0])
    pairs = list(pairs) if pairs is not None else all_pairs(n)
    if not pairs:
        raise ValueError(f"pairwise_barriers needs at least one pair; got none for {n} models.")
    for i, j in pairs:
        if not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"pair ({i}, {j}) is out of range for {n} models.")
    alphas_arr = jnp.asarray(default_alphas() if alphas is None else alphas, jnp.float32)
    ii = jnp.asarray([p[0] for p in pairs])
    jj = jnp.asarray([p[1] for p in pairs])
    k = alphas_arr.shape[0]
    # Flatten (pair, α) into one batch axis so chunking bounds the total work in flight.
    pi = jnp.repeat(jnp.arange(len(pairs)), k)
    al = jnp.tile(alphas_arr, len(pairs))

    def compute(stacked, x, y):
        def point(inputs):
            p, alpha = inputs
            a = tree_lib.index(stacked, ii[p])
            b = tree_lib.index(stacked, jj[p])
            return eval_fn(interpolate(a, b, alpha), x, y)

        return _map(point, (pi, al), chunk)

    out = (jax.jit(compute) if jit else compute)(stacked, x, y)
    loss = np.asarray(out["loss"]).reshape(len(pairs), k)
    acc = np.asarray(out["accuracy"]).reshape(len(pairs), k)
    per_pair = [barriers({"alpha": alphas_arr, "loss": loss[p], "accuracy": acc[p]}) for p in range(len(pairs))]
    lb = np.full((n, n), np.nan)
    ab = np.full((n, n), np.nan)
    np.fill_diagonal(lb, 0.0)
    np.fill_diagonal(ab, 0.0)
    for (i, j), b in zip(pairs, per_pair):
        lb[i, j] = lb[j, i] = b["loss_barrier"]
        ab[i, j] = ab[j, i] = b["accuracy_barrier"]
    return {"pairs": pairs, "paths": {"alpha": np.asarray(alphas_arr), "loss": loss, "accuracy": acc},
            "per_pair": per_pair, "loss_barrier": lb, "accuracy_barrier": ab}


def fuse(eval_fn: EvalFn, stacked: PyTree, data: tuple[jax.Array, jax.Array], weights: Any = None
         ) -> dict[str, Any]:
    """Multi-model fusion: the (weighted) average of K models against their individual metrics.

    Returns:
      ``{"fused": variables, "fused_loss", "fused_accuracy", "individual_loss" (K,),
      "individual_accuracy" (K,), "mean_individual_loss", "mean_individual_accuracy",
      "accuracy_barrier" (mean individual − fused), "loss_barrier" (fused − mean individual)}``.
    """
    x, y = check_data(data)
    fused = tree_lib.weighted_mean(stacked, weights)
    ind = jax.jit(jax.vmap(eval_fn, in_axes=(0, None, None)))(stacked, x, y)
    f = jax.jit(eval_fn)(fused, x, y)
    ind_acc = np.asarray(ind["accuracy"], np.float64)
    ind_loss = np.asarray(ind["loss"], np.float64)
    w = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    mean_acc = float(np.mean(ind_acc) if w is None else np.sum(w * ind_acc))
    mean_loss = float(np.mean(ind_loss) if w is None else np.sum(w * ind_loss))
    return {
        "fused": fused,
        "fused_loss": float(f["loss"]), "fused_accuracy": float(f["accuracy"]),
        "individual_loss": ind_loss, "individual_accuracy": ind_acc,
        "mean_individual_loss": mean_loss, "mean_individual_accuracy": mean_acc,
        "accuracy_barrier": mean_acc - float(f["accuracy"]),
        "loss_barrier": float(f["loss"]) - mean_loss,
    }
