"""Deriving a model's permutation spec from its computation, not by hand.

git-re-basin writes a ``PermutationSpec`` by hand for every architecture. Here it is read off the
model's jaxpr (the list of primitive operations ``net.apply`` performs in evaluation mode):

1. The jaxpr is traced with every ``jit``/``custom_jvp``/``custom_vjp`` call inlined, so it is
   one flat list of primitives.
2. Every axis of every intermediate array is a node. Each primitive *links* the axes that must
   be reordered together for the output to be the same reordering of the inputs: an elementwise
   op links equal axes of its operands and output; ``dot_general`` links the two contracted axes
   and passes the free axes to the output; a convolution links its input channels with the
   kernel's input axis and the kernel's output axis with the output channels; a reshape links
   the factors it merges or splits (so a convolution's channels survive a flatten into a dense
   layer, and attention's ``(heads, head_dim)`` survive the head split), reductions keep the
   axes they do not reduce.
3. Axes that cannot be reordered are *fixed*: the model's input and output, constants, ``iota``,
   spatial axes of convolutions and pools, sliced/padded/concatenated/gathered axes, and every
   axis of a primitive without a rule (listed in :attr:`Analysis.unsupported`; being fixed is
   always safe, it only means fewer symmetries).
4. The connected groups of linked axes (union-find) that touch at least one parameter and no
   fixed axis are the permutations. Residual streams come out as one permutation because the
   additions link them. A permutation ``X`` is *nested* in ``Y`` when every array that carries
   ``X`` also carries ``Y`` and no operation mixes different positions of ``Y`` while keeping
   ``X`` (attention: the head dimension may be reordered differently in every head).

Each permutation is named after the layer that writes it (the first layer, in call order, whose
kernel has it on its last axis), e.g. ``"dense_0"``, ``"stage1_block0/conv1"``; a residual stream
after the first layer writing into it (``"conv_stem"``, ``"stage1_block0/conv2"``); the parent of
nested permutations after its first child (``"block0/attn/query:heads"``); otherwise after the
first array and (expanded) axis carrying it (``"embed/pos[1]"``).

The same analysis also tells which activations carry each permutation and are fed into a weight
contraction; :mod:`tna_jax.align.activation_matching` uses those as the features to correlate.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np

from tna_jax import tree as tree_lib
from tna_jax.align.rules import Factors, Rules, UnionFind, is_var, shape_of
from tna_jax.align.spec import LeafLayout, PermutationSpec

PyTree = Any

__all__ = ["permutation_spec", "analyze", "Analysis", "FeaturePoint", "flat_jaxpr", "eval_flat"]

# ---------------------------------------------------------------------------------------------
# 1. A flat jaxpr.
# ---------------------------------------------------------------------------------------------

_INLINE = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
           "custom_vjp_call_jaxpr", "remat", "checkpoint", "remat2"}


def _sub_jaxpr(eqn: Any) -> tuple[Any, list[Any]] | None:
    if eqn.primitive.name not in _INLINE:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, jcore.ClosedJaxpr):
            return sub.jaxpr, list(sub.consts)
        if isinstance(sub, jcore.Jaxpr):
            return sub, []
    return None


def eval_flat(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any],
              capture: frozenset[Any] | set[Any] = frozenset()) -> tuple[list[Any], dict[Any, Any]]:
    """Evaluates `jaxpr` primitive by primitive, inlining calls; returns the outputs and the values
    of the variables in `capture` (traceable: use it under ``jit``/``vmap``)."""
    env: dict[Any, Any] = {}
    captured: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def run(jx: Any, cs: Sequence[Any], xs: Sequence[Any]) -> list[Any]:
        for v, c in zip(jx.constvars, cs):
            env[v] = c
        for v, a in zip(jx.invars, xs):
            env[v] = a
        for eqn in jx.eqns:
            invals = [read(v) for v in eqn.invars]
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                outs = run(sub[0], sub[1], invals)
            else:
                params = eqn.primitive.get_bind_params(eqn.params)
                if isinstance(params, tuple):  # older JAX: (subfuns, params)
                    outs = eqn.primitive.bind(*params[0], *invals, **params[1])
                else:
                    outs = eqn.primitive.bind(*invals, **params)
                if not eqn.primitive.multiple_results:
                    outs = [outs]
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
                    if v in capture:
                        captured[v] = o
        return [read(v) for v in jx.outvars]

    outs = run(jaxpr, consts, args)
    return outs, captured


def flat_jaxpr(net: Any, variables: PyTree, batch_size: int = 2) -> tuple[Any, list[str], Any]:
    """The flat (call-free) jaxpr of ``net.apply(variables, x)[0]`` in evaluation mode.

    Returns ``(closed_jaxpr, leaf_names, treedef)``: the jaxpr's inputs are the leaves of
    `variables` (named by `leaf_names`, in flattening order) followed by ``x`` of shape
    ``(batch_size, *net.input_shape)``.
    """
    leaves, treedef = jax.tree.flatten(variables)
    names = [n for n, _ in tree_lib.named_leaves(variables)]
    abstract = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]
    x = jax.ShapeDtypeStruct((batch_size, *net.input_shape), net.input_dtype)

    def fwd(*args):
        v = jax.tree.unflatten(treedef, args[:-1])
        return net.apply(v, args[-1], train=False)[0]

    closed = jax.make_jaxpr(fwd)(*abstract, x)

    def inlined(*args):
        return eval_flat(closed.jaxpr, closed.consts, args)[0]

    return jax.make_jaxpr(inlined)(*abstract, x), names, treedef


# ---------------------------------------------------------------------------------------------
# 4. The analysis.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeaturePoint:
    """An activation that carries a permutation and feeds a weight contraction.

    Attributes:
      var: the jaxpr variable holding it.
      factors: its expanded shape.
      axis: the expanded axis of the permutation's units.
      parent_axis: for nested permutations, the expanded axis of the parent's units.
    """

    var: Any
    factors: tuple[int, ...]
    axis: int
    parent_axis: int | None = None


@dataclasses.dataclass(eq=False)
class Analysis:
    """What :func:`analyze` finds: the spec, the flat jaxpr it came from and the activation points.

    Attributes:
      spec: the :class:`PermutationSpec`.
      jaxpr: the flat closed jaxpr (inputs: variables leaves, then ``x``).
      leaf_names: names of the variables leaves, in the jaxpr's input order.
      features: ``{perm name: [FeaturePoint, ...]}``; for a parent of nested permutations, its
        own points (without a child axis) are under its name and the joint ones under the child.
      unsupported: primitives without a rule (their axes were fixed).
      batch_size: the batch size the jaxpr was traced with.
      order: the variables' leaf names in the order the computation first reads them.
    """

    spec: PermutationSpec
    jaxpr: Any
    leaf_names: list[str]
    features: dict[str, list[FeaturePoint]]
    unsupported: tuple[str, ...]
    batch_size: int
    order: tuple[str, ...] = ()


def _call_rank(jx: Any, leaf_vars: list[Any], names: list[str]) -> Callable[[str], tuple[Any, ...]]:
    """Orders arrays by where the computation first reads them (Flax's call order)."""
    first: dict[Any, int] = {}
    for i, eqn in enumerate(jx.eqns):
        for v in eqn.invars:
            if is_var(v) and v not in first:
                first[v] = i
    pos = {names[k]: first.get(v, len(jx.eqns)) for k, v in enumerate(leaf_vars)}

    def rank(path: str) -> tuple[Any, ...]:
        return (pos.get(path, len(jx.eqns)), not path.startswith("params/"), tuple(tree_lib.natural_key(path)))

    return rank


def analyze(net: Any, variables: PyTree | None = None, *, batch_size: int = 2) -> Analysis:
    """Derives the permutation spec of `net` and the activations that carry each permutation.

    Args:
      net: a :class:`tna_jax.models.Net` (anything with ``apply``, ``init``, ``input_shape``,
        ``input_dtype``).
      variables: the model's variables (or their ``jax.ShapeDtypeStruct``); default from
        ``net.init``.
      batch_size: batch size of the traced jaxpr (activation matching traces at its own).

    Returns:
      an :class:`Analysis`.
    """
    if variables is None:
        variables = jax.eval_shape(net.init, jax.random.key(0))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), variables)
    signature = tuple((n, tuple(np.shape(x)), str(x.dtype)) for n, x in tree_lib.named_leaves(abstract))
    try:
        return _analyze_cached(net, int(batch_size), signature, _Frozen(abstract))
    except TypeError:  # an unhashable net
        return _analyze(net, abstract, int(batch_size))


class _Frozen:
    """Carries a pytree through ``lru_cache`` without taking part in the key."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Frozen)


@functools.lru_cache(maxsize=64)
def _analyze_cached(net: Any, batch_size: int, signature: tuple[Any, ...], abstract: _Frozen) -> Analysis:
    del signature
    return _analyze(net, abstract.value, batch_size)


def _nodes(facs: Factors, v: Any, a: int) -> list[tuple[Any, int, int]]:
    return [(v, a, k) for k in range(len(facs.get(v, a)))]


def _all_nodes(facs: Factors, v: Any) -> list[tuple[Any, int, int]]:
    return [n for a in range(len(shape_of(v))) for n in _nodes(facs, v, a)]


def _link(jx: Any, rels: list[tuple[int, tuple[Any, ...]]], facs: Factors, x_var: Any
          ) -> tuple[UnionFind, set[Any], dict[int, list[tuple[Any, Any]]]]:
    """Merges the factor nodes the relations link; ``(union-find, fixed roots, links per equation)``."""
    uf = UnionFind()
    fixed: set[Any] = set()
    links: dict[int, list[tuple[Any, Any]]] = {}
    for i, r in rels:
        if r[0] == "fix":
            fixed.update(_nodes(facs, r[1], r[2]))
            continue
        if r[0] == "same":
            _, u, a, v, b = r
            nu, nv = _nodes(facs, u, a), _nodes(facs, v, b)
            if (u, a) in facs.bad or (v, b) in facs.bad or len(nu) != len(nv):
                fixed.update(nu)
                fixed.update(nv)
                for x in nu[1:] + nv:
                    if nu:
                        uf.union(nu[0], x)
                continue
        else:
            _, w, u = r
            nu, nv = _all_nodes(facs, w), _all_nodes(facs, u)
            bad = any((w, a) in facs.bad for a in range(len(shape_of(w)))) or \
                any((u, a) in facs.bad for a in range(len(shape_of(u))))
            if bad or len(nu) != len(nv):
                fixed.update(nu)
                fixed.update(nv)
                continue
        for x, y in zip(nu, nv):
            uf.union(x, y)
            links.setdefault(i, []).append((x, y))
    fixed.update(_all_nodes(facs, x_var))
    for v in [*jx.outvars, *jx.constvars]:
        if is_var(v):
            fixed.update(_all_nodes(facs, v))
    return uf, {uf.find(n) for n in fixed}, links


def _classes(jx: Any, leaf_vars: list[Any], names: list[str], uf: UnionFind, fixed_roots: set[Any], facs: Factors
             ) -> tuple[dict[Any, list[tuple[str, int, int]]], dict[Any, dict[Any, list[tuple[Any, int, int]]]]]:
    """The permutable classes (roots of parameter nodes that are not fixed) with their parameter
    nodes, and for every variable of the jaxpr the classes it carries."""
    root_nodes: dict[Any, list[tuple[str, int, int]]] = {}
    for k, v in enumerate(leaf_vars):
        for node in _all_nodes(facs, v):
            r = uf.find(node)
            if r not in fixed_roots:
                root_nodes.setdefault(r, []).append((names[k], node[1], node[2]))
    all_vars: list[Any] = list(jx.invars) + [v for e in jx.eqns for v in e.outvars if is_var(v)]
    var_classes: dict[Any, dict[Any, list[tuple[Any, int, int]]]] = {}
    for v in all_vars:
        cls: dict[Any, list[tuple[Any, int, int]]] = {}
        for node in _all_nodes(facs, v):
            r = uf.find(node)
            if r in root_nodes:
                cls.setdefault(r, []).append(node)
        var_classes[v] = cls
    return root_nodes, var_classes


def _node_pos(facs: Factors, v: Any, a: int, k: int) -> int:
    return sum(len(facs.get(v, b) or (1,)) for b in range(a)) + k


def _class_names(order: list[Any], root_nodes: dict[Any, list[tuple[str, int, int]]], leaf_vars: list[Any],
                 names: list[str], rank: Callable[[str], Any], facs: Factors, parent_of: dict[Any, Any]) -> dict[Any, str]:
    """Names each class after the layer that writes it (see the module docstring)."""
    width = {v: sum(len(facs.get(v, a) or (1,)) for a in range(len(shape_of(v)))) for v in leaf_vars}
    class_name: dict[Any, str] = {}
    taken: set[str] = set()
    for r in order:
        cands = []
        for path, a, k in root_nodes[r]:
            v = leaf_vars[names.index(path)]
            is_last = _node_pos(facs, v, a, k) == width[v] - 1
            if path.startswith("params/") and path.split("/")[-1] in ("kernel", "embedding") and is_last:
                cands.append((rank(path), "/".join(path.split("/")[1:-1])))
        if cands:
            name = min(cands)[1]
        else:
            path, a, k = min(root_nodes[r], key=lambda t: (rank(t[0]), t[1], t[2]))
            short = path[len("params/"):] if path.startswith("params/") else path
            name = f"{short}[{_node_pos(facs, leaf_vars[names.index(path)], a, k)}]"
        base, j = name, 1
        while name in taken:
            j += 1
            name = f"{base}#{j}"
        taken.add(name)
        class_name[r] = name
    for y in order:  # a parent of nested permutations is named after its first child: "<child>:heads"
        kids = [x for x in order if parent_of.get(x) == y]
        if kids and f"{class_name[kids[0]]}:heads" not in taken:
            class_name[y] = f"{class_name[kids[0]]}:heads"
            taken.add(class_name[y])
    return class_name


def _spec(order: list[Any], root_nodes: dict[Any, Any], leaf_vars: list[Any], names: list[str], rank: Callable[[str], Any],
          facs: Factors, uf: UnionFind, class_name: dict[Any, str], parent_of: dict[Any, Any]) -> PermutationSpec:
    layouts = []
    for k_, v in enumerate(leaf_vars):
        perms: list[str | None] = []
        for a in range(len(shape_of(v))):
            for k in range(len(facs.get(v, a))) or [None]:
                r = uf.find((v, a, k)) if k is not None else None
                perms.append(class_name[r] if r in root_nodes else None)
        if any(p is not None for p in perms):
            expanded = tuple(f for a in range(len(shape_of(v))) for f in (facs.get(v, a) or (1,)))
            layouts.append((names[k_], LeafLayout(shape_of(v), expanded, tuple(perms))))
    layouts.sort(key=lambda t: rank(t[0]))
    sizes = {class_name[r]: int(_node_size(root_nodes[r][0], leaf_vars, names, facs)) for r in order}
    return PermutationSpec(tuple((class_name[r], sizes[class_name[r]]) for r in order),
                           tuple((class_name[r], class_name[parent_of[r]] if r in parent_of else None) for r in order),
                           tuple(layouts))


def _analyze(net: Any, variables: PyTree, batch_size: int) -> Analysis:
    closed, names, _ = flat_jaxpr(net, variables, batch_size)
    jx = closed.jaxpr
    leaf_vars = list(jx.invars[:len(names)])
    x_var = jx.invars[len(names)]
    rules = Rules()
    for i, eqn in enumerate(jx.eqns):
        rules.eqn(i, eqn)
    facs = Factors()
    facs.solve(rules.rel)
    uf, fixed_roots, links = _link(jx, rules.rel, facs, x_var)
    root_nodes, var_classes = _classes(jx, leaf_vars, names, uf, fixed_roots, facs)
    roots = set(root_nodes)
    parent_of = _nesting(jx, roots, var_classes, links, uf)
    rank = _call_rank(jx, leaf_vars, names)
    order = sorted(roots, key=lambda r: min((*rank(p), a, k) for p, a, k in root_nodes[r]))
    class_name = _class_names(order, root_nodes, leaf_vars, names, rank, facs, parent_of)
    spec = _spec(order, root_nodes, leaf_vars, names, rank, facs, uf, class_name, parent_of)
    features = _features(jx, x_var, set(leaf_vars), roots, var_classes, parent_of, class_name, facs)
    return Analysis(spec=spec, jaxpr=closed, leaf_names=names, features=features,
                    unsupported=tuple(sorted(rules.unsupported)), batch_size=batch_size,
                    order=tuple(sorted(names, key=rank)))


def _node_size(node: tuple[str, int, int], leaf_vars: list[Any], names: list[str], facs: Factors) -> int:
    path, a, k = node
    v = leaf_vars[names.index(path)]
    return facs.get(v, a)[k]


def _nesting(jx: Any, roots: set[Any], var_classes: dict[Any, dict[Any, Any]],
             links: dict[int, list[tuple[Any, Any]]], uf: UnionFind) -> dict[Any, Any]:
    """``{child root: parent root}`` for permutations that may be reordered per parent position."""
    parent_of: dict[Any, Any] = {}
    for x in roots:
        carriers = [v for v, cls in var_classes.items() if x in cls]
        if any(len(var_classes[v][x]) != 1 for v in carriers):
            continue
        common = None
        for v in carriers:
            s = set(var_classes[v]) - {x}
            common = s if common is None else common & s
        if not common or len(common) != 1:
            continue
        y = next(iter(common))
        if any(len(var_classes[v][y]) != 1 for v in carriers):
            continue
        ok = True
        for i, eqn in enumerate(jx.eqns):
            eq_links = {frozenset(p) for p in links.get(i, [])}
            for u in eqn.invars:
                if not is_var(u) or not {x, y} <= set(var_classes.get(u, {})):
                    continue
                for w in eqn.outvars:
                    if not is_var(w) or x not in var_classes.get(w, {}):
                        continue
                    if y not in var_classes[w] or \
                            frozenset((var_classes[u][y][0], var_classes[w][y][0])) not in eq_links:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            parent_of[x] = y
    # one level only: a parent may not itself be nested
    return {x: y for x, y in parent_of.items() if y not in parent_of}


def _features(jx: Any, x_var: Any, leaf_vars: set[Any], roots: set[Any], var_classes: dict[Any, Any],
              parent_of: dict[Any, Any], class_name: dict[Any, str], facs: Factors) -> dict[str, list[FeaturePoint]]:
    """Activations (functions of the input) that a weight contraction consumes along a permuted axis."""
    depends = {x_var}
    for eqn in jx.eqns:
        if any(is_var(v) and v in depends for v in eqn.invars):
            depends.update(v for v in eqn.outvars if is_var(v))
    found: dict[Any, set[Any]] = {}
    for eqn in jx.eqns:
        name = eqn.primitive.name
        contracted: list[tuple[Any, int]] = []
        if name == "dot_general":
            (lc, rc), _ = eqn.params["dimension_numbers"]
            contracted = [(eqn.invars[0], a) for a in lc] + [(eqn.invars[1], b) for b in rc]
        elif name == "conv_general_dilated" and eqn.params["feature_group_count"] == 1:
            dn = eqn.params["dimension_numbers"]
            contracted = [(eqn.invars[0], dn.lhs_spec[1]), (eqn.invars[1], dn.rhs_spec[1])]
        for u, a in contracted:
            if not is_var(u) or u not in depends or u in leaf_vars:
                continue
            for r, nodes_ in var_classes.get(u, {}).items():
                if any(n[1] == a for n in nodes_):
                    found.setdefault(u, set()).add(r)
    out: dict[str, list[FeaturePoint]] = {class_name[r]: [] for r in roots}
    for u, rs in found.items():
        factors = tuple(f for a in range(len(shape_of(u))) for f in (facs.get(u, a) or (1,)))

        def pos(node: tuple[Any, int, int], u: Any = u) -> int:
            return sum(len(facs.get(u, b) or (1,)) for b in range(node[1])) + node[2]

        cls = var_classes[u]
        for r in sorted(rs, key=lambda r: class_name[r]):
            if r in parent_of and parent_of[r] in cls:
                out[class_name[r]].append(FeaturePoint(u, factors, pos(cls[r][0]), pos(cls[parent_of[r]][0])))
            elif r in parent_of:
                continue
            else:
                kids = [c for c, p in parent_of.items() if p == r and c in cls]
                if kids and any(c in rs for c in kids):
                    continue  # counted jointly with its child
                out[class_name[r]].append(FeaturePoint(u, factors, pos(cls[r][0])))
    return out


def permutation_spec(net: Any, variables: PyTree | None = None) -> PermutationSpec:
    """The permutation spec of `net`, derived from its computation (see the module docstring).

    Args:
      net: a :class:`tna_jax.models.Net`.
      variables: optional variables to check the spec against (shapes); the spec itself depends
        only on the architecture.

    Returns:
      a :class:`PermutationSpec` covering ``params`` and ``batch_stats``.

    Examples:
      >>> from tna_jax import models
      >>> net = models.build({"name": "mlp", "depth": 2, "width": 16}, (40,), 10)
      >>> print(permutation_spec(net).describe())
      2 permutations over 5 arrays
        dense_0 (16 units): dense_0/kernel[:, dense_0]  dense_0/bias[dense_0]  dense_1/kernel[dense_0, dense_1]
        dense_1 (16 units): dense_1/kernel[dense_0, dense_1]  dense_1/bias[dense_1]  head/kernel[dense_1, :]
    """
    spec = analyze(net).spec
    if variables is not None:
        spec.check_variables(variables)
    return spec
