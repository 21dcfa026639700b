"""A small Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words") for small
images: patch embedding, CLS token, learned position embeddings, pre-LN encoder blocks.

Parameter names (``i`` counts blocks from 0)::

    patch_embed                      Conv, kernel (p, p, C, dim), stride p
    embed/cls_token                  (dim,)          the CLS token
    embed/pos_embedding              (1 + N, dim)    learned positions, CLS first
    block{i}/ln1                     LayerNorm before attention
    block{i}/attn/query|key|value    Dense, kernel (dim, dim)
    block{i}/attn/out                Dense, kernel (dim, dim)
    block{i}/ln2                     LayerNorm before the MLP
    block{i}/mlp/fc1                 Dense, kernel (dim, mlp_dim)
    block{i}/mlp/fc2                 Dense, kernel (mlp_dim, dim)
    final_norm                       LayerNorm on the residual stream
    head                             Dense, kernel (dim, num_classes), on the CLS token

The attention projections are plain ``nn.Dense`` layers (not ``DenseGeneral`` with a heads axis),
so the last axis of every kernel is its unit axis. For neuron-granularity anchors each Dense is a
unit group; the pre-LN norms ``ln1``, ``ln2``, ``final_norm`` and ``embed`` are groups of their
own (they normalise or feed the residual stream, not one layer's outputs).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tna_jax.models.layers import KERNEL_INIT, Dropout, SelfAttention, as_logits, flat_init

VIT_LN_EPSILON = 1e-6  # as in the reference ViT implementation


class MlpBlock(nn.Module):
    """``fc2(dropout(gelu(fc1(x))))`` with exact (erf) GELU."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=KERNEL_INIT)
        y = nn.gelu(nn.Dense(self.mlp_dim, name="fc1", **kw)(x), approximate=False)
        y = Dropout(self.dropout, deterministic=not train)(y)
        return nn.Dense(x.shape[-1], name="fc2", **kw)(y)


class EncoderBlock(nn.Module):
    """Pre-LN block: ``x + drop(attn(ln1(x)))``, then ``x + drop(mlp(ln2(x)))``."""

    heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        ln = lambda name: nn.LayerNorm(VIT_LN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32,  # noqa: E731
                                       name=name)
        drop = Dropout(self.dropout, deterministic=not train)
        x = x + drop(SelfAttention(self.heads, self.dropout, self.dtype, name="attn")(ln("ln1")(x), train=train))
        return x + drop(MlpBlock(self.mlp_dim, self.dropout, self.dtype, name="mlp")(ln("ln2")(x), train))


class ViT(nn.Module):
    """Vision Transformer classifier; see the module docstring for the parameter names.

    The image ``(H, W, C)`` is cut into ``(H/p) * (W/p)`` patches (`patch_size` must divide H and
    W; checked by ``build``), embedded by ``patch_embed``, prefixed with the CLS token and added to
    the position embeddings; ``depth`` pre-LN blocks follow, then ``final_norm`` and ``head`` on
    the CLS token.

    Attributes:
      num_classes: output size.
      patch_size: side p of the square patches.
      dim: width of the residual stream.
      depth: number of encoder blocks.
      heads: attention heads (divides `dim`).
      mlp_dim: hidden width of the MLPs.
      dropout: dropout rate after the embeddings, on attention probabilities, inside the MLPs
        and on each residual branch (training only).
      dtype: computation dtype (parameters are float32).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> vit = ViT(num_classes=10, patch_size=2, dim=16, depth=1, heads=2, mlp_dim=32)
      >>> variables = jax.eval_shape(vit.init, jax.random.key(0), jnp.ones((2, 8, 8, 1)))
      >>> variables["params"]["embed"]["pos_embedding"].shape  # CLS + (8/2) * (8/2) patches
      (17, 16)
      >>> jax.eval_shape(vit.apply, variables, jnp.ones((2, 8, 8, 1))).shape
      (2, 10)
    """

    num_classes: int
    patch_size: int = 4
    dim: int = 64
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        p = self.patch_size
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", kernel_init=KERNEL_INIT, dtype=self.dtype,
                    param_dtype=jnp.float32, name="patch_embed")(x.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, self.dim)
        x = TokenEmbed(x.shape[1] + 1, self.dim, name="embed")(x)
        x = Dropout(self.dropout, deterministic=not train)(x)
        for i in range(self.depth):
            x = EncoderBlock(self.heads, self.mlp_dim, self.dropout, self.dtype, name=f"block{i}")(x, train)
        x = nn.LayerNorm(VIT_LN_EPSILON, dtype=self.dtype, param_dtype=jnp.float32, name="final_norm")(x)
        return as_logits(nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                                  kernel_init=KERNEL_INIT, name="head")(x[:, 0]))


class TokenEmbed(nn.Module):
    """Prepends the CLS token (``cls_token``, zeros at init) and adds ``pos_embedding`` (normal, std 0.02)."""

    length: int
    dim: int

    @nn.compact
    def __call__(self, x):
        cls = self.param("cls_token", nn.initializers.zeros, (self.dim,), jnp.float32)
        pos = self.param("pos_embedding", flat_init(nn.initializers.normal(0.02)), (self.length, self.dim), jnp.float32)
        cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.dim))
        return jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
