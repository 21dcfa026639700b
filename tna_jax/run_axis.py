"""How the runs of the run axis are mapped inside one compiled program: `vmap` (GPU/TPU, and
CPU for nets without convolutions) or a loop over runs (CPU convolutions: XLA:CPU turns a
vmapped convolution into a grouped one that runs several times slower), and how many steps each
call takes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from tna_jax.models import Net

PyTree = Any

__all__ = ["RUN_AXES", "MAX_LOOPED_RUNS", "RunGroups", "loop_group_size", "loop_over_runs", "run_axis_plan",
           "uses_convolutions", "loop_plan", "resolve_run_axis"]


RUN_AXES = ("vmap", "loop")


# At most this many runs per device are traced into one looped program; more runs are trained
# by the same program in groups, one call per group. Compile time grows faster than linearly
# with the step copies in one program (ResNet-20 on CPU: 8 copies 26 s, 16 copies over 2 min).
MAX_LOOPED_RUNS = 4


def loop_group_size(runs_per_device: int, max_runs: int = MAX_LOOPED_RUNS) -> int:
    """Runs per device in one looped program: the largest divisor of `runs_per_device` that is at
    most `max_runs` (so every group has the same shape and the program compiles once).

    Args:
      runs_per_device: runs each device holds.
      max_runs: the cap (:data:`MAX_LOOPED_RUNS`).

    Returns:
      The group size, in ``[1, max_runs]``.

    Examples:
      >>> loop_group_size(3), loop_group_size(8), loop_group_size(10), loop_group_size(7)
      (3, 4, 2, 1)
    """
    n = max(1, int(runs_per_device))
    return next(d for d in range(min(n, max(1, int(max_runs))), 0, -1) if n % d == 0)


class RunGroups:
    """A looped train-chunk program applied to groups of runs, one call per group.

    Each device holds ``n / devices`` runs; when that is more than ``max_runs``, every call cuts
    each device's block into groups of :func:`loop_group_size` runs (local slices, no
    communication), runs the one compiled `program` on each group and joins the results in the
    original order. The numbers are those of one call over all runs (each run's computation is
    the same); only the program size, and so the compile time, is bounded.

    Args:
      program: the jitted looped function (``loop_over_runs`` of one run's chunk).
      num_mapped: its leading arguments that carry the run axis.
      mesh: the run mesh, or None (one device).
      max_runs: runs per device in one call of `program`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> double = jax.jit(loop_over_runs(lambda w, s: (w * s, w.sum()), num_mapped=1))
      >>> groups = RunGroups(double, num_mapped=1, max_runs=2)
      >>> out, sums = groups(jnp.arange(12.0).reshape(6, 2), 2.0)  # 6 runs: 3 groups of 2
      >>> out[:, 0].tolist(), sums.tolist()
      ([0.0, 4.0, 8.0, 12.0, 16.0, 20.0], [1.0, 5.0, 9.0, 13.0, 17.0, 21.0])
    """

    def __init__(self, program: Callable[..., Any], num_mapped: int, mesh: Mesh | None = None,
                 max_runs: int = MAX_LOOPED_RUNS):
        self.program, self.num_mapped, self.max_runs = program, int(num_mapped), int(max_runs)
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self.lower = program.lower  # for a call that needs no groups (see group_size)

    def group_size(self, num_runs: int) -> int | None:
        """Runs per device per call, or None when all runs fit in one call."""
        local = num_runs // (self.mesh.size if self.mesh is not None else 1)
        return None if local <= self.max_runs else loop_group_size(local, self.max_runs)

    def __call__(self, *args):
        mapped, shared = args[:self.num_mapped], args[self.num_mapped:]
        n = int(jax.tree.leaves(mapped)[0].shape[0])
        size = self.group_size(n)
        if size is None:
            return self.program(*args)
        local = n // (self.mesh.size if self.mesh is not None else 1)
        take, join = _group_programs(self.mesh, size)
        outs = [self.program(*take(mapped, jnp.int32(g)), *shared) for g in range(local // size)]
        return join(outs)


@functools.lru_cache(maxsize=16)
def _group_programs(mesh: Mesh | None, size: int):
    """Jitted ``take(tree, g)`` (each device's runs ``[g*size, (g+1)*size)``) and ``join(parts)``."""

    def take(tree, g):
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, g * size, size, axis=0), tree)

    def join(parts):
        return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)

    if mesh is not None:  # per device: slices and joins of its own block only
        spec = PartitionSpec("runs")
        take = jax.shard_map(take, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=spec, check_vma=False)
        join = jax.shard_map(join, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    return jax.jit(take), jax.jit(join)


def loop_over_runs(fn: Callable[..., Any], num_mapped: int, mesh: Mesh | None = None, *,
                   unrolled: bool = True) -> Callable[..., Any]:
    """``fn`` mapped over the leading (run) axis of its first `num_mapped` arguments by a loop,
    the other arguments passed to every run.

    This is ``jax.vmap(fn, in_axes=(0,) * num_mapped + (None,) * rest)`` with the same results,
    for the case where batching is slower than repeating (convolutions on XLA:CPU). `unrolled`
    traces one copy of ``fn`` per run (a Python loop: needed for convolution gradients, which
    XLA:CPU runs ~30x slower inside a ``while`` loop); False is a ``lax.map`` (one copy, fast
    compiles; fine for forward passes). With a `mesh` of more than one device it is a
    ``shard_map`` over the ``"runs"`` axis: each device loops over its own block of runs, and the
    shared arguments are replicated.

    Args:
      fn: the function of one run.
      num_mapped: how many leading arguments carry the run axis.
      mesh: the run mesh (:func:`run_mesh`), or None for one device.
      unrolled: one traced copy per run (True) or a ``lax.map`` (False).

    Returns:
      The mapped function, to be jitted by the caller.

    Examples:
      >>> import jax.numpy as jnp
      >>> f = loop_over_runs(lambda w, x: w * x, num_mapped=1)
      >>> f(jnp.arange(3.0), 2.0).tolist()
      [0.0, 2.0, 4.0]
    """

    def looped(*args):
        mapped, shared = args[:num_mapped], args[num_mapped:]
        if not unrolled:
            return jax.lax.map(lambda m: fn(*m, *shared), mapped)
        n = jax.tree.leaves(mapped)[0].shape[0]
        outs = [fn(*jax.tree.map(lambda a, r=r: a[r], mapped), *shared) for r in range(n)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    if mesh is None or mesh.size == 1:
        return looped

    def sharded(*args):
        in_specs = (PartitionSpec("runs"),) * num_mapped + (PartitionSpec(),) * (len(args) - num_mapped)
        return jax.shard_map(looped, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec("runs"),
                             check_vma=False)(*args)

    return sharded


def run_axis_plan(net: Net, backend: str | None = None) -> str:
    """``"loop"`` on CPU for a network with overlapping convolutions, else ``"vmap"`` (see
    :func:`make_train_epoch`).

    On CPU, vmapped ResNet-20 seeds train several times slower than looped in one program
    (``benchmarks/resnet20.py`` measures it; BENCHMARKS.md has the numbers). A convolution whose
    kernel equals its stride (a ViT's patch embedding) is a matmul in disguise and vmaps well, so
    a ViT is vmapped: looping its runs would mostly compile copies. On GPU and TPU, vmap is the
    fast path.

    Args:
      net: the model.
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"`` (default: JAX's default backend).

    Returns:
      ``"loop"`` or ``"vmap"``, a `run_axis` for :func:`make_train_epoch`.

    Examples:
      >>> from tna_jax import models
      >>> cnn = models.build({"name": "cnn", "width": 0.25, "hidden": 8}, (8, 8, 1), 10)
      >>> mlp = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 3)
      >>> run_axis_plan(cnn, "cpu"), run_axis_plan(cnn, "gpu"), run_axis_plan(mlp, "cpu")
      ('loop', 'vmap', 'vmap')
    """
    return "loop" if (backend or jax.default_backend()) == "cpu" and any(_convolutions(net)) else "vmap"


AUTO_UNROLL_STEPS = 8


@functools.lru_cache(maxsize=64)
def _convolutions(net: Net) -> tuple[bool, ...]:
    """One entry per convolution in the forward pass (read off its jaxpr): whether its windows
    overlap (a kernel larger than its stride in some spatial dimension). A ViT's patch embedding
    (kernel = stride) does not: it is a matmul on reshaped patches."""
    variables = jax.eval_shape(net.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((1, *net.input_shape), net.input_dtype)
    jaxpr = jax.make_jaxpr(lambda v, x: net.apply(v, x)[0])(variables, x).jaxpr
    found: list[bool] = []

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape
                window = [rhs[d] for d in eqn.params["dimension_numbers"].rhs_spec[2:]]
                found.append(any(k > s for k, s in zip(window, eqn.params["window_strides"])))
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jaxpr)
    return tuple(found)


def uses_convolutions(net: Net) -> bool:
    """Whether the network's forward pass contains a convolution (read off its jaxpr).

    Args:
      net: the model.

    Returns:
      True when some convolution is not a patch embedding computed as a matmul.
    """
    return bool(_convolutions(net))


def loop_plan(net: Net, steps_per_epoch_: int, steps_per_call: int = 0, unroll: int = 0,
              backend: str | None = None, runs_per_device: int = 1) -> tuple[int, int | bool]:
    """``(steps per jitted call, scan unroll)`` for :func:`make_train_epoch`.

    ``unroll=0`` is automatic: on CPU, a network with convolutions gets each call's steps
    completely unrolled, because XLA:CPU runs a convolution's gradient inside a ``while`` loop
    about 30x slower than outside one (measured: ``benchmarks/resnet20.py``, BENCHMARKS.md), and
    as many steps per call as the largest divisor of the epoch that is at most
    :data:`AUTO_UNROLL_STEPS`: every call then has the same length and the unrolled program
    compiles once (a shorter last call would compile a second one, which for an unrolled conv net
    costs as much as the first). Everything else keeps one rolled ``lax.scan`` over the call's
    steps (fast compiles, no dispatch per step). An explicit `unroll` (1 = rolled, k = unroll
    factor) and `steps_per_call` (0 = the whole epoch) win. When the runs are looped
    (:func:`run_axis_plan`), each device's program holds `runs_per_device` copies of every step,
    so the automatic chunk shrinks to keep at most :data:`AUTO_UNROLL_STEPS` step copies in one
    program (compile time grows with the copies).

    Args:
      net: the model.
      steps_per_epoch_: optimizer steps per epoch.
      steps_per_call: steps per call (0: automatic).
      unroll: scan unroll (0: automatic; 1: rolled; k: unroll factor).
      backend: the JAX backend (default: the current one).
      runs_per_device: looped runs each device's program holds.

    Returns:
      `(steps per call, unroll)`.

    Examples:
      >>> from tna_jax import models
      >>> cnn = models.build({"name": "cnn", "width": 0.25, "hidden": 8}, (8, 8, 1), 10)
      >>> loop_plan(cnn, 20, backend="cpu"), loop_plan(cnn, 24, backend="cpu"), loop_plan(cnn, 20, backend="gpu")
      ((5, True), (8, True), (20, 1))
      >>> loop_plan(cnn, 20, backend="cpu", runs_per_device=2)  # 4 steps x 2 runs per program
      (4, True)
    """
    auto = unroll == 0 and (backend or jax.default_backend()) == "cpu" and uses_convolutions(net)
    if steps_per_call:
        chunk = int(steps_per_call)
    elif auto:
        cap = min(steps_per_epoch_, max(1, AUTO_UNROLL_STEPS // max(1, int(runs_per_device))))
        chunk = next(d for d in range(cap, 0, -1) if steps_per_epoch_ % d == 0)
    else:
        chunk = steps_per_epoch_
    return chunk, (True if auto else max(1, int(unroll)))


def resolve_run_axis(config: Any, net: Net) -> str:
    """``config.train.run_axis``, with ``"auto"`` decided by :func:`run_axis_plan`.

    Args:
      config: the experiment config (``train.run_axis``: ``"auto"``, ``"vmap"`` or ``"loop"``).
      net: the model.

    Returns:
      ``"vmap"`` or ``"loop"``.

    Examples:
      >>> from tna_jax import models
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> mlp = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 3)
      >>> resolve_run_axis(c, mlp), c.train.run_axis
      ('vmap', 'auto')
      >>> c.train.run_axis = "loop"
      >>> resolve_run_axis(c, mlp)
      'loop'
    """
    choice = str(config.train.get("run_axis", "auto"))
    return run_axis_plan(net) if choice == "auto" else choice
