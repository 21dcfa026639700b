"""Pytree helpers shared by every module: names of leaves, structure checks, lerp and averages.

Everything in tna_jax names a parameter by its '/'-joined path (``"block1/conv1/kernel"``), the
way git-re-basin and Flax's ``traverse_util`` do. These helpers are the one place that turns
JAX key paths into such names, checks that two trees have the same structure (naming the first
path that differs), and does the arithmetic that linear mode connectivity and model fusion need
(``lerp``, ``weighted_mean``). They know nothing about models.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Path = tuple[Any, ...]

__all__ = [
    "path_str",
    "named_leaves",
    "leaf_names",
    "map_with_names",
    "check_same_structure",
    "lerp",
    "weighted_mean",
    "stack",
    "unstack",
    "index",
    "tree_size",
    "tree_bytes",
    "module_order",
    "natural_key",
    "NORM_SUFFIXES",
    "norm_owner",
    "norm_module",
]


# A normalisation module belongs to the layer named without its suffix ("conv1_norm" normalises
# the outputs of "conv1"): anchors group a unit's norm entries with it, layer-wise LMC moves a
# layer with its norm, REPAIR corrects the norm's output. The one place that rule is written.
NORM_SUFFIXES = ("_norm", "_bn", "_ln")


def _key_str(key: Any) -> str | None:
    """One element of a JAX key path as text, or None for elements that carry no name."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        # flax.nnx wraps every array in a Variable whose payload sits under `.value`; the
        # payload is not a separate name a user would write.
        return None if key.name == "value" else key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path: Path) -> str:
    """Joins a JAX key path into a '/'-separated name, e.g. ``"dense_0/kernel"``.

    Args:
      path: a key path from ``jax.tree_util.tree_flatten_with_path`` (dict keys, sequence indices,
        attribute names).

    Returns:
      The name; keys that carry no name are skipped.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"dense_0": {"kernel": jnp.ones((2, 3))}}
      >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
      ['dense_0/kernel']
    """
    parts = [s for s in (_key_str(k) for k in path) if s is not None]
    return "/".join(parts)


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """``[(name, leaf), ...]`` in JAX's canonical flattening order.

    Args:
      tree: any pytree.

    Returns:
      One ``(name, leaf)`` pair per leaf, names as in :func:`path_str`.

    Examples:
      >>> named_leaves({"b": 2, "a": {"w": 1}})
      [('a/w', 1), ('b', 2)]
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    names = _names_by_structure.get(treedef)
    if names is None:  # trees of one structure have the same names: work them out once
        names = tuple(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])
        if len(_names_by_structure) >= 256:
            _names_by_structure.clear()
        _names_by_structure[treedef] = names
    return list(zip(names, leaves))


# named_leaves' cache: tree structure -> leaf names (a cache, not state: bounded, never read
# for anything but the names it was filled with).
_names_by_structure: dict[Any, tuple[str, ...]] = {}


def leaf_names(tree: PyTree) -> list[str]:
    """The '/'-joined names of the leaves of `tree`, in flattening order.

    Args:
      tree: any pytree.

    Returns:
      A list of names (see :func:`named_leaves`).

    Examples:
      >>> leaf_names({"dense": {"kernel": 0, "bias": 0}})
      ['dense/bias', 'dense/kernel']
    """
    return [name for name, _ in named_leaves(tree)]


def map_with_names(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Like ``jax.tree.map`` but ``fn(name, leaf, *other_leaves)`` also receives the leaf's name.

    Args:
      fn: called once per leaf with its '/'-joined name first.
      tree: the pytree whose structure the result has.
      *rest: further pytrees of the same structure; their leaves are passed after `tree`'s.

    Returns:
      A pytree of `fn`'s results.

    Examples:
      >>> map_with_names(lambda name, x: f"{name}={x}", {"a": 1, "b": {"c": 2}})
      {'a': 'a=1', 'b': {'c': 'b/c=2'}}
    """
    return jax.tree_util.tree_map_with_path(lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest)


def check_same_structure(
    a: PyTree, b: PyTree, *, names: tuple[str, str] = ("a", "b"), check_shapes: bool = True
) -> None:
    """Raises ValueError naming the first path where `a` and `b` differ in structure or shape.

    Args:
      a, b: the two pytrees.
      names: how to call the two trees in the message (e.g. ``("params", "mask")``).
      check_shapes: also require equal leaf shapes.

    Raises:
      ValueError: a path in one tree only, the same leaves in another order, different tree types,
        or (with `check_shapes`) different shapes at a path; the message names the path.

    Examples:
      >>> import jax.numpy as jnp
      >>> check_same_structure({"w": jnp.ones(2)}, {"w": jnp.zeros(2)})
      >>> try:
      ...     check_same_structure({"w": jnp.ones(2)}, {"w": jnp.ones(3)}, names=("params", "mask"))
      ... except ValueError as err:
      ...     print(err)
      params and mask differ in shape at path 'w': (2,) vs (3,).
    """
    la, lb = named_leaves(a), named_leaves(b)
    na, nb = [n for n, _ in la], [n for n, _ in lb]
    if na != nb:
        set_b = set(nb)
        set_a = set(na)
        only_a = [n for n in na if n not in set_b]
        only_b = [n for n in nb if n not in set_a]
        if only_a or only_b:
            first = only_a[0] if only_a else only_b[0]
            where = names[0] if only_a else names[1]
            other = names[1] if only_a else names[0]
            raise ValueError(
                f"{names[0]} and {names[1]} have different structure: path {first!r} is in "
                f"{where} but not in {other} ({len(na)} vs {len(nb)} leaves)."
            )
        raise ValueError(f"{names[0]} and {names[1]} have the same leaves in a different order.")
    sa = jax.tree_util.tree_structure(a)
    sb = jax.tree_util.tree_structure(b)
    if sa != sb:
        raise ValueError(
            f"{names[0]} and {names[1]} have different tree types with the same leaf names: "
            f"{sa} vs {sb}."
        )
    if check_shapes:
        for (name, x), (_, y) in zip(la, lb):
            if np.shape(x) != np.shape(y):
                raise ValueError(
                    f"{names[0]} and {names[1]} differ in shape at path {name!r}: "
                    f"{np.shape(x)} vs {np.shape(y)}."
                )


def lerp(a: PyTree, b: PyTree, alpha: Any) -> PyTree:
    """Linear interpolation ``(1 - alpha) * a + alpha * b`` of two trees, leaf by leaf.

    Exact at the ends: ``alpha = 0`` gives `a` and ``alpha = 1`` gives `b` (value for value,
    for finite leaves); any other real ``alpha`` (also outside [0, 1]: extrapolation) is
    allowed.

    Integer leaves (step counters) are taken from `a` when ``alpha < 0.5`` and from `b`
    otherwise, so that interpolating whole train states is well defined. Floating leaves keep
    their dtype; ``alpha`` may be a traced scalar (this is what ``jax.vmap`` over α maps).

    Args:
      a, b: two pytrees of the same structure.
      alpha: the interpolation weight of `b` (a Python number or a scalar array, possibly traced).

    Returns:
      A pytree of the structure and dtypes of `a`.

    Examples:
      >>> import jax.numpy as jnp
      >>> lerp({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, 0.25)["w"]
      Array([0.25, 0.25], dtype=float32)

    Raises:
      ValueError: `a` and `b` differ in structure or shape (naming the first path).
      TypeError: `alpha` is not a real number or a numeric array.
    """
    check_same_structure(a, b)
    if isinstance(alpha, (str, bytes, bool)) or not (
            isinstance(alpha, numbers.Real) or hasattr(alpha, "dtype") and jnp.issubdtype(alpha.dtype, jnp.number)):
        raise TypeError(f"alpha must be a real number or a numeric array; got {type(alpha).__name__} {alpha!r:.60}.")

    def one(x, y):
        x = jnp.asarray(x)
        y = jnp.asarray(y)
        if jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.complexfloating):
            al = jnp.asarray(alpha, dtype=jnp.promote_types(x.dtype, jnp.float32))
            # (1 - α) x + α y, not x + α (y - x): this form returns x at α = 0 and y at α = 1
            # exactly (for finite leaves), so path endpoints are the endpoint models.
            out = x.astype(al.dtype) * (1 - al) + y.astype(al.dtype) * al
            return out.astype(x.dtype)
        return jnp.where(jnp.asarray(alpha) < 0.5, x, y)

    return jax.tree.map(one, a, b)


def weighted_mean(stacked: PyTree, weights: Any = None, *, axis: int = 0) -> PyTree:
    """Average over the leading (model) axis of a stacked tree, optionally weighted.

    Integer leaves (step counters) are taken from the first model.

    Args:
      stacked: a pytree whose leaves have a leading axis of size K (K models).
      weights: None for the uniform average, or K non-negative weights (normalised here).
      axis: the model axis.

    Returns:
      One model: the pytree without the model axis.

    Raises:
      ValueError: weights of the wrong length, negative, or summing to zero; an `axis` that
        some leaf does not have.

    Examples:
      >>> import jax.numpy as jnp
      >>> weighted_mean({"w": jnp.array([1.0, 3.0])})["w"].tolist()
      2.0
      >>> weighted_mean({"w": jnp.array([1.0, 3.0])}, weights=[3, 1])["w"].tolist()
      1.5
    """
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        return stacked
    ndim = min(np.ndim(x) for x in leaves)
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"axis must be an integer in [{-ndim}, {ndim - 1}] (every leaf has {ndim}+ dimensions); "
                         f"got {axis!r}.")
    k = np.shape(leaves[0])[axis]
    if weights is None:
        return jax.tree.map(
            lambda x: jnp.mean(x, axis=axis) if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.take(x, 0, axis=axis),
            stacked,
        )
    w = jnp.asarray(weights, dtype=jnp.float32)
    if w.shape != (k,):
        raise ValueError(f"weights must have shape ({k},) to match {k} models; got {w.shape}.")
    if not isinstance(w, jax.core.Tracer):
        wn = np.asarray(w)
        if np.any(wn < 0) or not np.isfinite(wn).all() or wn.sum() <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero; got {wn}.")
    w = w / jnp.sum(w)

    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.take(x, 0, axis=axis)
        shape = [1] * x.ndim
        shape[axis] = k
        return jnp.sum(x * w.reshape(shape).astype(x.dtype), axis=axis)

    return jax.tree.map(one, stacked)


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks a list of same-structure trees along a new leading axis.

    Args:
      trees: one or more pytrees of the same structure and shapes.

    Returns:
      A pytree whose leaves have a new leading axis of size ``len(trees)``.

    Raises:
      ValueError: an empty list, or trees that differ in structure or shape (the path is named).

    Examples:
      >>> import jax.numpy as jnp
      >>> stack([{"w": jnp.zeros(3)}, {"w": jnp.ones(3)}])["w"].shape
      (2, 3)
    """
    if not trees:
        raise ValueError("stack() needs at least one tree; got an empty sequence.")
    for i, t in enumerate(trees[1:], start=1):
        check_same_structure(trees[0], t, names=("tree 0", f"tree {i}"))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(stacked: PyTree) -> list[PyTree]:
    """Inverse of :func:`stack`: a list of trees, one per index of the leading axis.

    Args:
      stacked: a pytree whose leaves share a leading axis.

    Returns:
      A list of pytrees (empty for a tree without leaves).

    Examples:
      >>> import jax.numpy as jnp
      >>> [t["w"].tolist() for t in unstack({"w": jnp.array([[0.0], [1.0]])})]
      [[0.0], [1.0]]
    """
    leaves, treedef = jax.tree.flatten(stacked)
    if not leaves:
        return []
    n = np.shape(leaves[0])[0]
    return [treedef.unflatten([x[i] for x in leaves]) for i in range(n)]


def index(stacked: PyTree, i: Any) -> PyTree:
    """The `i`-th tree of a stacked tree (works with traced `i`).

    Args:
      stacked: a pytree whose leaves share a leading axis.
      i: an index, a slice or an integer array (then the result keeps an axis of that length).

    Returns:
      ``jax.tree.map(lambda x: x[i], stacked)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> index({"w": jnp.array([10.0, 20.0, 30.0])}, 1)["w"].tolist()
      20.0
    """
    return jax.tree.map(lambda x: x[i], stacked)


def tree_size(tree: PyTree) -> int:
    """Total number of entries over all leaves.

    Args:
      tree: any pytree of arrays (or shape structs).

    Returns:
      The number of entries.

    Examples:
      >>> import jax.numpy as jnp
      >>> tree_size({"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)})
      15
    """
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def tree_bytes(tree: PyTree) -> int:
    """Total number of bytes over all array leaves.

    Args:
      tree: a pytree of arrays (or shape structs with a dtype).

    Returns:
      The number of bytes.

    Examples:
      >>> import jax.numpy as jnp
      >>> tree_bytes({"kernel": jnp.zeros((4, 3)), "mask": jnp.zeros(3, bool)})
      51
    """
    return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def natural_key(text: str) -> list[Any]:
    """Sort key that orders ``layer_2`` before ``layer_10``.

    Args:
      text: a name.

    Returns:
      The name split into text and integer parts.

    Examples:
      >>> sorted(["layer_10", "layer_2"], key=natural_key)
      ['layer_2', 'layer_10']
    """
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def module_order(tree: Mapping[str, Any], weight_names: Iterable[str] = ("kernel", "embedding")) -> list[str]:
    """Paths of the weight-bearing modules of a nested dict, in the dict's insertion order.

    Flax's ``init`` returns parameters in the order the modules were called, i.e. from the
    input to the output. JAX's own flattening sorts dict keys, so this walks the dicts
    directly. A module counts as a layer when it holds a leaf named in `weight_names`.

    Args:
      tree: nested dicts of parameters (e.g. ``variables["params"]``).
      weight_names: leaf names that make a module a layer.

    Returns:
      The '/'-joined module paths, from the input to the output.

    Examples:
      >>> module_order({"dense_1": {"kernel": 0}, "dense_0": {"kernel": 0}, "block": {"conv": {"kernel": 0}}})
      ['dense_1', 'dense_0', 'block/conv']
    """
    names = set(weight_names)
    order: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, Mapping):
            return
        if any(k in names and not isinstance(v, Mapping) for k, v in node.items()):
            order.append(prefix)
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}/{k}" if prefix else str(k))

    walk(tree, "")
    return order


def norm_owner(module: str) -> str | None:
    """The layer a normalisation module belongs to, by name: ``<layer>_norm`` (or ``_bn``, ``_ln``).

    Args:
      module: a '/'-joined module path (``"block1/conv1_norm"``).

    Returns:
      The owning layer's path (``"block1/conv1"``), or None when `module` is not named as a norm.

    Examples:
      >>> norm_owner("block1/conv1_norm"), norm_owner("dense_0_ln"), norm_owner("dense_0"), norm_owner("_norm")
      ('block1/conv1', 'dense_0', None, None)
    """
    head, _, last = module.rpartition("/")
    for suffix in NORM_SUFFIXES:
        if last.endswith(suffix) and len(last) > len(suffix):
            base = last[: -len(suffix)]
            return f"{head}/{base}" if head else base
    return None


def norm_module(params: Mapping[str, Any], layer: str) -> str | None:
    """The path of `layer`'s normalisation module in `params` (the inverse of :func:`norm_owner`).

    Args:
      params: a nested params mapping.
      layer: a '/'-joined layer path.

    Returns:
      ``layer + suffix`` for the first suffix of :data:`NORM_SUFFIXES` whose module `params`
      holds, or None.

    Examples:
      >>> norm_module({"dense_0": {}, "dense_0_norm": {"scale": 1.0}}, "dense_0"), norm_module({"head": {}}, "head")
      ('dense_0_norm', None)
    """
    for suffix in NORM_SUFFIXES:
        node: Any = params
        for part in f"{layer}{suffix}".split("/"):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping):
            return f"{layer}{suffix}"
    return None
