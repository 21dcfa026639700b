r"""Anchor masks: which entries are anchored (drawn from a key), prune-at-init, and helpers.

A mask is a tree of booleans shaped like the parameters, True = anchored. It depends on the key,
the leaf names and shapes alone: the same on every device, process and host.
"""

from __future__ import annotations

import functools
import numbers
import re
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import tree as tree_lib
from tna_jax.trace import layer_order, nnx_layer_order

PyTree = Any

GRANULARITIES = ("weight", "neuron")
NAMED_SELECTIONS = ("first", "middle", "last")
# Suffixes that mark a normalisation module belonging to the layer named without the suffix
# ("conv1_norm" normalises the output channels of "conv1"), so that neuron granularity anchors
# the norm's scale/bias entries of the same units.
NORM_SUFFIXES = tree_lib.NORM_SUFFIXES
# How masks are drawn from a key. Recorded with every checkpoint and report: a resumed run must
# draw the masks it was started with. 1: one `jax.random.uniform` per leaf (before 2026-12-01);
# 2: a counter-based Threefry-2x32 number per entry, counters (crc32 of the leaf or unit-group
# name, row-major index), the top 24 bits compared with the ratio.
MASK_SCHEME = "threefry-counter/2"

__all__ = [
    "GRANULARITIES",
    "MASK_SCHEME",
    "NAMED_SELECTIONS",
    "NORM_SUFFIXES",
    "anchor_mask",
    "as_key",
    "check_mask",
    "layer_order",
    "mask_summary",
    "nnx_layer_order",
    "prune_at_init",
    "share_anchor_values",
]


# --------------------------------------------------------------------------------------------
# Argument checks (shared by every public function here and by `tna_jax.anchors.transform`;
# public names for the package, not in `__all__`).
# --------------------------------------------------------------------------------------------


def is_concrete(x: Any) -> bool:
    """Whether `x` is a value rather than a tracer (checks that read values skip tracers).

    Args:
      x: anything.

    Returns:
      False for a `jax.core.Tracer`, True otherwise.
    """
    return not isinstance(x, jax.core.Tracer)


def check_ratio(ratio: Any, name: str = "ratio") -> None:
    """Checks an anchored fraction: a real scalar in [0, 1] (a traced one passes unchecked).

    Args:
      ratio: the value to check.
      name: how to call the argument in an error.

    Raises:
      TypeError: not a real number.
      ValueError: an array that is not a scalar, or a value outside [0, 1] (NaN included).
    """
    if isinstance(ratio, bool) or not (
        isinstance(ratio, numbers.Real) or isinstance(ratio, (np.ndarray, jax.Array))
    ):
        raise TypeError(f"{name} must be a real number in [0, 1]; got {type(ratio).__name__} {ratio!r}.")
    if isinstance(ratio, (np.ndarray, jax.Array)):
        if np.ndim(ratio) != 0:
            raise ValueError(f"{name} must be a scalar in [0, 1]; got an array of shape {np.shape(ratio)}.")
        if not is_concrete(ratio):
            return  # traced (vmap over ratios, inject_hyperparams): checked by the caller's caller
        ratio = float(ratio)
    if not (0.0 <= float(ratio) <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1]; got {ratio!r}.")


def as_key(key: Any, name: str = "key") -> jax.Array:
    """Returns a typed PRNG key, accepting typed keys and legacy `uint32[2]` keys.

    Args:
      key: a key from `jax.random.key(seed)` or `jax.random.PRNGKey(seed)`.
      name: how to call the argument in an error.

    Returns:
      A typed PRNG key.

    Raises:
      TypeError: `key` is not a PRNG key.
      ValueError: `key` is a batch of keys.

    Examples:
      >>> import jax
      >>> as_key(jax.random.PRNGKey(0)).dtype
      key<fry>
    """
    if isinstance(key, (jax.Array, np.ndarray)):
        dtype = key.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            if key.shape != ():
                raise ValueError(f"{name} must be a single PRNG key; got a batch of shape {key.shape} "
                                 "(use jax.vmap to map over keys).")
            return key
        if dtype == jnp.uint32 and key.shape == (2,):
            return jax.random.wrap_key_data(key)
    raise TypeError(
        f"{name} must be a PRNG key made by jax.random.key(seed) or jax.random.PRNGKey(seed); "
        f"got {type(key).__name__} {_short(key)}."
    )


_as_key = as_key  # the name other modules used before it was public


def _is_key(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and (
        jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) or (x.dtype == np.uint32 and x.shape == (2,)))


def _ratio_then_key(ratio: Any, key: Any, fn: str) -> tuple[Any, Any]:
    """Accepts the order of releases before 0.2, `(key, ratio)`, with a DeprecationWarning."""
    if _is_key(ratio) and not _is_key(key):
        warnings.warn(f"{fn}(params, key, ratio) is deprecated: the order is now {fn}(params, ratio, key), "
                      "as in fixed_anchor_mask(ratio, key).", DeprecationWarning, stacklevel=3)
        return key, ratio
    return ratio, key


def _short(x: Any) -> str:
    if isinstance(x, (jax.Array, np.ndarray)):
        return f"with shape {x.shape} and dtype {x.dtype}"
    text = repr(x)
    return text if len(text) < 60 else text[:57] + "..."


def _stable_hash(name: str) -> int:
    # Python's hash() is salted per process; crc32 is the same on every host.
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def _parent(name: str) -> str:
    return name.rsplit("/", 1)[0] if "/" in name else ""


def default_unit_group(name: str) -> str:
    """The unit group of a leaf for neuron granularity: its module, with a normalisation module
    counted as the layer it normalises (`conv1_norm/scale` is in group `conv1`).

    Args:
      name: the leaf's '/'-joined path.

    Returns:
      The group's name.
    """
    parent = _parent(name)
    return tree_lib.norm_owner(parent) or parent


def _named_selection(pattern: str, names: Sequence[str], layers: Sequence[str] | None, arg: str) -> np.ndarray:
    if layers is None:
        raise ValueError(
            f"{arg}={pattern!r} needs the order in which the model calls its layers, which a params tree "
            "does not hold (JAX and nnx.State sort dict keys). Pass layer_order=: "
            "anchors.layer_order(lambda p: model.apply({'params': p}, x), params) for Flax Linen, "
            "anchors.nnx_layer_order(model, x) for NNX, or net.layer_order() for a tna_jax model.")
    if not layers:
        raise ValueError(f"{arg}={pattern!r} needs weight layers (modules with a 'kernel'), "
                         "but layer_order is empty.")
    if pattern == "first":
        chosen = set(layers[:1])
    elif pattern == "last":
        chosen = set(layers[-1:])
    else:
        chosen = set(layers[1:-1])
        if not chosen:
            raise ValueError(f"{arg}='middle' selects nothing: the model has only "
                             f"{len(layers)} weight layer(s) {list(layers)}.")
    return np.array([_parent(n) in chosen for n in names], dtype=bool)


def _selection(
    names: Sequence[str],
    patterns: str | Sequence[str] | None,
    layers: Sequence[str] | None,
    arg: str,
) -> np.ndarray | None:
    """Boolean vector over `names`: which leaves the patterns select (None = no patterns)."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)):
        raise TypeError(f"{arg} must be a string or a list of strings (regular expressions or one of "
                        f"{NAMED_SELECTIONS}); got {type(patterns).__name__} {_short(patterns)}.")
    patterns = list(patterns)
    if not patterns:
        raise ValueError(f"{arg} must name at least one pattern when given; got an empty list.")
    selected = np.zeros(len(names), dtype=bool)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{arg} entries must be strings (regular expressions or one of "
                            f"{NAMED_SELECTIONS}); got {type(pattern).__name__} {pattern!r}.")
        if pattern in NAMED_SELECTIONS:
            hits = _named_selection(pattern, names, layers, arg)
        else:
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{arg} pattern {pattern!r} is not a valid regular expression: {err}.") from None
            hits = np.array([regex.search(n) is not None for n in names], dtype=bool)
        if not hits.any():
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"{arg} pattern {pattern!r} selects no parameter; the paths are: {shown}.")
        selected |= hits
    return selected


def check_layer_order(layer_order: Any) -> None:
    """Checks a `layer_order` argument: None or a list of module paths.

    Args:
      layer_order: the value to check.

    Raises:
      TypeError: anything else (a bare string included).
    """
    if layer_order is not None and (isinstance(layer_order, str) or not isinstance(layer_order, (list, tuple))
                                    or not all(isinstance(n, str) for n in layer_order)):
        raise TypeError(f"layer_order must be a list of module paths (strings); got {_short(layer_order)}.")


def eligible_leaves(params: PyTree, include: Any, exclude: Any, layer_order: Sequence[str] | None) -> np.ndarray:
    """Which leaves may hold anchors: `include` minus `exclude`.

    Args:
      params: the parameter tree.
      include, exclude, layer_order: as in `anchor_mask`.

    Returns:
      One bool per leaf, in `jax.tree.leaves` order.

    Raises:
      TypeError, ValueError: a bad pattern or layer order (as `anchor_mask`).
    """
    check_layer_order(layer_order)
    names = tree_lib.leaf_names(params)
    layers = list(layer_order) if layer_order is not None else None
    eligible = np.ones(len(names), dtype=bool)
    inc = _selection(names, include, layers, "include")
    exc = _selection(names, exclude, layers, "exclude")
    if inc is not None:
        eligible &= inc
    if exc is not None:
        eligible &= ~exc
    return eligible


# --------------------------------------------------------------------------------------------
# Drawing masks (`threefry_first_word`, `threefry_keypair` and `draw_mask` serve
# `tna_jax.anchors.transform` too).
# --------------------------------------------------------------------------------------------

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry_first_word(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> jax.Array:
    """The first output word of Threefry-2x32 (20 rounds; Salmon et al. 2011) for counters
    (x0, x1), elementwise.

    Written out in `jnp` so that XLA fuses it with the counter `iota` and the comparison with the
    ratio: a leaf's mask is then one loop with no temporary arrays (the library primitive
    materialises both counter and both output words, 16 bytes per entry). It equals
    `jax.extend.random.threefry_2x32` word for word (tested).
    """
    k2 = k0 ^ k1 ^ jnp.uint32(0x1BD11BDA)
    schedule = (k0, k1, k2)
    x0 = x0 + k0
    x1 = x1 + k1
    for block in range(5):
        for r in _THREEFRY_ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = (x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))
            x1 = x1 ^ x0
        x0 = x0 + schedule[(block + 1) % 3]
        x1 = x1 + schedule[(block + 2) % 3] + jnp.uint32(block + 1)
    return x0


def threefry_keypair(key: jax.Array) -> jax.Array:
    """The Threefry key (2 x uint32) of any PRNG key: its own words for Threefry keys, the
    words of wider keys (e.g. `rbg`) hashed down pairwise."""
    words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    pair = words[:2]
    for i in range(2, int(words.shape[0]), 2):
        pair = jax.extend.random.threefry_2x32(pair, words[i:i + 2])
    return pair


def _uniform(keypair: jax.Array, draw: str, shape: tuple[int, ...]) -> jax.Array:
    """u_j = 2^-24 floor(Threefry(keypair; crc32(draw), j) / 2^8) for the row-major index j."""
    size = int(np.prod(shape, dtype=np.int64))
    index = jax.lax.iota(jnp.uint32, size).reshape(shape) if shape else jnp.zeros((), jnp.uint32)
    bits = threefry_first_word(keypair[0], keypair[1], jnp.uint32(_stable_hash(draw)), index)
    # The top 24 bits as a float32 in [0, 1): exact, so u < ratio holds for every entry at
    # ratio 1 and for none at ratio 0, and masks are nested in the ratio.
    return jax.lax.shift_right_logical(bits, jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)


def draw_mask(params: PyTree, keypair: jax.Array, ratio: Any, eligible: Sequence[Any], granularity: str,
          group_of: Callable[[str], str]) -> PyTree:
    """The mask of `params`: per leaf, `u < ratio` where the leaf is eligible (a Python bool:
    ineligible leaves are not drawn at all; a traced bool: drawn, then and-ed)."""
    leaves = []
    for (name, leaf), ok in zip(tree_lib.named_leaves(params), eligible):
        shape = tuple(np.shape(leaf))
        if ok is False or ok is np.False_:
            leaves.append(jnp.zeros(shape, bool))
            continue
        if granularity == "weight":
            m = _uniform(keypair, name, shape) < ratio
        else:  # one number per output unit (last axis), shared by the unit's group
            units = shape[-1] if shape else 1
            u = _uniform(keypair, "unit:" + group_of(name), (units,))
            m = jnp.broadcast_to(u.reshape(shape[-1:]), shape) < ratio
        leaves.append(m if isinstance(ok, (bool, np.bool_)) else m & ok)
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


@functools.partial(jax.jit, static_argnames=("layout",))
def _draw_placed(key: jax.Array, ratio: Any, layout: tuple[Any, ...]) -> PyTree:
    treedef, leaves, eligible, granularity, group_of = layout
    shapes = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(shape, jnp.float32) for shape, _ in leaves])
    mask = draw_mask(shapes, threefry_keypair(key), ratio, eligible, granularity, group_of)
    if all(sharding is None for _, sharding in leaves):
        return mask
    shardings = jax.tree.unflatten(treedef, [sharding for _, sharding in leaves])
    return jax.lax.with_sharding_constraint(mask, shardings)


def anchor_mask(
    params: PyTree,
    ratio: float | jax.Array,
    key: jax.Array,
    *,
    granularity: str = "weight",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layer_order: Sequence[str] | None = None,
    unit_groups: Callable[[str], str] | None = None,
) -> PyTree:
    r"""Draws the anchor mask: a tree of booleans shaped like `params`, True = anchored.

    For entry $i$ (row-major) of leaf $\ell$ the mask is $m_i = [u_i < \rho]$, with
    $u_i = 2^{-24} \lfloor \mathrm{Threefry}_{\mathrm{key}}(\mathrm{crc32}(\ell), i) / 2^8 \rfloor$
    a counter-based uniform number in $[0, 1)$, so each entry is anchored independently with
    probability $\rho$ (`granularity="weight"`, what the paper's experiments do). With
    `granularity="neuron"` one number is drawn per output unit (the last axis of each leaf: a
    Dense unit's incoming weights and bias, a conv output channel) and shared by every leaf of
    the unit's module and of its normalisation module (`conv1` and `conv1_norm`), so whole units
    are anchored.

    Properties that follow from the construction:

    * the mask depends on `key`, the leaf names and shapes alone: the same on any device,
      process or host, and independent of the order in which leaves are visited;
    * masks with the same key are nested in the ratio ($\rho_1 \le \rho_2$ implies
      $m_1 \subseteq m_2$);
    * `ratio` may be a traced scalar, so a sweep over ratios is a `jax.vmap`;
    * drawing needs no memory beyond the mask itself, and the mask of sharded params is drawn
      sharded like them.

    Args:
      params: the parameter tree (any nesting of dicts, lists, NamedTuples, `nnx.State`).
      key: a PRNG key (`jax.random.key` or legacy `jax.random.PRNGKey`).
      ratio: the anchored fraction $\rho$ in [0, 1].
      granularity: `"weight"` (each entry) or `"neuron"` (whole output units).
      include: regular expression(s) over '/'-joined parameter paths (`re.search`), or the named
        selections `"first"`, `"middle"`, `"last"` (weight layers counted from the input; they
        need `layer_order`). Only matching leaves can be anchored. None: every leaf.
      exclude: like `include`; matching leaves are never anchored.
      layer_order: module paths of the weight layers from input to output, for the named
        selections: `layer_order(...)`, `nnx_layer_order(...)` or `Net.layer_order()`.
      unit_groups: for neuron granularity, maps a leaf name to the name of its unit group
        (leaves in one group share the unit draw). Default: the leaf's module path, with a
        trailing `_norm`/`_bn`/`_ln` removed.

    Returns:
      A tree of `bool` arrays with the structure and shapes of `params`.

    Raises:
      ValueError: ratio outside [0, 1] or NaN, unknown granularity, a pattern that selects no
        parameter, an invalid regular expression, a named selection without `layer_order`.
      TypeError: `key` is not a PRNG key; `ratio` is not a number.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = {"dense": {"kernel": jnp.zeros((100, 100)), "bias": jnp.zeros(100)}}
      >>> mask = anchor_mask(params, 0.4, jax.random.key(0))
      >>> round(float(mask["dense"]["kernel"].mean()), 1)
      0.4
    """
    ratio, key = _ratio_then_key(ratio, key, "anchor_mask")
    check_ratio(ratio)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}.")
    key = as_key(key)
    for name, leaf in tree_lib.named_leaves(params):
        if isinstance(leaf, (str, bytes)) or not hasattr(leaf, "shape"):
            raise TypeError(f"params leaves must be arrays; got {type(leaf).__name__} {_short(leaf)} at path {name!r}.")
    if unit_groups is not None and not callable(unit_groups):
        raise TypeError(f"unit_groups must be a function from a leaf name to a group name; got "
                        f"{type(unit_groups).__name__}.")
    eligible = tuple(bool(e) for e in eligible_leaves(params, include, exclude, layer_order))
    group_of = unit_groups or default_unit_group
    leaves, treedef = jax.tree.flatten(params)
    if not all(isinstance(x, jax.Array) and is_concrete(x) for x in leaves) or not leaves:
        return draw_mask(params, threefry_keypair(key), ratio, eligible, granularity, group_of)
    # Placed arrays, eager call: one compiled program (cached on the tree's layout), its output
    # placed like the params.
    # Arrays on one device get a mask placed as JAX places new arrays (so a jitted consumer sees
    # the same placement as for jnp.zeros); sharded ones get the params' shardings.
    spread = any(len(x.sharding.device_set) > 1 for x in leaves)
    layout = (treedef, tuple((tuple(x.shape), x.sharding if spread else None) for x in leaves), eligible,
              granularity, group_of)
    return _draw_placed(key, ratio, layout)


def check_mask(params: PyTree, mask: PyTree) -> None:
    """Raises ValueError naming the first path where `mask` does not match `params`.

    Args:
      params: the parameter pytree.
      mask: a pytree of booleans that should have the structure and shapes of `params`.

    Raises:
      ValueError: a path in one tree only, or a shape mismatch (the path is named).

    Examples:
      >>> import jax.numpy as jnp
      >>> check_mask({"w": jnp.zeros(3)}, {"w": jnp.array([True, False, True])})
    """
    tree_lib.check_same_structure(params, mask, names=("params", "mask"))


def share_anchor_values(params: PyTree, anchor_values: PyTree, mask: PyTree) -> PyTree:
    """Takes anchored entries from `anchor_values` and all others from `params`.

    Used when several models are trained from different seeds but must share the anchored
    values as well as the mask, exactly from the first step (`fixed_anchor_mask(values=...)`
    reaches the values in its first update and exactly in its second).

    Args:
      params: one model's parameters.
      anchor_values: parameters of the same structure holding the shared anchored values.
      mask: the anchor mask (True = anchored).

    Returns:
      ``where(mask, anchor_values, params)`` leaf by leaf, in the dtypes of `params`.

    Raises:
      ValueError: the three trees differ in structure or shape.

    Examples:
      >>> import jax.numpy as jnp
      >>> out = share_anchor_values({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, {"w": jnp.array([True, False, True])})
      >>> out["w"].tolist()
      [1.0, 0.0, 1.0]
    """
    check_mask(params, mask)
    tree_lib.check_same_structure(params, anchor_values, names=("params", "anchor_values"))
    return jax.tree.map(lambda p, a, m: jnp.where(m, a.astype(p.dtype), p), params, anchor_values, mask)


def prune_at_init(
    params: PyTree,
    ratio: float,
    key: jax.Array,
    **mask_kwargs: Any,
) -> tuple[PyTree, PyTree]:
    """Random pruning at initialisation, the baseline TNA-PFN is compared with.

    Draws ``mask = anchor_mask(params, ratio, key, **mask_kwargs)`` and zeroes the masked
    entries. Chaining ``fixed_anchor_mask(mask=mask)`` after the optimizer keeps them at zero
    during training (an anchor whose value is 0).

    Args:
      params: the initial parameters.
      key: the mask key (shared by every model that should have the same pruning).
      ratio: the pruned fraction in [0, 1].
      **mask_kwargs: further arguments of :func:`anchor_mask` (granularity, include, exclude).

    Returns:
      ``(pruned_params, mask)``.

    Raises:
      ValueError, TypeError: as :func:`anchor_mask`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = {"w": jnp.ones((10, 10))}
      >>> pruned, mask = prune_at_init(params, 0.5, jax.random.key(1))
      >>> bool((pruned["w"] == 0).sum() == mask["w"].sum())
      True
    """
    ratio, key = _ratio_then_key(ratio, key, "prune_at_init")
    mask = anchor_mask(params, ratio, key, **mask_kwargs)
    pruned = jax.tree.map(lambda p, m: jnp.where(m, jnp.zeros((), p.dtype), p), params, mask)
    return pruned, mask


def mask_summary(mask: PyTree) -> dict[str, Any]:
    """Anchored fraction per leaf, per layer (module) and overall, as plain Python numbers.

    Args:
      mask: a pytree of boolean arrays (True = anchored), e.g. ``state.mask`` of
        :func:`fixed_anchor_mask`.

    Returns:
      ``{"overall": float, "anchored": int, "total": int, "per_layer": {module: float},
      "per_leaf": {path: float}}``.

    Examples:
      >>> import jax.numpy as jnp
      >>> s = mask_summary({"dense": {"kernel": jnp.array([[True, False], [False, False]]), "bias": jnp.ones(2, bool)}})
      >>> s["overall"], s["anchored"], s["per_layer"]
      (0.5, 3, {'dense': 0.5})
    """
    per_leaf: dict[str, float] = {}
    layer_counts: dict[str, list[int]] = {}
    anchored = total = 0
    for name, m in tree_lib.named_leaves(mask):
        m = np.asarray(m, dtype=bool)
        k, n = int(m.sum()), int(m.size)
        per_leaf[name] = k / n if n else 0.0
        counts = layer_counts.setdefault(_parent(name), [0, 0])
        counts[0] += k
        counts[1] += n
        anchored += k
        total += n
    return {
        "overall": anchored / total if total else 0.0,
        "anchored": anchored,
        "total": total,
        "per_layer": {k: (a / n if n else 0.0) for k, (a, n) in layer_counts.items()},
        "per_leaf": per_leaf,
    }
