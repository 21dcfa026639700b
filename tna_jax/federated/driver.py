"""Running rounds: several seeds at once, clients sharded over devices and processes, checkpoints.

The unit of work is one *arm* (an algorithm with its settings) trained from S seeds. Its server
states are stacked on a leading seed axis and one jitted call, ``jax.vmap`` over seeds of the
algorithm's ``apply``, runs a round of every seed; inside it the clients are the second batch
axis, sharded over the devices of a 1-D mesh (``tna_jax.sharding.run_mesh``).

Several processes (hosts). Under ``jax.distributed.initialize`` the mesh spans every process's
devices and the same program runs in each process: :func:`place_clients` builds the client data
as one global array whose rows live on the devices that train them (each process supplies only
the rows of its own devices: clients are split across processes), the server state is replicated,
and the size-weighted average over clients is an all-reduce across processes. Every key is a
function of (seed, round, client id), so the result does not depend on the number of processes.

Keys, split by purpose from ``seed``: model init, anchor mask, and the rounds (round r of seed s
gets ``fold_in(rounds_key[s], r)``; ``apply`` derives sampling and the client keys from it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tna_jax.federated.algorithms import FederatedAlgorithm, ServerState
from tna_jax.federated.client import ClientData

PyTree = Any

__all__ = ["SeedKeys", "seed_keys", "place_clients", "replicated", "make_init", "init_states", "abstract_states",
           "make_rounds",
           "round_keys", "to_host", "client_rows_of_process", "evaluate_program"]

PURPOSES = ("init", "mask", "rounds")


class SeedKeys(NamedTuple):
    """Raw uint32 key data per seed (leading seed axis), one stream per purpose.

    Attributes:
      init: (S, 2) keys of the initial global models.
      mask: (S, 2) keys of the anchor masks (FedPFN / FedPNU).
      rounds: (S, 2) keys of the rounds (:func:`round_keys` folds the round in).

    Examples:
      >>> keys = SeedKeys(*[np.zeros((3, 2), np.uint32)] * 3)
      >>> keys._fields, keys.rounds.shape
      (('init', 'mask', 'rounds'), (3, 2))
    """

    init: jax.Array
    mask: jax.Array
    rounds: jax.Array


def seed_keys(seed: int, num_seeds: int, *, share_mask: bool = True) -> SeedKeys:
    """Per-seed keys from the root `seed`: seed s gets ``fold_in(fold_in(root, purpose), s)``.

    With `share_mask` every seed uses the same anchor-mask key (as in ``tna_jax.training``).
    Arms trained with the same `seed` get the same keys: their comparison is paired.

    Args:
      seed: the root seed (``config.seed``).
      num_seeds: S >= 1.
      share_mask: one anchor-mask key for every seed.

    Returns:
      :class:`SeedKeys` of shape ``(S, 2)`` each (raw key data).

    Raises:
      ValueError: `num_seeds` not a positive integer.

    Examples:
      >>> keys = seed_keys(0, 3)
      >>> keys.init.shape, bool((keys.mask[0] == keys.mask[2]).all())
      ((3, 2), True)
    """
    if isinstance(num_seeds, bool) or not isinstance(num_seeds, (int, np.integer)) or num_seeds < 1:
        raise ValueError(f"num_seeds must be a positive integer; got {num_seeds!r}.")
    root = jax.random.key(seed)
    streams = []
    for i, purpose in enumerate(PURPOSES):
        base = jax.random.fold_in(root, i)
        shared = purpose == "mask" and share_mask
        streams.append(jnp.stack([jax.random.key_data(jax.random.fold_in(base, 0 if shared else s + 1))
                                  for s in range(num_seeds)]))
    return SeedKeys(*streams)


def _spec(mesh: Mesh, sharded: bool) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]) if sharded else PartitionSpec())


def client_rows_of_process(num_rows: int, mesh: Mesh, process: int | None = None) -> np.ndarray:
    """The client rows whose data live on `process`'s devices (default: this process).

    Args:
      num_rows: the rows of the client data (a multiple of the mesh size).
      mesh: the mesh the client axis is split over.
      process: a process index (default ``jax.process_index()``).

    Returns:
      The sorted row indices (int64) that `process` must supply to :func:`place_clients`.

    Examples:
      >>> from tna_jax.sharding import run_mesh
      >>> client_rows_of_process(4, run_mesh()).tolist()
      [0, 1, 2, 3]
    """
    process = jax.process_index() if process is None else process
    sharding = _spec(mesh, True)
    rows = set()
    for device, index in sharding.devices_indices_map((num_rows,)).items():
        if device.process_index == process:
            rows.update(range(num_rows)[index[0]])
    return np.asarray(sorted(rows), np.int64)


def place_clients(clients: ClientData, mesh: Mesh, *, seed_axis: bool = False) -> ClientData:
    """The client data as global arrays with the client axis split over `mesh`.

    Each process reads only the rows of its own devices from `clients` (so a host may hold just its
    clients' rows, zeros elsewhere). The number of rows must be a multiple of the mesh size
    (``pack_clients(..., multiple=mesh.size)``).

    Args:
      clients: host client data (:func:`tna_jax.federated.client.pack_clients`).
      mesh: the mesh (:func:`tna_jax.sharding.run_mesh`).
      seed_axis: the data carry a leading seed axis (one split of the clients per seed,
        ``federated.partition_per_seed``): ``x`` is ``(S, K, N_max, ...)``, ``n`` is ``(S, K)``, and
        the client axis (axis 1) is the one split over `mesh`.

    Returns:
      A :class:`ClientData` of ``jax.Array`` sharded over the mesh's first axis.

    Raises:
      ValueError: rows not a multiple of the devices.

    Examples:
      >>> from tna_jax.sharding import run_mesh
      >>> d = ClientData(np.zeros((2, 3, 1)), np.zeros((2, 3), np.int32), np.array([3, 1]))
      >>> place_clients(d, run_mesh()).n.tolist()
      [3, 1]
    """
    rows = int(np.shape(clients.n)[1 if seed_axis else 0])
    if rows % mesh.devices.size:
        raise ValueError(f"the client data have {rows} rows, not a multiple of the {mesh.devices.size} devices; "
                         "pack them with pack_clients(..., multiple=number of devices).")
    sharding = NamedSharding(mesh, PartitionSpec(None, mesh.axis_names[0])) if seed_axis else _spec(mesh, True)

    def put(host: np.ndarray) -> jax.Array:
        host = np.asarray(host)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return ClientData(put(clients.x), put(clients.y), put(clients.n))


def replicated(tree: PyTree, mesh: Mesh) -> PyTree:
    """`tree` (the same host values in every process) replicated over every device of `mesh`.

    Args:
      tree: a pytree of host arrays (identical in every process).
      mesh: the mesh.

    Returns:
      The tree as fully replicated ``jax.Array`` leaves.

    Examples:
      >>> from tna_jax.sharding import run_mesh
      >>> replicated({"w": np.ones(3)}, run_mesh())["w"].sharding.is_fully_replicated
      True
    """
    sharding = _spec(mesh, False)

    def put(host: Any) -> jax.Array:
        host = np.asarray(host)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def _init_fn(alg: FederatedAlgorithm, net: Any):
    def one(init_key, mask_key, ratio):
        variables = net.init(jax.random.wrap_key_data(init_key))
        params = variables.pop("params")
        return alg.init(params, variables, anchor_key=mask_key, mask_ratio=ratio)

    return jax.vmap(one, in_axes=(0, 0, None))


def make_init(alg: FederatedAlgorithm, net: Any, mesh: Mesh):
    """``init(keys, mask_ratio=None) -> states``: :func:`init_states` jitted once, so arms that differ
    only in ρ (a traced value) share one compiled program.

    Args:
      alg: the algorithm (:func:`tna_jax.federated.algorithms.federated_algorithm`).
      net: its model.
      mesh: the mesh the states are replicated over.

    Returns:
      ``init(keys, mask_ratio=None)`` returning the stacked round-0 :class:`ServerState` of every
      seed of `keys` (:func:`seed_keys`).

    Examples:
      >>> import optax
      >>> from tna_jax import models
      >>> from tna_jax.report import count_compiles
      >>> from tna_jax.federated.algorithms import fed_pfn
      >>> from tna_jax.sharding import run_mesh
      >>> net = models.build({"name": "mlp", "depth": 0}, (3,), 2)
      >>> alg = fed_pfn(net, optax.sgd(0.1), 0.4, jax.random.key(0), num_clients=2, max_examples=4, batch_size=2)
      >>> init = make_init(alg, net, run_mesh())
      >>> with count_compiles() as compiles:
      ...     states = [init(seed_keys(0, 2), ratio) for ratio in (0.2, 0.6)]
      >>> states[1].mask["head"]["kernel"].shape, [round(r, 2) for r in states[1].mask_ratio.tolist()], compiles["jit(one)"]
      ((2, 3, 2), [0.6, 0.6], 1)
    """
    fn = jax.jit(_init_fn(alg, net), out_shardings=_spec(mesh, False))

    def init(keys: SeedKeys, mask_ratio: float | None = None) -> ServerState:
        ratio = None if mask_ratio is None else np.float32(mask_ratio)
        return fn(replicated(keys.init, mesh), replicated(keys.mask, mesh), ratio)

    return init


def init_states(alg: FederatedAlgorithm, net: Any, keys: SeedKeys, mesh: Mesh, mask_ratio: float | None = None
                ) -> ServerState:
    """Round-0 server states of every seed (leading seed axis), replicated over `mesh`.

    Seed s's global model is ``net.init(init_key[s])`` and its anchor key ``mask[s]``; `mask_ratio`
    overrides the algorithm's ρ.

    Args:
      alg: the algorithm.
      net: its model.
      keys: the seeds' keys (:func:`seed_keys`).
      mesh: the mesh the states are replicated over.
      mask_ratio: ρ for FedPFN / FedPNU (None: the algorithm's).

    Returns:
      A :class:`ServerState` whose leaves have a leading seed axis.

    Examples:
      >>> import optax
      >>> from tna_jax import models
      >>> from tna_jax.federated.algorithms import fed_avg
      >>> from tna_jax.sharding import run_mesh
      >>> net = models.build({"name": "mlp", "depth": 0}, (3,), 2)
      >>> alg = fed_avg(net, optax.sgd(0.1), num_clients=2, max_examples=4, batch_size=2)
      >>> states = init_states(alg, net, seed_keys(0, 2), run_mesh())
      >>> states.params["head"]["kernel"].shape, states.round.tolist()
      ((2, 3, 2), [0, 0])
    """
    return make_init(alg, net, mesh)(keys, mask_ratio)


def abstract_states(alg: FederatedAlgorithm, net: Any, keys: SeedKeys, mesh: Mesh,
                    mask_ratio: float | None = None) -> ServerState:
    """Shapes, dtypes and shardings of :func:`init_states` (the target of a checkpoint restore).

    Nothing is computed or compiled (``jax.eval_shape``).

    Args:
      alg, net, keys, mesh, mask_ratio: as for :func:`init_states`.

    Returns:
      A :class:`ServerState` of ``jax.ShapeDtypeStruct`` leaves, replicated over `mesh`.

    Examples:
      >>> import optax
      >>> from tna_jax import models
      >>> from tna_jax.federated.algorithms import fed_avg
      >>> from tna_jax.sharding import run_mesh
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (3,), 2)
      >>> alg = fed_avg(net, optax.sgd(0.1), num_clients=2, max_examples=4, batch_size=2)
      >>> target = abstract_states(alg, net, seed_keys(0, 4), run_mesh())
      >>> target.params["dense_0"]["kernel"].shape, target.round.dtype
      ((4, 3, 8), dtype('int32'))
    """
    shapes = jax.eval_shape(_init_fn(alg, net), keys.init, keys.mask, mask_ratio)
    sharding = _spec(mesh, False)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def make_rounds(alg: FederatedAlgorithm, mesh: Mesh, *, donate: bool = True, per_seed_clients: bool = False):
    """``rounds(states, clients, keys) -> (states, metrics)``: one round of every seed, jitted.

    `keys` are the (S,) raw round keys (:func:`round_keys`); the states stay replicated.

    Args:
      alg: the algorithm.
      mesh: the mesh (the output states are replicated over it).
      donate: donate the input states' buffers to the call.
      per_seed_clients: `clients` carry a leading seed axis (`place_clients` with
        ``seed_axis=True``): seed s trains on its own split; else every seed on the same clients.

    Returns:
      The jitted ``rounds`` (compiled on its first call): ``jax.vmap`` over seeds of ``alg.apply``.

    Examples:
      >>> import optax
      >>> from tna_jax import models
      >>> from tna_jax.federated.algorithms import fed_avg
      >>> from tna_jax.federated.client import pack_clients
      >>> from tna_jax.sharding import run_mesh
      >>> net = models.build({"name": "mlp", "depth": 0}, (3,), 2)
      >>> alg = fed_avg(net, optax.sgd(0.1), num_clients=2, max_examples=4, batch_size=2)
      >>> keys, mesh = seed_keys(0, 3), run_mesh()
      >>> clients = pack_clients(np.ones((6, 3), np.float32), np.array([0, 1, 0, 1, 1, 0]),
      ...                        [np.arange(4), np.arange(4, 6)])
      >>> rounds = make_rounds(alg, mesh)
      >>> states = abstract_states(alg, net, keys, mesh)
      >>> _, metrics = jax.eval_shape(rounds, states, clients, round_keys(keys, 0))  # traced, not compiled
      >>> metrics["train_loss"].shape, metrics["client_loss"].shape  # (seeds,), (seeds, clients)
      ((3,), (3, 2))
    """
    fn = jax.vmap(alg.apply, in_axes=(0, 0 if per_seed_clients else None, 0))
    return jax.jit(fn, out_shardings=_spec(mesh, False), donate_argnums=(0,) if donate else ())


def round_keys(keys: SeedKeys, round_index: int) -> np.ndarray:
    """(S, 2) raw keys of round `round_index` for every seed: ``fold_in(rounds_key[s], round)``.

    Args:
      keys: the seeds' keys (:func:`seed_keys`).
      round_index: the round r (0 for the first).

    Returns:
      A NumPy uint32 array of shape ``(S, 2)``.

    Examples:
      >>> keys = seed_keys(0, 2)
      >>> round_keys(keys, 3).shape, bool((round_keys(keys, 3) != round_keys(keys, 4)).any())
      ((2, 2), True)
    """
    return np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(k), round_index)))
                     for k in np.asarray(keys.rounds)])


def to_host(tree: PyTree) -> PyTree:
    """NumPy copies of replicated (or fully addressable) arrays, in any process.

    Args:
      tree: a pytree of arrays (a replicated array that spans other processes is read from this
        process's first shard).

    Returns:
      The tree with NumPy leaves.

    Examples:
      >>> type(to_host({"a": jnp.ones(2)})["a"]).__name__
      'ndarray'
    """
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def evaluate_program(eval_fn: Any, mesh: Mesh):
    """``evaluate(params, model_state, x, y)``: ``eval_fn`` (``evaluation.make_eval_fn``) vmapped over
    the seed axis, jitted; returns ``{"loss": (S,), "accuracy": (S,)}``.

    Args:
      eval_fn: the evaluation of one model.
      mesh: the mesh (outputs are replicated over it).

    Returns:
      The jitted ``evaluate`` (compiled on its first call).

    Examples:
      >>> from tna_jax import evaluation, models, sharding
      >>> net = models.build({"name": "mlp", "depth": 0}, (3,), 2)
      >>> evaluate = evaluate_program(evaluation.make_eval_fn(net), sharding.run_mesh())
      >>> params = {"head": {"kernel": jnp.zeros((2, 3, 2)), "bias": jnp.array([[1.0, 0.0], [0.0, 1.0]])}}
      >>> evaluate(params, {}, jnp.ones((4, 3)), jnp.zeros(4, jnp.int32))["accuracy"].tolist()  # 2 seeds
      [1.0, 0.0]
    """
    def run(params, model_state, x, y):
        return jax.vmap(lambda p, s: eval_fn({"params": p, **s}, x, y))(params, model_state)

    return jax.jit(run, out_shardings=_spec(mesh, False))

