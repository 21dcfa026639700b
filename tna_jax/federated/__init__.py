"""Federated learning: client partitions, vmapped local training, FedAvg, FedProx, FedPFN, FedPNU
and server optimizers (FedAvgM, FedAdam, FedYogi), with the client axis sharded over devices.

* :mod:`tna_jax.federated.partition` — IID, Dirichlet(α) label skew and pathological shards;
* :mod:`tna_jax.federated.client` — padded client data and one client's local training;
* :mod:`tna_jax.federated.algorithms` — ``init`` / ``apply`` pairs in the style of fedjax;
* :mod:`tna_jax.federated.server` — the server state, server optimizers, aggregation and FedBN;
* :mod:`tna_jax.federated.driver` — rounds for several seeds at once, sharding, processes, checkpoints.
"""

from tna_jax.federated import algorithms, client, partition
from tna_jax.federated.algorithms import (
    FederatedAlgorithm,
    ServerState,
    fed_avg,
    fed_pfn,
    fed_pnu,
    fed_prox,
    federated_algorithm,
    server_optimizer,
)
from tna_jax.federated.client import ClientData, make_local_update, pack_clients

__all__ = [
    "algorithms", "client", "partition", "FederatedAlgorithm", "ServerState", "ClientData", "federated_algorithm",
    "fed_avg", "fed_prox", "fed_pfn", "fed_pnu", "server_optimizer", "make_local_update", "pack_clients",
]
