"""BatchNorm statistics of a model that was not trained as such (an interpolation, a soup, an
aligned or merged model): its running statistics are not those of its own activations (variance
collapse, Jordan et al. 2023, "REPAIR"). `reset_bn_stats` recomputes them from data and
`with_bn_reset` wraps an `EvalFn` so that every evaluated point is reset first."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import tree as tree_lib
from tna_jax.evaluation import EvalFn

PyTree = Any

__all__ = ["reset_bn_stats", "with_bn_reset"]


_MOMENTS = "bn_moments"


def _feature_axes(ndim: int, axis: Any) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def _capture_moments(next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
    """Flax method interceptor: records the mean, the mean of squares and the count of every
    ``nn.BatchNorm``'s input (over its reduction axes) in the ``bn_moments`` collection."""

    module = context.module
    if isinstance(module, nn.BatchNorm) and context.method_name == "__call__" and not module.is_initializing():
        x = args[0] if args else kwargs["x"]
        feat = _feature_axes(x.ndim, module.axis)
        red = tuple(i for i in range(x.ndim) if i not in feat)
        x32 = jnp.asarray(x, jnp.float32)
        count = float(np.prod([x.shape[i] for i in red]))
        if module.has_variable(_MOMENTS, "mean"):
            raise ValueError(f"BatchNorm module {'/'.join(module.path)} is called more than once per forward "
                             "pass; reset_bn_stats supports one call per module.")
        module.put_variable(_MOMENTS, "mean", jnp.mean(x32, axis=red))
        module.put_variable(_MOMENTS, "mean_sq", jnp.mean(jnp.square(x32), axis=red))
        module.put_variable(_MOMENTS, "count", jnp.asarray(count, jnp.float32))
    return next_fun(*args, **kwargs)


def _batch_moments(net: Any, variables: PyTree, xb: jax.Array, rng: jax.Array | None) -> PyTree:

    with nn.intercept_methods(_capture_moments):
        _, state = net.module.apply(variables, xb, train=True, rngs=None if rng is None else {"dropout": rng},
                                    mutable=["batch_stats", _MOMENTS])
    return state.get(_MOMENTS, {})


def reset_bn_stats(net: Any, variables: PyTree, data: Any, *, batch_size: int = 500,
                   num_batches: int | None = None, variance: str = "population",
                   rng: jax.Array | None = None) -> PyTree:
    """`variables` with every BatchNorm's running statistics recomputed from the inputs of `data`.

    The one BatchNorm reset of tna_jax: :func:`with_bn_reset` (LMC paths, soups) and
    ``tna_jax.align`` (curves, alignment comparisons) call it.

    The data is cut into ``B = num_batches`` (default: all full batches; the remainder of
    ``len(x) % batch_size`` examples is dropped, one batch of ``len(x)`` when ``len(x) <
    batch_size``) batches of ``n = batch_size`` examples. Each batch goes through the network in
    training mode, so every BatchNorm normalises with the batch's own statistics (exactly like
    PyTorch's ``model.train()`` forward passes in REPAIR's / git-re-basin's ``reset_bn_stats``),
    and for every BatchNorm the batch mean μ_b and mean of squares s_b of its input are recorded
    over its reduction axes (batch and, for convolutions, space: m elements per feature). Then

    * ``mean = (1/B) Σ_b μ_b``,
    * ``variance="population"`` (default): ``var = (1/B) Σ_b s_b − mean²``, the population
      (biased) variance over all B·m inputs — what Flax's BatchNorm stores (it keeps biased
      variances) when the statistics are exact;
    * ``variance="pytorch"``: ``var = (1/B) Σ_b (s_b − μ_b²) · m / (m − 1)``, the average of the
      per-batch unbiased variances: exactly what PyTorch's ``BatchNorm(momentum=None)``
      cumulative moving average holds after B equal batches (``reset_running_stats()`` then one
      pass over the loader), i.e. REPAIR's and git-re-basin's reset.

    Both have the same mean; the variances differ by the law of total variance,
    population = mean of biased batch variances + variance of the batch means, and by the factor
    m / (m − 1): for m ≥ 100 the two agree to about 1 %. With one batch ``population`` is the
    exact batch statistic. Pure and jittable: ``jax.vmap`` over interpolated models (α) works.

    Args:
      net: the :class:`tna_jax.models.Net` (its Flax module must use ``flax.linen.BatchNorm``).
      variables: ``{"params", "batch_stats"}`` of one model (e.g. an interpolated one).
      data: inputs ``x`` or a pair ``(x, y)`` (labels unused) to compute the statistics from
        (training data, as in the papers).
      batch_size: examples per forward pass (the BatchNorm batch size, as in training).
      num_batches: use only the first this many batches (None = all full batches).
      variance: "population" or "pytorch" (see above).
      rng: dropout key for models with dropout (None = no dropout key).

    Returns:
      `variables` with ``batch_stats`` replaced (params unchanged).

    Raises:
      ValueError: a model without ``batch_stats``, empty data, ``batch_size``/``num_batches`` < 1,
        more batches than `x` holds, an unknown `variance`, or batch statistics that no
        ``nn.BatchNorm`` produced.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from tna_jax.models import Net
      >>> class Tiny(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=False):
      ...         return nn.BatchNorm(use_running_average=not train, name="bn")(x)
      >>> net = Net("tiny", Tiny(), (1,), 1)
      >>> v = net.init(jax.random.key(0))
      >>> x = jnp.array([[1.0], [3.0], [5.0], [7.0]])
      >>> new = reset_bn_stats(net, v, x, batch_size=2)  # batches {1, 3} and {5, 7}
      >>> new["batch_stats"]["bn"]["mean"].tolist(), new["batch_stats"]["bn"]["var"].tolist()
      ([4.0], [5.0])
      >>> reset_bn_stats(net, v, x, batch_size=2, variance="pytorch")["batch_stats"]["bn"]["var"].tolist()
      [2.0]
    """
    x = data[0] if isinstance(data, (tuple, list)) else data
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        raise ValueError("reset_bn_stats needs variables with 'batch_stats' (a model with BatchNorm); got "
                         f"collections {sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__}.")
    if variance not in ("population", "pytorch"):
        raise ValueError(f"variance must be 'population' or 'pytorch'; got {variance!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    n = int(np.shape(x)[0]) if np.ndim(x) else 0
    if n == 0:
        raise ValueError(f"x is empty (shape {np.shape(x)}): reset_bn_stats needs at least one example.")
    bs = min(int(batch_size), n)
    available = n // bs
    if num_batches is None:
        nb = available
    elif isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer or None; got {num_batches!r}.")
    elif num_batches > available:
        raise ValueError(f"num_batches={num_batches} exceeds the {available} full batches of {bs} in x "
                         f"({n} examples).")
    else:
        nb = int(num_batches)
    xb = jnp.reshape(jnp.asarray(x)[: nb * bs], (nb, bs, *np.shape(x)[1:]))

    probe = jax.eval_shape(lambda v, x0: _batch_moments(net, v, x0, rng), variables, xb[0])
    stats = variables["batch_stats"]
    stat_modules = {n.rsplit("/", 1)[0] for n in tree_lib.leaf_names(stats)}
    got = {n.rsplit("/", 1)[0] for n in tree_lib.leaf_names(probe)}
    if stat_modules - got:
        missing = sorted(stat_modules - got)[0]
        raise ValueError(f"batch_stats of module {missing!r} were not produced by a flax.linen.BatchNorm "
                         "call in training mode; reset_bn_stats cannot recompute them.")

    is_moments = lambda t: isinstance(t, Mapping) and "mean_sq" in t  # noqa: E731

    def with_batch_var(m: PyTree) -> PyTree:
        # The per-batch unbiased variance (s_b − μ_b²) · m / (m − 1), for variance="pytorch".
        return jax.tree.map(lambda t: {**t, "batch_var": (t["mean_sq"] - jnp.square(t["mean"])) * t["count"]
                                       / jnp.maximum(t["count"] - 1.0, 1.0)}, m, is_leaf=is_moments)

    def body(acc, batch):
        return jax.tree.map(jnp.add, acc, with_batch_var(_batch_moments(net, variables, batch, rng))), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(with_batch_var, probe))
    sums, _ = jax.lax.scan(body, zeros, xb)

    def new_stats(path_stats: Mapping[str, Any], path: str) -> dict[str, Any]:
        node = sums
        for part in path.split("/"):
            node = node[part]
        mean = node["mean"] / nb
        if variance == "population":
            var = jnp.maximum(node["mean_sq"] / nb - jnp.square(mean), 0.0)
        else:
            var = node["batch_var"] / nb
        return {"mean": mean.astype(path_stats["mean"].dtype).reshape(path_stats["mean"].shape),
                "var": var.astype(path_stats["var"].dtype).reshape(path_stats["var"].shape)}

    def rebuild(node: Any, prefix: str) -> Any:
        if isinstance(node, Mapping) and "mean" in node and "var" in node and not isinstance(node["mean"], Mapping):
            return {**node, **new_stats(node, prefix)}
        return {k: rebuild(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in node.items()}

    return {**variables, "batch_stats": rebuild(stats, "")}


def with_bn_reset(net: Any, eval_fn: EvalFn, x_reset: jax.Array, *, batch_size: int = 500,
                  num_batches: int | None = None, variance: str = "population") -> EvalFn:
    """``eval_fn`` that first recomputes BatchNorm statistics from `x_reset` (:func:`reset_bn_stats`).

    Use it in place of `eval_fn` in :func:`lmc_path`, :func:`pairwise_barriers`,
    :func:`layerwise_lmc` or :func:`fuse` to evaluate every interpolated model after a BN
    reset (the "BN reset" variant of LMC in REPAIR and git-re-basin). Endpoints are reset too,
    so the barrier compares like with like. The result is pure and vmappable over α; `x_reset`
    is closed over (a constant of the compiled program).

    Args:
      net: the model (:class:`tna_jax.models.Net`) with BatchNorm.
      eval_fn: evaluation of one model.
      x_reset: the inputs the statistics are recomputed from (training data).
      batch_size, num_batches, variance: as in :func:`reset_bn_stats`.

    Returns:
      ``eval_fn(variables, x, y)`` with the reset applied to `variables` first.

    Raises:
      ValueError: `net` has no BatchNorm statistics, or `x_reset` is empty.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from tna_jax.models import Net
      >>> class Tiny(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=False):
      ...         return nn.BatchNorm(use_running_average=not train, name="bn")(x)
      >>> net = Net("tiny", Tiny(), (1,), 1)
      >>> def eval_fn(v, x, y):  # reports the running mean it evaluates with
      ...     return {"loss": v["batch_stats"]["bn"]["mean"][0], "accuracy": jnp.float32(1.0)}
      >>> reset_eval = with_bn_reset(net, eval_fn, jnp.array([[2.0], [4.0]]), batch_size=2)
      >>> float(reset_eval(net.init(jax.random.key(0)), None, None)["loss"])
      3.0
    """
    if not getattr(net, "has_batch_stats", False):
        raise ValueError(f"with_bn_reset needs a net with BatchNorm statistics; {getattr(net, 'name', net)!r} has none.")
    if np.ndim(x_reset) == 0 or np.shape(x_reset)[0] == 0:
        raise ValueError(f"x_reset is empty (shape {np.shape(x_reset)}): at least one example is needed.")
    x_reset = jnp.asarray(x_reset)

    def reset_eval(variables: PyTree, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        fresh = reset_bn_stats(net, variables, x_reset, batch_size=batch_size, num_batches=num_batches,
                               variance=variance)
        return eval_fn(fresh, x, y)

    return reset_eval
