"""The optimizer of a run from the config: the base optax chain, with `fixed_anchor_mask`
appended for anchored arms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optax

from tna_jax import anchors
from tna_jax.models import Net
from tna_jax.runs import Arm

__all__ = ["check_anchor_options", "make_optimizer", "anchor_options", "make_transform"]


def make_optimizer(opt_config: Any, steps_per_epoch_: int, epochs: int) -> optax.GradientTransformation:
    """The base optimizer (without anchors) from ``config.optimizer``.

    ``name``: sgd | momentum | adam | adamw | lion; ``schedule``: constant | cosine (decay to 0
    over training) | warmup_cosine (``warmup_epochs`` of linear warm-up); ``weight_decay``
    (decoupled for adamw/lion, added to the gradient otherwise); ``grad_clip_norm`` > 0 clips
    by global norm first.

    Args:
      opt_config: ``config.optimizer``.
      steps_per_epoch_: optimizer steps per epoch (for the schedules).
      epochs: training epochs (for the schedules).

    Returns:
      An optax ``GradientTransformation`` (chain :func:`tna_jax.anchors.fixed_anchor_mask` after it).

    Raises:
      ValueError: an unknown optimizer name.

    Examples:
      >>> import jax.numpy as jnp
      >>> from tna_jax.config import default_config
      >>> tx = make_optimizer(default_config().optimizer, steps_per_epoch_=10, epochs=2)  # SGD, lr 0.05
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))
      >>> [round(float(u), 4) for u in updates["w"]]
      [-0.05, -0.05]
    """
    lr = float(opt_config.learning_rate)
    total = max(1, steps_per_epoch_ * epochs)
    if opt_config.schedule == "constant":
        schedule: Any = lr
    elif opt_config.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(lr, total)
    else:
        warmup = int(round(opt_config.warmup_epochs * steps_per_epoch_))
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(total, warmup + 1))
    name, wd = opt_config.name, float(opt_config.weight_decay)
    parts = []
    if opt_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(opt_config.grad_clip_norm)))
    if name in ("sgd", "momentum", "adam") and wd > 0:
        parts.append(optax.add_decayed_weights(wd))
    if name == "sgd":
        parts.append(optax.sgd(schedule))
    elif name == "momentum":
        parts.append(optax.sgd(schedule, momentum=float(opt_config.momentum)))
    elif name == "adam":
        parts.append(optax.adam(schedule))
    elif name == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=wd))
    elif name == "lion":
        parts.append(optax.lion(schedule, weight_decay=wd))
    else:
        raise ValueError(f"config.optimizer.name must be one of ('sgd', 'momentum', 'adam', 'adamw', 'lion'); got {name!r}.")
    return optax.chain(*parts) if len(parts) > 1 else parts[0]


def _patterns(text: str) -> list[str] | None:
    items = [p.strip() for p in text.split(",") if p.strip()] if text else []
    return items or None


def anchor_options(config: Any, net: Net) -> dict[str, Any]:
    """Keyword arguments of `tna_jax.anchors.anchor_mask` from `config.anchor`.

    Args:
      config: the experiment config.
      net: the model (its `layer_order()` resolves "first"/"middle"/"last").

    Returns:
      `granularity`, `include`, `exclude` (lists of patterns or None) and `layer_order`.
    """
    return dict(granularity=config.anchor.granularity, include=_patterns(config.anchor.include),
                exclude=_patterns(config.anchor.exclude), layer_order=net.layer_order())


def check_anchor_options(config: Any, net: Net) -> None:
    """Checks that ``config.anchor``'s include/exclude patterns select weights of `net`.

    Runs the selection on the parameter shapes (``jax.eval_shape``: nothing is computed), so a
    misspelled pattern stops the run before any data is placed or any program compiled.

    Args:
      config: the experiment config.
      net: the model.

    Raises:
      tna_jax.config.ConfigError: a pattern that selects nothing, is not a regular expression,
        or a named selection the model cannot resolve; the message lists the parameter paths.

    Examples:
      >>> from tna_jax import models
      >>> from tna_jax.config import default_config
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 3)
      >>> c = default_config()
      >>> c.anchor.include = "dense_O"  # a letter O, not a zero
      >>> check_anchor_options(c, net)
      Traceback (most recent call last):
      ...
      tna_jax.config.schema.ConfigError: config.anchor.include pattern 'dense_O' selects no parameter; the paths are: dense_0/bias, dense_0/kernel, head/bias, head/kernel.
    """
    import jax

    from tna_jax.config import ConfigError

    opts = anchor_options(config, net)
    if opts["include"] is None and opts["exclude"] is None:
        return
    key = jax.random.key(0)

    def select():
        params = net.init(key)["params"]
        return anchors.anchor_mask(params, 0.5, key, **opts)

    try:
        jax.eval_shape(select)
    except (ValueError, TypeError) as err:
        text = str(err)
        for arg in ("include", "exclude"):
            if text.startswith(arg):
                text = f"config.anchor.{text}"
        raise ConfigError(text) from None


def make_transform(base: optax.GradientTransformation, config: Any, net: Net, arms: Sequence[Arm]
                   ) -> Callable[..., optax.GradientTransformation]:
    """``tx(ratio, key, values=None)``: the optimizer of one run, with ``fixed_anchor_mask``
    appended when any arm masks weights. Its ``update`` reads everything (mask, ratio, key,
    values) from the state, so one instance updates every run; ``init`` is called per run
    (inside vmap) with the run's ratio, key and anchor values.

    Args:
      base: the base optimizer (`make_optimizer`).
      config: the experiment config (`config.anchor`: granularity, include/exclude patterns,
        `refresh_every`).
      net: the model (its layer order feeds the named layer selections).
      arms: the arms of the experiment (`arms_from_config`); when none has a ratio > 0 the
        factory returns `base` unchanged.

    Returns:
      ``tx(ratio, key, values=None) -> optax.GradientTransformation``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from tna_jax import anchors, models
      >>> from tna_jax.config import default_config
      >>> from tna_jax.runs import arms_from_config
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 3)
      >>> c = default_config()
      >>> tx = make_transform(optax.sgd(0.1), c, net, arms_from_config(c))  # vanilla and TNA-PFN 0.4
      >>> params = {"w": jnp.zeros((10, 10))}
      >>> mask = anchors.find_state(tx(0.4, jax.random.key(0)).init(params)).mask
      >>> mask["w"].dtype, round(float(mask["w"].mean()), 2)  # each entry an anchor with probability 0.4
      (dtype('bool'), 0.46)
    """
    if not any(a.ratio > 0 for a in arms):
        return lambda ratio, key, values=None: base
    refresh = config.anchor.refresh_every or None
    opts = anchor_options(config, net)

    def tx(ratio, key, values=None):
        return optax.chain(base, anchors.fixed_anchor_mask(ratio, key, values=values, refresh_every=refresh, **opts))

    return tx
