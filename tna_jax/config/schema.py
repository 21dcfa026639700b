"""The config schema: every field with its default, the fields with a history, dotted access.

``default_config()`` is the schema: every config in ``configs/`` starts from it and overrides
fields. ``federated_config()`` is the ``federated`` section's. The tables say which fields may
change on resume, which were renamed and which were added after workdirs were written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

__all__ = ["ConfigError", "default_config", "federated_config", "get", "flatten", "RENAMED_FIELDS",
           "RESUME_SAFE_FIELDS", "ADDED_FIELDS", "EPOCH_DEPENDENT_SCHEDULES", "PATH_SUFFIXES", "PAIR_MODES",
           "INIT_SCHEMES", "MAX_SIZE"]


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
    c.data = _data_defaults()
    c.model = _model_defaults()
    c.optimizer = _optimizer_defaults()
    c.anchor = _anchor_defaults()

    c.prune = ml_collections.ConfigDict()
    c.prune.ratio = 0.0  # >0: prune-at-init arm instead of anchors

    c.baseline = True  # also train a plain (ratio 0) arm with the same seeds
    c.sweep = ml_collections.ConfigDict()
    c.sweep.anchor_ratios = ()  # when either list is non-empty, the arms are exactly these
    c.sweep.prune_ratios = ()

    c.seeds = ml_collections.ConfigDict()
    c.seeds.vary = "both"  # what differs across seeds: both | init | data
    c.train = _train_defaults()
    c.analysis = _analysis_defaults()
    return c


def _data_defaults() -> ml_collections.ConfigDict:
    """``config.data``: the dataset, its split and the synthetic generator's settings."""
    d = ml_collections.ConfigDict()
    d.source = "mnist1d"  # mnist1d | digits | synthetic | tfds:<name>
    d.val_fraction = 0.1
    d.num_train = 0  # 0 = all training examples
    d.split_seed = 0
    d.normalize = True
    d.augment = "none"  # none | crop_flip (images only)
    d.data_dir = ""  # tfds data directory ("" = tfds's default, $TFDS_DATA_DIR or ~/tensorflow_datasets)
    d.train_split = "train"  # tfds split names (slicing such as "train[:10%]" allowed)
    d.test_split = "test"
    d.num_samples = 5000  # mnist1d / synthetic size
    d.generation_seed = 42  # mnist1d / synthetic generator seed
    d.test_fraction = 0.2  # digits / synthetic: share held out for testing
    d.synthetic = ml_collections.ConfigDict()  # tna_jax.data.synthetic
    d.synthetic.kind = "mixture"  # mixture | teacher
    d.synthetic.shape = (32,)  # one example: (d,) features or (H, W, C) images
    d.synthetic.num_classes = 10
    d.synthetic.class_sep = 3.0  # mixture: norm of the class means (noise std 1)
    d.synthetic.teacher_width = 64
    d.synthetic.teacher_depth = 1
    d.synthetic.label_noise = 0.0
    return d


def _model_defaults() -> ml_collections.ConfigDict:
    """``config.model``: the architecture (tna_jax.models checks its own fields)."""
    m = ml_collections.ConfigDict()
    m.name = "mlp"
    m.depth = 2
    m.width = 128
    m.activation = "relu"
    m.norm = "none"
    m.dtype = "float32"
    # Weight init: "flax" (the zoo's own: lecun_normal kernels, zero biases) or "torch" (PyTorch's
    # nn.Linear/nn.Conv2d defaults, U(±1/sqrt(fan_in)) kernels and biases), to compare with PyTorch papers.
    m.init = "flax"
    return m


def _optimizer_defaults() -> ml_collections.ConfigDict:
    """``config.optimizer``: the optax chain of every run (tna_jax.optimizers)."""
    o = ml_collections.ConfigDict()
    o.name = "sgd"  # sgd | momentum | adam | adamw | lion
    o.learning_rate = 0.05
    o.momentum = 0.9  # for momentum (and sgd when > 0 is wanted, use 'momentum')
    o.weight_decay = 0.0
    o.schedule = "constant"  # constant | cosine | warmup_cosine
    o.warmup_epochs = 0.0
    o.grad_clip_norm = 0.0  # 0 = no clipping
    return o


def _anchor_defaults() -> ml_collections.ConfigDict:
    """``config.anchor``: the TNA-PFN arm's mask and values."""
    a = ml_collections.ConfigDict()
    a.ratio = 0.4  # TNA-PFN mask ratio of the main arm (0 = plain training)
    a.granularity = "weight"  # weight | neuron
    a.include = ""  # comma-separated regexes or first/middle/last ("" = all)
    a.exclude = ""
    a.share_mask = True  # one mask for every seed (the paper) or one per seed
    a.share_values = True  # anchored entries take the same values in every seed
    a.refresh_every = 0  # >0: a fresh mask every this many steps (FedPNU-style)
    return a


def _train_defaults() -> ml_collections.ConfigDict:
    """``config.train``: epochs, batches, how the steps are compiled, evaluation and checkpoints."""
    t = ml_collections.ConfigDict()
    t.epochs = 20
    t.batch_size = 128
    t.eval_batch_size = 1000
    t.steps_per_call = 0  # steps per jitted call (0 = a whole epoch, or auto; see unroll); SIGTERM granularity
    # Steps unrolled in the compiled step loop: 0 = auto (convolutional nets on CPU: each call's steps
    # fully unrolled, at most AUTO_UNROLL_STEPS per call, because XLA:CPU runs convolutions inside a
    # loop ~30x slower; everything else: a rolled lax.scan), 1 = rolled, k = unroll factor k.
    t.unroll = 0
    # How the runs are mapped in the step: auto = a loop over runs in the program for convolutional
    # nets on CPU (XLA:CPU's batched convolutions run ~6x slower than the same convolutions one
    # after another), vmap everywhere else; vmap | loop force one.
    t.run_axis = "auto"
    t.eval_every = 1  # epochs between validation evaluations
    t.checkpoint_every = 5  # epochs between checkpoints (and at the end)
    t.keep_checkpoints = 2
    t.progress = True  # tqdm progress bar
    t.tensorboard = True  # TensorBoard event files in <workdir>/tensorboard
    t.label_smoothing = 0.0
    return t


def _analysis_defaults() -> ml_collections.ConfigDict:
    """``config.analysis``: what the train kind measures after training (LMC pairs, plots)."""
    a = ml_collections.ConfigDict()
    a.lmc = True  # pairwise LMC barriers between the seeds of each arm
    a.num_alphas = 25
    # Which seed pairs LMC is measured on (docs/concepts/lmc.md): "all" = every pair i < j in order
    # (at most max_pairs: the first ones), "disjoint" = (0, 1), (2, 3), ... (independent pairs),
    # "random" = max_pairs pairs drawn without replacement from all of them with pairs_seed.
    a.pairs = "all"
    a.max_pairs = 10  # at most this many pairs per arm, in every mode
    a.pairs_seed = 0
    a.split = "test"
    a.plots = True
    a.plot_ratios = ()  # ratios whose paths go into lmc_paths.png (empty = every arm)
    a.bn_reset = True  # nets with BatchNorm: also report LMC with statistics reset at every α
    a.bn_reset_examples = 2000  # training examples the reset uses (0 = the whole split)
    a.chunk = 0  # >0: evaluate at most this many (pair, α) points at once; 0 = auto (chunking.auto_chunk)
    return a


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


MAX_SIZE = 1 << 24  # no sane experiment here asks for more seeds, epochs or examples
PAIR_MODES = ("all", "disjoint", "random")  # analysis.pairs (tna_jax.lmc.select_pairs)
INIT_SCHEMES = ("flax", "torch")  # model.init (tna_jax.models)

# Fields named ``*_path``, ``*_file`` or ``*_subdir`` (in any section, the open ones included) are
# places a run writes to: they must stay inside its workdir (see check_relative_path). Input
# locations (``data.data_dir``) are not affected.
PATH_SUFFIXES = ("_path", "_file", "_subdir")



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
