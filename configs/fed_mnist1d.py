"""Federated MNIST-1D: 20 clients with Dirichlet(0.5) label skew, full participation, 1 local epoch
of batch 32 per round (SGD with momentum 0.9, lr 0.02, reset every round), 100 rounds. FedAvg vs
FedProx (μ = 0.01) vs FedPFN vs FedPNU (ρ = 0.4), each also with FedAvgM (server momentum 0.9),
4 seeds each, seeds and clients vmapped (8 arms x 4 seeds = 32 federations).

    python train.py --config configs/fed_mnist1d.py --workdir runs/fed_mnist1d

Sweep over α ∈ {0.1, 0.5, 1.0} and ρ ∈ {0.2, 0.4, 0.6} (FedAvg, FedPFN, FedPNU: 21 arms, 4 seeds,
100 rounds as above; arms that differ only in α or ρ share one compiled program; the results page
was made on one CPU device, see docs/results/federated.md):

    python train.py --config configs/fed_mnist1d.py:sweep --workdir runs/fed_mnist1d_sweep --cpu_devices=1

Writes report.json, report.md (final accuracy mean ± std, paired differences to FedAvg),
accuracy_vs_round.png (and sweep_ratio.png for the sweep), metrics.jsonl and checkpoints.
"""

from tna_jax.config import default_config, federated_config


def get_config(option: str = ""):
    c = default_config()
    c.name = "fed_mnist1d"
    c.kind = "federated"
    c.num_seeds = 4
    c.data.source = "mnist1d"
    c.data.num_samples = 10000
    c.model.name = "mlp"
    c.model.depth = 2
    c.model.width = 128
    c.optimizer.name = "momentum"  # the clients' optimizer (its state is reset every round)
    c.optimizer.learning_rate = 0.02
    c.optimizer.momentum = 0.9
    c.train.eval_batch_size = 1000
    c.federated = federated_config()
    f = c.federated
    f.algorithms = ("fedavg", "fedprox", "fedpfn", "fedpnu")
    f.server_optimizers = ("none", "fedavgm")
    f.num_clients = 20
    f.partition = "dirichlet"
    f.alpha = 0.5
    f.client_fraction = 1.0
    f.local_epochs = 1
    f.batch_size = 32
    f.rounds = 100
    f.prox_mu = 0.01
    f.ratio = 0.4
    f.eval_every = 5
    f.checkpoint_every = 25
    if option == "sweep":
        c.name = "fed_mnist1d_sweep"
        f.eval_every = 10
        f.algorithms = ("fedavg", "fedpfn", "fedpnu")
        f.server_optimizers = ("none",)
        f.sweep_alphas = (0.1, 0.5, 1.0)
        f.sweep_ratios = (0.2, 0.4, 0.6)
    elif option:
        raise ValueError(f"configs/fed_mnist1d.py takes '' or 'sweep'; got {option!r}.")
    return c
