"""What a function reads, and in which order: the layer order of a model from how it is called.

A model's parameters come as nested dicts (Flax Linen) or an ``nnx.State``; JAX sorts dict keys
whenever a tree passes through a transformation, and ``nnx.State`` sorts them always, so a dict's
order says nothing reliable about which layer comes first. The computation does: tracing the
model once shows the order in which it reads its weights. Everything here works on any pure
function of a parameter tree (Linen ``apply``, an NNX ``merge``-and-call, Haiku, plain JAX).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.extend as jex

from tna_jax import tree as tree_lib

PyTree = Any

__all__ = ["first_reads", "layer_order", "nnx_layer_order"]


def _sub_jaxprs(eqn: Any) -> list[Any]:
    """The jaxprs nested in an equation (``pjit``, ``custom_jvp_call``, ``scan``, ``cond``, ...)."""
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            jaxpr = getattr(item, "jaxpr", item)
            if hasattr(jaxpr, "eqns") and hasattr(jaxpr, "invars"):
                found.append(jaxpr)
    return found


def _walk(jaxpr: Any, watched: dict[Any, int], first: dict[int, int], clock: list[int]) -> None:
    """Records, for each watched variable, the position of the first equation that reads it.

    Equations are numbered in program order, depth first: the body of a nested call is numbered
    where the call stands. A watched variable passed into a nested jaxpr is followed inside it, so
    a model wrapped in ``jit`` or ``remat`` is still read layer by layer.
    """
    for eqn in jaxpr.eqns:
        clock[0] += 1
        here = clock[0]
        inner_watch: dict[Any, int] = {}
        subs = _sub_jaxprs(eqn)
        for pos, var in enumerate(eqn.invars):
            leaf = watched.get(var) if isinstance(var, jex.core.Var) else None
            if leaf is None:
                continue
            if not subs:
                first.setdefault(leaf, here)
                continue
            for sub in subs:
                # Call-like primitives pass their operands through in order; where the counts
                # differ (cond's predicate, scan's consts/carry split), align from the end.
                offset = len(sub.invars) - len(eqn.invars)
                index = pos + offset if offset >= 0 else pos
                if 0 <= index < len(sub.invars):
                    inner_watch[sub.invars[index]] = leaf
                else:
                    first.setdefault(leaf, here)
        for sub in subs:
            _walk(sub, {**inner_watch}, first, clock)
        for leaf in set(inner_watch.values()):
            first.setdefault(leaf, here)  # passed in but never read inside: the call reads it


def first_reads(fn: Callable[[PyTree], Any], tree: PyTree) -> dict[str, int]:
    """Where `fn` first reads each leaf of `tree`: ``{leaf path: position}``, smaller is earlier.

    `fn` is traced once with abstract values (nothing is computed). Leaves that `fn` never
    reads are left out.

    Args:
      fn: a function of `tree` alone (close over inputs, e.g. ``lambda p: model.apply({"params":
        p}, x)``).
      tree: the tree `fn` takes (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      A dict from '/'-joined leaf paths to the position of the first equation that reads them.

    Raises:
      ValueError: `fn` takes more inputs than the leaves of `tree`.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"a": jnp.ones(2), "b": jnp.ones(2)}
      >>> reads = first_reads(lambda p: jnp.sin(p["b"]) + p["a"], params)
      >>> sorted(reads, key=reads.get)
      ['b', 'a']
    """
    names = tree_lib.leaf_names(tree)
    closed = jax.make_jaxpr(fn)(tree)
    jaxpr = closed.jaxpr
    if len(jaxpr.invars) != len(names):
        raise ValueError(f"fn must take the tree as its only argument ({len(names)} leaves); its trace has "
                         f"{len(jaxpr.invars)} inputs.")
    watched = {var: i for i, var in enumerate(jaxpr.invars)}
    first: dict[int, int] = {}
    _walk(jaxpr, watched, first, [0])
    return {names[i]: pos for i, pos in first.items()}


def layer_order(fn: Callable[[PyTree], Any], params: PyTree,
                weight_names: Iterable[str] = ("kernel", "embedding")) -> list[str]:
    """The weight layers of a model in the order the model calls them (input to output).

    A layer is a module holding a leaf named in `weight_names`; layers are ordered by the first
    read of that leaf when `fn` runs. This is what ``include="first"``/``"last"`` of
    `tna_jax.anchors` and layer-wise LMC need, and what no dict order gives (JAX and
    ``nnx.State`` sort keys).

    Args:
      fn: runs the model on a fixed input as a function of `params` alone, e.g.
        ``lambda p: model.apply({"params": p}, x)`` for Flax Linen; for NNX see
        `nnx_layer_order`.
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      weight_names: leaf names that make a module a layer.

    Returns:
      Module paths ('/'-joined), from the input to the output.

    Raises:
      ValueError: `params` has no leaf named in `weight_names`, or `fn` reads none of them.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(2, name="z_head")(nn.relu(nn.Dense(4, name="a_body")(x)))
      >>> x = jnp.ones((1, 3))
      >>> params = Net().init(jax.random.key(0), x)["params"]
      >>> layer_order(lambda p: Net().apply({"params": p}, x), params)
      ['a_body', 'z_head']
    """
    weight_names = set(weight_names)
    weights = [n for n in tree_lib.leaf_names(params) if n.rsplit("/", 1)[-1] in weight_names]
    if not weights:
        raise ValueError(f"params hold no weight layer: no leaf is named one of {sorted(weight_names)}.")
    reads = first_reads(fn, params)
    read = [n for n in weights if n in reads]
    if not read:
        raise ValueError("fn reads none of the weight leaves of params; it must run the model on params.")
    layers: dict[str, int] = {}
    for name in read:
        module = name.rsplit("/", 1)[0] if "/" in name else ""
        layers[module] = min(layers.get(module, reads[name]), reads[name])
    return sorted(layers, key=lambda m: (layers[m], tree_lib.natural_key(m)))


def nnx_layer_order(model: Any, *inputs: Any, **kwargs: Any) -> list[str]:
    """`layer_order` of a Flax NNX module called as ``model(*inputs, **kwargs)``.

    The paths are those of ``nnx.state(model, nnx.Param)`` (what ``nnx.Optimizer`` hands to an
    optax transform), so the result can go straight to ``fixed_anchor_mask(layer_order=...)``.

    Args:
      model: an ``nnx.Module``.
      *inputs: example inputs (only their shapes and dtypes matter).
      **kwargs: further keyword arguments of the call.

    Returns:
      Module paths from the input to the output.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.z_stem, self.a_head = nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.a_head(self.z_stem(x))
      >>> nnx_layer_order(Net(nnx.Rngs(0)), jnp.ones((1, 3)))
      ['z_stem', 'a_head']
    """
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(p: PyTree) -> Any:
        return nnx.merge(graphdef, p, rest)(*inputs, **kwargs)

    return layer_order(run, params)
