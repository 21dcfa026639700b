"""What several benchmarks share: a multi-seed trainer built from the library's own pieces, the
machine's matmul peak, and analytic FLOP counts read off a function's jaxpr."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import data as data_lib
from tna_jax import models, optimizers, training
from tna_jax import run_axis as run_axis_lib
from tna_jax import runs as runs_lib
from tna_jax import sharding as sharding_lib


class Trainer:
    """`config.num_seeds` x arms runs of `config`'s model, trained by the library's jitted epoch
    function (vmap, or for conv nets on CPU a loop, over runs of a scan over steps; see
    ``run_axis_lib.run_axis_plan`` and ``config.train.run_axis``), optionally sharded over every device."""

    def __init__(self, config, dataset: data_lib.Dataset, *, shard: bool = False, like: Trainer | None = None):
        """`like`: a trainer of the same shapes (e.g. another seed) whose compiled epoch to reuse."""
        self.config = config
        batch = config.train.batch_size
        self.net = models.build(config.model, dataset.input_shape, dataset.num_classes)
        self.data = data_lib.to_device(dataset)
        runs = runs_lib.make_runs(config)
        self.num_runs = len(runs)
        self.keys = runs_lib.make_run_keys(config, runs)
        n = self.data.x_train.shape[0]
        self.steps = n // batch
        base = optimizers.make_optimizer(config.optimizer, self.steps, 1)
        factory = optimizers.make_transform(base, config, self.net, runs_lib.arms_from_config(config))
        self.state = jax.jit(lambda k: training.init_runs(self.net, factory, runs, k))(self.keys)
        # The same loop plan as training.fit (steps per call, scan unroll), whole epochs only.
        mesh = sharding_lib.run_mesh() if shard and self.num_runs % jax.device_count() == 0 else None
        self.run_axis = run_axis_lib.resolve_run_axis(config, self.net)
        per_device = run_axis_lib.loop_group_size(self.num_runs // (mesh.size if mesh is not None else 1))
        self.chunk, unroll = run_axis_lib.loop_plan(self.net, self.steps, int(config.train.steps_per_call),
                                                int(config.train.unroll),
                                                runs_per_device=per_device if self.run_axis == "loop" else 1)
        if self.steps % self.chunk:
            raise ValueError(f"steps per epoch ({self.steps}) must be a multiple of the steps per call ({self.chunk})")
        self.epoch_fn = like.epoch_fn if like is not None else training.make_train_epoch(
            self.net, factory(0.0, jax.random.key(0)), num_train=n, batch_size=batch, num_steps=self.chunk,
            unroll=unroll, run_axis=self.run_axis, mesh=mesh)
        if mesh is not None:
            self.state, self.keys = sharding_lib.shard_runs(self.state, mesh), sharding_lib.shard_runs(self.keys, mesh)
            self.data = sharding_lib.replicate(self.data, mesh)
        self.epoch = 0
        # Compiled once, ahead of time (the epoch number is traced): the timing of this is what a
        # user waits for before the first epoch, and the executable also gives XLA's memory plan.
        grouped = isinstance(self.epoch_fn, run_axis_lib.RunGroups) and self.epoch_fn.group_size(self.num_runs)
        if like is not None:
            self.compiled, self.compile_s = like.compiled, like.compile_s
        elif grouped:  # several calls of one program per chunk: the first chunk's time is the compile
            t0 = time.perf_counter()
            self.state, metrics = self.epoch_fn(*self._args(0))
            jax.block_until_ready(metrics)
            self.compiled, self.compile_s = self.epoch_fn, time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            self.compiled = self.epoch_fn.lower(*self._args(0)).compile()
            self.compile_s = time.perf_counter() - t0

    def _args(self, epoch: int, start: int = 0):
        return (self.state, self.keys.data, self.keys.dropout, epoch, start, self.data.x_train, self.data.y_train)

    def run_epoch(self):
        for start in range(0, self.steps, self.chunk):
            self.state, metrics = self.compiled(*self._args(self.epoch, start))
        self.epoch += 1
        return metrics.loss_sum

    def memory_bytes(self) -> int | None:
        """XLA's estimate of the epoch function's live bytes (arguments + outputs + temporaries)."""
        mem = self.compiled.memory_analysis() if hasattr(self.compiled, "memory_analysis") else None
        if mem is None:
            return None
        return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                   - mem.alias_size_in_bytes)


def matmul_peak_gflops(n: int = 2048, rounds: int = 5) -> float:
    """Best-of-`rounds` GFLOP/s of one large float32 matmul on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contracted = float(np.prod([lhs[d] for d in lhs_contract])) if lhs_contract else 1.0
            total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * contracted
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
            per_output = float(rhs[spec[1]]) * float(np.prod([rhs[d] for d in spec[2:]]))
            total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * per_output
        repeats = float(eqn.params["length"]) if name == "scan" else 1.0
        for param in eqn.params.values():  # nested programs: jit, remat, custom_vjp, scan, ...
            inner = getattr(param, "jaxpr", param)  # a ClosedJaxpr holds its Jaxpr in .jaxpr
            if hasattr(inner, "eqns"):
                total += repeats * _jaxpr_flops(inner)
    return total


def matmul_flops(fn, *args: Any) -> float:
    """Analytic FLOPs of the matrix products and convolutions in ``fn(*args)`` (2 per multiply-
    add), counted from its jaxpr; elementwise work is left out, as in the usual model FLOP counts."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def train_flops_per_example(net: models.Net, input_shape: tuple[int, ...]) -> float:
    """3x the forward pass's matmul/conv FLOPs for one example (forward + two backward products)."""
    variables = jax.eval_shape(net.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return 3.0 * matmul_flops(lambda v, x: net.apply(v, x, train=False)[0], variables, x)
