"""Permutation specs: which axes of which arrays each permutation of hidden units acts on.

A network computes the same function after its hidden units are reordered, provided every array
that reads or writes those units is reordered alike: the output axis of the layer that produces
them, its bias and normalisation (BatchNorm running statistics included), and the input axis of
every layer that consumes them. A :class:`PermutationSpec` records this as git-re-basin's
``PermutationSpec`` does (``perm_to_axes`` / ``axes_to_perm``), over the *whole* Flax variables
tree (``"params/dense_0/kernel"``, ``"batch_stats/conv1_norm/mean"``):

* ``axes_to_perm["params/dense_1/kernel"] == ("dense_0", "dense_1")``: axis 0 of that kernel is
  permuted by ``dense_0``, axis 1 by ``dense_1``;
* residual streams are one permutation shared by every array on the stream;
* an axis that a reshape merged from several axes (a convolution's output flattened into a dense
  layer, the ``(heads, head_dim)`` of attention) is *factored*: the array is viewed with the
  expanded shape ``factors`` and each expanded axis has its own entry;
* a permutation may be *nested* in a parent (``parents[name]``): attention's head dimension can be
  reordered differently inside every head, so it is stored as an array of shape
  ``(parent size, size)`` holding one permutation per (already permuted) parent position.

Specs are usually derived from the model (:func:`tna_jax.align.permutation_spec`); for a model of
your own, write one with :func:`dense`, :func:`conv`, :func:`norm` and :func:`spec_from_axes`,
which read like git-re-basin's.

Permutations are plain dicts ``{name: int array}``; ``perm[name][i]`` is the unit of the model
being permuted that lands at position ``i`` (``new = old[perm]``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import tree as tree_lib

PyTree = Any
Permutation = dict[str, Any]

__all__ = [
    "LeafLayout", "PermutationSpec", "Permutation", "dense", "conv", "norm", "spec_from_axes",
    "identity_permutation", "random_permutation", "invert_permutation", "check_permutation",
    "apply_permutation",
]


def hash_once(obj: Any, values: Callable[[], tuple]) -> int:
    """The hash of ``values()``, computed on the first call and kept on the frozen dataclass `obj`.

    Specs and cost plans key the caches of every matching step; hashing their nested tuples each
    time cost more than the lookups.

    Args:
      obj: a frozen dataclass instance (the hash is stored in its ``__dict__``).
      values: the fields that define it.

    Returns:
      the hash.
    """
    cached = obj.__dict__.get("_hash")
    if cached is None:
        cached = hash(values())
        object.__setattr__(obj, "_hash", cached)
    return cached


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """How one array is permuted.

    Attributes:
      shape: the array's shape.
      factors: the expanded shape the permutations act on (equal to ``shape`` unless a reshape
        merged axes; size-1 axes are kept so that ``reshape(factors)`` is a view).
      perms: one permutation name (or None) per axis of ``factors``.
    """

    shape: tuple[int, ...]
    factors: tuple[int, ...]
    perms: tuple[str | None, ...]

    def axes_of(self, name: str) -> tuple[int, ...]:
        return tuple(i for i, p in enumerate(self.perms) if p == name)


@dataclasses.dataclass(frozen=True)
class PermutationSpec:
    """The permutation symmetry of a model (hashable, so jitted functions can be cached on it).

    Attributes:
      sizes: ``((name, size), ...)``: number of units each permutation reorders (per parent
        position for nested permutations).
      parents: ``((name, parent or None), ...)``.
      layouts: ``((path, LeafLayout), ...)`` for every array at least one permutation touches.
    """

    sizes: tuple[tuple[str, int], ...]
    parents: tuple[tuple[str, str | None], ...]
    layouts: tuple[tuple[str, LeafLayout], ...]

    def __hash__(self) -> int:  # computed once: the spec keys the caches of every matching step
        return hash_once(self, lambda: (self.sizes, self.parents, self.layouts))

    # ---- views -----------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.sizes)

    @property
    def size(self) -> dict[str, int]:
        return dict(self.sizes)

    @property
    def parent(self) -> dict[str, str | None]:
        return dict(self.parents)

    @property
    def leaves(self) -> dict[str, LeafLayout]:
        return dict(self.layouts)

    def children(self, name: str) -> tuple[str, ...]:
        return tuple(n for n, p in self.parents if p == name)

    def groups(self) -> list[tuple[str, tuple[str, ...]]]:
        """``[(top-level permutation, its nested children), ...]``: the units weight matching
        optimises jointly."""
        return [(n, self.children(n)) for n, p in self.parents if p is None]

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Shape of the index array of permutation `name`: ``(n,)`` or ``(parent size, n)``."""
        p = self.parent[name]
        return (self.size[name],) if p is None else (self.size[p], self.size[name])

    @property
    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        """git-re-basin's view: ``{perm: [(path, expanded axis), ...]}``."""
        out: dict[str, list[tuple[str, int]]] = {n: [] for n in self.names}
        for path, lay in self.layouts:
            for ax, p in enumerate(lay.perms):
                if p is not None:
                    out[p].append((path, ax))
        return out

    @property
    def axes_to_perm(self) -> dict[str, tuple[str | None, ...]]:
        """git-re-basin's view: ``{path: (perm or None per expanded axis)}``."""
        return {path: lay.perms for path, lay in self.layouts}

    def __len__(self) -> int:
        return len(self.sizes)

    def describe(self) -> str:
        """A readable listing: each permutation with its size and the axes it acts on.

        Examples:
          >>> import jax.numpy as jnp
          >>> v = {"params": {"dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
          ...                 "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}}
          >>> spec = spec_from_axes({**dense("dense_0", None, "P0"), "params/head/kernel": ("P0", None)}, v)
          >>> print(spec.describe())
          1 permutation over 3 arrays
            P0 (4 units): dense_0/kernel[:, P0]  dense_0/bias[P0]  head/kernel[P0, :]
        """
        lines = [f"{len(self)} permutation{'s' if len(self) != 1 else ''} over {len(self.layouts)} arrays"]
        p2a = self.perm_to_axes
        leaves = self.leaves
        for name in self.names:
            parent = self.parent[name]
            size = f"{self.size[name]} units" + (f" per unit of {parent}" if parent else "")
            seen: list[str] = []
            for path, _ in p2a[name]:
                if path not in seen:
                    seen.append(path)
            cells = [_render(path, leaves[path]) for path in seen]
            lines.append(f"  {name} ({size}): " + "  ".join(cells))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    # ---- checks ----------------------------------------------------------------------------
    def check_variables(self, variables: PyTree, *, argument: str = "variables") -> None:
        """Raises ValueError naming the first array of the spec that `variables` lacks or that has
        another shape."""
        shapes = {name: tuple(np.shape(x)) for name, x in tree_lib.named_leaves(variables)}
        for path, lay in self.layouts:
            if path not in shapes:
                close = [n for n in shapes if n.split("/")[-1] == path.split("/")[-1]][:3]
                hint = f" (arrays with the same leaf name: {close})" if close else ""
                raise ValueError(f"the permutation spec names {path!r} but {argument} has no such array{hint}; "
                                 "was the spec derived from another model?")
            if shapes[path] != lay.shape:
                raise ValueError(f"{argument} has shape {shapes[path]} at {path!r} but the permutation spec "
                                 f"expects {lay.shape}; the spec belongs to a model of another size.")

    def to_json(self) -> dict[str, Any]:
        return {"sizes": dict(self.sizes), "parents": dict(self.parents),
                "layouts": {p: {"shape": list(lay.shape), "factors": list(lay.factors), "perms": list(lay.perms)}
                            for p, lay in self.layouts}}


def _render(path: str, lay: LeafLayout) -> str:
    short = path[len("params/"):] if path.startswith("params/") else path
    cells = [p if p is not None else ":" for p in lay.perms]
    text = f"{short}[{', '.join(cells)}]"
    if lay.factors != lay.shape:
        text += f"<as {lay.factors}>"
    return text


# ---------------------------------------------------------------------------------------------
# Building specs by hand (git-re-basin style).
# ---------------------------------------------------------------------------------------------

AxesMap = dict[str, tuple[str | None, ...]]


def dense(name: str, p_in: str | None, p_out: str | None, *, bias: bool = True) -> AxesMap:
    """Axes of a Dense layer ``name``: kernel ``(p_in, p_out)``, bias ``(p_out,)``."""
    out: AxesMap = {f"params/{name}/kernel": (p_in, p_out)}
    if bias:
        out[f"params/{name}/bias"] = (p_out,)
    return out


def conv(name: str, p_in: str | None, p_out: str | None, *, bias: bool = True) -> AxesMap:
    """Axes of a 2-D convolution ``name``: kernel ``(h, w, p_in, p_out)``, bias ``(p_out,)``."""
    out: AxesMap = {f"params/{name}/kernel": (None, None, p_in, p_out)}
    if bias:
        out[f"params/{name}/bias"] = (p_out,)
    return out


def norm(name: str, p: str | None, *, batch_stats: bool = False) -> AxesMap:
    """Axes of a normalisation layer ``name`` (LayerNorm, or BatchNorm with ``batch_stats=True``,
    whose running ``mean`` and ``var`` are permuted with its ``scale`` and ``bias``)."""
    out: AxesMap = {f"params/{name}/scale": (p,), f"params/{name}/bias": (p,)}
    if batch_stats:
        out[f"batch_stats/{name}/mean"] = (p,)
        out[f"batch_stats/{name}/var"] = (p,)
    return out


def spec_from_axes(axes: Mapping[str, Sequence[str | None]], variables: PyTree, *,
                   parents: Mapping[str, str] | None = None,
                   factors: Mapping[str, Sequence[int]] | None = None) -> PermutationSpec:
    """A :class:`PermutationSpec` from git-re-basin style ``{path: (perm or None per axis)}``.

    Args:
      axes: e.g. ``{**dense("dense_0", None, "P0"), **dense("head", "P0", None)}``; paths are
        '/'-joined names in `variables` (``"params/..."``, ``"batch_stats/..."``).
      variables: the model's variables (arrays or ``jax.ShapeDtypeStruct``), for the sizes.
      parents: ``{child: parent}`` for nested permutations.
      factors: ``{path: expanded shape}`` for arrays whose axes are permuted in factored form.

    Raises:
      ValueError: a path that `variables` lacks (named), an axes tuple of the wrong length, a
        permutation used on axes of different sizes (both named), a child without its parent.

    Examples:
      >>> import jax.numpy as jnp
      >>> v = {"params": {"dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}}
      >>> spec_from_axes(dense("dense_0", None, "P0"), v).size
      {'P0': 4}
    """
    shapes = {name: tuple(int(d) for d in np.shape(x)) for name, x in tree_lib.named_leaves(variables)}
    parents = dict(parents or {})
    factors = {k: tuple(int(d) for d in v) for k, v in (factors or {}).items()}
    sizes: dict[str, int] = {}
    where: dict[str, str] = {}
    layouts: list[tuple[str, LeafLayout]] = []
    for path, perms in axes.items():
        if path not in shapes:
            raise ValueError(f"axes names {path!r}, which is not an array of the variables; known arrays "
                             f"start with {sorted(shapes)[:6]}.")
        shape = shapes[path]
        fac = factors.get(path, shape)
        if int(np.prod(fac)) != int(np.prod(shape)):
            raise ValueError(f"factors {fac} of {path!r} do not multiply to its shape {shape}.")
        perms = tuple(perms)
        if len(perms) != len(fac):
            raise ValueError(f"axes[{path!r}] has {len(perms)} entries but the array has {len(fac)} axes "
                             f"(shape {fac}).")
        for ax, p in enumerate(perms):
            if p is None:
                continue
            if not isinstance(p, str):
                raise TypeError(f"axes[{path!r}][{ax}] must be a permutation name or None; got {p!r}.")
            if p in sizes and sizes[p] != fac[ax]:
                raise ValueError(f"permutation {p!r} acts on axes of different sizes: {where[p]} has "
                                 f"{sizes[p]} units but {path!r} axis {ax} has {fac[ax]}.")
            sizes.setdefault(p, fac[ax])
            where.setdefault(p, f"{path!r} axis {ax}")
        if any(p is not None for p in perms):
            layouts.append((path, LeafLayout(shape, fac, perms)))
    for child, parent in parents.items():
        if child not in sizes:
            raise ValueError(f"parents names {child!r}, which no axis uses.")
        if parent not in sizes:
            raise ValueError(f"parent {parent!r} of {child!r} is not a permutation of the spec.")
        for path, lay in layouts:
            if child in lay.perms and parent not in lay.perms:
                raise ValueError(f"{path!r} is permuted by the nested {child!r} but not by its parent {parent!r}.")
    names = list(sizes)
    return PermutationSpec(tuple((n, sizes[n]) for n in names),
                           tuple((n, parents.get(n)) for n in names), tuple(layouts))


# ---------------------------------------------------------------------------------------------
# Permutation values.
# ---------------------------------------------------------------------------------------------


def identity_permutation(spec: PermutationSpec) -> Permutation:
    """The identity: ``arange`` per permutation (tiled over the parent for nested ones)."""
    out = {}
    for name in spec.names:
        shape = spec.shape_of(name)
        out[name] = np.broadcast_to(np.arange(shape[-1]), shape).copy()
    return out


def random_permutation(spec: PermutationSpec, key: jax.Array) -> Permutation:
    """A uniformly random element of the spec's permutation group (as NumPy int arrays).

    Drawn on the host by NumPy's generator seeded with the key's bits: deterministic in `key`,
    exactly uniform, and nothing to compile (a jitted ``jax.random.permutation`` per permutation
    took seconds to compile for a ResNet-20 spec, more than the rest of a test).

    Args:
      spec: the :class:`PermutationSpec`.
      key: a PRNG key (typed ``jax.random.key`` or a raw ``uint32`` key).

    Returns:
      ``{name: int32 array}`` of shape ``spec.shape_of(name)`` (one row per parent position for
      nested permutations).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> v = {"params": {"d": {"kernel": jnp.ones((2, 5))}}}
      >>> spec = spec_from_axes(dense("d", None, "P", bias=False), v)
      >>> p = random_permutation(spec, jax.random.key(0))
      >>> sorted(p["P"].tolist()), bool((random_permutation(spec, jax.random.key(0))["P"] == p["P"]).all())
      ([0, 1, 2, 3, 4], True)
    """
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    rng = np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())
    out = {}
    for name in spec.names:
        shape = spec.shape_of(name)
        rows = [rng.permutation(shape[-1]) for _ in range(int(np.prod(shape[:-1])))]
        out[name] = np.stack(rows).reshape(shape).astype(np.int32)
    return out


def invert_permutation(spec: PermutationSpec, perm: Permutation) -> Permutation:
    """The inverse: ``apply_permutation(spec, invert(perm), apply_permutation(spec, perm, v)) == v``.

    For a nested permutation σ with parent π the inverse is ``σ'[y] = argsort(σ[π⁻¹[y]])``.
    """
    check_permutation(spec, perm)
    out = {}
    for name in spec.names:
        p = np.asarray(perm[name])
        parent = spec.parent[name]
        if parent is None:
            out[name] = np.argsort(p)
        else:
            pinv = np.argsort(np.asarray(perm[parent]))
            out[name] = np.argsort(p[pinv], axis=-1)
    return out


def check_permutation(spec: PermutationSpec, perm: Mapping[str, Any], *, argument: str = "perm") -> None:
    """Raises ValueError when `perm` lacks a permutation of the spec, has an unknown one, the wrong
    shape, or a row that is not a permutation (checked on concrete values only)."""
    if not isinstance(perm, Mapping):
        raise TypeError(f"{argument} must be a dict {{name: index array}}; got {type(perm).__name__}.")
    missing = [n for n in spec.names if n not in perm]
    extra = [n for n in perm if n not in spec.size]
    if missing or extra:
        raise ValueError(f"{argument} does not match the spec: missing {missing}, unknown {extra}.")
    for name in spec.names:
        shape = spec.shape_of(name)
        got = tuple(np.shape(perm[name]))
        if got != shape:
            raise ValueError(f"{argument}[{name!r}] has shape {got}; the spec needs {shape}.")
        value = perm[name]
        if isinstance(value, jax.core.Tracer):
            continue
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{argument}[{name!r}] must hold integers; got dtype {arr.dtype}.")
        ok = (np.sort(arr, axis=-1) == np.arange(shape[-1])).all()
        if not ok:
            raise ValueError(f"{argument}[{name!r}] is not a permutation of 0..{shape[-1] - 1}.")


def _as_index(x: Any) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.int32)


def permute_leaf(lay: LeafLayout, parent: Mapping[str, str | None], perm: Mapping[str, Any], x: jax.Array,
                 skip: Iterable[int] = ()) -> jax.Array:
    """Applies `perm` to one array laid out as `lay`, leaving the expanded axes in `skip` alone."""
    skip = set(skip)
    y = jnp.reshape(x, lay.factors)
    nested = []
    for ax, name in enumerate(lay.perms):
        if name is None or ax in skip:
            continue
        if parent.get(name) is None:
            y = jnp.take(y, _as_index(perm[name]), axis=ax)
        else:
            nested.append((ax, name))
    for ax, name in nested:
        pax = lay.perms.index(parent[name])
        idx = _as_index(perm[name])  # (parent size, size), indexed by the new parent position
        shape = [1] * y.ndim
        shape[pax], shape[ax] = idx.shape[0], idx.shape[1]
        idx = jnp.reshape(idx if pax < ax else idx.T, shape)
        y = jnp.take_along_axis(y, jnp.broadcast_to(idx, y.shape), axis=ax)
    return jnp.reshape(y, lay.shape)


def apply_permutation(spec: PermutationSpec, perm: Mapping[str, Any], variables: PyTree) -> PyTree:
    """Reorders the hidden units of a model: every array the spec names, BatchNorm statistics included.

    For a permutation ``P`` of a hidden layer, ``W_in[:, P]``, ``b[P]``, ``W_out[P, :]`` (and the
    same on every other array that touches those units), so the permuted model computes the same
    function. Pure and jittable (``perm`` may be traced).

    Args:
      spec: the model's :class:`PermutationSpec`.
      perm: ``{name: index array}`` (see :func:`identity_permutation`).
      variables: the model's variables ``{"params": ..., ["batch_stats": ...]}``.

    Returns:
      variables of the same structure with the units reordered.

    Raises:
      ValueError: `variables` lacks an array of the spec or has another shape there (the path is
        named); `perm` does not match the spec.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> v = {"params": {"dense_0": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.arange(3.0)}}}
      >>> spec = spec_from_axes(dense("dense_0", None, "P0"), v)
      >>> out = apply_permutation(spec, {"P0": jnp.array([2, 0, 1])}, v)
      >>> out["params"]["dense_0"]["bias"].tolist()
      [2.0, 0.0, 1.0]
    """
    spec.check_variables(variables)
    check_permutation(spec, perm)
    return _apply_fn(spec)({k: _as_index(v) for k, v in perm.items()}, variables)


@functools.lru_cache(maxsize=64)
def _apply_fn(spec: PermutationSpec):
    leaves = spec.leaves
    parent = spec.parent

    def fn(perm: Mapping[str, Any], variables: PyTree) -> PyTree:
        def one(name: str, x: Any) -> Any:
            lay = leaves.get(name)
            return x if lay is None else permute_leaf(lay, parent, perm, x)

        return tree_lib.map_with_names(one, variables)

    return jax.jit(fn)
