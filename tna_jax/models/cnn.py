"""The simple CNN of federated image classification (McMahan et al., 2017, "Communication-Efficient
Learning of Deep Networks from Decentralized Data", the "CNN" of their MNIST and CIFAR-10 runs)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tna_jax.models.layers import KERNEL_INIT, as_logits, maybe_max_pool, scaled


class CNN(nn.Module):
    """``conv1 (5x5, 32) -> relu -> pool -> conv2 (5x5, 64) -> relu -> pool -> dense1 -> relu -> head``.

    Convolutions use SAME padding and a bias; pools are 2x2 with stride 2 and are skipped when a
    side is already below 2 (so any ``(H, W, C)`` image works). On 28x28x1 MNIST with width 1
    and hidden 512 this is McMahan et al.'s 1,663,370-parameter model.

    Layer names: ``conv1``, ``conv2``, ``dense1``, ``head``.

    Attributes:
      num_classes: output size.
      width: channel multiplier: ``conv1`` has ``max(1, round(32*width))`` channels, ``conv2``
        ``max(1, round(64*width))``.
      hidden: width of ``dense1``.
      dtype: computation dtype (parameters are float32).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> cnn = CNN(num_classes=10, width=0.25, hidden=16)
      >>> variables = jax.eval_shape(cnn.init, jax.random.key(0), jnp.ones((2, 8, 8, 1)))
      >>> variables["params"]["conv1"]["kernel"].shape, variables["params"]["head"]["kernel"].shape
      ((5, 5, 1, 8), (16, 10))
    """

    num_classes: int
    width: float = 1.0
    hidden: int = 512
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no BatchNorm or dropout
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=KERNEL_INIT)
        x = x.astype(self.dtype)
        x = nn.relu(nn.Conv(scaled(32, self.width), (5, 5), padding="SAME", name="conv1", **kw)(x))
        x = maybe_max_pool(x)
        x = nn.relu(nn.Conv(scaled(64, self.width), (5, 5), padding="SAME", name="conv2", **kw)(x))
        x = maybe_max_pool(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, name="dense1", **kw)(x))
        return as_logits(nn.Dense(self.num_classes, name="head", **kw)(x))
