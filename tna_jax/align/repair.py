"""REPAIR (Jordan et al. 2023) and BatchNorm statistics reset for interpolated networks.

Averaging the weights of two aligned networks shrinks the variance of their hidden units
("variance collapse"): the units of θ_α = (1 − α) θ_A + α θ_B are less active than those of
either endpoint, and the effect compounds with depth. REPAIR measures, per channel ``c`` of
every hidden layer's pre-activation, the mean and standard deviation in A, in B and in θ_α on
the same data, and rescales θ_α's channel to the interpolated statistics

    μ_c^* = (1 − α) μ_c^A + α μ_c^B,     σ_c^* = (1 − α) σ_c^A + α σ_c^B,
    y_c ← σ_c^* (y_c − μ_c^α) / σ_c^α + μ_c^*,

folding the affine correction into the layer's own weights, so the result is an ordinary set of
variables of the same model. Layers are repaired in call order, each measured after the
corrections of the layers before it (exact statistics). When the data fit in one batch this
takes one forward pass: each corrected output is replaced by its correction as the pass computes
it (``flax.linen.intercept_methods``), so every later layer is measured on corrected inputs;
otherwise one pass over the batches per layer (about L/2 forward passes for L layers, since a
pass stops at its layer).

Which outputs are corrected (the *points*): every dense/convolution layer whose output units are
a (non-nested) permutation of the spec, i.e. every hidden layer but not the classifier. When the
layer has a normalisation ``<layer>_norm`` (the naming convention of :mod:`tna_jax.models`), the
normalised output is the pre-activation and the correction goes into the norm's scale and bias
(for BatchNorm in evaluation mode and for LayerNorm alike); otherwise into the layer's kernel
and bias.

The simpler repair for BatchNorm networks, recomputing the running statistics of the
interpolated network on data (the statistics of θ_α are not the interpolation of the endpoints'
statistics), is :func:`tna_jax.norm_stats.reset_bn_stats`; ``reset_batch_stats`` here is its
deprecated former name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import deprecation, norm_stats
from tna_jax import tree as tree_lib
from tna_jax.align.derive import analyze

PyTree = Any

__all__ = ["RepairPoint", "repair_points", "make_repair", "repair", "output_stats"]


@dataclasses.dataclass(frozen=True)
class RepairPoint:
    """One corrected output.

    Attributes:
      layer: module path of the weight layer (``"dense_0"``, ``"block1_0/conv1"``).
      target: the module whose output is corrected (``layer`` or ``layer + "_norm"``).
      channels: number of channels (the last axis of the output).
    """

    layer: str
    target: str
    channels: int


def _get(tree: Any, path: str) -> Any:
    node = tree
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict[str, Any], path: str, leaf: str, value: Any) -> dict[str, Any]:
    parts = path.split("/")
    out = dict(tree)
    node = out
    for part in parts:
        node[part] = dict(node[part])
        node = node[part]
    node[leaf] = value
    return out


def repair_points(net: Any, variables: PyTree | None = None) -> list[RepairPoint]:
    """The outputs :func:`repair` corrects, in call order (see the module docstring).

    Examples:
      >>> from tna_jax import models
      >>> net = models.build({"name": "mlp", "depth": 2, "width": 16, "norm": "layer"}, (40,), 10)
      >>> [(p.layer, p.target) for p in repair_points(net)]
      [('dense_0', 'dense_0_norm'), ('dense_1', 'dense_1_norm')]
    """
    analysis = analyze(net, variables)
    spec = analysis.spec
    leaves = spec.leaves
    params = variables["params"] if variables is not None else jax.eval_shape(net.init, jax.random.key(0))["params"]
    points = []
    for name in analysis.order:
        if not name.startswith("params/") or not name.endswith("/kernel"):
            continue
        lay = leaves.get(name)
        if lay is None:
            continue
        p = lay.perms[-1]
        if p is None or spec.parent[p] is not None or spec.children(p) or lay.factors[-1] != lay.shape[-1]:
            continue
        layer = name[len("params/"):-len("/kernel")]
        norm_name = tree_lib.norm_module(params, layer)
        norm = None if norm_name is None else _get(params, norm_name)
        if isinstance(norm, dict) and "scale" in norm:
            points.append(RepairPoint(layer, norm_name, int(lay.shape[-1])))
        elif norm is None:
            points.append(RepairPoint(layer, layer, int(lay.shape[-1])))
    return points


def _batches(data: Any, batch_size: int, what: str) -> jax.Array:
    x = data[0] if isinstance(data, (tuple, list)) else data
    if not hasattr(x, "shape"):
        raise TypeError(f"data must be an array x or a pair (x, y); got {type(data).__name__}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    n = int(x.shape[0])
    if n < 2:
        raise ValueError(f"{what} needs at least 2 examples to estimate statistics; data has {n}.")
    bs = min(int(batch_size), n)
    nb = n // bs
    return jnp.reshape(x[: nb * bs], (nb, bs, *x.shape[1:]))


def output_stats(net: Any, variables: PyTree, xs: jax.Array, targets: Sequence[str]
                 ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per-channel mean and standard deviation of the outputs of modules `targets` over batches
    ``xs`` of shape ``(num_batches, batch, ...)`` (evaluation mode; jitted, traceable)."""
    return _stats_jit(net, tuple(targets))(variables, xs)


@functools.lru_cache(maxsize=64)
def _stats_jit(net: Any, targets: tuple[str, ...]):
    return jax.jit(functools.partial(_output_stats, net, targets=targets))


def _output_stats(net: Any, variables: PyTree, xs: jax.Array, *, targets: tuple[str, ...]
                  ) -> dict[str, tuple[jax.Array, jax.Array]]:
    wanted = set(targets)

    def keep(mdl: Any, method: str) -> bool:
        return method == "__call__" and "/".join(mdl.scope.path) in wanted

    def one(xb):
        _, state = net.module.apply(variables, xb, train=False, capture_intermediates=keep,
                                    mutable=["intermediates"])
        out = {}
        for t in targets:
            y = _get(state["intermediates"], t)["__call__"][0].astype(jnp.float32)
            y = y.reshape(-1, y.shape[-1])
            out[t] = (y.sum(0), (y * y).sum(0), jnp.asarray(y.shape[0], jnp.float32))
        return out

    def body(carry, xb):
        return jax.tree.map(jnp.add, carry, one(xb)), None

    init = jax.tree.map(jnp.zeros_like, jax.eval_shape(one, xs[0]))
    sums, _ = jax.lax.scan(body, init, xs)
    stats = {}
    for t, (s, ss, n) in sums.items():
        mean = s / n
        stats[t] = (mean, jnp.sqrt(jnp.maximum(ss / n - mean * mean, 0.0)))
    return stats


def _fold(variables: PyTree, point: RepairPoint, scale: jax.Array, shift: jax.Array) -> PyTree:
    params = variables["params"]
    module = _get(params, point.target)
    if point.target != point.layer:  # a normalisation: y = γ n + β  ->  (sγ) n + (sβ + t)
        params = _set(params, point.target, "scale", module["scale"] * scale.astype(module["scale"].dtype))
        if "bias" in module:
            params = _set(params, point.target, "bias",
                          (module["bias"] * scale + shift).astype(module["bias"].dtype))
    else:  # the layer itself: y = x W + b  ->  x (W s) + (s b + t)
        params = _set(params, point.target, "kernel", module["kernel"] * scale.astype(module["kernel"].dtype))
        if "bias" in module:
            params = _set(params, point.target, "bias",
                          (module["bias"] * scale + shift).astype(module["bias"].dtype))
    return {**variables, "params": params}


def _correct_in_one_pass(net: Any, m: PyTree, x: jax.Array, pts: Sequence[RepairPoint],
                         target: dict[str, tuple[jax.Array, jax.Array]], eps: float) -> PyTree:
    """REPAIR of `m` with one forward pass over `x` (one batch): each target's output is corrected
    to the target statistics as it is computed, and the corrections are folded afterwards."""
    wanted = {p.target for p in pts}
    found: dict[str, tuple[jax.Array, jax.Array]] = {}

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        path = "/".join(context.module.scope.path)
        if context.method_name != "__call__" or path not in wanted or path in found:
            return y
        flat = y.astype(jnp.float32).reshape(-1, y.shape[-1])
        mean = flat.mean(0)
        sd = jnp.sqrt(jnp.maximum((flat * flat).mean(0) - mean * mean, 0.0))
        scale = target[path][1] / (sd + eps)
        found[path] = (scale, target[path][0] - scale * mean)
        return (y.astype(jnp.float32) * found[path][0] + found[path][1]).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        net.module.apply(m, x, train=False)
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"REPAIR points {missing} were not called by the model's forward pass.")
    for p in pts:
        m = _fold(m, p, *found[p.target])
    return m


def make_repair(net: Any, a: PyTree, b: PyTree, data: Any, *, batch_size: int = 500, eps: float = 1e-5,
                points: Sequence[RepairPoint] | None = None) -> Callable[[Any], PyTree]:
    """``fn(alpha) -> variables``: REPAIR of the interpolation between `a` and `b` at α.

    The endpoints' statistics are computed once here; ``fn`` is pure and traceable (``jit`` it,
    ``vmap`` or ``lax.map`` it over α). `b` should already be aligned to `a`.

    Args:
      net: the model.
      a, b: the endpoint variables (same structure).
      data: inputs ``x`` or ``(x, y)`` for the statistics (training data).
      batch_size: examples per forward pass (full batches only). With ``len(x) <= batch_size``
        the whole correction is one forward pass (see the module docstring); otherwise one pass
        over the batches per corrected layer.
      eps: added to σ^α.
      points: the outputs to correct (default :func:`repair_points`).

    Raises:
      ValueError: fewer than 2 examples; models of different structure.
    """
    tree_lib.check_same_structure(a, b, names=("a", "b"))
    xs = _batches(data, batch_size, "REPAIR")
    pts = list(points) if points is not None else repair_points(net, a)
    targets = [p.target for p in pts]
    stats_a = output_stats(net, a, xs, targets)
    stats_b = output_stats(net, b, xs, targets)

    def fn(alpha: Any) -> PyTree:
        alpha = jnp.asarray(alpha, jnp.float32)
        m = tree_lib.lerp(a, b, alpha)
        if xs.shape[0] == 1:
            target = {t: ((1 - alpha) * stats_a[t][0] + alpha * stats_b[t][0],
                          (1 - alpha) * stats_a[t][1] + alpha * stats_b[t][1]) for t in targets}
            return _correct_in_one_pass(net, m, xs[0], pts, target, eps)
        for p in pts:
            mu_m, sd_m = output_stats(net, m, xs, [p.target])[p.target]
            mu_t = (1 - alpha) * stats_a[p.target][0] + alpha * stats_b[p.target][0]
            sd_t = (1 - alpha) * stats_a[p.target][1] + alpha * stats_b[p.target][1]
            scale = sd_t / (sd_m + eps)
            m = _fold(m, p, scale, mu_t - scale * mu_m)
        return m

    return fn


def repair(net: Any, a: PyTree, b: PyTree, alpha: float, data: Any, *, batch_size: int = 500,
           eps: float = 1e-5) -> PyTree:
    """The REPAIRed interpolation of `a` and `b` at `alpha` (see :func:`make_repair`).

    Examples:
      >>> import jax
      >>> from tna_jax import models
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 3)
      >>> a, b = net.init(jax.random.key(0)), net.init(jax.random.key(1))
      >>> x = jax.random.normal(jax.random.key(2), (64, 4))
      >>> mid = repair(net, a, b, 0.5, x, batch_size=32)
      >>> mu, sd = output_stats(net, mid, x.reshape(2, 32, 4), ["dense_0"])["dense_0"]
      >>> mu_a, sd_a = output_stats(net, a, x.reshape(2, 32, 4), ["dense_0"])["dense_0"]
      >>> mu_b, sd_b = output_stats(net, b, x.reshape(2, 32, 4), ["dense_0"])["dense_0"]
      >>> bool(jax.numpy.allclose(sd, (sd_a + sd_b) / 2, atol=1e-4))
      True
    """
    x = data[0] if isinstance(data, (tuple, list)) else data
    _batches(x, batch_size, "REPAIR")  # checks before compiling
    return _repair_jit(net, int(batch_size), float(eps))(a, b, jnp.asarray(alpha, jnp.float32), x)


@functools.lru_cache(maxsize=16)
def _repair_jit(net: Any, batch_size: int, eps: float):
    return jax.jit(lambda a, b, alpha, x: make_repair(net, a, b, x, batch_size=batch_size, eps=eps)(alpha))


def reset_batch_stats(net: Any, variables: PyTree, data: Any, *, batch_size: int = 500) -> PyTree:
    """Deprecated: use :func:`tna_jax.norm_stats.reset_bn_stats` (the one BatchNorm reset).

    Same numbers as ``norm_stats.reset_bn_stats(net, variables, data, batch_size=batch_size,
    rng=jax.random.key(0))``, jitted; returns `variables` unchanged when they hold no
    ``batch_stats``.

    Raises:
      ValueError: fewer than 2 examples.
    """
    deprecation.warn("tna_jax.align.reset_batch_stats", "tna_jax.norm_stats.reset_bn_stats")
    if "batch_stats" not in variables:
        return variables
    x = data[0] if isinstance(data, (tuple, list)) else data
    _batches(x, batch_size, "reset_batch_stats")  # checks before compiling
    return _reset_jit(net, int(batch_size))(variables, x)


@functools.lru_cache(maxsize=16)
def _reset_jit(net: Any, batch_size: int):
    def reset(variables: PyTree, x: jax.Array) -> PyTree:  # dropout, if any, with a fixed key
        return norm_stats.reset_bn_stats(net, variables, x, batch_size=batch_size, rng=jax.random.key(0))

    return jax.jit(reset)
