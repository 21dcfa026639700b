"""Federated CIFAR-10 (the journal paper's federated setting): the McMahan et al. CNN, 20 clients
with Dirichlet(0.5) label skew, full participation, 1 local epoch of batch 50, 200 rounds;
FedAvg vs FedProx vs FedPFN vs FedPNU (ρ = 0.4), each also with FedAvgM; 3 seeds each.

Needs CIFAR-10 prepared for tensorflow-datasets (nothing is downloaded at run time): on a machine
with network, `pip install -e ".[tfds]" && tfds build cifar10 --data_dir ~/tensorflow_datasets`,
then copy that directory here and pass it. Without the data the run stops before anything is
built, with a message that says this. Meant for an accelerator (on 2 CPU cores it takes days):

    python train.py --config configs/fed_cifar10.py --workdir runs/fed_cifar10 \\
        --config.data.data_dir=$HOME/tensorflow_datasets
"""

import os

import ml_collections

from tna_jax.config import default_config, federated_config


def get_config():
    c = default_config()
    c.name = "fed_cifar10"
    c.kind = "federated"
    c.num_seeds = 3
    c.data.source = "tfds:cifar10"
    c.data.data_dir = os.path.expanduser("~/tensorflow_datasets")
    c.model = ml_collections.ConfigDict({"name": "cnn", "width": 1.0, "hidden": 512, "dtype": "float32",
                                         "init": "flax"})
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.01
    c.optimizer.momentum = 0.9
    c.train.eval_batch_size = 500
    c.federated = federated_config()
    f = c.federated
    f.algorithms = ("fedavg", "fedprox", "fedpfn", "fedpnu")
    f.server_optimizers = ("none", "fedavgm")
    f.num_clients = 20
    f.alpha = 0.5
    f.local_epochs = 1
    f.batch_size = 50
    f.rounds = 200
    f.ratio = 0.4
    f.eval_every = 5
    f.checkpoint_every = 10
    return c
