"""Mode-connecting curves (Garipov et al. 2018; Tatro et al. 2020): a quadratic Bezier curve or a
polygonal chain between two trained endpoints, with a trained control point.

With endpoints θ_A, θ_B and control point θ_C, for t ∈ [0, 1]:

* Bezier:      φ(t) = (1 − t)² θ_A + 2 t (1 − t) θ_C + t² θ_B
* poly-chain:  φ(t) = θ_A + 2t (θ_C − θ_A) for t ≤ ½, θ_C + (2t − 1)(θ_B − θ_C) for t > ½

Only θ_C is trained, to minimise the loss averaged along the curve,
``E_{t ~ U[0,1]} L(φ(t))``: every step draws ``num_t`` values of t and evaluates them on the
same batch (``jax.vmap`` over t on accelerators; one t after the other on CPU, see
:func:`train_curve`). θ_C starts at the midpoint of the line, so an untrained
curve is the straight line. Aligning the endpoints first (``apply_permutation`` of a weight- or
activation-matching permutation to θ_B) gives Tatro et al.'s aligned curves.

Evaluation maps over a grid of t (:func:`tna_jax.chunking.map_points`, chunked), reporting the average and the
minimum accuracy along the curve. BatchNorm networks train with batch statistics; for evaluation
pass ``bn_reset`` to recompute each point's running statistics (Garipov et al. do the same).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tna_jax import chunking
from tna_jax import tree as tree_lib
from tna_jax.data.batching import epoch_indices, gather, steps_per_epoch
from tna_jax.evaluation import cross_entropy
from tna_jax.run_axis import loop_plan
from tna_jax.steps import gradient_step

PyTree = Any

__all__ = ["Curve", "KINDS", "init_curve", "curve_point", "train_curve", "evaluate_curve"]

KINDS = ("bezier", "polychain")


@flax.struct.dataclass
class Curve:
    """A curve between two models (a pytree: ``jit``/``vmap``/orbax see the three variable trees).

    Attributes:
      a, b: the endpoint variables.
      control: the control point θ_C (same structure).
      kind: ``"bezier"`` or ``"polychain"`` (static).
    """

    a: PyTree
    control: PyTree
    b: PyTree
    kind: str = flax.struct.field(pytree_node=False, default="bezier")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}.")


def init_curve(a: PyTree, b: PyTree, kind: str = "bezier") -> Curve:
    """A curve whose control point is the midpoint of the line (so it starts as the line).

    Raises:
      ValueError: unknown kind; endpoints of different structure (the path is named).
    """
    _check_kind(kind)
    tree_lib.check_same_structure(a, b, names=("a", "b"))
    return Curve(a=a, control=tree_lib.lerp(a, b, 0.5), b=b, kind=kind)


def curve_point(curve: Curve, t: Any) -> PyTree:
    """φ(t) (see the module docstring); `t` may be traced.

    Examples:
      >>> import jax.numpy as jnp
      >>> c = init_curve({"w": jnp.zeros(2)}, {"w": jnp.ones(2)})
      >>> c = c.replace(control={"w": jnp.full(2, 2.0)})
      >>> curve_point(c, 0.5)["w"].tolist(), curve_point(c, 0.0)["w"].tolist()
      ([1.25, 1.25], [0.0, 0.0])
    """
    _check_kind(curve.kind)
    t = jnp.asarray(t, jnp.float32)
    if curve.kind == "bezier":
        def one(a, c, b):
            if not jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact):
                return jnp.where(t < 0.5, a, b)
            return ((1 - t) ** 2 * a + 2 * t * (1 - t) * c + t**2 * b).astype(a.dtype)

        return jax.tree.map(one, curve.a, curve.control, curve.b)
    s = jnp.where(t <= 0.5, 2 * t, 2 * t - 1)

    def one(a, c, b):
        if not jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact):
            return jnp.where(t < 0.5, a, b)
        start, end = jnp.where(t <= 0.5, a, c), jnp.where(t <= 0.5, c, b)
        return ((1 - s) * start + s * end).astype(a.dtype)  # exact at t = 0, ½ and 1

    return jax.tree.map(one, curve.a, curve.control, curve.b)


def _xy(data: Any, what: str) -> tuple[jax.Array, jax.Array]:
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{what} must be a pair (x, y); got {type(data).__name__}.")
    x, y = data
    if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{what} must hold the same positive number of inputs and labels; got "
                         f"{x.shape[0]} and {y.shape[0]}.")
    return jnp.asarray(x), jnp.asarray(y)


@functools.lru_cache(maxsize=1)
def _default_optimizer() -> optax.GradientTransformation:
    return optax.adam(1e-3)


@functools.lru_cache(maxsize=32)
def _chunk_fn(net: Any, n: int, batch_size: int, num_t: int, tx: optax.GradientTransformation, steps: int,
              unroll: int | bool, t_chunk: int):
    """``steps`` consecutive steps of one epoch of curve training, jitted and cached (so repeated
    curves compile once). The epoch's batch order and t draws depend on (key, step) only, so an
    epoch cut into chunks takes exactly the steps of an uncut one."""

    def loss_fn(params, curve, xb, yb, ts, rng):
        control = {**curve.control, "params": params}

        def at(t):
            v = curve_point(curve.replace(control=control), t)
            logits, _ = net.apply(v, xb, train=True, rng=rng)
            return cross_entropy(logits, yb).mean()

        # chunks of t in a Python loop, not lax.map: a loop around convolutions is the slow path
        # of XLA:CPU (see train_curve)
        losses = [jax.vmap(at)(ts[i:i + t_chunk]) for i in range(0, num_t, t_chunk)]
        return jnp.concatenate(losses).mean()

    def chunk(params, opt_state, k, start, curve, x, y):
        order_key, t_key = jax.random.split(k)
        rows = jax.lax.dynamic_slice_in_dim(epoch_indices(order_key, n, batch_size), start, steps, axis=0)

        def step(carry, inputs):
            params, opt_state, total = carry
            i, idx = inputs
            ts = jax.random.uniform(jax.random.fold_in(t_key, i), (num_t,))
            loss, params, opt_state = gradient_step(loss_fn, tx, params, opt_state, curve, gather(x, idx),
                                                    gather(y, idx), ts, jax.random.fold_in(k, i))
            return (params, opt_state, total + loss), None

        (params, opt_state, total), _ = jax.lax.scan(step, (params, opt_state, jnp.zeros(())),
                                                     (start + jnp.arange(steps), rows), unroll=unroll)
        return params, opt_state, total

    return jax.jit(chunk)


def train_curve(net: Any, curve: Curve, data: tuple[jax.Array, jax.Array], *, key: jax.Array,
                epochs: int = 10, batch_size: int = 128, num_t: int = 4, t_chunk: int | str = "auto",
                steps_per_call: int = 0, optimizer: optax.GradientTransformation | None = None,
                log: Callable[[str], None] | None = None) -> tuple[Curve, list[dict[str, float]]]:
    """Trains the control point to minimise the loss along the curve.

    Args:
      net: the model (:class:`tna_jax.models.Net`).
      curve: the curve (e.g. :func:`init_curve`); its endpoints stay fixed.
      data: training data ``(x, y)`` (device arrays).
      key: PRNG key for batch order and the sampled t.
      epochs: passes over the data.
      batch_size: examples per step.
      num_t: values of t ~ U[0, 1] per step, all on the same batch; the loss is their mean.
      t_chunk: how many of them are evaluated at once (``jax.vmap``; chunks one after the other
        when fewer than `num_t`). ``"auto"``: all at once on accelerators, one at a time on CPU,
        where XLA's batched matmuls (every t has its own weights) cost about twice a loop.
      steps_per_call: steps per jitted call, as ``train.steps_per_call`` (0 = automatic, see
        :func:`tna_jax.run_axis.loop_plan`: the whole epoch in one scan, or for convolutional
        nets on CPU short fully unrolled chunks). 1 compiles one step only: the fastest start
        when compilation dominates (small images, few epochs).
      optimizer: optax transformation for the control point's parameters (default
        ``optax.adam(1e-3)``); pass the same object to repeated calls to reuse the compiled step.
      log: optional callback for one line per epoch.

    Returns:
      ``(trained curve, [{"epoch", "loss"}, ...])``.

    Raises:
      ValueError: non-positive epochs/batch_size/num_t/t_chunk, negative steps_per_call, batch
        larger than the data.
    """
    x, y = _xy(data, "data")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("num_t", num_t)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, (int, np.integer)) or steps_per_call < 0:
        raise ValueError(f"steps_per_call must be a non-negative integer; got {steps_per_call!r}.")
    n = int(x.shape[0])
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples.")
    tx = optimizer if optimizer is not None else _default_optimizer()
    steps = steps_per_epoch(n, int(batch_size))
    # Convolutional nets on CPU: short fully unrolled chunks, as in training (XLA:CPU runs a
    # convolution's gradient inside a while loop many times slower); otherwise one rolled scan.
    per_call, unroll = loop_plan(net, steps, steps_per_call)
    if t_chunk == "auto":
        t_chunk = 1 if jax.default_backend() == "cpu" else int(num_t)
    if isinstance(t_chunk, bool) or not isinstance(t_chunk, (int, np.integer)) or t_chunk < 1:
        raise ValueError(f"t_chunk must be 'auto' or a positive integer; got {t_chunk!r}.")
    params = curve.control["params"]
    opt_state = tx.init(params)
    history = []
    for e in range(int(epochs)):
        k = jax.random.fold_in(key, e)
        total = 0.0
        for start in range(0, steps, per_call):
            fn = _chunk_fn(net, n, int(batch_size), int(num_t), tx, min(per_call, steps - start), unroll,
                           min(int(t_chunk), int(num_t)))
            params, opt_state, part = fn(params, opt_state, k, jnp.asarray(start, jnp.int32), curve, x, y)
            total = total + part
        loss = float(total) / steps
        history.append({"epoch": e + 1, "loss": float(loss)})
        if log is not None:
            log(f"curve epoch {e + 1}/{epochs}: loss along the curve {float(loss):.4f}")
    return curve.replace(control={**curve.control, "params": params}), history


@functools.lru_cache(maxsize=32)
def _eval_fn(eval_fn: Callable[..., Any], chunk: Any, bn_reset: Callable[[PyTree], PyTree] | None):
    def run(ts, curve, x, y):
        def at(t):
            v = curve_point(curve, t)
            if bn_reset is not None:
                v = bn_reset(v)
            return eval_fn(v, x, y)

        return chunking.map_points(at, ts, chunk)

    return jax.jit(run)


def evaluate_curve(eval_fn: Callable[[PyTree, jax.Array, jax.Array], dict[str, jax.Array]], curve: Curve,
                   data: tuple[jax.Array, jax.Array], ts: Any = None, *, chunk: Any = chunking.AUTO,
                   bn_reset: Callable[[PyTree], PyTree] | None = None) -> dict[str, Any]:
    """Loss and accuracy along the curve, vmapped over t.

    Args:
      eval_fn: ``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for one model
        (:func:`tna_jax.evaluation.make_eval_fn`).
      curve: the curve.
      data: ``(x, y)`` to evaluate on.
      ts: grid of t (default 21 points in [0, 1]).
      chunk: evaluate at most this many t at once (:func:`tna_jax.chunking.map_points`: ``None``
        vmaps every t, ``"auto"`` sizes the chunks from the program's memory, as LMC paths do).
      bn_reset: optional ``variables -> variables`` applied to each point first (e.g.
        ``lambda v: norm_stats.reset_bn_stats(net, v, x_train)`` for BatchNorm networks).

    Returns:
      ``{"t", "loss", "accuracy"}`` (NumPy arrays over t) and ``avg_accuracy``, ``min_accuracy``,
      ``avg_loss``, ``max_loss`` (floats).

    Raises:
      ValueError / TypeError: `data` not a pair of the same positive length, or a bad `chunk`.
    """
    x, y = _xy(data, "data")
    ts = jnp.asarray(np.linspace(0.0, 1.0, 21) if ts is None else ts, jnp.float32)

    chunk = chunking.check_chunk(chunk)
    out = jax.device_get(_eval_fn(eval_fn, chunk, bn_reset)(ts, curve, x, y))
    acc = np.asarray(out["accuracy"], np.float64)
    loss = np.asarray(out["loss"], np.float64)
    return {"t": np.asarray(ts), "loss": loss, "accuracy": acc, "avg_accuracy": float(acc.mean()),
            "min_accuracy": float(acc.min()), "avg_loss": float(loss.mean()), "max_loss": float(loss.max())}
