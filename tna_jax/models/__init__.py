"""The model zoo behind one pure boundary: ``build(model_config, input_shape, num_classes) -> Net``.

Known models are registered in :data:`REGISTRY`; each entry turns a model config (an
``ml_collections.ConfigDict`` or a plain mapping with a ``name`` field) into a Flax module.
Unknown names raise an error that lists the known ones; a bad field raises a ``ValueError``
that names ``model.<field>``, the value and what is allowed.

===============  ==================================================================  =========
name             fields (default)                                                    inputs
===============  ==================================================================  =========
``mlp``          depth (2), width (128), activation (relu), norm (none)              any
``cnn``          width (1.0), hidden (512)                                           (H, W, C)
``vgg11/vgg16``  width (1.0), norm (batch | none)                                    (H, W, C)
``resnet20``     width (1.0), norm (batch | layer)                                   (H, W, C)
``wrn``          depth (16; 6n+4), width (4.0, the factor k), norm (batch | layer),  (H, W, C)
                 dropout (0.0)
``vit``          patch_size (4), dim (64), depth (6), heads (4), mlp_dim (128),      (H, W, C)
                 dropout (0.0)
``transformer``  vocab_size (30522), hidden (384), layers (6), heads (12),           (L,) int32
                 intermediate (1536), max_len (512), type_vocab (2), dropout (0.1),
                 layer_norm_eps (1e-12)
===============  ==================================================================  =========

Every model also takes ``dtype`` (``"float32"`` or ``"bfloat16"``): the computation dtype.
Parameters are always float32 and logits come back as float32.

And every model takes ``init`` (``"flax"``, the default, or ``"torch"``): how the weights are
drawn. ``"flax"`` is the zoo's own init: Flax's default ``lecun_normal`` kernels (truncated
normal, variance ``1/fan_in``) and zero biases. ``"torch"`` draws every Dense and Conv layer as
PyTorch's ``nn.Linear``/``nn.Conv2d`` do by default: kernel ``kaiming_uniform_(a=sqrt(5))``, i.e.
``U(±1/sqrt(fan_in))``, and bias ``U(±1/sqrt(fan_in))`` (``fan_in`` = input features, or input
channels times the kernel's receptive field); LayerNorm/BatchNorm scales 1 and biases 0 as in
both libraries. Why it matters: the initialisation alone moves LMC barriers, endpoint
accuracies and federated accuracies by several points (PyTorch's weights are ``1/sqrt(3)``
times smaller in standard deviation and its biases are not zero), so numbers meant to be
compared with a PyTorch paper need ``init="torch"`` (docs/howto/reproduce-pytorch.md). What
``"torch"`` leaves alone, because a PyTorch implementation sets it by hand too: ViT's CLS token
(zeros) and position embedding (normal, std 0.02); and the ``transformer``, whose init is
BERT's under both values (normal, std 0.02, zero biases: what Hugging Face's PyTorch
``BertModel`` does). See `tna_jax.models.layers.torch_default_init`. Layer names follow one
convention (see :mod:`tna_jax.models.base` and each module's docstring): a layer's output
normalisation is ``<layer>_norm``, which ``anchors`` uses for neuron-granularity unit groups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from tna_jax.models.base import Net, Variables
from tna_jax.models.cnn import CNN
from tna_jax.models.layers import DTYPES, INIT_SCHEMES
from tna_jax.models.mlp import ACTIVATIONS, MLP
from tna_jax.models.resnet import ResNet, WideResNet
from tna_jax.models.transformer import TransformerEncoder, sentence_embedding
from tna_jax.models.vgg import VGG, VGG_CONFIGS
from tna_jax.models.vit import ViT

__all__ = [
    "Net",
    "Variables",
    "build",
    "REGISTRY",
    "register",
    "MLP",
    "CNN",
    "VGG",
    "ResNet",
    "WideResNet",
    "ViT",
    "TransformerEncoder",
    "sentence_embedding",
    "DTYPES",
    "INIT_SCHEMES",
]

# Models whose init is the same under model.init="flax" and "torch": the PyTorch implementation
# they mirror initialises every weight itself (BERT: normal, std 0.02).
OWN_INIT = frozenset({"transformer"})

# name -> factory(cfg: Mapping, input_shape, num_classes) -> (module, input_dtype)
REGISTRY: dict[str, Callable[[Mapping[str, Any], tuple[int, ...], int], tuple[Any, Any]]] = {}


def register(name: str):
    """Decorator that adds a model factory to :data:`REGISTRY` under `name`.

    A factory is ``fn(model_config, input_shape, num_classes) -> (flax_module, input_dtype)``; it
    reads and validates its own ``model.*`` fields (see :func:`positive_int`, :func:`choice`).

    Args:
      name: the ``model.name`` value that selects it.

    Returns:
      The decorator (it returns the factory unchanged).

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> class Linear(nn.Module):
      ...     num_classes: int
      ...     @nn.compact
      ...     def __call__(self, x, train=False):
      ...         return nn.Dense(self.num_classes, name="head")(x)
      >>> @register("test_doc_linear")
      ... def linear(cfg, input_shape, num_classes):
      ...     return Linear(num_classes), jnp.float32
      >>> net = build({"name": "test_doc_linear"}, (3,), 2)
      >>> net.apply(net.init(jax.random.key(0)), jnp.ones((4, 3)))[0].shape
      (4, 2)
    """

    def deco(fn):
        REGISTRY[name] = fn
        return fn

    return deco


def _get(cfg: Mapping[str, Any], field: str, default: Any) -> Any:
    return cfg.get(field, default) if hasattr(cfg, "get") else getattr(cfg, field, default)


MAX_SIZE = 1 << 20  # widths, depths, sequence lengths: no model here (or memory) goes beyond


def positive_int(cfg: Mapping[str, Any], field: str, default: int) -> int:
    """Reads an integer field in [1, MAX_SIZE] from a model config, with an error naming the field."""
    value = _get(cfg, field, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise ValueError(f"model.{field} must be a positive integer (at most {MAX_SIZE}); got {value!r}.")
    return value


def positive_float(cfg: Mapping[str, Any], field: str, default: float) -> float:
    value = _get(cfg, field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"model.{field} must be a positive number; got {value!r}.")
    return float(value)


def choice(cfg: Mapping[str, Any], field: str, default: str, allowed: tuple[str, ...]) -> str:
    value = _get(cfg, field, default)
    if value not in allowed:
        raise ValueError(f"model.{field} must be one of {allowed}; got {value!r}.")
    return value


def fraction(cfg: Mapping[str, Any], field: str, default: float) -> float:
    """Reads a rate in [0, 1) (dropout) from a model config, with an error naming the field."""
    value = _get(cfg, field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"model.{field} must be a number in [0, 1); got {value!r}.")
    return float(value)


def compute_dtype(cfg: Mapping[str, Any]) -> Any:
    """The ``dtype`` field (``"float32"`` or ``"bfloat16"``) as a JAX dtype."""
    return DTYPES[choice(cfg, "dtype", "float32", tuple(DTYPES))]


def _image(name: str, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"model {name!r} needs image inputs of shape (H, W, C); got input_shape={input_shape}.")


@register("mlp")
def _mlp(cfg, input_shape, num_classes):
    depth = _get(cfg, "depth", 2)
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= 10_000:
        raise ValueError(f"model.depth must be an integer in [0, 10000]; got {depth!r}.")
    width = positive_int(cfg, "width", 128)
    activation = choice(cfg, "activation", "relu", tuple(ACTIVATIONS))
    norm = choice(cfg, "norm", "none", ("none", "layer"))
    return MLP(hidden=(width,) * depth, num_classes=num_classes, activation=activation, norm=norm,
               dtype=compute_dtype(cfg)), jnp.float32


@register("cnn")
def _cnn(cfg, input_shape, num_classes):
    _image("cnn", input_shape)
    return CNN(num_classes=num_classes, width=positive_float(cfg, "width", 1.0),
               hidden=positive_int(cfg, "hidden", 512), dtype=compute_dtype(cfg)), jnp.float32


def _vgg(name: str):
    def factory(cfg, input_shape, num_classes):
        _image(name, input_shape)
        return VGG(layers=VGG_CONFIGS[name], num_classes=num_classes,
                   width=positive_float(cfg, "width", 1.0),
                   norm=choice(cfg, "norm", "batch", ("batch", "none")), dtype=compute_dtype(cfg)), jnp.float32

    factory.__doc__ = f"{name}: see :class:`tna_jax.models.vgg.VGG`."
    return factory


for _name in VGG_CONFIGS:
    register(_name)(_vgg(_name))


@register("resnet20")
def _resnet20(cfg, input_shape, num_classes):
    _image("resnet20", input_shape)
    return ResNet(num_classes=num_classes, blocks=(3, 3, 3), channels=(16, 32, 64),
                  width=positive_float(cfg, "width", 1.0),
                  norm=choice(cfg, "norm", "batch", ("batch", "layer")), dtype=compute_dtype(cfg)), jnp.float32


@register("wrn")
def _wrn(cfg, input_shape, num_classes):
    _image("wrn", input_shape)
    depth = _get(cfg, "depth", 16)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"model.depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...); got {depth!r}.")
    return WideResNet(num_classes=num_classes, depth=depth, width=positive_float(cfg, "width", 4.0),
                      norm=choice(cfg, "norm", "batch", ("batch", "layer")),
                      dropout=fraction(cfg, "dropout", 0.0), dtype=compute_dtype(cfg)), jnp.float32


@register("vit")
def _vit(cfg, input_shape, num_classes):
    _image("vit", input_shape)
    patch = positive_int(cfg, "patch_size", 4)
    h, w, _ = input_shape
    if h % patch or w % patch:
        raise ValueError(f"model.patch_size must divide the image height and width {(h, w)}; got {patch}.")
    dim = positive_int(cfg, "dim", 64)
    heads = positive_int(cfg, "heads", 4)
    if dim % heads:
        raise ValueError(f"model.heads must divide model.dim={dim}; got {heads}.")
    return ViT(num_classes=num_classes, patch_size=patch, dim=dim, depth=positive_int(cfg, "depth", 6),
               heads=heads, mlp_dim=positive_int(cfg, "mlp_dim", 128), dropout=fraction(cfg, "dropout", 0.0),
               dtype=compute_dtype(cfg)), jnp.float32


@register("transformer")
def _transformer(cfg, input_shape, num_classes):
    if len(input_shape) != 1:
        raise ValueError("model 'transformer' needs token-id inputs of shape (seq_len,); "
                         f"got input_shape={input_shape}.")
    hidden = positive_int(cfg, "hidden", 384)
    heads = positive_int(cfg, "heads", 12)
    if hidden % heads:
        raise ValueError(f"model.heads must divide model.hidden={hidden}; got {heads}.")
    max_len = positive_int(cfg, "max_len", 512)
    if input_shape[0] > max_len:
        raise ValueError(f"model.max_len must be at least the sequence length {input_shape[0]}; got {max_len}.")
    module = TransformerEncoder(
        num_classes=num_classes, vocab_size=positive_int(cfg, "vocab_size", 30522), hidden=hidden,
        layers=positive_int(cfg, "layers", 6), heads=heads, intermediate=positive_int(cfg, "intermediate", 1536),
        max_len=max_len, type_vocab=positive_int(cfg, "type_vocab", 2), dropout=fraction(cfg, "dropout", 0.1),
        layer_norm_eps=positive_float(cfg, "layer_norm_eps", 1e-12), dtype=compute_dtype(cfg))
    return module, jnp.int32


def build(model_config: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int | None = None) -> Net:
    """Builds the model named ``model_config.name`` for inputs of `input_shape`.

    Args:
      model_config: ``name`` plus the model's own fields (see each model's docstring).
      input_shape: shape of one example, e.g. ``(40,)`` for MNIST-1D or ``(32, 32, 3)``.
      num_classes: number of classes; defaults to ``model_config.num_classes``.

    Returns:
      The :class:`Net` (pure ``init`` and ``apply``).

    Raises:
      ValueError: unknown model name (the message lists the known ones) or a bad field (e.g.
        ``model.init`` not ``"flax"`` or ``"torch"``).

    Examples:
      >>> import jax
      >>> net = build({"name": "mlp", "depth": 2, "width": 32}, input_shape=(40,), num_classes=10)
      >>> variables = net.init(jax.random.key(0))
      >>> logits, _ = net.apply(variables, jax.numpy.zeros((5, 40)))
      >>> logits.shape
      (5, 10)
      >>> torch_like = build({"name": "mlp", "depth": 1, "width": 32, "init": "torch"}, (40,), 10)
      >>> bias = torch_like.init(jax.random.key(0))["params"]["dense_0"]["bias"]  # U(±1/sqrt(40)), not zeros
      >>> bool((bias != 0).all()), bool((abs(bias) <= 40 ** -0.5).all())
      (True, True)
    """
    name = _get(model_config, "name", None)
    if name not in REGISTRY:
        raise ValueError(f"model.name must be one of {sorted(REGISTRY)}; got {name!r}.")
    if num_classes is None:
        num_classes = _get(model_config, "num_classes", None)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}.")
    input_shape = tuple(int(d) for d in input_shape)
    init = choice(model_config, "init", "flax", INIT_SCHEMES)
    module, input_dtype = REGISTRY[name](model_config, input_shape, num_classes)
    if name in OWN_INIT:  # their PyTorch reference sets every weight itself (see the module docstring)
        init = "flax"
    return Net(name=name, module=module, input_shape=input_shape, num_classes=num_classes,
               input_dtype=input_dtype, init_scheme=init)
