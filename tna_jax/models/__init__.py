"""The model zoo behind one pure boundary: ``build(model_config, input_shape, num_classes) -> Net``.

Known models are registered in :data:`REGISTRY`; each entry turns a model config (an
``ml_collections.ConfigDict`` or a plain mapping with a ``name`` field) into a Flax module.
Unknown names raise an error that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from tna_jax.models.base import Net, Variables
from tna_jax.models.mlp import ACTIVATIONS, MLP

__all__ = ["Net", "Variables", "build", "REGISTRY", "register", "MLP"]

# name -> factory(cfg: Mapping, input_shape, num_classes) -> (module, input_dtype)
REGISTRY: dict[str, Callable[[Mapping[str, Any], tuple[int, ...], int], tuple[Any, Any]]] = {}


def register(name: str):
    """Decorator that adds a model factory to :data:`REGISTRY` under `name`."""

    def deco(fn):
        REGISTRY[name] = fn
        return fn

    return deco


def _get(cfg: Mapping[str, Any], field: str, default: Any) -> Any:
    return cfg.get(field, default) if hasattr(cfg, "get") else getattr(cfg, field, default)


def positive_int(cfg: Mapping[str, Any], field: str, default: int) -> int:
    """Reads an integer field >= 1 from a model config, with an error naming the field."""
    value = _get(cfg, field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model.{field} must be a positive integer; got {value!r}.")
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


@register("mlp")
def _mlp(cfg, input_shape, num_classes):
    depth = _get(cfg, "depth", 2)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"model.depth must be a non-negative integer; got {depth!r}.")
    width = positive_int(cfg, "width", 128)
    activation = choice(cfg, "activation", "relu", tuple(ACTIVATIONS))
    norm = choice(cfg, "norm", "none", ("none", "layer"))
    return MLP(hidden=(width,) * depth, num_classes=num_classes, activation=activation, norm=norm), jnp.float32


def build(model_config: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int | None = None) -> Net:
    """Builds the model named ``model_config.name`` for inputs of `input_shape`.

    Args:
      model_config: ``name`` plus the model's own fields (see each model's docstring).
      input_shape: shape of one example, e.g. ``(40,)`` for MNIST-1D or ``(32, 32, 3)``.
      num_classes: number of classes; defaults to ``model_config.num_classes``.

    Raises:
      ValueError: unknown model name (the message lists the known ones) or a bad field.

    Examples:
      >>> import jax
      >>> net = build({"name": "mlp", "depth": 2, "width": 32}, input_shape=(40,), num_classes=10)
      >>> variables = net.init(jax.random.key(0))
      >>> logits, _ = net.apply(variables, jax.numpy.zeros((5, 40)))
      >>> logits.shape
      (5, 10)
    """
    name = _get(model_config, "name", None)
    if name not in REGISTRY:
        raise ValueError(f"model.name must be one of {sorted(REGISTRY)}; got {name!r}.")
    if num_classes is None:
        num_classes = _get(model_config, "num_classes", None)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}.")
    input_shape = tuple(int(d) for d in input_shape)
    module, input_dtype = REGISTRY[name](model_config, input_shape, num_classes)
    return Net(name=name, module=module, input_shape=input_shape, num_classes=num_classes,
               input_dtype=input_dtype)
