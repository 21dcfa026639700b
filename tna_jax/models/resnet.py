"""Residual networks for small images: the CIFAR ResNet-20 of He et al. (2016, "Deep Residual
Learning for Image Recognition", section 4.2) and the pre-activation WideResNet of Zagoruyko &
Komodakis (2016, "Wide Residual Networks").

Both come with BatchNorm or LayerNorm. The LayerNorm variant normalises over the channel axis
only, separately for each example and spatial position: it keeps BatchNorm's one scale and one
bias per channel (so parameter layouts, anchors and permutation specs are the same for both
norms) and has no running statistics, which makes weight averaging and LMC free of the BatchNorm
statistics reset.

Names are chosen so that the residual streams can be read off the parameter tree: blocks are
``stage{s}_block{b}`` (both counted from 0), and a projection ``shortcut`` (1x1 conv) exists only
in blocks that change the number of channels or the resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tna_jax.models.layers import KERNEL_INIT, Dropout, as_logits, make_norm, scaled


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any) -> nn.Conv:
    # Symmetric padding (k-1)/2, as PyTorch's padding=1 for 3x3: "SAME" would pad stride-2
    # convolutions on one side only, and weights would not carry over to or from PyTorch ResNets.
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, kernel_init=KERNEL_INIT, dtype=dtype, param_dtype=jnp.float32, name=name)


class BasicBlock(nn.Module):
    """Post-activation basic block: ``relu(conv2_norm(conv2(relu(conv1_norm(conv1(x))))) + s(x))``.

    ``s`` is the identity, or ``shortcut_norm(shortcut(x))`` (1x1 conv, "option B" of He et al.)
    when the block changes shape. Submodules: ``conv1``, ``conv1_norm``, ``conv2``,
    ``conv2_norm`` and, where the shape changes, ``shortcut``, ``shortcut_norm``.
    """

    features: int
    stride: int = 1
    norm: str = "batch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = lambda name: make_norm(self.norm, name, train, self.dtype)  # noqa: E731
        y = _conv(self.features, 3, self.stride, "conv1", self.dtype)(x)
        y = nn.relu(norm("conv1_norm")(y))
        y = _conv(self.features, 3, 1, "conv2", self.dtype)(y)
        y = norm("conv2_norm")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, "shortcut", self.dtype)(x)
            x = norm("shortcut_norm")(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """CIFAR ResNet: ``conv_stem -> conv_stem_norm -> relu -> stages of BasicBlocks -> average
    pool -> head``.

    Stage ``s`` has ``blocks[s]`` blocks with ``max(1, round(channels[s] * width))`` channels; the
    first block of every stage but the first has stride 2. Convolutions have no bias. ResNet-20
    is ``blocks=(3, 3, 3)``, ``channels=(16, 32, 64)``: with width 1, BatchNorm, 32x32x3 inputs
    and 10 classes it has 272,474 parameters (the "0.27M" of He et al., with 1x1 projection
    shortcuts).

    Layer names: ``conv_stem``, ``conv_stem_norm``, ``stage{s}_block{b}/{conv1, conv1_norm,
    conv2, conv2_norm[, shortcut, shortcut_norm]}``, ``head``.

    Attributes:
      num_classes: output size.
      blocks: number of blocks per stage.
      channels: base channels per stage (the stem has ``channels[0]``).
      width: channel multiplier.
      norm: ``"batch"`` or ``"layer"`` (LayerNorm over channels, per position).
      dtype: computation dtype (parameters are float32).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> resnet = ResNet(num_classes=10, blocks=(1, 1), channels=(4, 8))
      >>> variables = jax.eval_shape(resnet.init, jax.random.key(0), jnp.ones((2, 8, 8, 3)))
      >>> sorted(variables["params"])
      ['conv_stem', 'conv_stem_norm', 'head', 'stage0_block0', 'stage1_block0']
      >>> sorted(variables["params"]["stage1_block0"])  # stride 2 and more channels: a projection
      ['conv1', 'conv1_norm', 'conv2', 'conv2_norm', 'shortcut', 'shortcut_norm']
    """

    num_classes: int
    blocks: Sequence[int] = (3, 3, 3)
    channels: Sequence[int] = (16, 32, 64)
    width: float = 1.0
    norm: str = "batch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        x = _conv(scaled(self.channels[0], self.width), 3, 1, "conv_stem", self.dtype)(x)
        x = nn.relu(make_norm(self.norm, "conv_stem_norm", train, self.dtype)(x))
        for s, (n, c) in enumerate(zip(self.blocks, self.channels, strict=True)):
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                x = BasicBlock(scaled(c, self.width), stride, self.norm, self.dtype,
                               name=f"stage{s}_block{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return as_logits(nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                                  kernel_init=KERNEL_INIT, name="head")(x))


class WideBlock(nn.Module):
    """Pre-activation wide block: ``o = relu(pre_norm(x))``, ``y = conv2(dropout(relu(conv1_norm(
    conv1(o)))))``, output ``y + s``.

    ``s`` is ``x`` or, when the block changes shape, ``shortcut(o)`` (a 1x1 conv of the
    pre-activated input, without a norm, as in the authors' code). Submodules: ``pre_norm``
    (normalises the block *input*, the residual stream: the previous block's ``conv2`` output
    plus its skip), ``conv1``, ``conv1_norm``, ``conv2`` and, where the shape changes,
    ``shortcut``. ``conv2`` has no ``conv2_norm``: its output goes straight into the residual
    stream, which the next block's ``pre_norm`` (or the network's ``final_norm``) normalises.
    """

    features: int
    stride: int = 1
    norm: str = "batch"
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = lambda name: make_norm(self.norm, name, train, self.dtype)  # noqa: E731
        o = nn.relu(norm("pre_norm")(x))
        y = _conv(self.features, 3, self.stride, "conv1", self.dtype)(o)
        y = nn.relu(norm("conv1_norm")(y))
        y = Dropout(self.dropout, deterministic=not train)(y)
        y = _conv(self.features, 3, 1, "conv2", self.dtype)(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, "shortcut", self.dtype)(o)
        return y + x


class WideResNet(nn.Module):
    """WRN-``depth``-``k``: ``conv_stem -> 3 stages of (depth-4)/6 WideBlocks -> final_norm -> relu
    -> average pool -> head``.

    The stem has 16 channels; stage ``s`` has ``(16, 32, 64)[s] * k`` channels and the first
    block of stages 1 and 2 has stride 2. Convolutions have no bias. The stem has no norm of its
    own: the first block's ``pre_norm`` normalises its output (pre-activation design).

    Layer names: ``conv_stem``, ``stage{s}_block{b}/{pre_norm, conv1, conv1_norm, conv2[,
    shortcut]}``, ``final_norm``, ``head``. For neuron-granularity anchors ``pre_norm`` and
    ``final_norm`` form unit groups of their own (they normalise the residual stream, not one
    layer's outputs); ``conv1_norm`` shares the draw of ``conv1``.

    Attributes:
      num_classes: output size.
      depth: total depth, ``6n + 4`` (n blocks per stage).
      width: widening factor k (channels ``max(1, round(base * k))``).
      norm: ``"batch"`` or ``"layer"``.
      dropout: dropout rate between the two convs of each block (training only).
      dtype: computation dtype (parameters are float32).

    Raises:
      ValueError: on the first call, when `depth` is not ``6n + 4`` with ``n >= 1``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> wrn = WideResNet(num_classes=10, depth=10, width=0.5)
      >>> variables = jax.eval_shape(wrn.init, jax.random.key(0), jnp.ones((2, 8, 8, 3)))
      >>> sorted(variables["params"])
      ['conv_stem', 'final_norm', 'head', 'stage0_block0', 'stage1_block0', 'stage2_block0']
      >>> variables["params"]["stage2_block0"]["conv2"]["kernel"].shape
      (3, 3, 32, 32)
    """

    num_classes: int
    depth: int = 16
    width: float = 4.0
    norm: str = "batch"
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if (self.depth - 4) % 6 or self.depth < 10:
            raise ValueError(f"depth must be 6n + 4 with n >= 1; got {self.depth}.")
        n = (self.depth - 4) // 6
        x = x.astype(self.dtype)
        x = _conv(16, 3, 1, "conv_stem", self.dtype)(x)
        for s, c in enumerate((16, 32, 64)):
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                x = WideBlock(scaled(c, self.width), stride, self.norm, self.dropout, self.dtype,
                              name=f"stage{s}_block{b}")(x, train)
        x = nn.relu(make_norm(self.norm, "final_norm", train, self.dtype)(x))
        x = jnp.mean(x, axis=(1, 2))
        return as_logits(nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                                  kernel_init=KERNEL_INIT, name="head")(x))
