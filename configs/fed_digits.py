"""Federated scikit-learn digits (8x8 images, shipped offline) with the federated CNN of McMahan et
al. (width 0.5): 20 clients with Dirichlet(0.5) label skew, full participation, 1 local epoch of
batch 16, 60 rounds; FedAvg vs FedProx vs FedPFN vs FedPNU (ρ = 0.4), each also with FedAvgM;
3 seeds each. On CPU the convolutional local steps are unrolled (see ``train.unroll``).

    nice -n 10 python train.py --config configs/fed_digits.py --workdir runs/fed_digits
"""

import ml_collections

from tna_jax.config import default_config, federated_config


def get_config():
    c = default_config()
    c.name = "fed_digits"
    c.kind = "federated"
    c.num_seeds = 3
    c.data.source = "digits"
    c.model = ml_collections.ConfigDict({"name": "cnn", "width": 0.5, "hidden": 128, "dtype": "float32",
                                         "init": "flax"})
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.02
    c.optimizer.momentum = 0.9
    c.train.eval_batch_size = 500
    c.federated = federated_config()
    f = c.federated
    f.algorithms = ("fedavg", "fedprox", "fedpfn", "fedpnu")
    f.server_optimizers = ("none", "fedavgm")
    f.num_clients = 20
    f.alpha = 0.5
    f.local_epochs = 1
    f.batch_size = 16
    f.rounds = 60
    f.ratio = 0.4
    f.eval_every = 5
    f.checkpoint_every = 20
    return c
