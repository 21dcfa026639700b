"""Config checks: every field's type and range, fields the schema does not know, paths that must
stay inside the workdir, and options that cannot be combined. Each error names the field, the
value and what is allowed (:class:`ConfigError`)."""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Iterable
from typing import Any

from tna_jax.config.overrides import rename_fields
from tna_jax.config.schema import (
    INIT_SCHEMES,
    MAX_SIZE,
    PAIR_MODES,
    PATH_SUFFIXES,
    ConfigError,
    default_config,
    federated_config,
    flatten,
    get,
)

__all__ = ["validate", "validate_federated", "check_relative_path"]

# Sections that the module owning them checks (``model``: tna_jax.models; the others: their kind).
OPEN_SECTIONS = ("model.", "federated.", "fusion.", "align.", "grid.", "layerwise.", "soup.", "cold.")


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config.{field} must be {allowed}; got {value!r}.")


def _int(config: Any, field: str, lo: int = 0, hi: int | None = None) -> None:
    v = get(config, field)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v > hi):
        _fail(field, v, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))


def _float(config: Any, field: str, lo: float, hi: float, *, lo_open: bool = False) -> None:
    v = get(config, field)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        _fail(field, v, f"a finite number in {'(' if lo_open else '['}{lo}, {hi}]")
    if float(v) < lo or float(v) > hi or (lo_open and float(v) == lo):
        _fail(field, v, f"a number in {'(' if lo_open else '['}{lo}, {hi}]")


def _choice(config: Any, field: str, allowed: tuple[str, ...]) -> None:
    v = get(config, field)
    if v not in allowed:
        _fail(field, v, f"one of {allowed}")


def _bool(config: Any, field: str) -> None:
    v = get(config, field)
    if not isinstance(v, bool):
        _fail(field, v, "True or False")


def _str(config: Any, field: str) -> None:
    v = get(config, field)
    if not isinstance(v, str):
        _fail(field, v, "a string")


def _ratios(config: Any, field: str) -> None:
    v = get(config, field)
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        _fail(field, v, "a tuple of ratios in [0, 1]")
    for r in v:
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not (0.0 <= float(r) <= 1.0):
            _fail(field, v, "a tuple of ratios in [0, 1]")




def _names(config: Any, field: str, allowed: tuple[str, ...]) -> None:
    v = get(config, field)
    if isinstance(v, str) or not hasattr(v, "__iter__") or not len(v) or any(x not in allowed for x in v):
        _fail(field, v, f"a non-empty tuple of names from {allowed}")


def _positives(config: Any, field: str, hi: float) -> None:
    v = get(config, field)
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        _fail(field, v, f"a tuple of numbers in (0, {hi}]")
    for r in v:
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(float(r)) \
                or not 0.0 < float(r) <= hi:
            _fail(field, v, f"a tuple of numbers in (0, {hi}]")




def check_relative_path(field: str, value: Any) -> str:
    """Checks that `value` is a path that stays inside the workdir; returns it.

    Allowed: a non-empty relative path without ``..`` components, NUL bytes or a leading ``~``.
    (Symbolic links are checked where the path is joined: :func:`tna_jax.workdir.workdir_path`.)

    Args:
      field: the config field's dotted name (for the message), e.g. ``"soup.out_file"``.
      value: the path to check.

    Returns:
      `value`, unchanged.

    Raises:
      ConfigError: naming ``config.<field>``, the value and what is allowed.

    Examples:
      >>> check_relative_path("soup.out_file", "soups/greedy.json")
      'soups/greedy.json'
      >>> check_relative_path("soup.out_file", "../elsewhere.json")
      Traceback (most recent call last):
      ...
      tna_jax.config.schema.ConfigError: config.soup.out_file must be a relative path inside the workdir (no '..', not absolute); got '../elsewhere.json'.
    """
    allowed = "a relative path inside the workdir (no '..', not absolute)"
    if not isinstance(value, str) or not value:
        _fail(field, value, allowed)
    parts = value.replace("\\", "/").split("/")
    if "\0" in value or os.path.isabs(value) or value.startswith(("~", "\\")) or ".." in parts:
        _fail(field, value, allowed)
    return value



def validate(config: Any, *, schema: Any = None) -> Any:
    """Checks every field of `config`; returns it or raises :class:`ConfigError`.

    Fields set under an old name of :data:`RENAMED_FIELDS` are first moved to their new name
    (:func:`rename_fields`, with a `DeprecationWarning`).

    Unknown keys (not in :func:`default_config`) are errors, except in the sections that the
    module owning them checks: ``model`` (tna_jax.models) and the experiment-kind sections
    ``federated``, ``fusion``, ``align``, ``grid``, ``layerwise``, ``soup``, ``cold``.

    Args:
      config: the config to check (a ``ConfigDict`` from :func:`default_config`).
      schema: the known fields (default :func:`default_config`).

    Returns:
      `config` (unchanged but for renamed fields).

    Raises:
      ConfigError: an unknown field (with a "did you mean" hint), a value of the wrong type or
        range (naming the field, the value and what is allowed), or options that cannot be combined.

    Examples:
      >>> c = default_config()
      >>> c.num_seeds = 0
      >>> try:
      ...     validate(c)
      ... except ConfigError as err:
      ...     print(err)
      config.num_seeds must be an integer >= 1 and <= 4096; got 0.
    """
    rename_fields(config)
    known = flatten(schema if schema is not None else default_config())
    _reject_unknown(flatten(config), known, OPEN_SECTIONS)
    for name, value in flatten(config).items():
        if name.rpartition(".")[2].endswith(PATH_SUFFIXES) and value != "":
            check_relative_path(name, value)
    _check_run_and_data(config)
    _check_model_and_optimizer(config)
    _check_arms(config)
    _check_train(config)
    _check_analysis(config)
    if "federated" in config:
        validate_federated(config)
    if config.prune.ratio > 0 and config.anchor.refresh_every > 0:
        raise ConfigError("config.anchor.refresh_every > 0 cannot be combined with prune arms "
                          f"(config.prune.ratio={config.prune.ratio}): pruned weights must stay at zero.")
    if len(config.sweep.prune_ratios) and config.anchor.refresh_every > 0:
        raise ConfigError("config.anchor.refresh_every > 0 cannot be combined with config.sweep.prune_ratios.")
    return config


def _reject_unknown(names: Iterable[str], known: dict[str, Any], open_sections: tuple[str, ...] = ()) -> None:
    """Raises ConfigError at the first of `names` that is not `known` (outside `open_sections`),
    suggesting the closest known field."""
    for name in names:
        if name not in known and not name.startswith(open_sections):
            close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config.{name} is not a known field{hint}.")


def _check_run_and_data(config: Any) -> None:
    """The run's name, kind and seeds; ``config.data``."""
    _str(config, "name")
    if not config.name.strip():
        _fail("name", config.name, "a non-empty name (it heads the report)")
    _str(config, "kind")
    _int(config, "seed", 0, 2**31 - 1)
    _int(config, "num_seeds", 1, 4096)
    _str(config, "data.source")
    if not config.data.source:
        _fail("data.source", config.data.source, "a non-empty source name")
    _float(config, "data.val_fraction", 0.0, 0.95)
    _int(config, "data.num_train", 0, MAX_SIZE)
    _int(config, "data.split_seed", 0, 2**31 - 1)
    _bool(config, "data.normalize")
    _choice(config, "data.augment", ("none", "crop_flip"))
    _str(config, "data.data_dir")
    _str(config, "data.train_split")
    _str(config, "data.test_split")
    _float(config, "data.test_fraction", 0.0, 0.95, lo_open=True)
    _choice(config, "data.synthetic.kind", ("mixture", "teacher"))
    _int(config, "data.synthetic.num_classes", 2, 1 << 20)
    _float(config, "data.synthetic.class_sep", 0.0, 1e6)
    _int(config, "data.synthetic.teacher_width", 1, 1 << 20)
    _int(config, "data.synthetic.teacher_depth", 0, 1000)
    _float(config, "data.synthetic.label_noise", 0.0, 1.0)


def _check_model_and_optimizer(config: Any) -> None:
    """``config.model`` (the fields every model reads) and ``config.optimizer``."""
    _str(config, "model.name")
    if "init" in config.model:  # configs that replace the model section may leave it out ("flax")
        _choice(config, "model.init", INIT_SCHEMES)
    _choice(config, "optimizer.name", ("sgd", "momentum", "adam", "adamw", "lion"))
    _float(config, "optimizer.learning_rate", 0.0, 1e3, lo_open=True)
    _float(config, "optimizer.momentum", 0.0, 0.9999)
    _float(config, "optimizer.weight_decay", 0.0, 10.0)
    _choice(config, "optimizer.schedule", ("constant", "cosine", "warmup_cosine"))
    _float(config, "optimizer.warmup_epochs", 0.0, 1e4)
    _float(config, "optimizer.grad_clip_norm", 0.0, 1e6)


def _check_arms(config: Any) -> None:
    """What is trained: ``config.anchor``, ``prune``, ``baseline``, ``sweep`` and ``seeds``."""
    _float(config, "anchor.ratio", 0.0, 1.0)
    _choice(config, "anchor.granularity", ("weight", "neuron"))
    _str(config, "anchor.include")
    _str(config, "anchor.exclude")
    _bool(config, "anchor.share_mask")
    _bool(config, "anchor.share_values")
    _int(config, "anchor.refresh_every", 0, MAX_SIZE)
    _float(config, "prune.ratio", 0.0, 1.0)
    _bool(config, "baseline")
    _ratios(config, "sweep.anchor_ratios")
    _ratios(config, "sweep.prune_ratios")
    _choice(config, "seeds.vary", ("both", "init", "data"))


def _check_train(config: Any) -> None:
    """``config.train``."""
    _int(config, "train.epochs", 0, MAX_SIZE)
    _int(config, "train.batch_size", 1, MAX_SIZE)
    _int(config, "train.eval_batch_size", 1, MAX_SIZE)
    _int(config, "train.steps_per_call", 0, MAX_SIZE)
    _int(config, "train.unroll", 0, MAX_SIZE)
    _choice(config, "train.run_axis", ("auto", "vmap", "loop"))
    _int(config, "train.eval_every", 1, MAX_SIZE)
    _int(config, "train.checkpoint_every", 1, MAX_SIZE)
    _int(config, "train.keep_checkpoints", 1, 1000)
    _bool(config, "train.progress")
    _bool(config, "train.tensorboard")
    _float(config, "train.label_smoothing", 0.0, 0.99)


def _check_analysis(config: Any) -> None:
    """``config.analysis``."""
    _bool(config, "analysis.lmc")
    _int(config, "analysis.num_alphas", 2, 10001)
    _choice(config, "analysis.pairs", PAIR_MODES)
    _int(config, "analysis.max_pairs", 1, 100000)
    _int(config, "analysis.pairs_seed", 0, 2**31 - 1)
    _choice(config, "analysis.split", ("val", "test", "train"))
    _bool(config, "analysis.plots")
    _ratios(config, "analysis.plot_ratios")
    _bool(config, "analysis.bn_reset")
    _int(config, "analysis.bn_reset_examples", 0, MAX_SIZE)
    _int(config, "analysis.chunk", 0, MAX_SIZE)


def validate_federated(config: Any) -> Any:
    """Checks the ``config.federated`` section (unknown keys and values name the field).

    :func:`validate` calls it when the config has a ``federated`` section.

    Args:
      config: a config with a ``federated`` section.

    Returns:
      `config`, unchanged.

    Raises:
      ConfigError: an unknown field, α <= 0, a fraction outside (0, 1], a mask ratio outside
        [0, 1], an unknown algorithm, server optimizer, partition or BN mode, ...

    Examples:
      >>> c = default_config()
      >>> c.federated = federated_config()
      >>> c.federated.alpha = 0.0
      >>> validate_federated(c)
      Traceback (most recent call last):
      ...
      tna_jax.config.schema.ConfigError: config.federated.alpha must be a number in (0.0, 1000000.0]; got 0.0.
    """
    _reject_unknown(flatten(config.federated, "federated."), flatten(federated_config(), "federated."))
    _names(config, "federated.algorithms", ("fedavg", "fedprox", "fedpfn", "fedpnu"))
    _names(config, "federated.server_optimizers", ("none", "fedavgm", "fedadam", "fedyogi"))
    _int(config, "federated.num_clients", 1, MAX_SIZE)
    _choice(config, "federated.partition", ("iid", "dirichlet", "shards"))
    _float(config, "federated.alpha", 0.0, 1e6, lo_open=True)
    _int(config, "federated.shards_per_client", 1, MAX_SIZE)
    _int(config, "federated.min_client_size", 1, MAX_SIZE)
    _int(config, "federated.partition_seed", 0, 2**31 - 1)
    _bool(config, "federated.partition_per_seed")
    _float(config, "federated.client_fraction", 0.0, 1.0, lo_open=True)
    _int(config, "federated.rounds", 0, MAX_SIZE)
    _int(config, "federated.local_epochs", 1, 10000)
    _int(config, "federated.local_steps", 0, MAX_SIZE)
    _int(config, "federated.batch_size", 1, MAX_SIZE)
    _int(config, "federated.size_buckets", 1, 64)
    _float(config, "federated.prox_mu", 0.0, 1e4)
    _float(config, "federated.ratio", 0.0, 1.0)
    _float(config, "federated.server_learning_rate", 0.0, 1e3)
    _float(config, "federated.server_momentum", 0.0, 0.9999)
    _float(config, "federated.server_b1", 0.0, 0.9999)
    _float(config, "federated.server_b2", 0.0, 0.999999)
    _float(config, "federated.server_eps", 0.0, 10.0, lo_open=True)
    _choice(config, "federated.bn", ("average", "local"))
    _int(config, "federated.eval_every", 1, MAX_SIZE)
    _choice(config, "federated.eval_split", ("test", "val"))
    _int(config, "federated.checkpoint_every", 1, MAX_SIZE)
    _positives(config, "federated.sweep_alphas", 1e6)
    _ratios(config, "federated.sweep_ratios")
    if "fedprox" in config.federated.algorithms and not config.federated.prox_mu > 0:
        _fail("federated.prox_mu", config.federated.prox_mu, "a number > 0 when 'fedprox' is among the algorithms")
    if len(config.federated.sweep_alphas) and config.federated.partition != "dirichlet":
        _fail("federated.sweep_alphas", config.federated.sweep_alphas,
              f"empty unless federated.partition='dirichlet' (it is {config.federated.partition!r})")
    return config
