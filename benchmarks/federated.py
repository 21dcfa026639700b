"""One federated round: clients vmapped (and sharded) vs a Python loop over clients with the same
code, vs a PyTorch FedAvg loop, and round time as the number of clients grows.

All in one process, variants interleaved (``benchmarks.common.time_interleaved``):

* ``vmap_speedup``: one FedAvg round of 20 Dirichlet(0.5) MNIST-1D clients (1 local epoch,
  batch 32, SGD with momentum) as ONE jitted call (``alg.apply`` as ``train.py`` runs it: the
  clients in 3 size buckets, each a vmap whose client axis is sharded over the CPU devices) vs the
  same round as a Python loop over clients, each calling its bucket's jitted single-client
  function, then the same averaging (target >= 4x);
* ``vmap_speedup_one_cohort``: the same with every client padded to the largest one
  (``size_buckets=1``), vmapped vs looped; ``bucket_speedup``: one padded cohort vs buckets;
* ``torch_ratio``: vs a PyTorch FedAvg round of the same MLP, data, batch size and optimizer
  (each client copies the global model, trains on its own, unpadded data; the server averages
  the state dicts weighted by client sizes); skipped cleanly when torch is not installed;
* ``vmap_speedup_small_clients``: the same with 20 clients of 32 examples (one step each);
* scaling: round time for 10, 50, 100 and 500 small clients (32 examples each).

    python benchmarks/federated.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # As train.py does: one CPU device per core, so the sharded client axis uses every core.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={min(8, os.cpu_count() or 1)}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import import_torch, print_table, time_interleaved, write_json  # noqa: E402
from tna_jax import data as data_lib  # noqa: E402
from tna_jax import models  # noqa: E402
from tna_jax import sharding as sharding_lib
from tna_jax import tree as tree_lib  # noqa: E402
from tna_jax.federated import algorithms, client, driver, partition  # noqa: E402

BATCH, LR, MOMENTUM = 32, 0.02, 0.9
BUCKETS = 3  # config.federated.size_buckets's default


def setup(num_clients: int, parts, x, y, net, mesh, size_buckets: int = BUCKETS):
    packed = client.pack_clients(x, y, parts, multiple=mesh.devices.size)
    alg = algorithms.fed_avg(net, optax.sgd(LR, momentum=MOMENTUM), num_clients=num_clients,
                             max_examples=packed.max_examples, batch_size=BATCH, mesh=mesh,
                             client_sizes=packed.n[:num_clients], size_buckets=size_buckets)
    state = driver.replicated(alg.init(net.init(jax.random.key(0))["params"]), mesh)
    return alg, packed, driver.place_clients(packed, mesh), state


def loop_round(net, packed, num_clients: int, mesh, *, size_buckets: int):
    """The same round as a Python loop over clients: each client's jitted single-client update
    (the function its row of the vmapped round runs: its size bucket's, or the one cohort's with
    ``size_buckets=1``), one call per client on its own rows, then the same size-weighted average."""
    ns = packed.n[:num_clients]
    # The buckets of the vmapped round (padded to the devices), so each client runs the same code.
    buckets = client.size_buckets(ns, batch_size=BATCH, max_buckets=size_buckets, multiple=mesh.devices.size)
    if len(buckets) == 1:
        buckets = [np.arange(num_clients)]
    code = {}
    for members in buckets:
        rows = packed.max_examples if len(buckets) == 1 else int(ns[members].max())
        fn = jax.jit(client.make_local_update(net, optax.sgd(LR, momentum=MOMENTUM), batch_size=BATCH,
                                              max_examples=rows, order_examples=packed.max_examples))
        code.update({int(c): (fn, rows) for c in members})
    average = jax.jit(lambda stacked, w: tree_lib.weighted_mean(stacked, w))
    xs = [jnp.asarray(packed.x[c, :code[c][1]]) for c in range(num_clients)]
    ys = [jnp.asarray(packed.y[c, :code[c][1]]) for c in range(num_clients)]
    weights = jnp.asarray(ns, jnp.float32)

    def run(state, key):
        train_key = jax.random.fold_in(key, 1)
        outs = [code[c][0](state.params, {}, state.params, None, xs[c], ys[c], int(ns[c]),
                           jax.random.fold_in(train_key, c)) for c in range(num_clients)]
        return average(tree_lib.stack([o.params for o in outs]), weights)

    return run


def torch_round_fn(x, y, parts, width: int, depth: int, num_classes: int, epochs: int = 1):
    """A PyTorch FedAvg round: every client trains a copy of the global MLP on its own data."""
    torch = import_torch()

    # One thread: on a shared machine PyTorch's spinning worker threads otherwise dominate its time
    # (measured here: 56 s for a round with 2 threads under load); the model is too small to gain from more.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers, prev = [], x.shape[1]
    for _ in range(depth):
        layers += [torch.nn.Linear(prev, width), torch.nn.ReLU()]
        prev = width
    layers.append(torch.nn.Linear(prev, num_classes))
    global_model = torch.nn.Sequential(*layers)
    local = torch.nn.Sequential(*[type(m)(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear)
                                  else torch.nn.ReLU() for m in layers])
    data = [(torch.tensor(x[p]), torch.tensor(y[p], dtype=torch.long)) for p in parts]
    sizes = np.array([len(p) for p in parts], np.float64)
    loss_fn = torch.nn.CrossEntropyLoss()

    def round_():
        global_state = {k: v.clone() for k, v in global_model.state_dict().items()}
        acc = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for (xc, yc), w in zip(data, sizes / sizes.sum()):
            local.load_state_dict(global_state)
            opt = torch.optim.SGD(local.parameters(), lr=LR, momentum=MOMENTUM)
            n = len(yc)
            for _ in range(epochs):
                perm = torch.randperm(n)
                for i in range(0, n, BATCH):
                    idx = perm[i:i + BATCH]
                    opt.zero_grad(set_to_none=True)
                    loss_fn(local(xc[idx]), yc[idx]).backward()
                    opt.step()
            with torch.no_grad():
                for k, v in local.state_dict().items():
                    acc[k] += float(w) * v
        global_model.load_state_dict(acc)
        return float(acc[next(iter(acc))].sum())

    return round_


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 7
    width, depth = (64, 1) if args.quick else (128, 2)
    dataset = data_lib.load({"source": "mnist1d", "num_samples": 5000})
    d = data_lib.to_device(dataset)
    x, y = np.asarray(d.x_train), np.asarray(d.y_train)
    net = models.build({"name": "mlp", "depth": depth, "width": width}, dataset.input_shape, dataset.num_classes)
    mesh = sharding_lib.run_mesh()

    # 1. One round with 20 clients: vmapped (size buckets, as train.py runs it; and one padded
    # cohort) vs a Python loop over clients running the same code vs PyTorch.
    k = 20
    parts = partition.dirichlet(y, k, 0.5, seed=0)
    alg, packed, placed, state = setup(k, parts, x, y, net, mesh)
    alg1, _, _, _ = setup(k, parts, x, y, net, mesh, size_buckets=1)
    vmapped, vmapped1 = jax.jit(alg.apply), jax.jit(alg1.apply)
    key = jax.random.key(1)
    looped, looped1 = loop_round(net, packed, k, mesh, size_buckets=BUCKETS), loop_round(net, packed, k, mesh, size_buckets=1)
    names = {"A": "20 clients vmapped, size buckets (default)", "B": "20 clients vmapped, one padded cohort",
             "C": "Python loop, each client its bucket's code", "D": "Python loop, the one-cohort code",
             "E": "PyTorch FedAvg loop"}
    fns = {names["A"]: lambda: vmapped(state, placed, key)[0].params,
           names["B"]: lambda: vmapped1(state, placed, key)[0].params,
           names["C"]: lambda: looped(state, key), names["D"]: lambda: looped1(state, key)}
    torch_ok = False
    if not args.no_torch:
        try:
            fns[names["E"]] = torch_round_fn(x, y, parts, width, depth, dataset.num_classes)
            torch_ok = True
        except ImportError:
            print("torch not installed (pip install 'tna_jax[bench]'): skipping the PyTorch comparison")
    times = time_interleaved(fns, rounds=rounds, warmup=1)
    med = {key_: times[name]["median_s"] for key_, name in names.items() if name in times}
    rows = [{"variant": name, "round_s": t["median_s"], "vs_default": t["median_s"] / med["A"]} for name, t in times.items()]
    table = print_table(rows, ["variant", "round_s", "vs_default"])
    vmap_speedup = med["C"] / med["A"]
    torch_ratio = med["E"] / med["A"] if torch_ok else None
    sizes = [len(p) for p in parts]
    steps = client.local_steps_count(packed.max_examples, BATCH, 1)
    buckets = client.size_buckets(packed.n[:k], batch_size=BATCH, max_buckets=BUCKETS, multiple=mesh.devices.size)
    bucket_steps = sum(-(-len(b) // mesh.devices.size) * mesh.devices.size * -(-int(packed.n[b].max()) // BATCH)
                       for b in buckets)
    print(f"client sizes {min(sizes)}..{max(sizes)}: {sum(-(-s // BATCH) for s in sizes)} real local steps; one "
          f"cohort padded to {packed.max_examples} runs {k * steps}, {len(buckets)} size buckets run {bucket_steps}")

    # 2. The same comparison with 20 small clients (32 examples: one step each), where a loop pays a
    # dispatch per client for very little work.
    small20 = [np.arange(c * 32, (c + 1) * 32) for c in range(k)]
    a20, p20, pl20, st20 = setup(k, small20, x, y, net, mesh)
    fn20, loop20 = jax.jit(a20.apply), loop_round(net, p20, k, mesh, size_buckets=BUCKETS)
    small_times = time_interleaved({"vmapped": lambda: fn20(st20, pl20, key)[0].params,
                                    "loop": lambda: loop20(st20, key)}, rounds=rounds, warmup=1)
    small_speedup = small_times["loop"]["median_s"] / small_times["vmapped"]["median_s"]
    print(f"20 clients of 32 examples: vmapped {small_times['vmapped']['median_s']:.4f} s, loop "
          f"{small_times['loop']['median_s']:.4f} s: {small_speedup:.2f}x")

    # 3. Round time as the number of small clients grows (32 examples each).
    scaling = []
    for num in ([10, 50, 100] if args.quick else [10, 50, 100, 500]):
        small = [np.arange(c * 32, (c + 1) * 32) % len(y) for c in range(num)]
        a, _, pl, st = setup(num, small, x, y, net, mesh)
        fn = jax.jit(a.apply)
        t = time_interleaved({"r": lambda fn=fn, st=st, pl=pl: fn(st, pl, key)[0].params}, rounds=rounds, warmup=1)["r"]
        scaling.append({"clients": num, "round_s": t["median_s"], "ms_per_client": 1e3 * t["median_s"] / num})
    scaling_table = print_table(scaling, ["clients", "round_s", "ms_per_client"])

    payload = {
        "quick": args.quick, "model": f"mlp depth {depth} width {width}", "batch_size": BATCH, "clients": k,
        "client_sizes": sizes, "padded_size": packed.max_examples, "rows": rows, "scaling": scaling,
        "tables": [table, scaling_table], "devices": jax.device_count(),
        "small_clients": {k_: v["median_s"] for k_, v in small_times.items()},
        "size_buckets": [b.tolist() for b in buckets], "local_steps": {"real": sum(-(-s // BATCH) for s in sizes),
                                                                       "one_cohort": k * steps, "buckets": bucket_steps},
        "ratios": {"vmap_speedup": vmap_speedup, "torch_ratio": torch_ratio,
                   "vmap_speedup_one_cohort": med["D"] / med["B"], "bucket_speedup": med["B"] / med["A"],
                   "vmap_speedup_small_clients": small_speedup},
        "note": "the default round trains the clients in size buckets, each vmapped and padded to its own largest "
                "client; the loop calls, per client, the function of its bucket on its own rows (the same code). "
                "The one-cohort rows pad every client to the largest. PyTorch trains each client on its own data",
    }
    print(f"vmapped vs Python loop over clients: {vmap_speedup:.2f}x (target 4x); "
          + (f"vs PyTorch: {torch_ratio:.2f}x (target 4x)" if torch_ok else "PyTorch: skipped"))
    write_json("federated", payload, args.out)


if __name__ == "__main__":
    main()
