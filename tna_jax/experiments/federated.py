"""``kind="federated"``: FedAvg, FedProx, FedPFN and FedPNU, each with every server optimizer, on
clients drawn from one training set, several seeds per arm in one program.

An *arm* is (algorithm, server optimizer, α, ρ). Every arm trains ``num_seeds`` global models at
once (seeds vmapped, clients vmapped and sharded over the devices, see
:mod:`tna_jax.federated.driver`); arms advance in lockstep, one round each, so one progress bar,
one ``metrics.jsonl`` (a line per evaluated round, arm and seed) and one checkpoint (every arm's
server states, every ``federated.checkpoint_every`` rounds and at the end) cover the whole
experiment. Rerunning the same command resumes from the last good checkpoint and ends
bit-identical to an uninterrupted run: round r of seed s depends only on (seed, r, client ids).

Arms with the same seed share the initial global model, the client sampling and the clients'
batch orders (paired comparisons). The clients' split of the training set is drawn from
``federated.partition_seed``: once for every seed (``federated.partition_per_seed=False``, the
default: the seeds' spread is that of init, sampling and batch order on ONE split), or once per
seed (``True``: seed s draws with NumPy seed ``SeedSequence([partition_seed, s])``, so the error
bars also cover the split, as in papers that redraw it per run; the clients then carry a leading
seed axis, S times the memory of the packed client data, and train in one padded cohort
without size buckets, since each seed's clients have other sizes). The report says which
(``federation.partition_draw``: ``"shared"`` or ``"per_seed"``).

Config: ``config.federated`` (:func:`tna_jax.config.federated_config`; every field documented
there); the clients' optimizer is ``config.optimizer`` (schedule must be ``constant``: the state
is reset every round), anchors' granularity/include/exclude/share_mask come from
``config.anchor``, the model from ``config.model``, data from ``config.data`` (``augment`` must be
``none``), ``train.eval_batch_size``, ``train.progress``, ``train.tensorboard``,
``train.keep_checkpoints`` and ``train.unroll`` are read too.

Writes ``report.json``, ``report.md`` (final accuracy, mean ± sample std over seeds, and the paired
difference to FedAvg with the same server optimizer and α), ``accuracy_vs_round.png`` (one panel
per α) and, for sweeps, ``sweep_ratio.png``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from tna_jax import anchors, evaluation, harness, logs, optimizers, runner
from tna_jax import checkpoint as ckpt_lib
from tna_jax import config as config_lib
from tna_jax import report as report_lib
from tna_jax import run_axis as run_axis_lib
from tna_jax import sharding as sharding_lib
from tna_jax.experiments import federated_report, registry
from tna_jax.experiments import train as train_kind
from tna_jax.experiments.federated_report import NAMES

__all__ = ["FedArm", "arms_from_config", "require_data", "federated_experiment", "make_clients", "partition_seed_of"]


@dataclasses.dataclass(frozen=True)
class FedArm:
    """One recipe: ``algorithm`` with ``server`` optimizer on Dirichlet(α) clients, mask ratio ρ.

    Attributes:
      algorithm: ``"fedavg"``, ``"fedprox"``, ``"fedpfn"`` or ``"fedpnu"``.
      server: the server optimizer: ``"none"``, ``"fedavgm"``, ``"fedadam"`` or ``"fedyogi"``.
      alpha: the Dirichlet α of the clients (None for other partitions).
      ratio: the mask ratio ρ (FedPFN/FedPNU; None for the others).
      show_alpha: put α in the label (sweeps over α).

    Examples:
      >>> arm = FedArm("fedpfn", "fedavgm", alpha=0.5, ratio=0.4, show_alpha=True)
      >>> arm.label, arm.slug, arm.masked
      ('α=0.5 FedPFN ρ=0.4 + FedAvgM', 'alpha_0_5_FedPFN_rho_0_4_FedAvgM', True)
    """

    algorithm: str
    server: str
    alpha: float | None
    ratio: float | None
    show_alpha: bool = False

    @property
    def masked(self) -> bool:
        return self.algorithm in ("fedpfn", "fedpnu")

    @property
    def label(self) -> str:
        name = NAMES[self.algorithm]
        if self.masked:
            name += f" ρ={self.ratio:g}"
        if self.server != "none":
            name += f" + {NAMES[self.server]}"
        if self.show_alpha and self.alpha is not None:
            name = f"α={self.alpha:g} {name}"
        return name

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "_", self.label.replace("ρ", "rho").replace("α", "alpha")).strip("_")


def arms_from_config(config: Any) -> list[FedArm]:
    """Every algorithm x server optimizer, once per α of ``sweep_alphas`` (or the one ``alpha``)
    and, for FedPFN/FedPNU, once per ρ of ``sweep_ratios`` (or the one ``ratio``).

    Args:
      config: a config with a ``federated`` section (:func:`tna_jax.config.federated_config`).

    Returns:
      The arms in order (α, algorithm, ρ, server optimizer), without duplicates.

    Examples:
      >>> from tna_jax.config import default_config, federated_config
      >>> c = default_config(); c.federated = federated_config()
      >>> c.federated.algorithms = ("fedavg", "fedpfn"); c.federated.server_optimizers = ("none", "fedavgm")
      >>> [a.label for a in arms_from_config(c)]
      ['FedAvg', 'FedAvg + FedAvgM', 'FedPFN ρ=0.4', 'FedPFN ρ=0.4 + FedAvgM']
    """
    f = config.federated
    dirichlet = f.partition == "dirichlet"
    alphas = [float(a) for a in f.sweep_alphas] or [float(f.alpha) if dirichlet else None]
    ratios = [float(r) for r in f.sweep_ratios] or [float(f.ratio)]
    arms = []
    for alpha in alphas:
        for algorithm in f.algorithms:
            for ratio in (ratios if algorithm in ("fedpfn", "fedpnu") else [None]):
                for server in f.server_optimizers:
                    arms.append(FedArm(algorithm, server, alpha, ratio, show_alpha=len(alphas) > 1))
    seen, unique = set(), []
    for a in arms:
        if a.slug not in seen:
            seen.add(a.slug)
            unique.append(a)
    return unique


def require_data(config: Any) -> None:
    """Fails fast, before any training, when a ``tfds:<name>`` source cannot be read here.

    Other sources pass (they are generated or shipped offline).

    Args:
      config: the experiment config (``data.source``, ``data.data_dir``).

    Raises:
      FileNotFoundError: the prepared data are not under ``data.data_dir`` (the message says how
        to prepare them: nothing is downloaded at run time).
      config.ConfigError: tensorflow-datasets or the tfds loader is not installed.

    Examples:
      >>> import tempfile
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> require_data(c)  # mnist1d: generated offline
      >>> c.data.source, c.data.data_dir = "tfds:cifar10", tempfile.mkdtemp()
      >>> try:
      ...     require_data(c)
      ... except FileNotFoundError as err:
      ...     print(str(err).split(";")[0].replace(c.data.data_dir, "DIR"))
      config.data.source='tfds:cifar10': no prepared 'cifar10' data in DIR
    """
    source = str(config.data.source)
    if not source.startswith("tfds:"):
        return
    name = source.split(":", 1)[1].split("/")[0]
    data_dir = os.path.expanduser(config.data.data_dir or "~/tensorflow_datasets")
    how = (f"prepare it on a machine with network access (pip install -e '.[tfds]' && tfds build {name} "
           f"--data_dir {data_dir}), copy the directory here and pass --config.data.data_dir=DIR; nothing is "
           "downloaded at run time")
    if not os.path.isdir(os.path.join(data_dir, name)):
        raise FileNotFoundError(f"config.data.source={source!r}: no prepared {name!r} data in {data_dir}; {how}.")
    if importlib.util.find_spec("tensorflow_datasets") is None:
        raise config_lib.ConfigError(f"config.data.source={source!r} needs tensorflow-datasets: "
                                     "pip install -e '.[tfds]'.")
    if importlib.util.find_spec("tna_jax.data.tfds_source") is None:
        raise config_lib.ConfigError(f"config.data.source={source!r}: this tna_jax has no tfds loader "
                                     "(tna_jax/data/tfds_source.py).")


def _check(config: Any) -> None:
    if "federated" not in config:
        raise config_lib.ConfigError("kind='federated' needs a config.federated section: "
                                     "c.federated = tna_jax.config.federated_config().")
    if config.optimizer.schedule != "constant":
        raise config_lib.ConfigError(f"config.optimizer.schedule must be 'constant' for kind='federated' (the clients' "
                                     f"optimizer is reset every round); got {config.optimizer.schedule!r}.")
    if config.data.augment != "none":
        raise config_lib.ConfigError(f"config.data.augment must be 'none' for kind='federated'; got "
                                     f"{config.data.augment!r}.")


def partition_seed_of(partition_seed: int, seed_index: int | None) -> int:
    """The NumPy seed of a partition of the clients (``federated.partition_per_seed``).

    Args:
      partition_seed: ``federated.partition_seed``.
      seed_index: None for the split every seed shares, or the seed s whose own split it is.

    Returns:
      `partition_seed` itself for the shared split (as before the option existed), else the first
      word of ``numpy.random.SeedSequence([partition_seed, s])``: independent streams, and no
      collision between (partition_seed, s) and (partition_seed + 1, s - 1).

    Examples:
      >>> partition_seed_of(0, None), partition_seed_of(0, 1) != partition_seed_of(1, 0)
      (0, True)
    """
    if seed_index is None:
        return int(partition_seed)
    return int(np.random.SeedSequence([int(partition_seed), int(seed_index)]).generate_state(1)[0])


def make_clients(config: Any, labels: np.ndarray, alpha: float | None,
                 seed_index: int | None = None) -> list[np.ndarray]:
    """The partition of the training labels that ``config.federated`` asks for (α overrides).

    Args:
      config: a config with a ``federated`` section (``num_clients``, ``partition``, ``alpha``,
        ``shards_per_client``, ``min_client_size``, ``partition_seed``).
      labels: the training labels.
      alpha: the Dirichlet α of this arm (None: ``federated.alpha``).
      seed_index: None for the split every seed shares, or the seed whose own split this is
        (``federated.partition_per_seed``; `partition_seed_of`).

    Returns:
      One int array of example indices per client (:func:`tna_jax.federated.partition.partition`).

    Examples:
      >>> import numpy as np
      >>> from tna_jax.config import default_config, federated_config
      >>> c = default_config()
      >>> c.federated = federated_config()
      >>> c.federated.num_clients, c.federated.partition = 4, "iid"
      >>> [len(p) for p in make_clients(c, np.arange(100) % 10, alpha=None)]
      [25, 25, 25, 25]
    """
    from tna_jax.federated import partition

    f = config.federated
    return partition.partition(labels, int(f.num_clients), f.partition, alpha=float(alpha or f.alpha),
                               shards_per_client=int(f.shards_per_client), min_size=int(f.min_client_size),
                               seed=partition_seed_of(int(f.partition_seed), seed_index))


def _algorithm(config: Any, net: Any, arm: FedArm, max_examples: int, mesh: Any, unroll: Any,
               client_sizes: Any = None) -> Any:
    """The algorithm of `arm` (its ρ is only the default: ``init`` gets each arm's own); with
    `client_sizes`, its clients train in ``config.federated.size_buckets`` size buckets."""
    from tna_jax.federated import algorithms

    f = config.federated
    tx = optimizers.make_optimizer(config.optimizer, 1, 1)
    server = algorithms.server_optimizer(arm.server, float(f.server_learning_rate) or None,
                                         momentum=float(f.server_momentum), b1=float(f.server_b1),
                                         b2=float(f.server_b2), eps=float(f.server_eps))
    return algorithms.federated_algorithm(
        net, tx, num_clients=int(f.num_clients), max_examples=max_examples, batch_size=int(f.batch_size),
        method=arm.algorithm, local_epochs=int(f.local_epochs), local_steps=int(f.local_steps),
        client_fraction=float(f.client_fraction), prox_mu=float(f.prox_mu), ratio=float(arm.ratio or 0.0),
        mask_options=optimizers.anchor_options(config, net), server_tx=server, bn=f.bn, mesh=mesh, unroll=unroll,
        client_sizes=client_sizes, size_buckets=int(f.size_buckets) if client_sizes is not None else 1)


def _round_rows(loop: harness.Loop, arms: list[Any], states: dict[str, Any], round_metrics: dict[str, Any],
                done: int, config: Any, evaluate: Any, x_eval: Any, y_eval: Any, split: str) -> list[dict[str, Any]]:
    """The metrics rows of round `done` (one per arm and seed); raises the loop's
    `TrainingDiverged` at a non-finite client loss."""
    from tna_jax.federated import driver

    rows = []
    seeds = int(config.num_seeds)
    for i, a in enumerate(arms):
        m = driver.to_host({k: round_metrics[a.slug][k] for k in ("train_loss", "train_accuracy")})
        bad = np.flatnonzero(~np.isfinite(m["train_loss"]))
        if bad.size:
            raise loop.diverged(f"federated training diverged: arm {a.label!r}, seed {int(bad[0])} had client loss "
                                f"{float(m['train_loss'][bad[0]])} in round {done}. Lower "
                                f"config.optimizer.learning_rate (now {config.optimizer.learning_rate})")
        ev = driver.to_host(evaluate(states[a.slug].params, states[a.slug].model_state, x_eval, y_eval))
        for s in range(seeds):
            rows.append({"epoch": done, "round": done, "run": i * seeds + s, "arm": a.label, "seed": s,
                         "train_loss": float(m["train_loss"][s]), "train_accuracy": float(m["train_accuracy"][s]),
                         f"{split}_loss": float(ev["loss"][s]), f"{split}_accuracy": float(ev["accuracy"][s])})
    return rows


@registry.register("federated")
def federated_experiment(config: Any, workdir: str | None) -> dict[str, Any]:
    """Trains every arm of ``config.federated`` for ``rounds`` rounds and reports accuracy per round.

    Args:
      config: a ``kind="federated"`` config with a ``federated`` section (see the module docstring).
      workdir: the run directory (``metrics.jsonl``, checkpoints, ``report.json``, ``report.md``,
        plots), or None to write nothing.

    Returns:
      ``{"name", "kind": "federated", "eval_split", "data", "model", "devices", "federation",
      "arms": per-arm final accuracy (and paired difference to FedAvg), "curves": accuracy per
      evaluated round and seed, "training", "markdown"[, "plots"]}``.

    Raises:
      tna_jax.config.ConfigError: no ``federated`` section, a schedule other than ``constant``,
        augmentation, an empty evaluation split (all before training); see also
        :func:`require_data`.
      tna_jax.training.TrainingDiverged: a client loss became NaN/inf.

    Examples:
      ``python train.py --config configs/fed_mnist1d.py --workdir runs/fed_mnist1d`` runs the
      README's table; a config the clients cannot use stops before anything is compiled:

      >>> from tna_jax.config import default_config, federated_config
      >>> c = default_config()
      >>> c.kind, c.federated = "federated", federated_config()
      >>> c.optimizer.schedule = "cosine"
      >>> federated_experiment(c, None)
      Traceback (most recent call last):
      ...
      tna_jax.config.schema.ConfigError: config.optimizer.schedule must be 'constant' for kind='federated' (the clients' optimizer is reset every round); got 'cosine'.
    """
    _check(config)
    require_data(config)
    primary = runner.is_primary()
    t0 = time.time()
    fed = _prepare(config)
    checkpointer, states, start_round = _resume_or_init(config, workdir, fed, primary)
    runs = [{"run": i * int(config.num_seeds) + s, "arm": a.label, "seed": s} for i, a in enumerate(fed.arms)
            for s in range(int(config.num_seeds))]
    # Several processes: process 0 writes the metrics and the report; every process takes part
    # in the checkpoints (orbax's multi-host protocol) and holds the same global model.
    metrics_log = logs.MetricsLog(workdir if primary else None, runs, start_round, tensorboard=config.train.tensorboard)
    t_train = time.time()
    states = _train_rounds(config, fed, states, checkpointer, metrics_log, start_round, primary)
    report = _report(config, fed, states, metrics_log.rows, time.time() - t_train, start_round, t0)
    if primary:
        print(report["markdown"])
    if workdir and primary:
        report_lib.write_report(workdir, config, report,
                                plots=lambda: federated_report.plots(config, workdir, report, fed.arms))
    return report


class _Federation(NamedTuple):
    """What the rounds of `federated_experiment` run on, prepared (and checked) before any training."""

    arms: list[FedArm]
    dataset: Any
    net: Any
    split: str  # the evaluation split
    mesh: Any
    per_seed: bool  # federated.partition_per_seed: the clients carry a seed axis
    bucketed: bool  # clients train in size buckets (one program per α then)
    federation: dict[str, Any]  # the report's record of every partition
    programs: dict[tuple[str, str, Any], Any]  # the algorithms, one per program key (`_program_key`)
    algs: dict[str, Any]  # each arm's (by slug) algorithm
    placed: dict[Any, Any]  # the clients of each α, on the devices
    keys: Any  # the seeds' keys (federated.driver.seed_keys)
    evaluate: Any  # the jitted evaluation of the global models
    x_eval: Any
    y_eval: Any


def _program_key(arm: FedArm, bucketed: bool) -> tuple[str, str, Any]:
    """Arms with the same key share one compiled program: every α (and seed) is padded to the same
    client size and ρ is a traced value; size buckets depend on the clients' sizes, so with them
    every α gets its own program."""
    return arm.algorithm, arm.server, arm.alpha if bucketed else None


def _prepare(config: Any) -> _Federation:
    """Loads the data and model, draws and packs the clients, builds the algorithms and places
    the clients and the evaluation split on the devices."""
    from tna_jax import data as data_lib
    from tna_jax.federated import driver

    f = config.federated
    arms = arms_from_config(config)
    dataset, net, _ = train_kind.load_problem(config)
    device_data = data_lib.to_device(dataset, normalize=config.data.normalize)
    x_train, y_train = np.asarray(device_data.x_train), np.asarray(device_data.y_train)
    split = f.eval_split
    x_eval, y_eval = device_data.split(split)
    if x_eval.shape[0] == 0:
        raise config_lib.ConfigError(f"config.federated.eval_split={split!r} is empty for {dataset.name} "
                                     f"(data.val_fraction={config.data.val_fraction}).")
    mesh = sharding_lib.run_mesh()
    num_devices = mesh.devices.size
    # Every input is checked (partitions included) before anything is compiled or trained.
    per_seed = bool(f.get("partition_per_seed", False))
    partitions, federation = _partitions(config, arms, y_train, dataset.num_classes, per_seed)
    n_max = max(max(len(p) for p in parts) for parts in partitions.values())
    clients, seed_clients = _pack(partitions, x_train, y_train, n_max, num_devices, per_seed)
    keys = driver.seed_keys(int(config.seed), int(config.num_seeds), share_mask=bool(config.anchor.share_mask))
    bucketed = int(f.size_buckets) > 1 and float(f.client_fraction) == 1.0 and not int(f.local_steps) and not per_seed
    programs = _programs(config, net, arms, clients, n_max, mesh, bucketed)
    _record_buckets(config, federation, clients, bucketed, num_devices)
    placed = {alpha: driver.place_clients(packed, mesh, seed_axis=per_seed)
              for alpha, packed in (seed_clients if per_seed else clients).items()}
    evaluate = driver.evaluate_program(evaluation.make_eval_fn(net, int(config.train.eval_batch_size)), mesh)
    return _Federation(
        arms=arms, dataset=dataset, net=net, split=split, mesh=mesh, per_seed=per_seed, bucketed=bucketed,
        federation=federation, programs=programs, algs={a.slug: programs[_program_key(a, bucketed)] for a in arms},
        placed=placed, keys=keys, evaluate=evaluate, x_eval=driver.replicated(np.asarray(x_eval), mesh),
        y_eval=driver.replicated(np.asarray(y_eval), mesh))


def _partitions(config: Any, arms: list[FedArm], y_train: np.ndarray, num_classes: int,
                per_seed: bool) -> tuple[dict[tuple[Any, Any], list[np.ndarray]], dict[str, Any]]:
    """The clients of every α (and, with a split per seed, every seed) and the report's record
    of them (sizes, partition seed, label histogram)."""
    from tna_jax.federated import partition

    f = config.federated
    draws = list(range(int(config.num_seeds))) if per_seed else [None]
    partitions, federation = {}, {}
    for alpha in dict.fromkeys(a.alpha for a in arms):
        for s in draws:
            parts = make_clients(config, y_train, alpha, seed_index=s)
            partitions[alpha, s] = parts
            sizes = [len(p) for p in parts]
            federation[str(alpha) if s is None else f"{alpha}/seed_{s}"] = {
                "sizes": sizes, "max_size": max(sizes), "min_size": min(sizes),
                "partition_seed": partition_seed_of(int(f.partition_seed), s),
                "labels": partition.label_histogram(y_train, parts, num_classes).tolist()}
    return partitions, federation


def _pack(partitions: dict[tuple[Any, Any], list[np.ndarray]], x_train: np.ndarray, y_train: np.ndarray,
          n_max: int, num_devices: int, per_seed: bool) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """The clients packed per α, every α (and seed) padded to the same client size `n_max`, and,
    with a split per seed, stacked on a leading seed axis (``(shared, per seed)``; one is empty)."""
    from tna_jax.federated import client

    packs: dict[Any, Any] = {}
    for (alpha, s), parts in partitions.items():
        packed = client.pack_clients(x_train, y_train, parts, multiple=num_devices)
        pad = n_max - packed.max_examples
        packs[alpha, s] = client.ClientData(np.pad(packed.x, [(0, 0), (0, pad)] + [(0, 0)] * (packed.x.ndim - 2)),
                                            np.pad(packed.y, [(0, 0), (0, pad)]), packed.n)
    clients = {alpha: packs[alpha, None] for alpha, s in packs if s is None}
    draws = list(dict.fromkeys(s for _, s in packs))
    seed_clients = {alpha: client.ClientData(*(np.stack([getattr(packs[alpha, s], k) for s in draws])
                                               for k in ("x", "y", "n")))
                    for alpha in dict.fromkeys(a for a, _ in packs)} if per_seed else {}
    return clients, seed_clients


def _programs(config: Any, net: Any, arms: list[FedArm], clients: dict[Any, Any], n_max: int, mesh: Any,
              bucketed: bool) -> dict[tuple[str, str, Any], Any]:
    """One algorithm per program key (`_program_key`), its local steps unrolled as
    ``train.unroll`` says (0: fully for convolutional nets on CPU)."""
    f = config.federated
    conv = run_axis_lib.uses_convolutions(net)
    unroll: Any = max(1, int(config.train.unroll)) if int(config.train.unroll) else \
        (True if conv and jax.default_backend() == "cpu" else 1)
    programs: dict[tuple[str, str, Any], Any] = {}
    for a in arms:
        if _program_key(a, bucketed) not in programs:
            sizes = clients[a.alpha].n[:int(f.num_clients)] if bucketed else None
            programs[_program_key(a, bucketed)] = _algorithm(config, net, a, n_max, mesh, unroll, sizes)
    return programs


def _record_buckets(config: Any, federation: dict[str, Any], clients: dict[Any, Any], bucketed: bool,
                    num_devices: int) -> None:
    """Records in the report which clients of each α trained together (their size buckets)."""
    from tna_jax.federated import client

    f = config.federated
    for alpha, packed in clients.items():
        sizes = packed.n[:int(f.num_clients)]
        federation[str(alpha)]["buckets"] = [b.tolist() for b in client.size_buckets(
            sizes, batch_size=int(f.batch_size), local_epochs=int(f.local_epochs),
            max_buckets=int(f.size_buckets) if bucketed else 1, multiple=num_devices)]


def _resume_or_init(config: Any, workdir: str | None, fed: _Federation,
                    primary: bool) -> tuple[Any, dict[str, Any], int]:
    """``(checkpointer, every arm's server states, the round to start from)``: from the workdir's
    last good checkpoint, or round 0 (no checkpointer without a workdir)."""
    from tna_jax.federated import driver

    checkpointer, start_round, states = None, 0, None
    if workdir:
        scheme = anchors.MASK_SCHEME if any(a.ratio for a in fed.arms) else None
        checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                                             mask_scheme=scheme)
        target = {a.slug: driver.abstract_states(fed.algs[a.slug], fed.net, fed.keys, fed.mesh, float(a.ratio or 0.0))
                  for a in fed.arms} if checkpointer.latest_step() is not None else None
        resumed = harness.resume(checkpointer, target, lambda meta: int(meta["round"]))
        if resumed is not None:
            states, meta = resumed
            start_round = int(meta["round"])
            if primary:
                print(f"resuming from the checkpoint of round {start_round} in {checkpointer.directory}")
    if states is None:
        inits = {key: driver.make_init(alg, fed.net, fed.mesh) for key, alg in fed.programs.items()}
        states = {a.slug: inits[_program_key(a, fed.bucketed)](fed.keys, float(a.ratio or 0.0)) for a in fed.arms}
    return checkpointer, states, start_round


def _one_program_at_a_time(mesh: Any) -> bool:
    """Whether each arm's round must finish before the next arm's is dispatched: on meshes of
    several CPU devices.

    XLA:CPU runs every device's share of a program on one shared thread pool. With several
    programs' collectives in flight at once, the devices can wait in different programs'
    rendezvous and never meet: the 21-arm α × ρ sweep on two CPU devices aborted in an
    all-gather rendezvous after 39 of 40 rounds, and ran through once each round was awaited.
    Accelerators order collectives per device stream and keep the asynchronous dispatch.
    """
    return mesh.devices.size > 1 and all(d.platform == "cpu" for d in mesh.devices.flat)


def _train_rounds(config: Any, fed: _Federation, states: dict[str, Any], checkpointer: Any, metrics_log: Any,
                  start_round: int, primary: bool) -> dict[str, Any]:
    """Advances every arm one round at a time (in lockstep) to ``federated.rounds``: metrics on the
    evaluation cadence, checkpoints, stop signals agreed between processes. Returns the states."""
    from tna_jax.federated import driver

    f = config.federated
    shared_rounds = {key: driver.make_rounds(alg, fed.mesh, per_seed_clients=fed.per_seed)
                     for key, alg in fed.programs.items()}
    round_fns = {a.slug: shared_rounds[_program_key(a, fed.bucketed)] for a in fed.arms}
    rounds = int(f.rounds)
    one_at_a_time = _one_program_at_a_time(fed.mesh)

    def save(done: int) -> None:
        checkpointer.save(done, states, meta={"round": done, "arms": [a.label for a in fed.arms]})

    # A signal to one process (a preemption notice) stops them all at the same round boundary.
    agree = (lambda stopping: bool(multihost_utils.process_allgather(np.int32(stopping)).any())) \
        if jax.process_count() > 1 else None
    with harness.Loop(rounds, start=start_round, unit="round", checkpointer=checkpointer,
                      checkpoint_every=f.checkpoint_every, metrics=metrics_log,
                      progress=bool(config.train.progress) and primary,
                      desc=f"{len(fed.arms)} arms x {config.num_seeds} seeds", agree=agree) as loop:
        for r in loop.iterations():
            round_metrics = {}
            rk = driver.replicated(driver.round_keys(fed.keys, r), fed.mesh)
            for a in fed.arms:
                states[a.slug], m = round_fns[a.slug](states[a.slug], fed.placed[a.alpha], rk)
                round_metrics[a.slug] = m
                if one_at_a_time:
                    jax.block_until_ready((states[a.slug], m))
            done = r + 1
            postfix = None
            if done % f.eval_every == 0 or done == rounds:
                rows = _round_rows(loop, fed.arms, states, round_metrics, done, config, fed.evaluate, fed.x_eval,
                                   fed.y_eval, fed.split)
                loop.log(rows)
                means: dict[str, list[float]] = {}
                for row in rows:
                    means.setdefault(row["arm"], []).append(row[f"{fed.split}_accuracy"])
                postfix = {k[:14]: f"{np.mean(v):.3f}" for k, v in list(means.items())[:4]}
            loop.point(f"round_end:{done}")
            loop.end_iteration(done, lambda d=done: save(d), postfix=postfix)
    return states


def _report(config: Any, fed: _Federation, states: dict[str, Any], rows: list[dict[str, Any]], train_seconds: float,
            start_round: int, t0: float) -> dict[str, Any]:
    """The report: the final accuracy of every arm's global models, the curves, the summaries
    and the federation's record (with its Markdown)."""
    from tna_jax.federated import driver

    f = config.federated
    final = {}
    for a in fed.arms:
        ev = driver.to_host(fed.evaluate(states[a.slug].params, states[a.slug].model_state, fed.x_eval, fed.y_eval))
        final[a.slug] = np.asarray(ev["accuracy"], np.float64)
    curves = federated_report.curves(fed.arms, rows, fed.split)
    dataset, net = fed.dataset, fed.net
    report: dict[str, Any] = {
        "name": config.name, "kind": "federated", "eval_split": fed.split,
        "data": {"name": dataset.name, "sizes": dataset.sizes(), "num_classes": dataset.num_classes},
        "model": {"name": net.name, "params": net.param_count(), "batch_norm": net.has_batch_stats},
        "devices": {"backend": jax.default_backend(), "count": jax.device_count(), "processes": jax.process_count()},
        "federation": {"num_clients": int(f.num_clients), "partition": f.partition, "alpha": float(f.alpha),
                       "partition_draw": "per_seed" if fed.per_seed else "shared",
                       "partition_seed": int(f.partition_seed), "client_fraction": float(f.client_fraction),
                       "cohort": list(next(iter(fed.algs.values())).cohort), "local_epochs": int(f.local_epochs),
                       "local_steps": int(f.local_steps), "batch_size": int(f.batch_size), "rounds": int(f.rounds),
                       "bn": f.bn, "clients": fed.federation},
        "arms": federated_report.summaries(fed.arms, final, curves),
        "curves": curves,
        "training": {"seconds": train_seconds, "resumed_from": start_round, "seeds": int(config.num_seeds)},
        "seconds_total": time.time() - t0,
    }
    report["markdown"] = federated_report.markdown(report)
    return report
