"""Multilayer perceptron with configurable depth and width (the paper sweeps both)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tna_jax.models.layers import KERNEL_INIT

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "tanh": jnp.tanh, "silu": nn.silu}


class MLP(nn.Module):
    """``dense_0 -> act -> ... -> dense_{L-1} -> act -> head``; inputs are flattened.

    Attributes:
      hidden: widths of the hidden layers (``len(hidden)`` hidden layers).
      num_classes: output size.
      activation: one of ``relu``, ``gelu``, ``tanh``, ``silu``.
      norm: ``"none"`` or ``"layer"`` (LayerNorm after each hidden layer, named ``dense_i_norm``).
      dtype: computation dtype (parameters are float32; logits are returned as float32).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> mlp = MLP(hidden=(16, 8), num_classes=3)
      >>> variables = jax.eval_shape(mlp.init, jax.random.key(0), jnp.ones((2, 5)))  # shapes only
      >>> sorted(variables["params"]), variables["params"]["dense_0"]["kernel"].shape
      (['dense_0', 'dense_1', 'head'], (5, 16))
      >>> jax.eval_shape(mlp.apply, variables, jnp.ones((2, 5))).shape
      (2, 3)
    """

    hidden: Sequence[int]
    num_classes: int
    activation: str = "relu"
    norm: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = ACTIVATIONS[self.activation]
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, kernel_init=KERNEL_INIT, name=f"dense_{i}", **kw)(x)
            if self.norm == "layer":
                x = nn.LayerNorm(name=f"dense_{i}_norm", **kw)(x)
            x = act(x)
        return nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, name="head", **kw)(x).astype(jnp.float32)
