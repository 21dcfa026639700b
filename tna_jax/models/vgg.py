"""VGG (Simonyan & Zisserman, 2015) in its CIFAR form: 3x3 convolutions and 2x2 max pools, then
global average pooling and a single linear head (as in the CIFAR VGGs of git-re-basin and of
the TNA-PFN experiments)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tna_jax.models.layers import KERNEL_INIT, as_logits, make_norm, maybe_max_pool, scaled

# Channels of each conv; "M" is a 2x2 max pool.
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """``[conv_i -> conv_i_norm -> relu | maxpool]* -> global average pool -> head``.

    Every conv is 3x3 with SAME padding; it has a bias only when ``norm == "none"`` (a
    BatchNorm's bias makes it redundant). A pool that would shrink a side below 1 is skipped, so
    8x8 inputs work; on 32x32 inputs the five pools leave 1x1 and the average pool is the
    flatten of the classic CIFAR VGG.

    Layer names: ``conv_0``, ``conv_0_norm``, ``conv_1``, ... (convs numbered from the input,
    pools not counted), ``head``.

    Attributes:
      layers: channels per conv and ``"M"`` for pools (see :data:`VGG_CONFIGS`).
      num_classes: output size.
      width: channel multiplier, ``channels = max(1, round(base * width))``.
      norm: ``"batch"`` or ``"none"``.
      dtype: computation dtype (parameters are float32).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> vgg = VGG(layers=(8, "M", 16, "M"), num_classes=10)
      >>> variables = jax.eval_shape(vgg.init, jax.random.key(0), jnp.ones((2, 8, 8, 3)))
      >>> sorted(variables["params"]), variables["batch_stats"]["conv_1_norm"]["mean"].shape
      (['conv_0', 'conv_0_norm', 'conv_1', 'conv_1_norm', 'head'], (16,))
    """

    layers: Sequence[int | str]
    num_classes: int
    width: float = 1.0
    norm: str = "batch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=KERNEL_INIT)
        x = x.astype(self.dtype)
        i = 0
        for spec in self.layers:
            if spec == "M":
                x = maybe_max_pool(x)
                continue
            name = f"conv_{i}"
            x = nn.Conv(scaled(int(spec), self.width), (3, 3), padding="SAME",
                        use_bias=self.norm == "none", name=name, **kw)(x)
            x = nn.relu(make_norm(self.norm, f"{name}_norm", train, self.dtype)(x))
            i += 1
        x = jnp.mean(x, axis=(1, 2))
        return as_logits(nn.Dense(self.num_classes, name="head", **kw)(x))
