"""Multilayer perceptron with configurable depth and width (the paper sweeps both)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "tanh": jnp.tanh, "silu": nn.silu}


class MLP(nn.Module):
    """``dense_0 -> act -> ... -> dense_{L-1} -> act -> head``; inputs are flattened.

    Attributes:
      hidden: widths of the hidden layers (``len(hidden)`` hidden layers).
      num_classes: output size.
      activation: one of ``relu``, ``gelu``, ``tanh``, ``silu``.
      norm: ``"none"`` or ``"layer"`` (LayerNorm after each hidden layer, named ``dense_i_norm``).
    """

    hidden: Sequence[int]
    num_classes: int
    activation: str = "relu"
    norm: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = ACTIVATIONS[self.activation]
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, name=f"dense_{i}")(x)
            if self.norm == "layer":
                x = nn.LayerNorm(name=f"dense_{i}_norm")(x)
            x = act(x)
        return nn.Dense(self.num_classes, name="head")(x)
