"""The experiment configuration: every field with its default, and checks that name the field.

``default_config()`` is the schema: every config in ``configs/`` starts from it and overrides
fields, and ``validate(config)`` rejects keys it does not know (a typo is an error, not a silent
no-op) and values of the wrong type or range, naming the field, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import warnings
from collections.abc import Mapping
from typing import Any

import ml_collections

__all__ = ["default_config", "federated_config", "validate", "validate_federated", "ConfigError", "get", "flatten", "check_override",
           "rename_fields", "RENAMED_FIELDS", "RESUME_SAFE_FIELDS", "ADDED_FIELDS", "EPOCH_DEPENDENT_SCHEDULES", "check_relative_path", "PATH_SUFFIXES",
           "PAIR_MODES", "INIT_SCHEMES"]


class ConfigError(ValueError):
    """A config field has a bad value or is unknown."""


def default_config() -> ml_collections.ConfigDict:
    """Every field tna_jax reads, with its default. Configs in ``configs/`` override these.

    Returns:
      A fresh ``ml_collections.ConfigDict`` (sections ``data``, ``model``, ``optimizer``,
      ``anchor``, ``prune``, ``sweep``, ``seeds``, ``train``, ``analysis``).

    Examples:
      >>> c = default_config()
      >>> c.anchor.ratio, c.data.source, c.train.epochs
      (0.4, 'mnist1d', 20)
    """
    c = ml_collections.ConfigDict()
    c.name = "experiment"
    c.kind = "train"  # which experiment runs (tna_jax.experiments.KINDS)
    c.seed = 0  # root of every random stream (init, data order, masks, dropout)
    c.num_seeds = 4  # models trained at once for each arm (a batch axis)

    c.data = ml_collections.ConfigDict()
    c.data.source = "mnist1d"  # mnist1d | digits | synthetic | tfds:<name>
    c.data.val_fraction = 0.1
    c.data.num_train = 0  # 0 = all training examples
    c.data.split_seed = 0
    c.data.normalize = True
    c.data.augment = "none"  # none | crop_flip (images only)
    c.data.data_dir = ""  # tfds data directory ("" = tfds's default, $TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.data.train_split = "train"  # tfds split names (slicing such as "train[:10%]" allowed)
    c.data.test_split = "test"
    c.data.num_samples = 5000  # mnist1d / synthetic size
    c.data.generation_seed = 42  # mnist1d / synthetic generator seed
    c.data.test_fraction = 0.2  # digits / synthetic: share held out for testing
    c.data.synthetic = ml_collections.ConfigDict()  # tna_jax.data.synthetic
    c.data.synthetic.kind = "mixture"  # mixture | teacher
    c.data.synthetic.shape = (32,)  # one example: (d,) features or (H, W, C) images
    c.data.synthetic.num_classes = 10
    c.data.synthetic.class_sep = 3.0  # mixture: norm of the class means (noise std 1)
    c.data.synthetic.teacher_width = 64
    c.data.synthetic.teacher_depth = 1
    c.data.synthetic.label_noise = 0.0

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"
    c.model.depth = 2
    c.model.width = 128
    c.model.activation = "relu"
    c.model.norm = "none"
    c.model.dtype = "float32"
    # Weight init: "flax" (the zoo's own: lecun_normal kernels, zero biases) or "torch" (PyTorch's
    # nn.Linear/nn.Conv2d defaults, U(±1/sqrt(fan_in)) kernels and biases), to compare with PyTorch papers.
    c.model.init = "flax"

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # sgd | momentum | adam | adamw | lion
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9  # for momentum (and sgd when > 0 is wanted, use 'momentum')
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "constant"  # constant | cosine | warmup_cosine
    c.optimizer.warmup_epochs = 0.0
    c.optimizer.grad_clip_norm = 0.0  # 0 = no clipping

    c.anchor = ml_collections.ConfigDict()
    c.anchor.ratio = 0.4  # TNA-PFN mask ratio of the main arm (0 = plain training)
    c.anchor.granularity = "weight"  # weight | neuron
    c.anchor.include = ""  # comma-separated regexes or first/middle/last ("" = all)
    c.anchor.exclude = ""
    c.anchor.share_mask = True  # one mask for every seed (the paper) or one per seed
    c.anchor.share_values = True  # anchored entries take the same values in every seed
    c.anchor.refresh_every = 0  # >0: a fresh mask every this many steps (FedPNU-style)

    c.prune = ml_collections.ConfigDict()
    c.prune.ratio = 0.0  # >0: prune-at-init arm instead of anchors

    c.baseline = True  # also train a plain (ratio 0) arm with the same seeds
    c.sweep = ml_collections.ConfigDict()
    c.sweep.anchor_ratios = ()  # when either list is non-empty, the arms are exactly these
    c.sweep.prune_ratios = ()

    c.seeds = ml_collections.ConfigDict()
    c.seeds.vary = "both"  # what differs across seeds: both | init | data

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 20
    c.train.batch_size = 128
    c.train.eval_batch_size = 1000
    c.train.steps_per_call = 0  # steps per jitted call (0 = a whole epoch, or auto; see unroll); SIGTERM granularity
    # Steps unrolled in the compiled step loop: 0 = auto (convolutional nets on CPU: each call's steps
    # fully unrolled, at most AUTO_UNROLL_STEPS per call, because XLA:CPU runs convolutions inside a
    # loop ~30x slower; everything else: a rolled lax.scan), 1 = rolled, k = unroll factor k.
    c.train.unroll = 0
    # How the runs are mapped in the step: auto = a loop over runs in the program for convolutional
    # nets on CPU (XLA:CPU's batched convolutions run ~6x slower than the same convolutions one
    # after another), vmap everywhere else; vmap | loop force one.
    c.train.run_axis = "auto"
    c.train.eval_every = 1  # epochs between validation evaluations
    c.train.checkpoint_every = 5  # epochs between checkpoints (and at the end)
    c.train.keep_checkpoints = 2
    c.train.progress = True  # tqdm progress bar
    c.train.tensorboard = True  # TensorBoard event files in <workdir>/tensorboard
    c.train.label_smoothing = 0.0

    c.analysis = ml_collections.ConfigDict()
    c.analysis.lmc = True  # pairwise LMC barriers between the seeds of each arm
    c.analysis.num_alphas = 25
    # Which seed pairs LMC is measured on (docs/concepts/lmc.md): "all" = every pair i < j in order
    # (at most max_pairs: the first ones), "disjoint" = (0, 1), (2, 3), ... (independent pairs),
    # "random" = max_pairs pairs drawn without replacement from all of them with pairs_seed.
    c.analysis.pairs = "all"
    c.analysis.max_pairs = 10  # at most this many pairs per arm, in every mode
    c.analysis.pairs_seed = 0
    c.analysis.split = "test"
    c.analysis.plots = True
    c.analysis.plot_ratios = ()  # ratios whose paths go into lmc_paths.png (empty = every arm)
    c.analysis.bn_reset = True  # nets with BatchNorm: also report LMC with statistics reset at every α
    c.analysis.bn_reset_examples = 2000  # training examples the reset uses (0 = the whole split)
    c.analysis.chunk = 0  # >0: evaluate at most this many (pair, α) points at once; 0 = auto (chunking.auto_chunk)
    return c


def federated_config() -> ml_collections.ConfigDict:
    """The ``config.federated`` section of ``kind="federated"`` with its defaults (see
    ``tna_jax/experiments/federated.py``). The clients' optimizer is ``config.optimizer``; the
    anchor options (granularity, include, exclude, share_mask) come from ``config.anchor``.

    Returns:
      A new ``ConfigDict``; assign it to ``config.federated`` and override fields as needed
      (:func:`validate_federated` checks them).

    Examples:
      >>> f = federated_config()
      >>> f.algorithms, f.server_optimizers, f.num_clients, f.partition, f.alpha, f.ratio
      (('fedavg', 'fedprox', 'fedpfn', 'fedpnu'), ('none', 'fedavgm'), 20, 'dirichlet', 0.5, 0.4)
    """
    f = ml_collections.ConfigDict()
    f.algorithms = ("fedavg", "fedprox", "fedpfn", "fedpnu")  # each trained with every server optimizer
    f.server_optimizers = ("none", "fedavgm")  # none | fedavgm | fedadam | fedyogi
    f.num_clients = 20
    f.partition = "dirichlet"  # iid | dirichlet | shards
    f.alpha = 0.5  # Dirichlet concentration (> 0)
    f.shards_per_client = 2  # for partition='shards'
    f.min_client_size = 2  # Dirichlet draws are repeated until every client has this many examples
    f.partition_seed = 0
    f.partition_per_seed = False  # True: seed s trains on its own split (partition_seed, s); False: one split for all seeds
    f.client_fraction = 1.0  # fraction of clients sampled each round, in (0, 1]
    f.rounds = 100
    f.local_epochs = 1
    f.local_steps = 0  # > 0: exactly this many local steps per round instead of epochs
    f.batch_size = 32  # client batch size
    f.size_buckets = 3  # full participation: train clients in up to this many size buckets (1 = one padded cohort)
    f.prox_mu = 0.01  # FedProx
    f.ratio = 0.4  # FedPFN / FedPNU mask ratio ρ in [0, 1] (formerly mask_ratio)
    f.server_learning_rate = 0.0  # 0 = the server optimizer's default (1.0 FedAvgM, 0.01 FedAdam/FedYogi)
    f.server_momentum = 0.9  # FedAvgM
    f.server_b1 = 0.9
    f.server_b2 = 0.99
    f.server_eps = 1e-3  # τ of FedAdam / FedYogi
    f.bn = "average"  # BatchNorm statistics: average | local (FedBN)
    f.eval_every = 1  # rounds between evaluations of the global models
    f.eval_split = "test"  # test | val
    f.checkpoint_every = 10  # rounds between checkpoints (and at the end)
    f.sweep_alphas = ()  # non-empty: every arm once per α (Dirichlet)
    f.sweep_ratios = ()  # non-empty: FedPFN/FedPNU arms once per ρ
    return f


# Fields that may change between a run and its resumption (they do not change the result of
# the epochs already done).
RESUME_SAFE_FIELDS = (
    "train.epochs", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.progress", "train.tensorboard", "train.steps_per_call", "train.unroll", "train.run_axis", "analysis.", "name", "data.data_dir",
    "federated.rounds", "federated.eval_every", "federated.checkpoint_every", "federated.size_buckets",
)

# Fields renamed: a config (or an older workdir's config.json) that sets the old name means the
# new one. `validate` moves the value with a DeprecationWarning; `prepare_workdir` reads old
# config.json files through it. One name per concept: ρ is "ratio" everywhere.
RENAMED_FIELDS = {"federated.mask_ratio": "federated.ratio"}

# Fields added after workdirs were written: a config.json without one had this value, so resuming
# such a workdir with the default is the same run (tna_jax.workdir.prepare_workdir).
ADDED_FIELDS = {"model.init": "flax", "federated.partition_per_seed": False, "analysis.pairs": "all",
                "analysis.pairs_seed": 0}

# Schedules whose learning rate at a step depends on the total number of steps (train.epochs):
# resuming with other epochs would train the steps already done under another schedule.
EPOCH_DEPENDENT_SCHEDULES = ("cosine", "warmup_cosine")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train.epochs": 20, ...}`` from a nested config.

    Args:
      config: a ``ConfigDict`` or nested mappings.
      prefix: prepended to every name.

    Returns:
      A flat dict from dotted names to values.

    Examples:
      >>> flatten({"a": 1, "b": {"c": 2}})
      {'a': 1, 'b.c': 2}
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def get(config: Any, dotted: str) -> Any:
    """The value of a dotted field: ``get(config, "train.epochs")``.

    Args:
      config: a ``ConfigDict`` or nested mappings.
      dotted: the field's dotted name.

    Returns:
      The value.

    Raises:
      KeyError: the field does not exist.

    Examples:
      >>> get({"train": {"epochs": 3}}, "train.epochs")
      3
    """
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


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


MAX_SIZE = 1 << 24  # no sane experiment here asks for more seeds, epochs or examples
PAIR_MODES = ("all", "disjoint", "random")  # analysis.pairs (tna_jax.lmc.select_pairs)
INIT_SCHEMES = ("flax", "torch")  # model.init (tna_jax.models)

# Fields named ``*_path``, ``*_file`` or ``*_subdir`` (in any section, the open ones included) are
# places a run writes to: they must stay inside its workdir (see check_relative_path). Input
# locations (``data.data_dir``) are not affected.
PATH_SUFFIXES = ("_path", "_file", "_subdir")


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
      tna_jax.config.ConfigError: config.soup.out_file must be a relative path inside the workdir (no '..', not absolute); got '../elsewhere.json'.
    """
    allowed = "a relative path inside the workdir (no '..', not absolute)"
    if not isinstance(value, str) or not value:
        _fail(field, value, allowed)
    parts = value.replace("\\", "/").split("/")
    if "\0" in value or os.path.isabs(value) or value.startswith(("~", "\\")) or ".." in parts:
        _fail(field, value, allowed)
    return value


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
      tna_jax.config.ConfigError: config.train.epoch is not a field of this config (did you mean 'train.epochs'?).
    """
    if name in RENAMED_FIELDS:
        import warnings

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
    schema = schema if schema is not None else default_config()
    known = flatten(schema)
    open_sections = ("model.", "federated.", "fusion.", "align.", "grid.", "layerwise.", "soup.", "cold.")
    for name in flatten(config):
        if name not in known and not name.startswith(open_sections):
            close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config.{name} is not a known field{hint}.")
    for name, value in flatten(config).items():
        if name.rpartition(".")[2].endswith(PATH_SUFFIXES) and value != "":
            check_relative_path(name, value)
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
    if "federated" in config:
        validate_federated(config)
    if config.prune.ratio > 0 and config.anchor.refresh_every > 0:
        raise ConfigError("config.anchor.refresh_every > 0 cannot be combined with prune arms "
                          f"(config.prune.ratio={config.prune.ratio}): pruned weights must stay at zero.")
    if len(config.sweep.prune_ratios) and config.anchor.refresh_every > 0:
        raise ConfigError("config.anchor.refresh_every > 0 cannot be combined with config.sweep.prune_ratios.")
    return config


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
      tna_jax.config.ConfigError: config.federated.alpha must be a number in (0.0, 1000000.0]; got 0.0.
    """
    known = flatten(federated_config(), "federated.")
    for name in flatten(config.federated, "federated."):
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config.{name} is not a known field{hint}.")
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
