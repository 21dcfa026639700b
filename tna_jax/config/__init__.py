"""The experiment configuration: every field with its default, and checks that name the field.

``default_config()`` is the schema: every config in ``configs/`` starts from it and overrides
fields, and ``validate(config)`` rejects keys it does not know (a typo is an error, not a silent
no-op) and values of the wrong type or range, naming the field, the value and what is allowed.

* `tna_jax.config.schema`: the fields and their defaults (`default_config`, `federated_config`),
  the fields with a history (renamed, added, safe to change on resume), dotted access;
* `tna_jax.config.overrides`: command-line overrides (`check_override`) and renamed fields
  (`rename_fields`);
* `tna_jax.config.checks`: `validate`, `validate_federated`, `check_relative_path`.
"""

from tna_jax.config.checks import check_relative_path, validate, validate_federated
from tna_jax.config.overrides import check_override, rename_fields
from tna_jax.config.schema import (
    ADDED_FIELDS,
    EPOCH_DEPENDENT_SCHEDULES,
    INIT_SCHEMES,
    MAX_SIZE,
    PAIR_MODES,
    PATH_SUFFIXES,
    RENAMED_FIELDS,
    RESUME_SAFE_FIELDS,
    ConfigError,
    default_config,
    federated_config,
    flatten,
    get,
)

__all__ = ["default_config", "federated_config", "validate", "validate_federated", "ConfigError", "get", "flatten",
           "check_override", "rename_fields", "RENAMED_FIELDS", "RESUME_SAFE_FIELDS", "ADDED_FIELDS",
           "EPOCH_DEPENDENT_SCHEDULES", "check_relative_path", "PATH_SUFFIXES", "PAIR_MODES", "INIT_SCHEMES",
           "MAX_SIZE"]
