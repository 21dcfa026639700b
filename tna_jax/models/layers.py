"""Building blocks shared by the model zoo: dtypes, norms, pooling, multi-head self-attention.

Conventions every model follows (``anchors`` and ``align`` rely on them):

* parameters are float32 (``param_dtype``); the computation runs in the model's ``dtype``
  (``"float32"`` or ``"bfloat16"``), and logits come back as float32;
* BatchNorm uses ``use_running_average=not train``, momentum 0.9 and epsilon 1e-5 (PyTorch's
  defaults, written the Flax way); its running averages live in the ``batch_stats`` collection;
* dropout is active only with ``train=True`` and draws from the ``"dropout"`` rng stream;
* the normalisation of a layer's outputs is named ``<layer>_norm``, so neuron-granularity anchors
  fix a unit of the layer together with that unit's norm scale and bias.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
LN_EPSILON = 1e-5


def flat_init(base: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """An initializer that does not look at the shape (``normal``, ``uniform``), drawn 1-D and reshaped.

    The values are bit for bit those of ``base(key, shape)``: threefry counters run over the
    flattened array. The point is compile time: under ``jax_threefry_partitionable`` (JAX's
    default) XLA:CPU compiles a random draw of a 3-D shape ~3x and of a 4-D shape ~10x slower
    than a 1-D one (seconds per layer), and ``jax.vmap`` over seeds adds one dimension to every
    draw. Drawing flat made ``jit(vmap(init))`` of ResNet-20 compile several times faster.
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return base(key, (math.prod(shape),), dtype).reshape(shape)

    return init


def lecun_normal(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Flax's default kernel init (``nn.initializers.lecun_normal()``), bit for bit, drawn 1-D.

    Truncated normal on [-2, 2] with variance ``1 / fan_in``, ``fan_in = prod(shape[:-1])`` (the
    receptive field times the input channels for a conv kernel). See :func:`flat_init` for why
    the draw is 1-D.
    """
    fan_in = math.prod(shape[:-1])
    # variance_scaling's correction for the truncation to [-2, 2].
    stddev = jnp.sqrt(jnp.asarray(1.0 / fan_in, dtype)) / jnp.array(0.87962566103423978, dtype)
    flat = jax.random.truncated_normal(key, -2, 2, (math.prod(shape),), dtype) * stddev
    return flat.reshape(shape)


KERNEL_INIT = lecun_normal

INIT_SCHEMES = ("flax", "torch")


def torch_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: Any = jnp.float32) -> jax.Array:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` of `shape`, drawn 1-D (see `flat_init`).

    This is PyTorch's default for ``nn.Linear`` and ``nn.Conv*``: the weight's
    ``kaiming_uniform_(a=sqrt(5))`` has bound ``gain * sqrt(3 / fan_in)`` with ``gain =
    sqrt(2 / (1 + a^2)) = sqrt(1/3)``, i.e. ``1 / sqrt(fan_in)``, and the bias is drawn from the
    same interval. Its variance is ``bound^2 / 3 = 1 / (3 fan_in)``.

    Args:
      key: a PRNG key.
      shape: the array's shape.
      fan_in: the layer's fan-in (``in_features``, or ``in_channels / groups`` times the receptive
        field for a convolution).
      dtype: the dtype.

    Returns:
      The draw, every value in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``.

    Examples:
      >>> w = torch_uniform(jax.random.key(0), (64, 32), fan_in=64)
      >>> bool(jnp.abs(w).max() <= 1 / 8)
      True
    """
    bound = 1.0 / math.sqrt(max(1, int(fan_in)))
    flat = jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound)
    return flat.reshape(shape)


def torch_default_init(params: dict[str, Any], key: jax.Array) -> dict[str, Any]:
    """`params` with every Dense/Conv layer redrawn as PyTorch's ``nn.Linear``/``nn.Conv*`` defaults.

    A layer is a module whose parameters include a ``kernel``: Flax keeps the input axes first and
    the output axis last (Dense ``(in, out)``, Conv ``(h, w, in / groups, out)``), so ``fan_in =
    prod(kernel.shape[:-1])``, PyTorch's ``fan_in`` of the transposed weight (a kernel with
    several output axes, ``nn.DenseGeneral``'s, would need its own rule; the zoo has none). Its
    ``kernel`` and ``bias`` are both drawn from ``U(±1/sqrt(fan_in))`` (`torch_uniform`).
    Everything else is left as it is: LayerNorm/BatchNorm scales are 1 and biases 0 in both libraries, and
    parameters that are not layers (ViT's CLS token and position embedding, embedding tables)
    keep the model's own init, which a PyTorch implementation also sets by hand.

    Each array gets its own key, ``fold_in(key, crc32(path))``, so the draw of a layer does not
    depend on the other layers of the model.

    Args:
      params: a model's ``params`` collection (nested dicts of arrays).
      key: a PRNG key.

    Returns:
      The params with the same structure, shapes and dtypes.

    Examples:
      >>> params = {"dense_0": {"kernel": jnp.zeros((100, 8)), "bias": jnp.zeros(8)},
      ...           "dense_0_norm": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}}
      >>> new = torch_default_init(params, jax.random.key(0))
      >>> float(jnp.abs(new["dense_0"]["bias"]).max()) <= 0.1, new["dense_0_norm"]["bias"].tolist() == [0.0] * 8
      (True, True)
    """

    def walk(node: Any, path: str) -> Any:
        if not isinstance(node, dict):
            return node
        kernel = node.get("kernel")
        if kernel is not None and not isinstance(kernel, dict) and len(kernel.shape) >= 2:
            fan_in = math.prod(kernel.shape[:-1])
            out = dict(node)
            for name in ("kernel", "bias"):
                if name in node and not isinstance(node[name], dict):
                    leaf_key = jax.random.fold_in(key, zlib.crc32(f"{path}/{name}".encode()) & 0x7FFFFFFF)
                    out[name] = torch_uniform(leaf_key, node[name].shape, fan_in, node[name].dtype)
            return out
        return {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}

    return walk(dict(params), "")


def make_norm(kind: str, name: str, train: bool, dtype: Any) -> Callable[[jax.Array], jax.Array]:
    """A normalisation over the last (channel/feature) axis named `name`, or the identity.

    Args:
      kind: ``"batch"`` (BatchNorm, statistics over batch and spatial axes), ``"layer"``
        (LayerNorm over the channel axis only, i.e. per example and per spatial position, so it
        carries one scale and one bias per channel like BatchNorm) or ``"none"``.
      name: module name, by convention ``<layer>_norm``.
      train: BatchNorm uses batch statistics (and updates ``batch_stats``) when True.
      dtype: computation dtype.
    """
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                            dtype=dtype, param_dtype=jnp.float32, name=name)
    if kind == "layer":
        return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, param_dtype=jnp.float32, name=name)
    if kind == "none":
        return lambda x: x
    raise ValueError(f"norm must be one of ('batch', 'layer', 'none'); got {kind!r}.")


def maybe_max_pool(x: jax.Array, size: int = 2) -> jax.Array:
    """``size x size`` max pool with stride `size`, skipped when a spatial side is below `size`.

    Skipping keeps the architectures usable on small images (8x8 digits): a pool that would
    shrink a side to 0 is left out instead of failing.
    """
    if x.shape[-3] < size or x.shape[-2] < size:
        return x
    return nn.max_pool(x, (size, size), strides=(size, size))


def scaled(base: int, width: float) -> int:
    """Channels of a layer with `base` channels under the width multiplier: ``max(1, round(base*width))``."""
    return max(1, round(base * width))


def as_logits(x: jax.Array) -> jax.Array:
    """Logits in float32 whatever the computation dtype (losses and metrics want float32)."""
    return x.astype(jnp.float32)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with its mask drawn 1-D and reshaped: the same values, compiled much faster.

    See :func:`flat_init`: attention probabilities are 4-D and activations 3-D or 4-D, and
    XLA:CPU compiled the training step of a one-block ViT several times slower with the
    multi-dimensional draw. ``broadcast_dims`` is not supported.
    """

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng: jax.Array | None = None):
        if self.broadcast_dims:
            raise ValueError(f"broadcast_dims is not supported here; got {self.broadcast_dims}.")
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:  # avoids NaN gradients, as nn.Dropout does
            return jnp.zeros_like(inputs)
        keep = 1.0 - self.rate
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        mask = jax.random.bernoulli(rng, p=keep, shape=(inputs.size,)).reshape(inputs.shape)
        return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))


class SelfAttention(nn.Module):
    """Multi-head self-attention with plain ``nn.Dense`` projections.

    Submodules: ``query``, ``key``, ``value`` (kernels ``(dim, dim)``) and ``out`` (kernel
    ``(dim, dim)``). Heads are contiguous slices of ``dim`` (head h owns features
    ``h*dim/heads ... (h+1)*dim/heads - 1``), the layout of Hugging Face BERT; plain Dense kernels
    keep the last axis the unit axis for neuron-granularity anchors and permutation specs.
    The softmax runs in float32 whatever the computation dtype.

    Attributes:
      heads: number of attention heads (must divide the feature size).
      dropout: dropout rate on the attention probabilities (training only).
      dtype: computation dtype.
      kernel_init: initializer of the four kernels.
    """

    heads: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    kernel_init: Callable[..., Any] = KERNEL_INIT

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None, train: bool = False) -> jax.Array:
        """`x`: ``(batch, length, dim)``; `mask`: ``(batch, length)`` booleans, True = real token."""
        dim = x.shape[-1]
        if dim % self.heads:
            raise ValueError(f"heads must divide the feature size; got heads={self.heads}, dim={dim}.")
        head_dim = dim // self.heads

        def proj(name: str) -> nn.Dense:
            return nn.Dense(dim, dtype=self.dtype, param_dtype=jnp.float32,
                            kernel_init=self.kernel_init, name=name)

        def split(t: jax.Array) -> jax.Array:  # (b, l, dim) -> (b, heads, l, head_dim)
            return t.reshape(*t.shape[:-1], self.heads, head_dim).swapaxes(-2, -3)

        q, k, v = (split(proj(n)(x)) for n in ("query", "key", "value"))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
        if mask is not None:
            logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        probs = Dropout(self.dropout, deterministic=not train)(probs)
        y = jnp.einsum("bhqk,bhkd->bhqd", probs, v).swapaxes(-2, -3).reshape(x.shape[:-1] + (dim,))
        return proj("out")(y)

