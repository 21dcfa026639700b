"""Fields named from outside the config file: command-line overrides checked against the
config's own fields, and fields set under an old name moved to the new one."""

from __future__ import annotations

import difflib
import warnings
from typing import Any

from tna_jax.config.schema import RENAMED_FIELDS, ConfigError, default_config, federated_config, flatten, get

__all__ = ["check_override", "rename_fields"]


def check_override(config: Any, name: str) -> str:
    """The field a command-line override ``--config.<name>=...`` sets, checked against `config`.

    Args:
      config: the config the overrides apply to (as its file's ``get_config`` returns it).
      name: the dotted field name after ``config.``.

    Returns:
      The field to set: `name`, or its new name when `name` is an old one of
      :data:`RENAMED_FIELDS` (with a `DeprecationWarning`).

    Raises:
      ConfigError: the config has no such field (the message suggests the closest one).

    Examples:
      >>> c = default_config()
      >>> check_override(c, "train.epochs")
      'train.epochs'
      >>> check_override(c, "train.epoch")
      Traceback (most recent call last):
      ...
      tna_jax.config.schema.ConfigError: config.train.epoch is not a field of this config (did you mean 'train.epochs'?).
    """
    if name in RENAMED_FIELDS:
        warnings.warn(f"--config.{name} is now --config.{RENAMED_FIELDS[name]}; the old name goes in the next "
                      "release.", DeprecationWarning, stacklevel=2)
        name = RENAMED_FIELDS[name]
    try:
        get(config, name)
    except (KeyError, TypeError, AttributeError):
        close = difflib.get_close_matches(name, list(flatten(config)), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config.{name} is not a field of this config{hint}.") from None
    return name


def rename_fields(config: Any) -> Any:
    """Moves every field set under an old name of :data:`RENAMED_FIELDS` to its new name, with a
    `DeprecationWarning` (in place).

    Args:
      config: a ``ConfigDict`` or nested dicts.

    Returns:
      `config`, with the old names gone.

    Raises:
      ConfigError: the old and the new name both set, to different values.

    Examples:
      >>> import warnings
      >>> c = default_config()
      >>> c.federated = federated_config()
      >>> del c.federated["ratio"]
      >>> c.federated.mask_ratio = 0.3
      >>> with warnings.catch_warnings():
      ...     warnings.simplefilter("ignore")
      ...     c = rename_fields(c)
      >>> c.federated.ratio, "mask_ratio" in c.federated
      (0.3, False)
    """
    for old, new in RENAMED_FIELDS.items():
        section, old_key = old.rsplit(".", 1)
        new_key = new.rsplit(".", 1)[1]
        node = config.get(section) if hasattr(config, "get") else None
        if node is None or old_key not in node:
            continue
        value = node[old_key]
        if new_key in node and node[new_key] != value and node[new_key] != get(_section_defaults(section), new_key):
            raise ConfigError(f"config.{old} (the old name of config.{new}) is {value!r} but config.{new} is "
                              f"{node[new_key]!r}; set only config.{new}.")
        warnings.warn(f"config.{old} is deprecated; use config.{new}. The old name goes in the next release.",
                      DeprecationWarning, stacklevel=2)
        if hasattr(node, "unlock"):
            with node.unlocked():
                node[new_key] = value
                del node[old_key]
        else:
            node[new_key] = value
            del node[old_key]
    return config


def _section_defaults(section: str) -> Any:
    # "federated" has its own defaults (federated_config), the other sections default_config's.
    return federated_config() if section == "federated" else get(default_config(), section)
