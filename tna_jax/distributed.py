"""Several processes (``jax.distributed``): the few operations every experiment kind needs to run
the same program in every process over one global mesh.

Every process loads the same data and builds the same host values (everything is a function of
the config and its seeds), then supplies only the shards its own devices hold
(:func:`global_array`); results spread over the processes' devices are gathered with
``multihost_utils.process_allgather`` (:func:`to_host`); process 0 alone writes the workdir's
files (:func:`is_primary`); and a decision one process takes (a SIGTERM it received) is taken
by all (:func:`any_process`). In one process each of these is the plain single-host operation.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding

PyTree = Any

__all__ = ["is_primary", "is_multiprocess", "global_array", "place", "to_host", "any_process", "primary_says",
           "sync"]


def is_primary() -> bool:
    """Whether this process writes the workdir's files (process 0; always True in one process).

    Returns:
      ``jax.process_index() == 0``.

    Examples:
      >>> is_primary()
      True
    """
    return jax.process_index() == 0


def is_multiprocess() -> bool:
    """Whether ``jax.distributed`` started more than one process.

    Returns:
      ``jax.process_count() > 1``.
    """
    return jax.process_count() > 1


def global_array(host: Any, sharding: Sharding) -> jax.Array:
    """`host` (the same value in every process) as one array placed with `sharding`, each process
    supplying only the shards of its own devices.

    Args:
      host: a NumPy array, or an array this process can read whole (a typed PRNG key array is
        placed as its key data and wrapped again).
      sharding: the target sharding (over a mesh that may span every process's devices).

    Returns:
      The ``jax.Array``.

    Examples:
      >>> import numpy as np
      >>> from jax.sharding import NamedSharding, PartitionSpec
      >>> from tna_jax.sharding import run_mesh
      >>> x = global_array(np.arange(4.0 * jax.device_count()), NamedSharding(run_mesh(), PartitionSpec("runs")))
      >>> x.shape == (4 * jax.device_count(),), float(x.sum()) == sum(range(4 * jax.device_count()))
      (True, True)
    """
    if isinstance(host, jax.Array) and jax.dtypes.issubdtype(host.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(host)
        return jax.random.wrap_key_data(global_array(jax.random.key_data(host), sharding), impl=impl)
    if isinstance(host, jax.Array) and not host.is_fully_addressable:
        return jax.device_put(host, sharding)  # already global: a reshard, no host copy
    value = np.asarray(host)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def place(tree: PyTree, sharding: Sharding) -> PyTree:
    """Every leaf of `tree` placed with `sharding`: ``jax.device_put`` in one process (unchanged
    behaviour), :func:`global_array` under ``jax.distributed``.

    Args:
      tree: a pytree of arrays (the same values in every process).
      sharding: the target sharding.

    Returns:
      The placed tree.
    """
    if not is_multiprocess():
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda leaf: global_array(leaf, sharding), tree)


def _host_leaf(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if leaf.is_fully_replicated:
            return np.asarray(leaf.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf) if isinstance(leaf, jax.Array) else leaf


def to_host(tree: PyTree) -> PyTree:
    """NumPy copies of every leaf, whole, in every process: arrays split over other processes'
    devices are gathered (``multihost_utils.process_allgather``), so every process must call it
    at the same point of the program.

    Args:
      tree: a pytree of arrays.

    Returns:
      The tree with NumPy leaves (other leaves unchanged).

    Examples:
      >>> import jax.numpy as jnp
      >>> to_host({"a": jnp.arange(3)})["a"].tolist()
      [0, 1, 2]
    """
    return jax.tree.map(_host_leaf, tree)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true in some process (a collective: every process calls it at the same
    point). One process: `flag` itself.

    Args:
      flag: this process's value.

    Returns:
      The OR over all processes.

    Examples:
      >>> any_process(False), any_process(True)
      (False, True)
    """
    if not is_multiprocess():
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def primary_says(flag: bool) -> bool:
    """Process 0's `flag`, in every process (a collective), for decisions that read files (a
    finished report to reuse) and must be the same everywhere. One process: `flag` itself.

    Args:
      flag: this process's value (only process 0's counts).

    Returns:
      Process 0's value.

    Examples:
      >>> primary_says(True)
      True
    """
    if not is_multiprocess():
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))


def sync(name: str) -> None:
    """A barrier: returns when every process has reached it (nothing in one process).

    Args:
      name: what is waited for (the same string in every process).
    """
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
