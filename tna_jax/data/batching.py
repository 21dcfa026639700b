"""Batch indices computed on the device, so the training step gathers its own batches.

Training never copies batches from the host: the (small) dataset lives on the device and the
jitted, scanned epoch indexes it with the rows of :func:`epoch_indices`. Each model (seed) has
its own key and therefore its own data order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped, as in Flax's examples)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    if batch_size > num_examples:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_examples} training examples.")
    return num_examples // batch_size


def epoch_indices(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """A random permutation of the examples cut into ``(steps, batch_size)`` index rows.

    Every example appears at most once per epoch; ``num_examples % batch_size`` examples (a
    different random subset each epoch) are left out.
    """
    steps = steps_per_epoch(num_examples, batch_size)
    perm = jax.random.permutation(key, num_examples)
    return perm[: steps * batch_size].reshape(steps, batch_size)


def eval_indices(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices covering every example once, in ``(batches, batch_size)`` rows padded with 0,
    and a boolean array that is False on the padding (so metrics can ignore it)."""
    if num_examples < 1:
        raise ValueError("cannot evaluate on an empty split (0 examples).")
    batch_size = max(1, min(batch_size, num_examples))
    batches = -(-num_examples // batch_size)
    flat = np.arange(batches * batch_size)
    valid = flat < num_examples
    return np.where(valid, flat, 0).reshape(batches, batch_size).astype(np.int32), valid.reshape(batches, batch_size)


def gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[idx]`` along the first axis (inside jit this is a device-side gather)."""
    return jnp.take(x, idx, axis=0)
