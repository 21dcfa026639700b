"""The pure boundary between Flax modules and the rest of tna_jax: :class:`Net`.

Every model in the zoo is a Flax Linen module. :class:`Net` wraps one into two pure functions,
``init(key) -> variables`` and ``apply(variables, x, train=..., rng=...) -> (logits, state)``,
so that ``jax.vmap`` over seeds, ``jax.jit`` and sharding apply to whole models. ``variables``
is ``{"params": ..., "batch_stats": ...}`` (the second only for nets with BatchNorm); ``state``
is the updated non-parameter collections after a training step (``{}`` when there are none).

Naming convention shared by all models (``anchors`` and ``align`` rely on it): weight layers have
readable names (``dense_0``, ``conv1``, ``block2_1/conv2``, ``head``) and the normalisation of a
layer's outputs is named ``<layer>_norm``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tna_jax import tree as tree_lib
from tna_jax.models.layers import INIT_SCHEMES, torch_default_init

Variables = dict[str, Any]
TORCH_STREAM = 0x70726E  # fold_in constant of init_scheme="torch"'s key


@dataclasses.dataclass(frozen=True)
class Net:
    """A model as pure functions.

    Attributes:
      name: registry name (``"mlp"``, ``"resnet20"``, ...).
      module: the Flax Linen module.
      input_shape: shape of one example (without the batch axis).
      num_classes: number of output logits.
      input_dtype: dtype of the inputs (float32 for images/features, int32 for token ids).
      init_scheme: ``"flax"`` (the modules' own initializers) or ``"torch"`` (every Dense/Conv
        layer redrawn as PyTorch's ``nn.Linear``/``nn.Conv*`` defaults after the module's init,
        `tna_jax.models.layers.torch_default_init`).

    Raises:
      ValueError: `init_scheme` is neither ``"flax"`` nor ``"torch"``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from tna_jax.models import MLP
      >>> net = Net("linear", MLP(hidden=(), num_classes=3), input_shape=(4,), num_classes=3)
      >>> variables = net.init(jax.random.key(0))
      >>> logits, state = net.apply(variables, jnp.ones((2, 4)))
      >>> logits.shape, state, net.param_count(), net.layer_order()
      ((2, 3), {}, 15, ['head'])
    """

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    num_classes: int
    input_dtype: Any = jnp.float32
    init_scheme: str = "flax"

    def __post_init__(self) -> None:
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(f"model.init must be one of {INIT_SCHEMES}; got {self.init_scheme!r}.")

    def init(self, key: jax.Array) -> Variables:
        """Initial variables for one model from one PRNG key (pure; vmap it over keys)."""
        params_key, dropout_key = jax.random.split(key)
        x = jnp.zeros((1, *self.input_shape), self.input_dtype)
        variables = dict(self.module.init({"params": params_key, "dropout": dropout_key}, x, train=False))
        if self.init_scheme == "torch":
            # Its own stream: the module's draws (discarded, so XLA never computes them) use params_key.
            variables["params"] = torch_default_init(variables["params"], jax.random.fold_in(params_key, TORCH_STREAM))
        return variables

    def apply(self, variables: Variables, x: jax.Array, *, train: bool = False,
              rng: jax.Array | None = None) -> tuple[jax.Array, Variables]:
        """Logits for a batch `x` and the updated non-parameter collections.

        In training mode BatchNorm uses batch statistics and returns updated running averages
        in the second output; in evaluation mode the second output is ``{}``.
        """
        mutable = [k for k in variables if k != "params"] if train else False
        rngs = {"dropout": rng} if rng is not None else None
        if mutable:
            logits, state = self.module.apply(variables, x, train=train, rngs=rngs, mutable=mutable)
            return logits, dict(state)
        logits = self.module.apply(variables, x, train=train, rngs=rngs)
        return logits, {}

    @property
    def has_batch_stats(self) -> bool:
        return "batch_stats" in jax.eval_shape(self.init, jax.random.key(0))

    def layer_order(self) -> list[str]:
        """Paths of the weight layers from input to output: the order in which the model reads
        its kernels when called (`tna_jax.trace.layer_order`), never a dict's key order (JAX
        sorts keys, which puts `head` before `stage0_block0` in a ResNet)."""
        from tna_jax import trace

        variables = jax.eval_shape(self.init, jax.random.key(0))
        x = jax.ShapeDtypeStruct((1, *self.input_shape), self.input_dtype)
        order = trace.layer_order(lambda v: self.apply(v, jnp.zeros(x.shape, x.dtype))[0], variables)
        return [path.split("/", 1)[1] for path in order if path.startswith("params/")]

    def param_count(self) -> int:
        return tree_lib.tree_size(jax.eval_shape(self.init, jax.random.key(0))["params"])


ModelFactory = Callable[..., nn.Module]
