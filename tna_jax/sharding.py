"""The run axis over the devices: a one-axis `Mesh` named "runs", shardings for run-stacked
trees, and the memory check done before anything is allocated."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

__all__ = ["run_mesh", "shard_runs", "replicate", "device_memory_bytes", "check_fits_in_memory"]


def run_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh named "runs" over `devices` (default: all devices).

    Args:
      devices: the devices (default ``jax.devices()``: under ``jax.distributed``, every
        process's devices, so the run axis is split over all of them).

    Returns:
      A ``jax.sharding.Mesh`` with one axis, ``"runs"``.

    Examples:
      >>> import jax
      >>> mesh = run_mesh()
      >>> mesh.axis_names, mesh.devices.size == jax.device_count()
      (('runs',), True)
    """
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.array(devices), ("runs",))


def shard_runs(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every leaf with its leading (run) axis split over the mesh.

    Args:
      tree: a pytree whose leaves have the run axis first (its length a multiple of the mesh size).
      mesh: the mesh (:func:`run_mesh`); under ``jax.distributed`` it may span every process's
        devices, and each process then supplies only its own devices' runs
        (:func:`tna_jax.distributed.place`).

    Returns:
      The tree placed with ``NamedSharding(mesh, PartitionSpec("runs"))``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = shard_runs({"w": jnp.zeros((jax.device_count() * 2, 3))}, run_mesh())["w"]
      >>> tuple(x.sharding.spec)
      ('runs',)
    """
    from tna_jax.distributed import place

    return place(tree, NamedSharding(mesh, PartitionSpec("runs")))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """`tree` placed whole on every device of `mesh` (the data every run reads).

    Args:
      tree: any tree of arrays.
      mesh: the run mesh (`run_mesh`).

    Returns:
      The tree, replicated.
    """
    from tna_jax.distributed import place

    return place(tree, NamedSharding(mesh, PartitionSpec()))


def device_memory_bytes(devices: Sequence[Any]) -> int | None:
    """Memory of `devices` together: accelerators report theirs; CPU devices share the host's RAM
    (counted once). None when unknown.

    Args:
      devices: JAX devices.

    Returns:
      Bytes, or None.

    Example:
      >>> device_memory_bytes(jax.devices()) > 2**20
      True
    """
    total, host = 0, False
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and stats.get("bytes_limit"):
            total += int(stats["bytes_limit"])
        elif d.platform == "cpu":
            host = True
        else:
            return None
    if host:
        try:
            total += os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return total or None


def check_fits_in_memory(abstract_state: PyTree, devices: Sequence[Any], num_runs: int) -> None:
    """Refuses a training state larger than the devices' memory, before anything is allocated
    (a huge width or depth would otherwise end in an out-of-memory kill, not an error).

    Args:
      abstract_state: the state's shapes and dtypes (`jax.eval_shape`).
      devices: the devices it will be sharded over (under ``jax.distributed``, this process's
        share of the state is checked against this process's devices).
      num_runs: the runs it holds (for the message).

    Raises:
      ValueError: naming the state size, the memory and the fields that size it.

    Example:
      >>> import jax.numpy as jnp
      >>> huge = {"w": jax.ShapeDtypeStruct((1 << 22, 1 << 22), jnp.float32)}  # 64 TiB
      >>> check_fits_in_memory(huge, jax.devices(), 1)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: the training state of 1 runs needs 65536.0 GiB ...
    """
    need = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(abstract_state))
    # Under jax.distributed each process holds (and can query) only its own devices' share.
    local = [d for d in devices if d.process_index == jax.process_index()]
    if len(local) < len(devices):
        need, devices = need * len(local) // max(1, len(devices)), local
    have = device_memory_bytes(devices)
    if have is not None and need > have:
        raise ValueError(f"the training state of {num_runs} runs needs {need / 2**30:.1f} GiB (parameters and "
                         f"optimizer state), more than the {have / 2**30:.1f} GiB of memory of {len(devices)} "
                         "device(s); lower config.model.width / depth, config.num_seeds or the number of arms.")
