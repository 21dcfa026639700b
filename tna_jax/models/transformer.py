"""A BERT-style text encoder (Devlin et al., 2019) whose parameters mirror Hugging Face's
``BertModel``, so that checkpoints such as sentence-transformers' all-MiniLM-L6-v2 load into it
tensor by tensor; mean pooling over real tokens and a linear classification head on top.

Parameter names (``i`` counts layers from 0) and their Hugging Face counterparts (Dense kernels
are the transposes of PyTorch ``Linear.weight``; LayerNorm ``scale``/``bias`` are
``weight``/``bias``)::

    embeddings/word_embeddings/embedding        embeddings.word_embeddings.weight        (vocab, hidden)
    embeddings/position_embeddings/embedding    embeddings.position_embeddings.weight    (max_len, hidden)
    embeddings/token_type_embeddings/embedding  embeddings.token_type_embeddings.weight  (type_vocab, hidden)
    embeddings/norm                             embeddings.LayerNorm
    layer_{i}/attention/query|key|value         encoder.layer.{i}.attention.self.query|key|value
    layer_{i}/attention/out                     encoder.layer.{i}.attention.output.dense
    layer_{i}/attention/out_norm                encoder.layer.{i}.attention.output.LayerNorm
    layer_{i}/intermediate                      encoder.layer.{i}.intermediate.dense     (hidden, intermediate)
    layer_{i}/output                            encoder.layer.{i}.output.dense           (intermediate, hidden)
    layer_{i}/output_norm                       encoder.layer.{i}.output.LayerNorm
    head                                        (new) Dense hidden -> num_classes

Neuron-granularity anchor groups: every Dense and embedding table is a group over its last
(hidden) axis; each post-LN norm shares the draw of the Dense whose output (plus the skip) it
normalises: ``attention/out_norm`` with ``attention/out`` and ``output_norm`` with ``output``.
``embeddings/norm`` is a group of its own (it normalises the sum of three tables).

Token id 0 is padding: padded keys are masked out of every attention softmax and padded
positions out of the mean pooling (sentence-transformers' ``mean_pooling``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tna_jax.models.layers import Dropout, SelfAttention, as_logits, flat_init

PAD_ID = 0
BERT_INIT = flat_init(nn.initializers.normal(0.02))  # BERT's initializer_range, drawn 1-D


class BertAttention(SelfAttention):
    """Self-attention followed by BERT's post-LN residual: ``out_norm(x + dropout(attention(x)))``.

    Submodules ``query``, ``key``, ``value``, ``out`` (from :class:`SelfAttention`) and ``out_norm``.
    """

    layer_norm_eps: float = 1e-12

    @nn.compact
    def __call__(self, x, mask=None, train: bool = False):
        y = super().__call__(x, mask, train)
        y = Dropout(self.dropout, deterministic=not train)(y)
        return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                            name="out_norm")(x + y)


class BertLayer(nn.Module):
    """One post-LN encoder layer: attention, then ``output_norm(x + drop(output(gelu(intermediate(x)))))``."""

    heads: int
    intermediate: int
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=BERT_INIT)
        x = BertAttention(heads=self.heads, dropout=self.dropout, dtype=self.dtype, kernel_init=BERT_INIT,
                          layer_norm_eps=self.layer_norm_eps, name="attention")(x, mask, train)
        y = nn.gelu(nn.Dense(self.intermediate, name="intermediate", **kw)(x), approximate=False)
        y = nn.Dense(x.shape[-1], name="output", **kw)(y)
        y = Dropout(self.dropout, deterministic=not train)(y)
        return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                            name="output_norm")(x + y)


class BertEmbeddings(nn.Module):
    """``norm(word[ids] + position[0..L-1] + token_type[type_ids])`` then dropout."""

    vocab_size: int
    hidden: int
    max_len: int
    type_vocab: int
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids, token_type_ids=None, train: bool = False):
        embed = lambda n, name: nn.Embed(n, self.hidden, dtype=self.dtype, param_dtype=jnp.float32,  # noqa: E731
                                         embedding_init=BERT_INIT, name=name)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(ids)
        positions = jnp.arange(ids.shape[-1])[None, :]
        x = (embed(self.vocab_size, "word_embeddings")(ids)
             + embed(self.max_len, "position_embeddings")(positions)
             + embed(self.type_vocab, "token_type_embeddings")(token_type_ids))
        x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32, name="norm")(x)
        return Dropout(self.dropout, deterministic=not train)(x)


class TransformerEncoder(nn.Module):
    """BERT-style encoder + mean pooling + ``head``; see the module docstring for the names.

    ``__call__(ids, train=False, return_embedding=False, token_type_ids=None)`` takes int token
    ids of shape ``(batch, seq_len)`` (``seq_len <= max_len``, pad id 0) and returns float32
    logits ``(batch, num_classes)``, or with ``return_embedding=True`` the pooled sentence
    embedding ``(batch, hidden)`` before the head (see :func:`sentence_embedding`).

    The defaults are all-MiniLM-L6-v2's: vocabulary 30522, hidden 384, 6 layers, 12 heads,
    intermediate 1536, 512 positions, 2 token types, LayerNorm epsilon 1e-12, exact erf GELU.
    Weights are initialised like BERT (normal, std 0.02; zero biases).

    Attributes:
      num_classes: output size of ``head``.
      vocab_size, hidden, layers, heads, intermediate, max_len, type_vocab: BERT sizes.
      dropout: rate for embeddings, attention probabilities and residual branches (training only;
        BERT uses 0.1 for both of its rates).
      layer_norm_eps: LayerNorm epsilon.
      dtype: computation dtype (parameters are float32).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> bert = TransformerEncoder(num_classes=2, vocab_size=50, hidden=8, layers=1, heads=2,
      ...                           intermediate=16, max_len=6)
      >>> ids = jnp.array([[5, 7, 9, 0, 0, 0]])  # 0 is padding
      >>> variables = jax.eval_shape(bert.init, jax.random.key(0), ids)
      >>> variables["params"]["embeddings"]["word_embeddings"]["embedding"].shape
      (50, 8)
      >>> jax.eval_shape(bert.apply, variables, ids).shape
      (1, 2)
    """

    num_classes: int
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_len: int = 512
    type_vocab: int = 2
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids, train: bool = False, return_embedding: bool = False, token_type_ids=None):
        mask = ids != PAD_ID
        x = BertEmbeddings(self.vocab_size, self.hidden, self.max_len, self.type_vocab, self.dropout,
                           self.layer_norm_eps, self.dtype, name="embeddings")(ids, token_type_ids, train)
        for i in range(self.layers):
            x = BertLayer(self.heads, self.intermediate, self.dropout, self.layer_norm_eps, self.dtype,
                          name=f"layer_{i}")(x, mask, train)
        m = mask[..., None].astype(jnp.float32)
        pooled = jnp.sum(x.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
        if return_embedding:
            return pooled
        return as_logits(nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                                  kernel_init=BERT_INIT, name="head")(pooled.astype(self.dtype)))


def sentence_embedding(net: Any, variables: dict[str, Any], ids: jax.Array) -> jax.Array:
    """Mean-pooled sentence embeddings ``(batch, hidden)`` of a transformer `net` (before ``head``).

    This is what sentence-transformers returns for a BERT model with mean pooling (without its
    optional L2 normalisation). `net` is the ``Net`` built for ``name="transformer"``.

    Args:
      net: a ``Net`` whose module is a :class:`TransformerEncoder`.
      variables: its variables (``{"params": ...}``).
      ids: int token ids ``(batch, seq_len)``, pad id 0 (padded positions are left out of the mean).

    Returns:
      float32 ``(batch, hidden)``: the mean of the last layer's outputs over the real tokens.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from tna_jax import models
      >>> net = models.build({"name": "transformer", "vocab_size": 50, "hidden": 8, "layers": 1,
      ...                     "heads": 2, "intermediate": 16, "max_len": 6}, (6,), 2)
      >>> variables = jax.eval_shape(net.init, jax.random.key(0))  # shapes only: no compile
      >>> ids = jnp.array([[5, 7, 9, 0, 0, 0], [5, 7, 0, 0, 0, 0]])
      >>> jax.eval_shape(lambda v: sentence_embedding(net, v, ids), variables).shape
      (2, 8)
    """
    return net.module.apply(variables, ids, train=False, return_embedding=True)
