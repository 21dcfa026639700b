"""Client partitions of a labelled training set: IID, Dirichlet(α) label skew, pathological shards.

A partition is a list of K integer index arrays, one per client, that together hold every
training example exactly once. Partitions are drawn on the host with NumPy from an integer seed
(they are data preparation, like the train/validation split), so the same seed gives the same
clients on every process and host.

* ``iid``: a random permutation cut into K near-equal parts (sizes differ by at most one).
* ``dirichlet`` (Hsu et al., 2019, "Measuring the effects of non-identical data distribution";
  the NIID-Bench recipe of Li et al., 2022): for every class k, proportions
  :math:`p_k \\sim \\mathrm{Dir}(\\alpha \\mathbf{1}_K)` split that class's examples over the K
  clients. Small α gives clients dominated by one or two classes; large α approaches IID. As in
  NIID-Bench, the draw is repeated until every client holds at least ``min_size`` examples.
* ``shards`` (McMahan et al., 2017): the examples sorted by label are cut into
  ``K * shards_per_client`` shards and each client gets ``shards_per_client`` random shards, so
  most clients see only that many classes.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

__all__ = ["PARTITIONS", "iid", "dirichlet", "shards", "partition", "check_partition", "label_histogram"]

PARTITIONS = ("iid", "dirichlet", "shards")


def _labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class ids; got shape {y.shape}.")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"labels must be integers; got dtype {y.dtype}.")
    return y


def _num_clients(num_clients: int, num_examples: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer; got {num_clients!r}.")
    if num_clients > num_examples:
        raise ValueError(f"num_clients={num_clients} is more than the {num_examples} training examples: some "
                         "client would have no data. Use fewer clients or more data.")
    return int(num_clients)


def _seed(seed: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}.")
    return np.random.default_rng(int(seed))


def iid(labels: np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """A uniformly random partition into `num_clients` parts of near-equal size.

    Args:
      labels: (N,) integer class ids (only their number matters here).
      num_clients: K, the number of clients (1 <= K <= N).
      seed: NumPy seed of the draw.

    Returns:
      K sorted int64 index arrays whose sizes differ by at most one.

    Raises:
      ValueError: K < 1 or K > N.

    Examples:
      >>> [len(p) for p in iid(np.zeros(10, np.int32), 3)]
      [4, 3, 3]
    """
    y = _labels(labels)
    k = _num_clients(num_clients, len(y))
    order = _seed(seed).permutation(len(y))
    return [np.sort(part) for part in np.array_split(order, k)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0, *, min_size: int = 1,
              max_tries: int = 1000) -> list[np.ndarray]:
    r"""Dirichlet(α) label skew: client c receives a fraction :math:`p_{k,c}` of class k, with
    :math:`p_k \sim \mathrm{Dir}(\alpha, \dots, \alpha)` drawn independently for every class.

    The draw is repeated (up to `max_tries` times, a new draw from the same generator each time)
    until every client holds at least `min_size` examples, as in NIID-Bench.

    Args:
      labels: (N,) integer class ids.
      num_clients: K (1 <= K <= N).
      alpha: concentration α > 0 (0.1: strongly skewed; 100: close to IID).
      seed: NumPy seed.
      min_size: the smallest client allowed (>= 1: no client may be empty).
      max_tries: draws to attempt before giving up.

    Returns:
      K sorted int64 index arrays, each of at least `min_size` examples, together holding every
      example exactly once.

    Raises:
      ValueError: α <= 0 or not finite; K < 1 or K > N; ``min_size * K > N``; no draw in
        `max_tries` gave every client `min_size` examples (the message suggests a larger α or
        fewer clients).

    Examples:
      >>> y = np.repeat(np.arange(10), 50)
      >>> parts = dirichlet(y, 5, alpha=0.5, seed=0)
      >>> sum(len(p) for p in parts), min(len(p) for p in parts) >= 1
      (500, True)
    """
    y = _labels(labels)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0 (Dirichlet concentration); got {alpha!r}.")
    k = _num_clients(num_clients, len(y))
    if isinstance(min_size, bool) or not isinstance(min_size, numbers.Integral) or min_size < 1:
        raise ValueError(f"min_size must be an integer >= 1 (no client may be empty); got {min_size!r}.")
    if min_size * k > len(y):
        raise ValueError(f"min_size={min_size} for {k} clients needs {min_size * k} examples; there are {len(y)}.")
    rng = _seed(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    smallest = 0
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(k, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].append(chunk)
        sizes = [sum(len(ch) for ch in part) for part in parts]
        smallest = min(sizes)
        if smallest >= min_size:
            return [np.sort(np.concatenate(part)).astype(np.int64) for part in parts]
    raise ValueError(f"dirichlet partition: after {max_tries} draws some client still has fewer than min_size="
                     f"{min_size} examples (smallest: {smallest}) with alpha={alpha}, {k} clients and {len(y)} "
                     "examples; use a larger alpha, fewer clients or a smaller min_size.")


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """McMahan et al.'s pathological non-IID split: label-sorted shards, `shards_per_client` each.

    Args:
      labels: (N,) integer class ids.
      num_clients: K.
      shards_per_client: S >= 1; the data are cut into K*S shards of near-equal size.
      seed: NumPy seed.

    Returns:
      K sorted int64 index arrays.

    Raises:
      ValueError: K < 1, ``K * S > N`` (a shard would be empty), or S < 1.

    Examples:
      >>> y = np.repeat(np.arange(10), 20)
      >>> parts = shards(y, 10, 2, seed=0)
      >>> max(len(np.unique(y[p])) for p in parts) <= 2
      True
    """
    y = _labels(labels)
    if isinstance(shards_per_client, bool) or not isinstance(shards_per_client, numbers.Integral) \
            or shards_per_client < 1:
        raise ValueError(f"shards_per_client must be a positive integer; got {shards_per_client!r}.")
    k = _num_clients(num_clients, len(y))
    total = k * int(shards_per_client)
    if total > len(y):
        raise ValueError(f"{k} clients x shards_per_client={shards_per_client} = {total} shards is more than the "
                         f"{len(y)} examples: some shard (and client) would be empty.")
    rng = _seed(seed)
    # Ties between equal labels are broken at random so that shards of one class are random subsets.
    order = np.lexsort((rng.random(len(y)), y))
    pieces = np.array_split(order, total)
    assignment = rng.permutation(total).reshape(k, int(shards_per_client))
    return [np.sort(np.concatenate([pieces[s] for s in row])).astype(np.int64) for row in assignment]


def partition(labels: np.ndarray, num_clients: int, method: str = "dirichlet", *, alpha: float = 0.5,
              shards_per_client: int = 2, min_size: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Dispatches to :func:`iid`, :func:`dirichlet` or :func:`shards` and checks the result.

    Args:
      labels: (N,) integer class ids.
      num_clients: K.
      method: one of :data:`PARTITIONS`.
      alpha: Dirichlet concentration (``"dirichlet"``).
      shards_per_client: shards per client (``"shards"``).
      min_size: the smallest client allowed (``"dirichlet"``).
      seed: NumPy seed.

    Returns:
      K sorted int64 index arrays that hold every example exactly once.

    Raises:
      ValueError: unknown `method` (listing :data:`PARTITIONS`), or the errors of the method.

    Examples:
      >>> parts = partition(np.arange(12) % 3, 4, "iid")
      >>> sorted(np.concatenate(parts).tolist()) == list(range(12))
      True
    """
    if method == "iid":
        parts = iid(labels, num_clients, seed)
    elif method == "dirichlet":
        parts = dirichlet(labels, num_clients, alpha, seed, min_size=min_size)
    elif method == "shards":
        parts = shards(labels, num_clients, shards_per_client, seed)
    else:
        raise ValueError(f"method must be one of {PARTITIONS}; got {method!r}.")
    check_partition(parts, len(_labels(labels)))
    return parts


def check_partition(parts: Sequence[np.ndarray], num_examples: int) -> None:
    """Raises ValueError unless `parts` assigns each of `num_examples` examples to exactly one client
    and no client is empty (the message names the client or the example).

    Args:
      parts: K index arrays, one per client.
      num_examples: N, the size of the training set.

    Raises:
      ValueError: an empty client, an index outside ``[0, N)``, an example on two clients or on none.

    Examples:
      >>> check_partition([np.array([0, 2]), np.array([1])], 3)
      >>> check_partition([np.array([0]), np.array([], np.int64)], 1)
      Traceback (most recent call last):
      ...
      ValueError: client 1 has no data; every client needs at least one example.
    """
    for c, p in enumerate(parts):
        if len(p) == 0:
            raise ValueError(f"client {c} has no data; every client needs at least one example.")
    flat = np.concatenate([np.asarray(p, np.int64) for p in parts]) if len(parts) else np.zeros(0, np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_examples):
        raise ValueError(f"partition indices must be in [0, {num_examples}); got [{flat.min()}, {flat.max()}].")
    counts = np.bincount(flat, minlength=num_examples)
    if (counts > 1).any():
        raise ValueError(f"example {int(np.argmax(counts > 1))} is assigned to {int(counts.max())} clients; "
                         "each example belongs to exactly one.")
    if (counts == 0).any():
        raise ValueError(f"example {int(np.argmax(counts == 0))} is assigned to no client.")


def label_histogram(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(K, num_classes) counts of each class on each client (for reports and plots).

    Args:
      labels: (N,) integer class ids.
      parts: K index arrays.
      num_classes: the number of classes (columns).

    Returns:
      An int64 array of shape ``(K, num_classes)``.

    Examples:
      >>> label_histogram(np.array([0, 1, 1]), [np.array([0, 1]), np.array([2])], 2).tolist()
      [[1, 1], [0, 1]]
    """
    y = _labels(labels)
    return np.stack([np.bincount(y[p], minlength=num_classes) for p in parts]).astype(np.int64)
