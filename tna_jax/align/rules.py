"""Linking rules of the spec derivation (`tna_jax.align.derive`): one small function per primitive.

Every axis of every intermediate array of a flat jaxpr is a node. A rule reads one equation and
records relations between the axes of its operands and outputs:

* ``("same", u, a, v, b)``: axis ``a`` of ``u`` and axis ``b`` of ``v`` must be reordered together;
* ``("reshape", w, u)``: ``w`` is ``u`` reshaped (their factors are linked through the reshape);
* ``("fix", u, a)``: axis ``a`` of ``u`` cannot be reordered.

`RULES` maps a primitive's name to its rule; a primitive without a rule fixes every axis it
touches (always safe: it only means fewer symmetries) and is reported as unsupported. The second
half of the module solves the relations: axes are factorised through reshapes (`Factors`), then
linked factor nodes are merged (`UnionFind`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.extend.core as jcore

__all__ = ["RULES"]

ELEMENTWISE = frozenset("""
add sub mul div max min pow atan2 rem and or xor not eq ne lt le gt ge nextafter neg exp exp2 log
log1p expm1 tanh logistic sin cos tan asin acos atan sinh cosh asinh acosh atanh sqrt rsqrt cbrt
abs sign floor ceil round is_finite integer_pow square erf erfc erf_inv lgamma digamma
convert_element_type copy copy_p stop_gradient reduce_precision real imag conj select_n clamp
add_any shift_left shift_right_logical shift_right_arithmetic population_count clz
""".split())
REDUCE = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
                    "reduce_xor"})
ARG_REDUCE = frozenset({"argmax", "argmin"})
WINDOW = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min"})
CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})


def is_var(v: Any) -> bool:
    """Whether `v` is a jaxpr variable (not a literal, not a dropped output)."""
    return not isinstance(v, (jcore.Literal, jcore.DropVar))


def shape_of(v: Any) -> tuple[int, ...]:
    """The shape of a jaxpr variable."""
    return tuple(int(d) for d in v.aval.shape)


class Rules:
    """Collects the relations of a jaxpr's equations (`eqn` applies the rule of each one)."""

    def __init__(self) -> None:
        self.rel: list[tuple[int, tuple[Any, ...]]] = []
        self.unsupported: set[str] = set()

    def same(self, i: int, u: Any, a: int, v: Any, b: int) -> None:
        if is_var(u) and is_var(v):
            self.rel.append((i, ("same", u, a, v, b)))

    def fix(self, i: int, u: Any, a: int) -> None:
        if is_var(u):
            self.rel.append((i, ("fix", u, a)))

    def fix_all(self, i: int, *vs: Any) -> None:
        for v in vs:
            if is_var(v):
                for a in range(len(shape_of(v))):
                    self.fix(i, v, a)

    def keep_or_fix(self, i: int, w: Any, u: Any, a: int, keep: bool) -> None:
        """Links axis `a` of `w` and `u` when `keep`, else fixes both."""
        if keep:
            self.same(i, w, a, u, a)
        else:
            self.fix(i, w, a)
            self.fix(i, u, a)

    def eqn(self, i: int, eqn: Any) -> None:
        """Records the relations of equation number `i`."""
        name = eqn.primitive.name
        outs = [v for v in eqn.outvars if is_var(v)]
        if not outs:
            return
        if name not in ELEMENTWISE and (name == "iota" or not eqn.invars):
            if name != "iota":
                self.unsupported.add(name)
            self.fix_all(i, *outs)
            return
        rule = RULES.get(name)
        if rule is None:
            self.unsupported.add(name)
            self.fix_all(i, *eqn.invars, *outs)
            return
        rule(self, i, eqn, list(eqn.invars), outs, eqn.params)


Rule = Callable[[Rules, int, Any, list[Any], list[Any], Any], None]


def _elementwise(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    for out in outs:
        for u in ins:
            if not is_var(u):
                continue
            su, so = shape_of(u), shape_of(out)
            if len(su) == len(so):  # equal axes link; size-1 axes of u broadcast
                for a in range(len(so)):
                    if su[a] == so[a]:
                        r.same(i, out, a, u, a)
                    elif su[a] != 1:
                        r.fix(i, out, a)
                        r.fix(i, u, a)
            elif su:
                r.fix_all(i, out, u)


def _broadcast_in_dim(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    u, w = ins[0], outs[0]
    for j, d in enumerate(p["broadcast_dimensions"]):
        if shape_of(u)[j] == shape_of(w)[d]:
            r.same(i, w, d, u, j)


def _reshape(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    if p.get("dimensions") is None:
        r.rel.append((i, ("reshape", outs[0], ins[0])))
    else:
        r.fix_all(i, outs[0], ins[0])


def _squeeze(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    u = ins[0]
    dims = {d % len(shape_of(u)) for d in p["dimensions"]}
    for k, a in enumerate(a for a in range(len(shape_of(u))) if a not in dims):
        r.same(i, outs[0], k, u, a)


def _transpose(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    for k, a in enumerate(p["permutation"]):
        r.same(i, outs[0], k, ins[0], a)


def _reduce(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    u = ins[0]
    axes = set(p["axes"])
    for k, a in enumerate(a for a in range(len(shape_of(u))) if a not in axes):
        r.same(i, outs[0], k, u, a)
    if eqn.primitive.name in ARG_REDUCE:
        for a in axes:
            r.fix(i, u, a)


def _dot_general(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    lhs, rhs, w = ins[0], ins[1], outs[0]
    for a, b in zip(lc, rc):
        r.same(i, lhs, a, rhs, b)
    for k, (a, b) in enumerate(zip(lb, rb)):
        r.same(i, lhs, a, rhs, b)
        r.same(i, w, k, lhs, a)
        r.same(i, w, k, rhs, b)
    k = len(lb)
    for v, contracted, batch in ((lhs, lc, lb), (rhs, rc, rb)):
        for a in range(len(shape_of(v))):
            if a not in contracted and a not in batch:
                r.same(i, w, k, v, a)
                k += 1


def _conv(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    lhs, rhs, w = ins[0], ins[1], outs[0]
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        r.fix_all(i, lhs, rhs, w)
        return
    dn = p["dimension_numbers"]
    ls, rs, os_ = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    r.same(i, lhs, ls[0], w, os_[0])
    r.same(i, lhs, ls[1], rhs, rs[1])
    r.same(i, rhs, rs[0], w, os_[1])
    for v, spec in ((lhs, ls), (rhs, rs), (w, os_)):
        for a in spec[2:]:
            r.fix(i, v, a)


def _window(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    u = ins[0]
    n = len(shape_of(u))
    bd = p.get("base_dilation", (1,) * n)
    wdl = p.get("window_dilation", (1,) * n)
    for a in range(n):
        plain = p["window_dimensions"][a] == 1 and p["window_strides"][a] == 1 and \
            tuple(p["padding"][a]) == (0, 0) and bd[a] == 1 and wdl[a] == 1
        r.keep_or_fix(i, outs[0], u, a, plain)


def _cumulative(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    for a in range(len(shape_of(outs[0]))):
        r.keep_or_fix(i, outs[0], ins[0], a, a != p["axis"])


def _concatenate(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    w, d = outs[0], p["dimension"]
    for v in ins:
        for a in range(len(shape_of(w))):
            if a == d:
                r.fix(i, v, a)
            else:
                r.same(i, w, a, v, a)
    r.fix(i, w, d)


def _pad(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    for a, cfg in enumerate(p["padding_config"]):
        r.keep_or_fix(i, outs[0], ins[0], a, tuple(cfg) == (0, 0, 0))


def _slice(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    u, w = ins[0], outs[0]
    rw = len(shape_of(w))
    strides = p.get("strides") or (1,) * rw
    for a in range(rw):
        full = p["start_indices"][a] == 0 and p["limit_indices"][a] == shape_of(u)[a] and strides[a] == 1
        r.keep_or_fix(i, w, u, a, full)
    r.fix_all(i, *ins[1:])


def _dynamic_slice(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    u, w = ins[0], outs[0]
    for a in range(len(shape_of(w))):
        r.keep_or_fix(i, w, u, a, p["slice_sizes"][a] == shape_of(u)[a])


def _dynamic_update_slice(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    u, upd, w = ins[0], ins[1], outs[0]
    for a in range(len(shape_of(w))):
        if shape_of(upd)[a] == shape_of(u)[a]:
            r.same(i, w, a, u, a)
            r.same(i, w, a, upd, a)
        else:
            r.fix(i, w, a)
            r.fix(i, u, a)
            r.fix(i, upd, a)


def _gather(r: Rules, i: int, eqn: Any, ins: list[Any], outs: list[Any], p: Any) -> None:
    operand, indices, w = ins[0], ins[1], outs[0]
    dn = p["dimension_numbers"]
    try:
        offset, collapsed, start_map = dn.offset_dims, dn.collapsed_slice_dims, dn.start_index_map
        batching = getattr(dn, "operand_batching_dims", ()) or getattr(dn, "start_indices_batching_dims", ())
    except AttributeError:
        r.unsupported.add("gather")
        r.fix_all(i, operand, indices, w)
        return
    if batching:
        r.fix_all(i, operand, indices, w)
        return
    sizes = p["slice_sizes"]
    kept = [a for a in range(len(shape_of(operand))) if a not in collapsed]
    for a in range(len(shape_of(operand))):
        if a in collapsed or a in start_map:
            r.fix(i, operand, a)
    for k, a in enumerate(kept):
        if sizes[a] == shape_of(operand)[a] and a not in start_map:
            r.same(i, w, offset[k], operand, a)
        else:
            r.fix(i, w, offset[k])
    # the remaining output axes are the batch axes of the indices (all but the last)
    batch_out = [d for d in range(len(shape_of(w))) if d not in offset]
    idx_axes = list(range(len(shape_of(indices)) - 1))
    if len(batch_out) == len(idx_axes):
        for d, a in zip(batch_out, idx_axes):
            r.same(i, w, d, indices, a)
    else:
        r.fix_all(i, indices)
        for d in batch_out:
            r.fix(i, w, d)


RULES: dict[str, Rule] = {
    **dict.fromkeys(ELEMENTWISE, _elementwise),
    **dict.fromkeys(REDUCE | ARG_REDUCE, _reduce),
    **dict.fromkeys(WINDOW, _window),
    **dict.fromkeys(CUMULATIVE, _cumulative),
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "transpose": _transpose,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "concatenate": _concatenate,
    "pad": _pad,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice,
    "gather": _gather,
}


# ---------------------------------------------------------------------------------------------
# Factorisation of axes through reshapes, then union-find over factor nodes.
# ---------------------------------------------------------------------------------------------


def _bounds(factors: Sequence[int]) -> set[int]:
    out, s = {1}, 1
    for f in reversed(factors):
        s *= f
        out.add(s)
    return out


def refine(f1: Sequence[int], f2: Sequence[int]) -> tuple[int, ...] | None:
    """The common refinement of two row-major factorisations of the same size, or None."""
    if tuple(f1) == tuple(f2):
        return tuple(f1)
    b = sorted(_bounds(f1) | _bounds(f2))
    if any(b[k + 1] % b[k] for k in range(len(b) - 1)):
        return None
    return tuple(reversed([b[k + 1] // b[k] for k in range(len(b) - 1)]))


class Factors:
    """Factorisations of the axes of a jaxpr's variables, refined until every relation agrees."""

    def __init__(self) -> None:
        self.fac: dict[tuple[Any, int], tuple[int, ...]] = {}
        self.bad: set[tuple[Any, int]] = set()

    def get(self, v: Any, a: int) -> tuple[int, ...]:
        got = self.fac.get((v, a))
        if got is not None:
            return got
        n = shape_of(v)[a]
        return (n,) if n > 1 else ()

    def flat(self, v: Any) -> list[int]:
        return [f for a in range(len(shape_of(v))) for f in self.get(v, a)]

    def set(self, v: Any, a: int, f: tuple[int, ...]) -> bool:
        if (v, a) in self.bad or self.get(v, a) == f:
            return False
        self.fac[(v, a)] = f
        return True

    def mark_bad(self, v: Any, a: int) -> bool:
        if (v, a) in self.bad:
            return False
        self.bad.add((v, a))
        n = shape_of(v)[a]
        self.fac[(v, a)] = (n,) if n > 1 else ()
        return True

    def solve(self, rels: Sequence[tuple[int, tuple[Any, ...]]]) -> None:
        changed, rounds = True, 0
        while changed and rounds < 100:
            changed, rounds = False, rounds + 1
            for _, r in rels:
                if r[0] == "same":
                    _, u, a, v, b = r
                    if (u, a) in self.bad or (v, b) in self.bad:
                        changed |= self.mark_bad(u, a) | self.mark_bad(v, b)
                        continue
                    f = refine(self.get(u, a), self.get(v, b))
                    if f is None:
                        changed |= self.mark_bad(u, a) | self.mark_bad(v, b)
                    else:
                        changed |= self.set(u, a, f) | self.set(v, b, f)
                elif r[0] == "reshape":
                    _, w, u = r
                    axes = [(w, a) for a in range(len(shape_of(w)))] + [(u, a) for a in range(len(shape_of(u)))]
                    if any(x in self.bad for x in axes):
                        for x in axes:
                            changed |= self.mark_bad(*x)
                        continue
                    f = refine(self.flat(w), self.flat(u))
                    if f is None:
                        for x in axes:
                            changed |= self.mark_bad(*x)
                        continue
                    for v in (w, u):
                        k = 0
                        for a, n in enumerate(shape_of(v)):
                            part: list[int] = []
                            prod = 1
                            while prod < n:
                                prod *= f[k]
                                part.append(f[k])
                                k += 1
                            changed |= self.set(v, a, tuple(part))


class UnionFind:
    """Union-find over hashable nodes (path halving)."""

    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x: Any) -> Any:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, x: Any, y: Any) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[ry] = rx
