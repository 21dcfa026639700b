"""Activation matching (Tatro et al. 2020 "neuron alignment"; Ainsworth et al. 2023, §3.1).

Two networks trained from different seeds learn similar features in different orders. Activation
matching pairs unit ``i`` of A with unit ``j`` of B when their activations over the same inputs
are most correlated, layer by layer:

    P_ℓ = argmax_P Σ_i corr(a_i, b_{P(i)}),
    corr(a_i, b_j) = (E[a_i b_j] − E[a_i] E[b_j]) / (σ(a_i) σ(b_j) + ε),

one exact linear assignment problem per permutation (no coordinate descent: the layers are
independent given the data).

**Which activations.** For every permutation of the spec (:func:`tna_jax.align.analyze`), the
activations that carry its units *and are fed into a weight contraction* (a dense layer,
convolution or attention product contracting those units): in an MLP the post-nonlinearity
hidden activations (the inputs of the next layer, as in both papers); in a ResNet the inputs of
the convolutions (so a residual stream sums the correlations of every block input on the
stream, and of the pooled features the classifier reads); in a transformer the LayerNorm outputs
that feed attention and the MLP, the attention queries and keys (head dimension, per head) and
the per-head attention outputs that feed the output projection. Spatial and sequence positions
count as extra samples. A permutation whose units no contraction reads keeps the identity.

The statistics are accumulated over the data in batches (one jitted ``lax.scan``); examples that
do not fill the last batch are left out.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import tree as tree_lib
from tna_jax.align.derive import Analysis, FeaturePoint, analyze, eval_flat
from tna_jax.align.lap import Solver, nested_value, solve_assignment, solve_nested
from tna_jax.align.spec import identity_permutation
from tna_jax.align.weight_matching import MatchResult

PyTree = Any

__all__ = ["activation_matching", "activation_correlations"]


def _units(value: jax.Array, fp: FeaturePoint) -> jax.Array:
    y = jnp.reshape(value, fp.factors).astype(jnp.float32)
    if fp.parent_axis is None:
        y = jnp.moveaxis(y, fp.axis, -1)
        return y.reshape(-1, y.shape[-1])
    y = jnp.moveaxis(y, (fp.parent_axis, fp.axis), (-2, -1))
    return y.reshape(-1, y.shape[-2] * y.shape[-1])


def _check_data(data: Any, batch_size: int) -> jax.Array:
    x = data[0] if isinstance(data, (tuple, list)) else data
    if not hasattr(x, "shape"):
        raise TypeError(f"data must be an array x or a pair (x, y); got {type(data).__name__}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    if x.shape[0] < 2:
        raise ValueError(f"activation statistics need at least 2 examples; data has {x.shape[0]}.")
    return x


@functools.lru_cache(maxsize=32)
def _stats_fn(analysis: Analysis):
    jx, consts = analysis.jaxpr.jaxpr, analysis.jaxpr.consts
    points = [(name, fp) for name, fps in analysis.features.items() for fp in fps]
    capture = frozenset(fp.var for _, fp in points)

    def one(leaves_a, leaves_b, xb):
        _, ca = eval_flat(jx, consts, [*leaves_a, xb], capture)
        _, cb = eval_flat(jx, consts, [*leaves_b, xb], capture)
        out = []
        for _, fp in points:
            fa, fb = _units(ca[fp.var], fp), _units(cb[fp.var], fp)
            out.append((fa.sum(0), fb.sum(0), (fa * fa).sum(0), (fb * fb).sum(0), fa.T @ fb,
                        jnp.asarray(fa.shape[0], jnp.float32)))
        return out

    def run(leaves_a, leaves_b, xs):
        init = jax.tree.map(jnp.zeros_like, jax.eval_shape(one, leaves_a, leaves_b, xs[0]))

        def body(carry, xb):
            return jax.tree.map(jnp.add, carry, one(leaves_a, leaves_b, xb)), None

        sums, _ = jax.lax.scan(body, init, xs)
        return sums

    return jax.jit(run), points


def activation_correlations(net: Any, a: PyTree, b: PyTree, data: Any, *, batch_size: int = 256,
                            eps: float = 1e-6) -> tuple[Analysis, dict[str, np.ndarray]]:
    """Correlation matrices between the units of A and B, summed over the activations that carry
    each permutation (see the module docstring).

    Returns:
      ``(analysis, {perm: corr})`` with ``corr`` of shape ``(n, n)`` for a plain permutation and
      ``(g, d, g, d)`` for a nested one (its parent's own points, if any, under the parent).
    """
    x = _check_data(data, batch_size)
    tree_lib.check_same_structure(a, b, names=("a", "b"))
    n = int(x.shape[0])
    bs = min(int(batch_size), n)
    nb = n // bs
    analysis = analyze(net, a, batch_size=bs)
    spec = analysis.spec
    spec.check_variables(a, argument="a")
    # In the spec's order (the model's), so the error names the first layer that is short of data.
    for name in (n for n in spec.names if n in analysis.features):
        fps = analysis.features[name]
        units = spec.size[name] * (spec.size[spec.parent[name]] if spec.parent[name] else 1)
        for fp in fps:
            other = int(np.prod(fp.factors)) // units
            samples = nb * other
            if samples < units:
                raise ValueError(
                    f"data is too small for activation statistics: permutation {name!r} has {units} units "
                    f"but {n} examples give {samples} samples of them (batches of {bs}); pass at least "
                    f"{int(np.ceil(units / max(other // bs, 1)))} examples.")
    fn, points = _stats_fn(analysis)
    leaves_a = [x_ for _, x_ in tree_lib.named_leaves(a)]
    leaves_b = [x_ for _, x_ in tree_lib.named_leaves(b)]
    xs = jnp.reshape(x[: nb * bs], (nb, bs, *x.shape[1:]))
    sums = jax.device_get(fn(leaves_a, leaves_b, xs))
    corr: dict[str, np.ndarray] = {}
    for (name, fp), (sa, sb, ssa, ssb, cross, count) in zip(points, sums):
        sa, sb, ssa, ssb, cross = (np.asarray(t, np.float64) for t in (sa, sb, ssa, ssb, cross))
        ma, mb = sa / count, sb / count
        va = np.maximum(ssa / count - ma**2, 0.0)
        vb = np.maximum(ssb / count - mb**2, 0.0)
        c = (cross / count - np.outer(ma, mb)) / (np.outer(np.sqrt(va), np.sqrt(vb)) + eps)
        if fp.parent_axis is not None:
            g = spec.size[spec.parent[name]]
            d = spec.size[name]
            c = c.reshape(g, d, g, d)
        corr[name] = corr.get(name, 0.0) + c
    return analysis, corr


def activation_matching(net: Any, a: PyTree, b: PyTree, data: Any, *, batch_size: int = 256,
                        eps: float = 1e-6, solver: str | Solver = "auto") -> MatchResult:
    """Permutes model B's hidden units to match model A's activations (correlation + assignment).

    Args:
      net: the model (a :class:`tna_jax.models.Net`).
      a, b: the two models' variables.
      data: inputs ``x`` or a pair ``(x, y)`` (labels unused), e.g. a slice of the training set.
      batch_size: examples per forward pass; ``len(x) // batch_size`` full batches are used.
      eps: added to ``σ_a σ_b`` (dead units correlate 0 with everything).
      solver: the exact assignment solver (see `tna_jax.align.lap`).

    Returns:
      a `MatchResult` (the same type as `weight_matching`'s): ``perm`` (``{name: index array}``
      for ``apply_permutation(permutation_spec(net), perm, b)``), ``iterations=1``,
      ``converged=True``, ``objective`` = the summed correlation of matched units before and
      after (``[identity, perm]``) and ``solves`` (assignment problems solved). Until version
      0.1 this function returned the ``perm`` dict itself; read ``.perm`` instead.

    Raises:
      ValueError: fewer than 2 examples, or fewer samples of a permutation's units than units
        (the message names the permutation); models of different structure.

    Examples:
      >>> import jax
      >>> from tna_jax import models
      >>> from tna_jax.align import permutation_spec, random_permutation, apply_permutation
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (40,), 10)
      >>> spec = permutation_spec(net)
      >>> a = net.init(jax.random.key(0))
      >>> true = random_permutation(spec, jax.random.key(1))
      >>> b = apply_permutation(spec, true, a)
      >>> x = jax.random.normal(jax.random.key(2), (64, 40))
      >>> perm = activation_matching(net, a, b, x, batch_size=32).perm
      >>> bool((true["dense_0"][perm["dense_0"]] == jax.numpy.arange(8)).all())
      True
    """
    analysis, corr = activation_correlations(net, a, b, data, batch_size=batch_size, eps=eps)
    spec = analysis.spec
    perm = identity_permutation(spec)
    before = after = 0.0
    solves = 0
    for group, kids in spec.groups():
        g = spec.size[group]
        if not kids:
            if group in corr:
                c = np.asarray(corr[group], np.float64)
                perm[group], value = solve_assignment(c, solver)
                before, after, solves = before + float(np.trace(c)), after + value, solves + 1
            continue
        c0 = np.asarray(corr.get(group, np.zeros((g, g))), np.float64)
        cc = {k: np.asarray(corr[k], np.float64) for k in kids if k in corr}
        if not cc and group not in corr:
            continue
        before += nested_value(c0, cc, perm[group], {k: perm[k] for k in kids})
        parent, children, value = solve_nested(c0, cc, solver)
        after, solves = after + value, solves + 1 + sum(g * g for _ in cc)
        perm[group] = parent
        perm.update(children)
    return MatchResult(perm={k: np.asarray(v, np.int32) for k, v in perm.items()}, iterations=1, converged=True,
                       objective=[before, after], solves=solves)
