"""Linear mode connectivity: interpolation paths vmapped over α (`LMCPath`) and their barriers
(`Barriers`). The fusion of K models is `tna_jax.fusion.uniform_soup` (`fuse` here is its
deprecated former name).

Definitions (as in the papers). With θ_α = (1 − α) θ_A + α θ_B,

* loss barrier     B_L = max_α [ L(θ_α) − ((1 − α) L(θ_A) + α L(θ_B)) ]
* accuracy barrier B_A = max_α [ ((1 − α) Acc(θ_A) + α Acc(θ_B)) − Acc(θ_α) ]

Both are ≥ 0 because the endpoints contribute 0. "Avg. Acc." is the mean accuracy of the two
endpoints and "Interp. Acc." the accuracy at α = 0.5 (the paper's Figure 2). α is a batch axis:
a path is `jax.vmap` over α of "interpolate, then evaluate", chunked to bound memory
(`tna_jax.chunking`). α outside [0, 1] means extrapolation along the same line; barriers are
still measured against the chord between the α = 0 and α = 1 points of the path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import deprecation
from tna_jax import tree as tree_lib
from tna_jax.chunking import AUTO, Chunk, check_chunk, map_points
from tna_jax.evaluation import EvalFn
from tna_jax.programs import cached_per_eval_fn

PyTree = Any

__all__ = ["MAX_ALPHAS", "LMCPath", "Barriers", "default_alphas", "check_alphas", "check_compatible", "check_data",
           "interpolate", "lmc_path", "barriers", "fuse"]


MAX_ALPHAS = 1_000_000  # points on one path; far more than any plot needs, far less than memory


@deprecation.legacy_item_access
class LMCPath(NamedTuple):
    """Loss and accuracy along interpolation paths.

    Attributes:
      alpha: (K,) the α grid.
      loss: (K,) for one path (:func:`lmc_path`, jax arrays: it runs under transformations), or
        (P, K) for P paths of a table (NumPy arrays).
      accuracy: same shape as `loss`.
    """

    alpha: Any
    loss: Any
    accuracy: Any


@deprecation.legacy_item_access
class Barriers(NamedTuple):
    """Barriers and summary numbers of one path (Python floats; see the module docstring).

    Attributes:
      loss_barrier: B_L ≥ 0.
      accuracy_barrier: B_A ≥ 0.
      avg_endpoint_accuracy: mean accuracy of the two endpoints.
      interp_accuracy: accuracy at α = 0.5 (linearly interpolated off the grid).
      avg_endpoint_loss: mean loss of the two endpoints.
      interp_loss: loss at α = 0.5.
      argmax_alpha_loss: the α where the loss gap is largest.
      argmax_alpha_accuracy: the α where the accuracy gap is largest.
    """

    loss_barrier: float
    accuracy_barrier: float
    avg_endpoint_accuracy: float
    interp_accuracy: float
    avg_endpoint_loss: float
    interp_loss: float
    argmax_alpha_loss: float
    argmax_alpha_accuracy: float


def default_alphas(num: int = 25) -> np.ndarray:
    """``num`` evenly spaced α in [0, 1] (25 by default, as in the paper's plots).

    Args:
      num: number of points (at least 2, so that both endpoints are on the grid).

    Returns:
      A float64 NumPy vector from 0 to 1.

    Raises:
      ValueError: `num` is not an integer >= 2.

    Examples:
      >>> default_alphas(5).tolist()
      [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or not 2 <= num <= MAX_ALPHAS:
        raise ValueError(f"num_alphas must be an integer in [2, {MAX_ALPHAS}]; got {num!r}.")
    return np.linspace(0.0, 1.0, int(num))


def check_compatible(a: PyTree, b: PyTree) -> None:
    """Raises ValueError naming the first path where two models' variables differ in structure
    or shape (e.g. a width-64 and a width-128 MLP, or a model with and without BatchNorm).

    Args:
      a, b: the variables of the two models.

    Raises:
      ValueError: the structures or shapes differ (the message names the path).

    Examples:
      >>> import jax.numpy as jnp
      >>> check_compatible({"w": jnp.ones(2)}, {"w": jnp.zeros(2)})
      >>> try:
      ...     check_compatible({"w": jnp.ones(2)}, {"w": jnp.ones(3)})
      ... except ValueError as err:
      ...     print(err)
      model a and model b differ in shape at path 'w': (2,) vs (3,).
    """
    tree_lib.check_same_structure(a, b, names=("model a", "model b"))
    for name, leaf in tree_lib.named_leaves(a):
        if isinstance(leaf, (str, bytes)) or not (hasattr(leaf, "dtype") or isinstance(leaf, (int, float))):
            raise TypeError(f"model variables must be arrays; model a has {type(leaf).__name__} {leaf!r:.40} at "
                            f"path {name!r}.")


def check_data(data: tuple[jax.Array, jax.Array], name: str = "data") -> tuple[jax.Array, jax.Array]:
    """Checks that `data` is a non-empty pair ``(x, y)`` of equal length; returns it.

    Args:
      data: the pair ``(inputs, labels)``.
      name: what to call it in error messages.

    Returns:
      ``(x, y)``.

    Raises:
      TypeError: `data` is not a pair.
      ValueError: no examples, or x and y of different lengths.

    Examples:
      >>> import numpy as np
      >>> x, y = check_data((np.zeros((3, 2)), np.zeros(3)))
      >>> try:
      ...     check_data((np.zeros((3, 2)), np.zeros(2)), "test data")
      ... except ValueError as err:
      ...     print(err)
      test data x and y differ in length: 3 vs (2,).
    """
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{name} must be a pair (x, y); got {type(data).__name__}.")
    x, y = data
    if np.ndim(x) == 0 or np.shape(x)[0] == 0:
        raise ValueError(f"{name} is empty: x has shape {np.shape(x)}; at least one example is needed.")
    if np.ndim(y) == 0 or np.shape(x)[0] != np.shape(y)[0]:
        raise ValueError(f"{name} x and y differ in length: {np.shape(x)[0]} vs {np.shape(y)[:1]}.")
    return x, y


def check_alphas(alphas: Any) -> jax.Array:
    """The α grid as a float32 vector (default 25 points in [0, 1]); any finite values allowed.

    Args:
      alphas: a 1-D sequence of numbers, an array (a tracer is passed through), or None.

    Returns:
      A float32 jax vector.

    Raises:
      TypeError: not a sequence of numbers.
      ValueError: empty, not 1-D, or not finite in float32.

    Examples:
      >>> check_alphas([0, 0.5, 1]).tolist()
      [0.0, 0.5, 1.0]
    """
    arr = default_alphas() if alphas is None else alphas
    if not isinstance(arr, jax.core.Tracer):
        try:
            host = np.asarray(arr, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"alphas must be a 1-D sequence of numbers; got {type(arr).__name__} {arr!r:.60}.") from None
        if host.ndim != 1 or host.shape[0] == 0:
            raise ValueError(f"alphas must be a non-empty 1-D sequence; got shape {host.shape}.")
        with np.errstate(over="ignore"):
            finite = np.isfinite(host.astype(np.float32)).all()
        if not finite:
            raise ValueError(f"alphas must be finite (in float32); got {host.tolist()[:8]}.")
    return jnp.asarray(arr, jnp.float32)


def interpolate(a: PyTree, b: PyTree, alpha: float | jax.Array) -> PyTree:
    """θ_α = (1 − α) a + α b over whole variable trees (params and BatchNorm statistics).

    Computed as ``(1 − α) a + α b`` (:func:`tna_jax.tree.lerp`), so α = 0 returns `a` and α = 1
    returns `b` exactly for finite float leaves. Integer leaves are taken from `a` for α < 0.5
    and from `b` otherwise. α outside [0, 1] extrapolates along the same line.

    Args:
      a, b: the variables of the two models (same structure).
      alpha: the weight of `b` (a number or a traced scalar).

    Returns:
      The variables θ_α, with the structure and dtypes of `a`.

    Examples:
      >>> import jax.numpy as jnp
      >>> interpolate({"w": jnp.zeros(2)}, {"w": jnp.full(2, 4.0)}, 0.25)["w"].tolist()
      [1.0, 1.0]
    """
    return tree_lib.lerp(a, b, alpha)


@cached_per_eval_fn
def _path_program(eval_fn: EvalFn, chunk: Chunk, jit: bool) -> Callable[..., Any]:
    """One compiled program per (eval_fn, chunk): repeated paths reuse it (no recompiles)."""

    def compute(a, b, alphas, x, y):
        return map_points(lambda alpha: eval_fn(interpolate(a, b, alpha), x, y), alphas, chunk)

    return jax.jit(compute) if jit else compute


def _legacy_path_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Maps the pre-0.2 call ``lmc_path(eval_fn, a, b, alphas, data, chunk)`` onto the new one."""
    if len(args) >= 5 or (len(args) == 4 and "data" in kwargs):
        names = ("alphas", "data", "chunk")
        moved = dict(zip(names, args[3:]))
        clash = sorted(set(moved) & set(kwargs))
        if clash:
            raise TypeError(f"lmc_path got {clash[0]!r} both by position and by keyword.")
        deprecation.warn("lmc_path(eval_fn, a, b, alphas, data)", "lmc_path(eval_fn, a, b, data, alphas=...)",
                         stacklevel=4)
        kwargs = {**kwargs, **moved}
        args = (*args[:3], kwargs.pop("data"))
    return args, kwargs


@deprecation.legacy_call(_legacy_path_call)
def lmc_path(eval_fn: EvalFn, a: PyTree, b: PyTree, data: tuple[jax.Array, jax.Array], *,
             alphas: Sequence[float] | jax.Array | None = None, chunk: Chunk = AUTO, jit: bool = True) -> LMCPath:
    """Loss and accuracy of θ_α = (1 − α) θ_A + α θ_B for every α, vmapped over α.

    The pre-0.2 order ``lmc_path(eval_fn, a, b, alphas, data)`` still works, with a
    `DeprecationWarning`.

    Args:
      eval_fn: ``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for one model
        (:func:`tna_jax.evaluation.make_eval_fn`; wrap it with
        :func:`tna_jax.norm_stats.with_bn_reset` to reset BatchNorm statistics at every α).
      a, b: the endpoint variables (same structure).
      data: ``(x, y)`` to evaluate on.
      alphas: the α grid; default 25 points in [0, 1]. Values outside [0, 1] extrapolate.
      chunk: evaluate at most this many α at once (``lax.map`` with ``batch_size``: bounds
        memory, same numbers); None = all α in one vmap; ``"auto"`` (default) sizes the chunks
        to the backend (:func:`tna_jax.chunking.auto_chunk`).
      jit: compile the path (cached per ``(eval_fn, chunk)``); False runs it eagerly, e.g.
        inside another transformation.

    Returns:
      An :class:`LMCPath` of (K,) jax arrays.

    Raises:
      ValueError: models of different structure (naming the first mismatching path), empty
        data, chunk < 1, an empty or non-finite α grid.
      TypeError: data that is not a pair ``(x, y)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):
      ...     loss = jnp.mean((x * v["w"] - y) ** 2)
      ...     return {"loss": loss, "accuracy": (loss < 0.5).astype(jnp.float32)}
      >>> data = (jnp.ones(4), jnp.ones(4))
      >>> path = lmc_path(eval_fn, {"w": jnp.array(0.0)}, {"w": jnp.array(2.0)}, data, alphas=[0.0, 0.5, 1.0])
      >>> path.loss.tolist()
      [1.0, 0.0, 1.0]
    """
    if data is None:
        raise ValueError("lmc_path needs data=(x, y) to evaluate on; got None.")
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be a function eval_fn(variables, x, y); got {type(eval_fn).__name__}.")
    x, y = check_data(data)
    chunk = check_chunk(chunk)
    check_compatible(a, b)
    alphas = check_alphas(alphas)
    out = _path_program(eval_fn, chunk, bool(jit))(a, b, alphas, x, y)
    return LMCPath(alpha=alphas, loss=out["loss"], accuracy=out["accuracy"])


def barriers(path: LMCPath | Mapping[str, Any]) -> Barriers:
    """Barriers and summary numbers of one path (the output of :func:`lmc_path`).

    The path must contain α = 0 and α = 1 (the endpoints). Accuracy at α = 0.5 is read off the
    path (linearly interpolated if 0.5 is not on the grid).

    Args:
      path: an :class:`LMCPath` (or a mapping with ``"alpha"``, ``"loss"``, ``"accuracy"``) of
        one path, vectors in any order of α.

    Returns:
      :class:`Barriers` (Python floats).

    Raises:
      ValueError: a path without alpha, loss and accuracy vectors of one length, or without
        the endpoints.

    Examples:
      >>> b = barriers(LMCPath(alpha=[0.0, 0.5, 1.0], loss=[0.2, 1.0, 0.4], accuracy=[0.9, 0.5, 0.7]))
      >>> round(b.loss_barrier, 3), round(b.accuracy_barrier, 3), round(b.interp_accuracy, 3)
      (0.7, 0.3, 0.5)
    """
    if isinstance(path, LMCPath):
        fields = (path.alpha, path.loss, path.accuracy)
    elif isinstance(path, Mapping) and all(k in path for k in ("alpha", "loss", "accuracy")):
        fields = (path["alpha"], path["loss"], path["accuracy"])
    else:
        raise ValueError("path must be an LMCPath (the output of lmc_path) or a mapping with 'alpha', 'loss' and "
                         f"'accuracy'; got {sorted(path) if isinstance(path, Mapping) else type(path).__name__}.")
    try:
        alpha, loss, acc = (np.asarray(f, np.float64) for f in fields)
    except (TypeError, ValueError):
        raise ValueError("path alpha, loss and accuracy must be numeric arrays.") from None
    if alpha.ndim != 1 or loss.shape != alpha.shape or acc.shape != alpha.shape:
        raise ValueError(f"path arrays must be 1-D of one length; got alpha {alpha.shape}, loss {loss.shape}, "
                         f"accuracy {acc.shape}.")
    i0 = np.where(np.isclose(alpha, 0.0))[0]
    i1 = np.where(np.isclose(alpha, 1.0))[0]
    if not len(i0) or not len(i1):
        raise ValueError("barriers() needs a path that contains alpha = 0 and alpha = 1 (the endpoints); "
                         f"got alphas {alpha.tolist()}.")
    la, lb, aa, ab = loss[i0[0]], loss[i1[0]], acc[i0[0]], acc[i1[0]]
    loss_gap = loss - ((1 - alpha) * la + alpha * lb)
    acc_gap = ((1 - alpha) * aa + alpha * ab) - acc
    order = np.argsort(alpha)
    return Barriers(
        loss_barrier=float(max(loss_gap.max(), 0.0)),
        accuracy_barrier=float(max(acc_gap.max(), 0.0)),
        avg_endpoint_accuracy=float((aa + ab) / 2),
        interp_accuracy=float(np.interp(0.5, alpha[order], acc[order])),
        avg_endpoint_loss=float((la + lb) / 2),
        interp_loss=float(np.interp(0.5, alpha[order], loss[order])),
        argmax_alpha_loss=float(alpha[int(np.argmax(loss_gap))]),
        argmax_alpha_accuracy=float(alpha[int(np.argmax(acc_gap))]),
    )


def fuse(eval_fn: EvalFn, stacked: PyTree, data: tuple[jax.Array, jax.Array], weights: Any = None
         ) -> dict[str, Any]:
    """Deprecated: :func:`tna_jax.fusion.uniform_soup` computes the same soup, typed.

    Returns the pre-0.2 dict ``{"fused", "fused_loss", "fused_accuracy", "individual_loss",
    "individual_accuracy", "mean_individual_loss", "mean_individual_accuracy",
    "accuracy_barrier", "loss_barrier"}`` built from the soup, with a `DeprecationWarning`.

    Args:
      eval_fn: the evaluation of one model.
      stacked: the K models stacked on a leading axis.
      data: ``(x, y)``.
      weights: per-model weights (None: uniform).

    Returns:
      The dict above.
    """
    deprecation.warn("tna_jax.lmc.fuse", "tna_jax.fusion.uniform_soup(eval_fn, stacked, data, weights=...)")
    from tna_jax.fusion import soups  # fusion builds on lmc: imported when used

    soup = soups.uniform_soup(eval_fn, stacked, data, weights=weights)
    return {"fused": soup.params, **soup.fusion_numbers()}
