"""Layer-wise LMC (Adilova et al., 2024): interpolate one group of layers at a time, the rest kept
at A: θ_α^G = A + α · 1_G ⊙ (B − A). Groups are per-leaf boolean masks stacked on a leading group
axis, so all groups and all α are one vmapped, compiled program. The cumulative variants
interpolate the first k groups ("from_input") or the last k groups ("from_output")."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import deprecation
from tna_jax import tree as tree_lib
from tna_jax.chunking import AUTO, Chunk, check_chunk, map_points
from tna_jax.evaluation import EvalFn
from tna_jax.lmc.paths import Barriers, LMCPath, barriers, check_alphas, check_compatible, check_data
from tna_jax.programs import cached_per_eval_fn

PyTree = Any

__all__ = ["LAYERWISE_MODES", "OTHER_GROUP", "LayerwiseLMC", "layer_groups", "layerwise_lmc"]


LAYERWISE_MODES = ("single", "from_input", "from_output")


OTHER_GROUP = "other"


_COLLECTIONS = ("params", "batch_stats")


GroupSpec = str | Sequence[str]


@deprecation.legacy_item_access
class LayerwiseLMC(NamedTuple):
    """Layer-wise LMC of one pair of models (:func:`layerwise_lmc`).

    Attributes:
      mode: one of :data:`LAYERWISE_MODES`.
      groups: the G group names.
      members: for each group, the names of the leaves it interpolates.
      paths: an :class:`~tna_jax.lmc.paths.LMCPath` with alpha (K,) and loss, accuracy (G, K)
        (NumPy).
      per_group: G :class:`~tna_jax.lmc.paths.Barriers`.
      loss_barrier: (G,) NumPy.
      accuracy_barrier: (G,) NumPy.
    """

    mode: str
    groups: list[str]
    members: list[list[str]]
    paths: LMCPath
    per_group: list[Barriers]
    loss_barrier: np.ndarray
    accuracy_barrier: np.ndarray


def _strip_collection(names: list[str], tree: PyTree) -> list[str]:
    """Leaf names without the Flax collection ("params/dense_0/kernel" -> "dense_0/kernel")."""
    if isinstance(tree, Mapping) and "params" in tree:
        return [n.split("/", 1)[1] if "/" in n else n for n in names]
    return names


def _layer_of(name: str, layers: set[str]) -> str | None:
    """The weight layer a leaf belongs to: its module, or the layer whose ``<layer>_norm`` it is."""
    module = name.rsplit("/", 1)[0] if "/" in name else ""
    if module in layers:
        return module
    owner = tree_lib.norm_owner(module)
    return owner if owner in layers else None


def layer_groups(variables: PyTree, groups: Sequence[GroupSpec] | Mapping[str, GroupSpec] | None = None, *,
                 layer_order: Sequence[str] | None = None) -> list[tuple[str, np.ndarray]]:
    """Which leaves of `variables` each group selects: ``[(group name, bool vector), ...]``.

    The bool vectors run over the leaves of `variables` in JAX's flattening order. Names are
    matched without the Flax collection prefix (``"dense_0/kernel"`` for both
    ``params/dense_0/kernel`` and a BatchNorm's ``batch_stats/dense_0_norm/mean``).

    Args:
      variables: one model's variables (``{"params", ["batch_stats"]}``) or a bare params tree.
      groups: None (default): one group per weight layer, in `layer_order` (or
        :func:`tna_jax.tree.module_order` of the params), holding the layer's leaves and those of
        its ``<layer>_norm`` (scale, bias and BatchNorm statistics); leaves of no weight layer
        (positional embeddings, stand-alone LayerNorms) form a last group named ``"other"``.
        Otherwise a sequence (or ``{name: spec}`` mapping) of specs, one group each: a string is
        a regular expression (``re.search`` over the leaf names); a list of strings names layers
        (selecting the layer and its norm) or leaves exactly.
      layer_order: the weight layers from input to output (``net.layer_order()``). Pass it: Flax
        returns params in call order but ``jax.tree.map`` re-sorts dict keys, so after training
        the insertion order may be alphabetical (``block10`` before ``block2``).

    Returns:
      ``[(name, selected), ...]``: one boolean vector over the leaves per group.

    Raises:
      ValueError: a group that selects nothing (naming it and listing the leaves), a bad regex,
        or a layer of `layer_order` that the variables do not hold.
      TypeError: a spec that is neither a string nor a list of strings.

    Examples:
      >>> import jax.numpy as jnp
      >>> v = {"params": {"dense_0": {"kernel": jnp.ones((2, 2))}, "dense_0_norm": {"scale": jnp.ones(2)},
      ...                 "head": {"kernel": jnp.ones((2, 1))}}}
      >>> [(name, sel.tolist()) for name, sel in layer_groups(v)]
      [('dense_0', [True, True, False]), ('head', [False, False, True])]
    """
    full = tree_lib.leaf_names(variables)
    names = _strip_collection(full, variables)
    if not names:
        raise ValueError("variables has no leaves to group.")
    params = variables["params"] if isinstance(variables, Mapping) and "params" in variables else variables
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    out: list[tuple[str, np.ndarray]] = []
    if groups is None:
        layers = list(layer_order) if layer_order is not None else tree_lib.module_order(params)
        layer_set = set(layers)
        owner = [_layer_of(n, layer_set) for n in names]
        for layer in layers:
            sel = np.array([o == layer for o in owner], dtype=bool)
            if not sel.any():
                raise ValueError(f"layer_order names layer {layer!r}, which the variables do not hold; "
                                 f"the leaves are: {shown}.")
            out.append((layer, sel))
        rest = np.array([o is None for o in owner], dtype=bool)
        if rest.any():
            out.append((OTHER_GROUP, rest))
        return out
    items = list(groups.items()) if isinstance(groups, Mapping) else [(None, g) for g in groups]
    if not items:
        raise ValueError("groups must hold at least one group; got an empty sequence.")
    for label, spec in items:
        if isinstance(spec, str):
            try:
                regex = re.compile(spec)
            except re.error as err:
                raise ValueError(f"groups pattern {spec!r} is not a valid regular expression: {err}.") from None
            sel = np.array([regex.search(n) is not None for n in names], dtype=bool)
            label = spec if label is None else label
        elif isinstance(spec, Sequence) and spec and all(isinstance(s, str) for s in spec):
            wanted = list(spec)
            sel = np.zeros(len(names), dtype=bool)
            for w in wanted:
                hit = np.array([n == w or f == w or _layer_of(n, {w}) == w for n, f in zip(names, full)], dtype=bool)
                if not hit.any():
                    raise ValueError(f"groups entry {w!r} names no layer or leaf; the leaves are: {shown}.")
                sel |= hit
            label = "+".join(wanted) if label is None else label
        else:
            raise TypeError("each group must be a regular expression (str) or a non-empty list of layer/leaf "
                            f"names; got {type(spec).__name__} {spec!r}.")
        if not sel.any():
            raise ValueError(f"group {label!r} selects no leaf; the leaves are: {shown}.")
        out.append((str(label), sel))
    return out


def _cumulative(named: list[tuple[str, np.ndarray]], mode: str) -> list[tuple[str, np.ndarray]]:
    if mode == "single":
        return named
    seq = named if mode == "from_input" else named[::-1]
    out, acc = [], np.zeros_like(seq[0][1])
    for k, (name, sel) in enumerate(seq):
        acc = acc | sel
        label = name if k == 0 else (f"{seq[0][0]} .. {name}" if mode == "from_input" else f"{name} .. {seq[0][0]}")
        out.append((label, acc.copy()))
    return out


def _masked_lerp(a: PyTree, b: PyTree, alpha: jax.Array, select: PyTree) -> PyTree:
    """θ = lerp(a, b, α) on the leaves where `select` (one bool scalar per leaf) holds, a elsewhere."""

    def one(x, y, s):
        # α·1[s] is exactly α or 0, so selected leaves get lerp(x, y, α) (the full path's
        # arithmetic, op for op) and the others (1 − 0) x + 0 y = x.
        return tree_lib.lerp(x, y, alpha * s.astype(jnp.float32))

    return jax.tree.map(one, a, b, select)


@cached_per_eval_fn
def _layerwise_program(eval_fn: EvalFn, chunk: Chunk, jit: bool) -> Callable[..., Any]:
    def compute(a, b, masks, gi, al, x, y):
        def point(inputs):
            g, alpha = inputs
            return eval_fn(_masked_lerp(a, b, alpha, tree_lib.index(masks, g)), x, y)

        return map_points(point, (gi, al), chunk)

    return jax.jit(compute) if jit else compute


def _legacy_layerwise_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Maps the pre-0.2 ``layerwise_lmc(eval_fn, a, b, groups, data)`` onto the new order."""
    if len(args) >= 5 or (len(args) == 4 and "data" in kwargs):
        deprecation.warn("layerwise_lmc(eval_fn, a, b, groups, data)",
                         "layerwise_lmc(eval_fn, a, b, data, groups=...)", stacklevel=4)
        kwargs = {**kwargs, "groups": args[3]}
        args = (*args[:3], args[4] if len(args) >= 5 else kwargs.pop("data"), *args[5:])
    return args, kwargs


@deprecation.legacy_call(_legacy_layerwise_call)
def layerwise_lmc(eval_fn: EvalFn, a: PyTree, b: PyTree, data: tuple[jax.Array, jax.Array], *,
                  groups: Sequence[GroupSpec] | Mapping[str, GroupSpec] | None = None,
                  alphas: Sequence[float] | None = None, mode: str = "single", chunk: Chunk = AUTO,
                  layer_order: Sequence[str] | None = None, jit: bool = True) -> LayerwiseLMC:
    """Layer-wise linear mode connectivity: interpolate one group of layers, keep the rest at A.

    For a group G with indicator 1_G over the leaves, the path is
    θ_α^G = (1 − α 1_G) ⊙ θ_A + α 1_G ⊙ θ_B, i.e. G's leaves move from A to B and every other
    leaf stays at A. Its barriers (:func:`barriers`) are measured against the chord between its
    own ends, θ_A and "A with G taken from B" (Adilova et al., 2024, "Layer-wise linear mode
    connectivity", ICLR). Modes:

    * ``"single"``: one path per group;
    * ``"from_input"``: path k interpolates groups 0..k (cumulative from the input);
    * ``"from_output"``: path k interpolates the last k + 1 groups (cumulative from the output).

    The last cumulative path interpolates every group; with the default groups (which cover
    every leaf) it is the full LMC path of :func:`lmc_path`, number for number.

    The per-group selections are stacked into a tree of bools with a leading group axis (one
    bool per leaf and group), so all groups and all α are ONE vmapped, compiled program
    (cached per ``(eval_fn, chunk)``: further pairs reuse it). The pre-0.2 order
    ``layerwise_lmc(eval_fn, a, b, groups, data)`` still works, with a `DeprecationWarning`.

    Args:
      eval_fn: evaluation of one model (wrap it with :func:`tna_jax.norm_stats.with_bn_reset`
        for BatchNorm nets).
      a, b: the two models' variables (same structure).
      data: ``(x, y)``.
      groups: None (default) for one group per weight layer, or regexes / name lists
        (see :func:`layer_groups`).
      alphas: the α grid (default 25 points in [0, 1]; values outside extrapolate).
      mode: one of :data:`LAYERWISE_MODES`.
      chunk: evaluate at most this many (group, α) points at once; None = all, ``"auto"``
        (default) as in :func:`lmc_path`.
      layer_order: the weight layers from input to output (``net.layer_order()``).

    Returns:
      :class:`LayerwiseLMC`.

    Raises:
      ValueError: different structures (naming the first mismatching path), empty data,
        chunk < 1, an unknown mode, groups that select nothing.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):  # loss (w1 w2 - 1)^2; A = (1, 1) and B = (-1, -1) are both minima
      ...     loss = (v["l1"]["kernel"] * v["l2"]["kernel"] - 1.0) ** 2
      ...     return {"loss": loss, "accuracy": (loss < 0.1).astype(jnp.float32)}
      >>> a = {"l1": {"kernel": jnp.array(1.0)}, "l2": {"kernel": jnp.array(1.0)}}
      >>> b = {"l1": {"kernel": jnp.array(-1.0)}, "l2": {"kernel": jnp.array(-1.0)}}
      >>> out = layerwise_lmc(eval_fn, a, b, (jnp.zeros(1), jnp.zeros(1)), alphas=[0.0, 0.5, 1.0])
      >>> out.groups, out.loss_barrier.tolist()  # each layer alone: convex, no barrier
      (['l1', 'l2'], [0.0, 0.0])
      >>> full = layerwise_lmc(eval_fn, a, b, (jnp.zeros(1), jnp.zeros(1)), alphas=[0.0, 0.5, 1.0],
      ...                      mode="from_input")
      >>> full.groups[-1], full.loss_barrier.tolist()  # both layers: the full LMC barrier
      ('l1 .. l2', [0.0, 1.0])
    """
    if mode not in LAYERWISE_MODES:
        raise ValueError(f"mode must be one of {LAYERWISE_MODES}; got {mode!r}.")
    if data is None:
        raise ValueError("layerwise_lmc needs data=(x, y) to evaluate on; got None.")
    x, y = check_data(data)
    chunk = check_chunk(chunk)
    check_compatible(a, b)
    alphas_arr = check_alphas(alphas)
    named = _cumulative(layer_groups(a, groups, layer_order=layer_order), mode)
    leaf_names = tree_lib.leaf_names(a)
    matrix = np.stack([sel for _, sel in named])  # (G, leaves)
    treedef = jax.tree.structure(a)
    masks = treedef.unflatten([jnp.asarray(matrix[:, i]) for i in range(matrix.shape[1])])
    g, k = matrix.shape[0], alphas_arr.shape[0]
    gi = jnp.repeat(jnp.arange(g, dtype=jnp.int32), k)
    al = jnp.tile(alphas_arr, g)
    out = _layerwise_program(eval_fn, chunk, bool(jit))(a, b, masks, gi, al, x, y)
    loss = np.asarray(out["loss"]).reshape(g, k)
    acc = np.asarray(out["accuracy"]).reshape(g, k)
    per_group = [barriers(LMCPath(alphas_arr, loss[i], acc[i])) for i in range(g)]
    return LayerwiseLMC(
        mode=mode,
        groups=[name for name, _ in named],
        members=[[leaf_names[j] for j in np.flatnonzero(sel)] for _, sel in named],
        paths=LMCPath(np.asarray(alphas_arr), loss, acc),
        per_group=per_group,
        loss_barrier=np.array([p.loss_barrier for p in per_group]),
        accuracy_barrier=np.array([p.accuracy_barrier for p in per_group]),
    )
