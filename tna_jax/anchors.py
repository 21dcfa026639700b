"""Fixed neuron anchors (TNA-PFN): anchor masks, the ``fixed_anchor_mask`` optax transform, and
prune-at-init.

TNA-PFN (Li et al., "Training-time Neuron Alignment through Permutation Subspace for Improving
Linear Mode Connectivity and Model Fusion", 2024; journal version "Improving Model Fusion by
Training-time Neuron Alignment with Fixed Neuron Anchors") draws a random subset of the weights,
the *anchors*, with a PRNG key that every model shares, and keeps them at their initial values for
the whole of training by zeroing their gradient updates. The fixed entries break the permutation
symmetry of hidden units, so independently trained models land in the same basin and their
weight average (the midpoint of the linear path) works.

Why a new transform rather than ``optax.masked`` or ``optax.transforms.freeze``: those decide per
*leaf* (a whole kernel is trained or frozen). Anchors are per *entry* of a tensor (or per output
unit), so the mask here is a tree of boolean arrays shaped like the parameters.

Design choice (measured in ``benchmarks/anchor_overhead.py``): the transform *stores* the mask in
its state (1 byte per parameter) instead of regenerating it from the key at every step. Drawing
uniform numbers with threefry for every parameter costs far more than the masked ``where`` itself
on CPU and GPU alike, while the stored mask is one byte per parameter next to adam's eight.
"""

from __future__ import annotations

import numbers
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.extend.random as jax_random_ext
import jax.numpy as jnp
import numpy as np
import optax

from tna_jax import tree as tree_lib

PyTree = Any

GRANULARITIES = ("weight", "neuron")
NAMED_SELECTIONS = ("first", "middle", "last")
# Suffixes that mark a normalisation module belonging to the layer named without the suffix
# ("conv1_norm" normalises the output channels of "conv1"), so that neuron granularity anchors
# the norm's scale/bias entries of the same units.
NORM_SUFFIXES = ("_norm", "_bn", "_ln")

__all__ = [
    "FixedAnchorMaskState",
    "anchor_mask",
    "fixed_anchor_mask",
    "prune_at_init",
    "share_anchor_values",
    "mask_summary",
    "check_mask",
]


# --------------------------------------------------------------------------------------------
# Argument checks (shared by every public function here).
# --------------------------------------------------------------------------------------------


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_ratio(ratio: Any, name: str = "ratio") -> None:
    if isinstance(ratio, bool) or not (
        isinstance(ratio, numbers.Real) or isinstance(ratio, (np.ndarray, jax.Array))
    ):
        raise TypeError(f"{name} must be a real number in [0, 1]; got {type(ratio).__name__} {ratio!r}.")
    if isinstance(ratio, (np.ndarray, jax.Array)):
        if np.ndim(ratio) != 0:
            raise ValueError(f"{name} must be a scalar in [0, 1]; got an array of shape {np.shape(ratio)}.")
        if not _is_concrete(ratio):
            return  # traced (vmap over ratios, inject_hyperparams): checked by the caller's caller
        ratio = float(ratio)
    if not (0.0 <= float(ratio) <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1]; got {ratio!r}.")


def _as_key(key: Any, name: str = "key") -> jax.Array:
    """Returns a typed PRNG key, accepting typed keys and legacy uint32[2] keys."""
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


def _default_unit_group(name: str) -> str:
    parent = _parent(name)
    head, _, last = parent.rpartition("/")
    for suffix in NORM_SUFFIXES:
        if last.endswith(suffix) and len(last) > len(suffix):
            last = last[: -len(suffix)]
            break
    return f"{head}/{last}" if head else last


def _selection(
    names: Sequence[str],
    patterns: str | Sequence[str] | None,
    layers: Sequence[str],
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
            if not layers:
                raise ValueError(f"{arg}={pattern!r} needs weight layers (modules with a 'kernel'), "
                                 "but the params have none.")
            if pattern == "first":
                chosen = set(layers[:1])
            elif pattern == "last":
                chosen = set(layers[-1:])
            else:
                chosen = set(layers[1:-1])
                if not chosen:
                    raise ValueError(f"{arg}='middle' selects nothing: the model has only "
                                     f"{len(layers)} weight layer(s) {list(layers)}.")
            hits = np.array([_parent(n) in chosen for n in names], dtype=bool)
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


# --------------------------------------------------------------------------------------------
# Masks.
# --------------------------------------------------------------------------------------------


def anchor_mask(
    params: PyTree,
    key: jax.Array,
    ratio: float | jax.Array,
    *,
    granularity: str = "weight",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    layer_order: Sequence[str] | None = None,
    unit_groups: Callable[[str], str] | None = None,
) -> PyTree:
    r"""Draws the anchor mask: a tree of booleans shaped like `params`, True = anchored (frozen).

    For every parameter entry :math:`i` of leaf :math:`\ell` the mask is

    .. math:: m_i = [u_i < \rho], \qquad
              u_i = 2^{-24} \lfloor \operatorname{Threefry}_{\text{key}}(\operatorname{crc32}(\ell), i) / 2^8 \rfloor,

    a counter-based uniform number in [0, 1) for entry :math:`i` (row-major) of leaf :math:`\ell`
    (all leaves in ONE Threefry call, so the mask compiles fast), so each entry is anchored independently with probability :math:`\rho` (``granularity="weight"``,
    what the paper's experiments do). With ``granularity="neuron"`` one uniform number is drawn per
    output unit (the last axis of each leaf: a Dense unit's incoming weights and bias, a conv
    output channel) and shared by every leaf of the unit's module and of its normalisation module
    (``conv1`` and ``conv1_norm``), so whole units are anchored.

    Properties that follow from the construction:
      * the mask depends on `key`, the leaf names and shapes alone: the same on any device,
        process or host, and independent of the order in which leaves are visited;
      * masks with the same key are nested in the ratio (ρ₁ ≤ ρ₂ ⇒ mask₁ ⊆ mask₂);
      * `ratio` may be a traced scalar, so a sweep over ratios is a ``jax.vmap``.

    Args:
      params: the parameter pytree (any nesting of dicts, lists, NamedTuples, ``nnx.State``).
      key: a PRNG key (``jax.random.key`` or legacy ``jax.random.PRNGKey``).
      ratio: the anchored fraction ρ in [0, 1].
      granularity: ``"weight"`` (each entry) or ``"neuron"`` (whole output units).
      include: regular expression(s) over '/'-joined parameter paths (``re.search``), or the
        named selections ``"first"``, ``"middle"``, ``"last"`` (weight layers counted from the
        input). Only matching leaves can be anchored. None = every leaf.
      exclude: like `include`; matching leaves are never anchored.
      layer_order: module paths of the weight layers from input to output, for the named
        selections. Default: the insertion order of the params dicts (Flax's call order).
      unit_groups: for neuron granularity, maps a leaf name to the name of its unit group
        (leaves in one group share the unit draw). Default: the leaf's module path, with a
        trailing ``_norm``/``_bn``/``_ln`` removed.

    Returns:
      A pytree of ``bool`` arrays with the structure and shapes of `params`.

    Raises:
      ValueError: ratio outside [0, 1] or NaN, unknown granularity, a pattern that selects no
        parameter, an invalid regular expression.
      TypeError: `key` is not a PRNG key; `ratio` is not a number.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = {"dense": {"kernel": jnp.zeros((100, 100)), "bias": jnp.zeros(100)}}
      >>> mask = anchor_mask(params, jax.random.key(0), 0.4)
      >>> round(float(mask["dense"]["kernel"].mean()), 1)
      0.4
    """
    _check_ratio(ratio)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}.")
    key = _as_key(key)
    named = tree_lib.named_leaves(params)
    for name, leaf in named:
        if isinstance(leaf, (str, bytes)) or not hasattr(leaf, "shape"):
            raise TypeError(f"params leaves must be arrays; got {type(leaf).__name__} {_short(leaf)} at path {name!r}.")
    if layer_order is not None and (isinstance(layer_order, str) or not isinstance(layer_order, (list, tuple))
                                    or not all(isinstance(n, str) for n in layer_order)):
        raise TypeError(f"layer_order must be a list of module paths (strings); got {_short(layer_order)}.")
    if unit_groups is not None and not callable(unit_groups):
        raise TypeError(f"unit_groups must be a function from a leaf name to a group name; got "
                        f"{type(unit_groups).__name__}.")
    names = [n for n, _ in named]
    if layer_order is None:
        layer_order = tree_lib.module_order(params) if hasattr(params, "items") else []
    layers = list(layer_order)
    inc = _selection(names, include, layers, "include")
    exc = _selection(names, exclude, layers, "exclude")
    eligible = np.ones(len(names), dtype=bool)
    if inc is not None:
        eligible &= inc
    if exc is not None:
        eligible &= ~exc
    group_of = unit_groups or _default_unit_group

    # One draw per anchorable leaf (weight granularity) or per unit group (neuron granularity).
    draws: dict[str, int] = {}
    plan: list[tuple[str, tuple[int, ...], str | None, int]] = []  # (name, shape, draw, units)
    for i, (name, leaf) in enumerate(named):
        shape = tuple(np.shape(leaf))
        if not eligible[i]:
            plan.append((name, shape, None, 0))
            continue
        if granularity == "weight":
            draw, size = name, int(np.prod(shape, dtype=np.int64))
        else:
            draw, size = "unit:" + group_of(name), (shape[-1] if shape else 1)
        draws[draw] = max(draws.get(draw, 0), size)
        plan.append((name, shape, draw, size))
    uniforms = _uniforms(key, draws)
    leaves = []
    for _, shape, draw, size in plan:
        if draw is None:
            leaves.append(jnp.zeros(shape, dtype=bool))
        elif granularity == "weight":
            leaves.append(uniforms[draw].reshape(shape) < ratio)
        else:
            leaves.append(jnp.broadcast_to(uniforms[draw][:size].reshape(shape[-1:]), shape) < ratio)
    treedef = jax.tree.structure(params)
    return jax.tree.unflatten(treedef, leaves)


def _keypair(key: jax.Array) -> jax.Array:
    """The Threefry key (2 x uint32) of any PRNG key: its own words for Threefry keys, the
    words of wider keys (e.g. ``rbg``) hashed down pairwise."""
    words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    pair = words[:2]
    for i in range(2, int(words.shape[0]), 2):
        pair = jax_random_ext.threefry_2x32(pair, words[i:i + 2])
    return pair


def _uniforms(key: jax.Array, draws: dict[str, int]) -> dict[str, jax.Array]:
    """For every named draw of n numbers, u_j = bits(Threefry(key; crc32(draw), j)) / 2^32, j < n.

    Threefry-2x32 is counter based, so each number depends on the key, the draw's name and its
    index alone. All draws share ONE Threefry call over the concatenated counters: XLA compiles
    Threefry's unrolled rounds once per call site, so one call per leaf made the mask of a
    6-leaf MLP take seconds to compile (and most of a training run's set-up time); one call
    for all leaves compiles as fast as a single ``jax.random.uniform``.
    """
    names = list(draws)
    sizes = [draws[n] for n in names]
    total = sum(sizes)
    if total == 0:
        return {n: jnp.zeros((0,), jnp.float32) for n in names}
    draw_ids = jnp.concatenate([jnp.full((n,), _stable_hash(name), jnp.uint32) for name, n in zip(names, sizes)])
    index = jnp.concatenate([jax.lax.iota(jnp.uint32, n) for n in sizes])
    bits = jax_random_ext.threefry_2x32(_keypair(key), jnp.concatenate([draw_ids, index]))[:total]
    # The top 24 bits as a float32 in [0, 1): exact, so u < ratio is True for all at ratio 1
    # and for none at ratio 0, and masks are nested in the ratio.
    u = jax.lax.shift_right_logical(bits, jnp.uint32(8)).astype(jnp.float32) * jnp.float32(2.0**-24)
    out, start = {}, 0
    for name, n in zip(names, sizes):
        out[name] = u[start:start + n]
        start += n
    return out


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
    values as well as the mask (the default in tna_jax; see DESIGN.md).

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
    key: jax.Array,
    ratio: float,
    **mask_kwargs: Any,
) -> tuple[PyTree, PyTree]:
    """Random pruning at initialisation, the baseline TNA-PFN is compared with.

    Draws ``mask = anchor_mask(params, key, ratio, **mask_kwargs)`` and zeroes the masked
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
      >>> pruned, mask = prune_at_init(params, jax.random.key(1), 0.5)
      >>> bool((pruned["w"] == 0).sum() == mask["w"].sum())
      True
    """
    mask = anchor_mask(params, key, ratio, **mask_kwargs)
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


# --------------------------------------------------------------------------------------------
# The optax transform.
# --------------------------------------------------------------------------------------------


class FixedAnchorMaskState(NamedTuple):
    """State of :func:`fixed_anchor_mask`.

    Attributes:
      count: number of updates applied so far (int32).
      mask: tree of booleans shaped like the params, True = anchored.
      key: raw uint32 data of the anchor key (used when the mask is refreshed).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> state = fixed_anchor_mask(0.5, jax.random.key(0)).init({"w": jnp.zeros(8)})
      >>> isinstance(state, FixedAnchorMaskState), state.mask["w"].dtype, int(state.count)
      (True, dtype('bool'), 0)
    """

    count: chex.Array
    mask: PyTree
    key: chex.Array


def fixed_anchor_mask(
    ratio: float | None = None,
    key: jax.Array | None = None,
    *,
    granularity: str = "weight",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    mask: PyTree | None = None,
    refresh_every: int | None = None,
    layer_order: Sequence[str] | None = None,
    unit_groups: Callable[[str], str] | None = None,
) -> optax.GradientTransformation:
    r"""Zeroes the updates of anchored parameter entries (TNA-PFN's partial gradient mask).

    With :math:`m` the anchor mask (:func:`anchor_mask`) and :math:`u_t` the incoming updates,

    .. math:: u'_t = (1 - m) \odot u_t ,

    so after any number of steps :math:`\theta_t \odot m = \theta_0 \odot m` bit for bit. Chain it
    *after* the optimizer so that everything the optimizer adds (weight decay included) is masked:
    ``optax.chain(optax.adamw(1e-3), fixed_anchor_mask(0.4, key))``.

    With ``refresh_every=k`` the mask for step :math:`t` is drawn from
    ``fold_in(key, t // k)``: a fresh anchor set every `k` steps, the idea of FedPNU used in
    centralised training. Anchored entries are then frozen at their current values.

    The mask lives in the state (one byte per parameter), chosen over regenerating it at every
    step; see ``benchmarks/anchor_overhead.py``. The update does not read `ratio` or `key`, so:

    * one mask for a batch of seeds: ``jax.vmap(tx.init)(stacked_params)``;
    * one mask per seed: ``jax.vmap(lambda p, k: fixed_anchor_mask(ratio, k).init(p))(stacked_params,
      keys)`` and then ``jax.vmap(tx.update)`` with any instance of the transform.

    It works under ``jit``, ``vmap``, sharding, ``optax.MultiSteps``, ``optax.inject_hyperparams``,
    ``optax.multi_transform`` and ``flax.nnx.Optimizer``.

    Args:
      ratio: anchored fraction ρ in [0, 1] (with `key`).
      key: PRNG key shared by every model that should share the anchors.
      granularity, include, exclude, layer_order, unit_groups: see :func:`anchor_mask`.
      mask: a precomputed mask (e.g. from :func:`prune_at_init`) instead of `ratio` and `key`.
      refresh_every: draw a new mask every this many updates (needs `ratio` and `key`).

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`FixedAnchorMaskState`.

    Raises:
      ValueError: both or neither of `mask` and (`ratio`, `key`); bad `ratio`, `granularity`,
        `refresh_every`; at ``init``, a mask that does not match the params (naming the path).
      TypeError: `key` is not a PRNG key.

    References:
      Li et al., Training-time Neuron Alignment through Permutation Subspace for Improving Linear
      Mode Connectivity and Model Fusion, 2024 (TNA-PFN).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones((4, 4))}
      >>> tx = optax.chain(optax.adamw(0.1), fixed_anchor_mask(0.5, jax.random.key(0)))
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.ones((4, 4))}
      >>> updates, state = tx.update(grads, state, params)
      >>> new = optax.apply_updates(params, updates)
      >>> anchored = state[1].mask["w"]
      >>> bool((new["w"][anchored] == 1.0).all()), bool((new["w"][~anchored] != 1.0).all())
      (True, True)
    """
    mask_kwargs = dict(granularity=granularity, include=include, exclude=exclude,
                       layer_order=layer_order, unit_groups=unit_groups)
    if mask is not None:
        if ratio is not None or key is not None:
            raise ValueError("fixed_anchor_mask takes either mask= or (ratio, key), not both; "
                             f"got mask and ratio={ratio!r}, key={'given' if key is not None else None}.")
        if refresh_every is not None:
            raise ValueError("refresh_every needs ratio and key to draw new masks; it cannot be "
                             "used with a precomputed mask=.")
        key_data = jnp.zeros((2,), jnp.uint32)
    else:
        if ratio is None or key is None:
            raise ValueError("fixed_anchor_mask needs ratio and key (or a precomputed mask=); "
                             f"got ratio={ratio!r}, key={'given' if key is not None else None}.")
        _check_ratio(ratio)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}.")
        key_data = jax.random.key_data(_as_key(key))
    if refresh_every is not None:
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, numbers.Integral) or refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive integer or None; got {refresh_every!r}.")

    # Updates arrive with dict keys re-sorted by JAX, so the input-to-output layer order that the
    # named selections ("first", "last") need is read from the params at init and kept here.
    init_layer_order: list[str] = list(layer_order) if layer_order is not None else []

    def draw(params: PyTree, key_data: jax.Array, period: Any) -> PyTree:
        k = jax.random.wrap_key_data(key_data)
        if refresh_every is not None:
            k = jax.random.fold_in(k, period)
        kwargs = dict(mask_kwargs, layer_order=init_layer_order or None)
        return anchor_mask(params, k, ratio, **kwargs)

    def init_fn(params: PyTree) -> FixedAnchorMaskState:
        if mask is not None:
            check_mask(params, mask)
            # Copies: the state may be donated to a jitted step, which must not delete the
            # caller's arrays.
            m = jax.tree.map(lambda x: jnp.array(x, dtype=bool, copy=True), mask)
        else:
            if not init_layer_order and hasattr(params, "items"):
                init_layer_order.extend(tree_lib.module_order(params))
            m = draw(params, key_data, 0)
        return FixedAnchorMaskState(count=jnp.zeros([], jnp.int32), mask=m, key=jnp.array(key_data, copy=True))

    def update_fn(updates: PyTree, state: FixedAnchorMaskState, params: PyTree | None = None):
        del params
        m = state.mask
        if refresh_every is not None:
            period = state.count // refresh_every
            m = jax.lax.cond(
                (state.count % refresh_every == 0) & (state.count > 0),
                lambda: draw(updates, state.key, period),
                lambda: m,
            )
        new_updates = jax.tree.map(
            lambda u, a: None if u is None else jnp.where(a, jnp.zeros((), u.dtype), u),
            updates, m, is_leaf=lambda x: x is None,
        )
        count = optax.safe_int32_increment(state.count)
        return new_updates, FixedAnchorMaskState(count=count, mask=m, key=state.key)

    return optax.GradientTransformation(init_fn, update_fn)
