"""ColD fusion (Don-Yehiya et al., "ColD Fusion: Collaborative Descent for Distributed Multitask
Finetuning", ACL 2023), optionally with TNA-PFN anchors over the shared body.

C contributors, each with its own task, share a model θ^r: in round r every contributor
fine-tunes θ^r on its own task, and the new shared model is the average of the contributors'
models, θ^{r+1} = (1/C) Σ_c θ_c^r. With TNA-PFN every contributor keeps the anchored entries of
the shared model fixed while fine-tuning (one mask from a key all contributors share, fixed for
all rounds or drawn afresh each round), so θ^{r+1} ⊙ m = θ^r ⊙ m exactly.

Task heads differ between contributors, so the head is not part of the shared model: every
contributor keeps its own head across rounds, and only the body (every parameter outside
`head`) is averaged. To train all contributors as one `jax.vmap`, heads are *padded* to the
largest class count: a padded class has a zero kernel column and a bias of `PAD_LOGIT` (−1e9),
frozen by the same optax mask as the anchors, so its probability and gradient are exactly 0 and
it never wins an argmax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tna_jax import anchors, deprecation
from tna_jax import tree as tree_lib
from tna_jax.evaluation import cross_entropy
from tna_jax.fusion.soups import num_candidates, stack_candidates
from tna_jax.harness import Loop
from tna_jax.steps import gradient_step

PyTree = Any

__all__ = ["PAD_LOGIT", "ColdTasks", "split_head", "merge_head", "pad_head", "stack_tasks", "cold_masks",
           "make_cold_round", "cold_fusion"]


PAD_LOGIT = -1e9  # bias of a padded class: exp(PAD_LOGIT - logsumexp) == 0 in float32


def _check_head_name(params: Mapping[str, Any], head: str) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of modules; got {type(params).__name__}.")
    if head not in params:
        raise ValueError(f"head={head!r} is not a top-level module of the params; they have {sorted(params)}.")


def split_head(params: Mapping[str, Any], head: str = "head") -> tuple[dict[str, Any], Any]:
    """``(body, head_params)``: the params without the top-level module `head`, and that module.

    Works on stacked params too (the split is by name, not by shape).

    Args:
      params: a model's params, a dict of top-level modules.
      head: the name of the head module.

    Returns:
      ``(body, head_params)``: a new dict without `head`, and ``params[head]``.

    Raises:
      TypeError: `params` is not a dict.
      ValueError: `head` is not a top-level module (the message lists the modules).

    Examples:
      >>> body, h = split_head({"dense_0": {"kernel": 1}, "head": {"kernel": 2}})
      >>> body, h
      ({'dense_0': {'kernel': 1}}, {'kernel': 2})
    """
    _check_head_name(params, head)
    return {k: v for k, v in params.items() if k != head}, params[head]


def merge_head(body: Mapping[str, Any], head_params: Any, head: str = "head") -> dict[str, Any]:
    """Inverse of :func:`split_head` (the head goes last, as Flax orders it).

    Args:
      body: the params without the head.
      head_params: the head module's params.
      head: its name.

    Returns:
      A new dict ``{**body, head: head_params}``.

    Raises:
      ValueError: `body` already has a module named `head`.

    Examples:
      >>> body, h = split_head({"dense_0": {"kernel": 1}, "head": {"kernel": 2}})
      >>> merge_head(body, {"kernel": 3})
      {'dense_0': {'kernel': 1}, 'head': {'kernel': 3}}
      >>> merge_head({"head": {}}, h)
      Traceback (most recent call last):
      ...
      ValueError: body already has a module named 'head'.
    """
    if head in body:
        raise ValueError(f"body already has a module named {head!r}.")
    return {**body, head: head_params}


def pad_head(head_params: Mapping[str, Any], max_classes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pads a Dense head ``{"kernel": (d, n), "bias": (n,)}`` to `max_classes` outputs.

    Padded classes get a zero kernel column and bias :data:`PAD_LOGIT`, so their logit is −1e9:
    zero probability, zero gradient, never the argmax.

    Args:
      head_params: ``{"kernel": (..., d, n), "bias": (..., n)}`` (leading axes, e.g. stacked
        contributors, are kept).
      max_classes: the padded number of outputs, at least n.

    Returns:
      ``(padded_head, frozen)``: the padded head and a boolean tree, True on padded entries, to
      freeze with ``anchors.fixed_anchor_mask(mask=...)`` (exactly, whatever the optimizer does).

    Raises:
      ValueError: not a Dense head, or `max_classes` below its number of classes.

    Examples:
      >>> import jax.numpy as jnp
      >>> h, frozen = pad_head({"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}, 4)
      >>> h["bias"].tolist(), frozen["kernel"][0].tolist()
      ([0.0, 0.0, -1000000000.0, -1000000000.0], [False, False, True, True])
    """
    if not isinstance(head_params, Mapping) or set(head_params) != {"kernel", "bias"}:
        keys = sorted(head_params) if isinstance(head_params, Mapping) else type(head_params).__name__
        raise ValueError(f"pad_head needs a Dense head with 'kernel' and 'bias'; got {keys}.")
    kernel, bias = head_params["kernel"], head_params["bias"]
    n = int(np.shape(bias)[-1])
    if isinstance(max_classes, bool) or not isinstance(max_classes, (int, np.integer)) or max_classes < n:
        raise ValueError(f"max_classes must be an integer >= the head's {n} classes; got {max_classes!r}.")
    pad = int(max_classes) - n
    kernel = jnp.pad(jnp.asarray(kernel), [(0, 0)] * (np.ndim(kernel) - 1) + [(0, pad)])
    bias = jnp.pad(jnp.asarray(bias), [(0, 0)] * (np.ndim(bias) - 1) + [(0, pad)], constant_values=PAD_LOGIT)
    valid = jnp.arange(max_classes) >= n
    frozen = {"kernel": jnp.broadcast_to(valid, kernel.shape), "bias": jnp.broadcast_to(valid, bias.shape)}
    return {"kernel": kernel, "bias": bias}, frozen


@dataclasses.dataclass(frozen=True)
class ColdTasks:
    """The contributors' training data, padded to a common size so contributors are a vmap axis.

    Attributes:
      x: (C, N_max, ...) inputs; rows ``n[c]`` and beyond are padding.
      y: (C, N_max) int32 labels.
      n: (C,) real example counts.
      num_classes: (C,) class counts of the tasks.
      names: task names.

    Examples:
      >>> import numpy as np
      >>> tasks = ColdTasks(x=np.zeros((2, 3, 4)), y=np.zeros((2, 3), np.int32), n=np.array([3, 1]),
      ...                   num_classes=np.array([5, 2]), names=("topic", "polarity"))
      >>> len(tasks), tasks.max_classes
      (2, 5)
    """

    x: np.ndarray
    y: np.ndarray
    n: np.ndarray
    num_classes: np.ndarray
    names: tuple[str, ...]

    @property
    def max_classes(self) -> int:
        return int(np.max(self.num_classes))

    def __len__(self) -> int:
        return len(self.names)


def stack_tasks(tasks: Sequence[tuple[np.ndarray, np.ndarray, int]], names: Sequence[str] | None = None) -> ColdTasks:
    """Pads C tasks' ``(x_train, y_train, num_classes)`` to one array per field.

    Args:
      tasks: C tuples ``(x_train, y_train, num_classes)``; inputs of one shape per example.
      names: C task names (default ``task_0``, ``task_1``, ...).

    Returns:
      A :class:`ColdTasks`, every task zero-padded to the largest one's example count.

    Raises:
      ValueError: no tasks; as many names as tasks; inputs of different shapes; labels outside
        ``[0, num_classes)``; an empty task.

    Examples:
      >>> import numpy as np
      >>> tasks = stack_tasks([(np.ones((3, 4)), np.array([0, 4, 2]), 5), (np.ones((1, 4)), np.array([1]), 2)],
      ...                     names=["topic", "polarity"])
      >>> tasks.x.shape, tasks.n.tolist(), tasks.num_classes.tolist(), tasks.y[1].tolist()
      ((2, 3, 4), [3, 1], [5, 2], [1, 0, 0])
      >>> stack_tasks([(np.ones((2, 4)), np.array([0, 3]), 2)])
      Traceback (most recent call last):
      ...
      ValueError: task 'task_0' has labels in [0, 3], outside [0, 1].
    """
    if len(tasks) == 0:
        raise ValueError("tasks must hold at least one (x, y, num_classes) task; got none.")
    names = tuple(names) if names is not None else tuple(f"task_{i}" for i in range(len(tasks)))
    if len(names) != len(tasks):
        raise ValueError(f"names has {len(names)} entries for {len(tasks)} tasks.")
    shape = np.shape(tasks[0][0])[1:]
    n_max = max(len(t[1]) for t in tasks)
    xs, ys, ns, ks = [], [], [], []
    for name, (x, y, k) in zip(names, tasks):
        x, y = np.asarray(x), np.asarray(y, np.int32)
        if x.shape[1:] != shape:
            raise ValueError(f"task {name!r} has inputs of shape {x.shape[1:]}; task {names[0]!r} has {shape}.")
        if len(y) == 0 or len(x) != len(y):
            raise ValueError(f"task {name!r} must have as many labels as inputs and at least one; got {len(x)} and {len(y)}.")
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"task {name!r} has labels in [{y.min()}, {y.max()}], outside [0, {k - 1}].")
        pad = n_max - len(y)
        xs.append(np.concatenate([x, np.zeros((pad, *shape), x.dtype)]))
        ys.append(np.concatenate([y, np.zeros(pad, np.int32)]))
        ns.append(len(y))
        ks.append(int(k))
    return ColdTasks(np.stack(xs), np.stack(ys), np.asarray(ns, np.int32), np.asarray(ks, np.int32), names)


def cold_masks(body: PyTree, frozen_heads: PyTree, key: jax.Array | None, ratio: float, round_index: int, *,
               refresh: bool = False, head: str = "head", **mask_kwargs: Any) -> tuple[PyTree, PyTree]:
    """The masks of one ColD round: the anchor mask of the shared body and every contributor's
    full optimizer mask (body anchors plus its frozen padded head entries).

    The body mask is ``anchors.anchor_mask(body, ratio, k)`` with ``k = key`` (fixed mask) or
    ``k = fold_in(key, round_index)`` (``refresh=True``: a fresh mask each round, as FedPNU).
    ``ratio = 0`` gives plain ColD fusion (no body entry is masked).

    Args:
      body: the shared params without the head.
      frozen_heads: the contributors' stacked head masks (True on padded entries; see
        :func:`pad_head`).
      key: the anchor key shared by every contributor (None only with ``ratio = 0``).
      ratio: the TNA-PFN mask ratio ρ over the body.
      round_index: the round (folded into `key` when `refresh`).
      refresh: a fresh mask every round instead of one for all rounds.
      head: name of the head module.
      **mask_kwargs: extra arguments of ``anchors.anchor_mask`` (granularity, include, exclude).

    Returns:
      ``(body_mask, masks)`` where `masks` has the contributor axis of `frozen_heads`.

    Raises:
      ValueError: ``ratio > 0`` without a key.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> body = {"dense_0": {"kernel": jnp.zeros((10, 10))}}
      >>> _, frozen = pad_head({"kernel": jnp.zeros((10, 2)), "bias": jnp.zeros(2)}, 3)
      >>> frozen = jax.tree.map(lambda m: jnp.stack([m, m]), frozen)  # 2 contributors
      >>> body_mask, masks = cold_masks(body, frozen, jax.random.key(0), 0.4, round_index=0)
      >>> masks["dense_0"]["kernel"].shape, masks["head"]["bias"][0].tolist()
      ((2, 10, 10), [False, False, True])
      >>> bool(jnp.array_equal(masks["dense_0"]["kernel"][1], body_mask["dense_0"]["kernel"]))  # one shared mask
      True
    """
    if ratio > 0:
        if key is None:
            raise ValueError(f"cold_masks needs a key for ratio={ratio}.")
        k = jax.random.fold_in(key, round_index) if refresh else key
        body_mask = anchors.anchor_mask(body, ratio, k, **mask_kwargs)
    else:
        body_mask = jax.tree.map(lambda p: jnp.zeros(np.shape(p), bool), body)
    c = num_candidates(frozen_heads, "frozen_heads")
    stacked_body = jax.tree.map(lambda m: jnp.broadcast_to(m, (c, *m.shape)), body_mask)
    return body_mask, merge_head(stacked_body, frozen_heads, head)


def make_cold_round(net: Any, base_tx: optax.GradientTransformation, *, steps: int, batch_size: int,
                    head: str = "head", weights: Any = None) -> Callable[..., tuple[PyTree, PyTree, PyTree, jax.Array]]:
    """One ColD fusion round for C contributors as one jitted program.

    ``round_fn(shared, heads, body_mask, masks, tasks_x, tasks_y, tasks_n, keys)`` returns
    ``(new_shared, new_heads, contributors, losses)``:

    1. each contributor c starts from ``merge_head(shared, heads[c])`` and a fresh optimizer state
       of ``optax.chain(base_tx, fixed_anchor_mask(mask=masks[c]))``, and takes `steps` steps of
       `batch_size` examples drawn uniformly (with replacement) from its ``tasks_n[c]`` examples,
       with dropout keyed by ``keys[c]`` (a ``jax.vmap`` over contributors of a ``lax.scan``);
    2. ``new_shared`` is the (weighted) mean of the contributors' bodies; entries in `body_mask`
       are copied from `shared`, so anchors stay bit-exact (the mean of C equal floats may differ
       from them in the last bit);
    3. ``new_heads`` are the contributors' heads (never averaged); ``contributors`` their full
       fine-tuned params (stacked), ``losses`` (C,) their mean training losses.

    Args:
      net: the model (``tna_jax.models.Net``); its head must be the top-level module `head`.
      base_tx: the optimizer (without anchors); its state is reset every round.
      steps: optimizer steps per contributor and round.
      batch_size: examples per step.
      head: name of the head module.
      weights: None (uniform, as in ColD fusion) or (C,) averaging weights.

    Returns:
      The jitted ``round_fn`` (compiled on its first call).

    Raises:
      ValueError: `steps` or `batch_size` not a positive integer.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from tna_jax import models
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 3)
      >>> round_fn = make_cold_round(net, optax.sgd(0.1), steps=5, batch_size=2)
      >>> body, _ = split_head(jax.eval_shape(net.init, jax.random.key(0))["params"])
      >>> heads = {"kernel": jnp.zeros((2, 8, 3)), "bias": jnp.zeros((2, 3))}  # 2 contributors
      >>> no_mask = jax.tree.map(lambda p: jnp.zeros(p.shape, bool), body)
      >>> masks = merge_head(jax.tree.map(lambda m: jnp.stack([m, m]), no_mask),
      ...                    jax.tree.map(lambda h: jnp.zeros(h.shape, bool), heads))
      >>> x, y, n = jnp.ones((2, 6, 4)), jnp.zeros((2, 6), jnp.int32), jnp.array([6, 4])
      >>> keys = jnp.stack([jax.random.key(0), jax.random.key(1)])
      >>> out = jax.eval_shape(round_fn, body, heads, no_mask, masks, x, y, n, keys)  # traced, not compiled
      >>> out[0]["dense_0"]["kernel"].shape, out[2]["head"]["kernel"].shape, out[3].shape
      ((4, 8), (2, 8, 3), (2,))
      >>> make_cold_round(net, optax.sgd(0.1), steps=0, batch_size=2)
      Traceback (most recent call last):
      ...
      ValueError: steps must be a positive integer; got 0.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")

    def contributor(shared, head_params, mask, x, y, n, key):
        params = merge_head(shared, head_params, head)
        tx = optax.chain(base_tx, anchors.fixed_anchor_mask(mask=mask))
        opt_state = tx.init(params)

        def step(carry, i):
            params, opt_state = carry
            k = jax.random.fold_in(key, i)
            idx = jax.random.randint(jax.random.fold_in(k, 0), (batch_size,), 0, n)

            def loss_fn(p):
                logits, _ = net.apply({"params": p}, jnp.take(x, idx, axis=0), train=True,
                                      rng=jax.random.fold_in(k, 1))
                return cross_entropy(logits, jnp.take(y, idx, axis=0)).mean()

            loss, params, opt_state = gradient_step(loss_fn, tx, params, opt_state)
            return (params, opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(steps))
        return params, losses.mean()

    def round_fn(shared, heads, body_mask, masks, tasks_x, tasks_y, tasks_n, keys):
        contributors, losses = jax.vmap(contributor, in_axes=(None, 0, 0, 0, 0, 0, 0))(
            shared, heads, masks, tasks_x, tasks_y, tasks_n, keys)
        bodies, new_heads = split_head(contributors, head)
        mean = tree_lib.weighted_mean(bodies, weights)
        new_shared = jax.tree.map(lambda m, old, new: jnp.where(m, old, new), body_mask, shared, mean)
        return new_shared, new_heads, contributors, losses

    return jax.jit(round_fn)


def _legacy_cold_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Maps the pre-0.2 keyword ``anchor_ratio=`` onto ``ratio=`` (one name for ρ in the API)."""
    if "anchor_ratio" in kwargs:
        deprecation.warn("cold_fusion(..., anchor_ratio=...)", "cold_fusion(..., ratio=...)", stacklevel=4)
        kwargs = dict(kwargs)
        kwargs["ratio"] = kwargs.pop("anchor_ratio")
    return args, kwargs


@deprecation.legacy_call(_legacy_cold_call)
def cold_fusion(net: Any, base_tx: optax.GradientTransformation, pretrained: Mapping[str, Any],
                heads: Sequence[Any], tasks: ColdTasks, *, rounds: int, steps: int, batch_size: int,
                key: jax.Array, ratio: float = 0.0, refresh_mask: bool = False,
                head: str = "head", evaluate: Callable[[int, PyTree, PyTree, PyTree | None], dict[str, Any]] | None = None,
                mask_kwargs: Mapping[str, Any] | None = None, round_fn: Callable[..., Any] | None = None,
                progress: bool = False, hooks: Sequence[Any] | None = None) -> dict[str, Any]:
    """ColD fusion of ``len(tasks)`` contributors for `rounds` rounds, optionally with TNA-PFN.

    Args:
      net: the model; ``pretrained`` are its params (``{"params": ...}["params"]``) with the body
        to share; the pretrained head, if any, is ignored.
      base_tx: the contributors' optimizer (reset every round).
      pretrained: params of the starting shared model (a dict with a `head` entry or without).
      heads: one initial head per task (unpadded Dense ``{"kernel", "bias"}`` with that task's
        class count).
      tasks: the contributors' training data (:func:`stack_tasks`).
      rounds, steps, batch_size: rounds, optimizer steps per round and contributor, batch size.
      key: root key: contributor c's dropout/batch key in round r is ``fold_in(fold_in(key, r), c)``
        and the anchor key is ``fold_in(key, -1 mod 2^31)``.
      ratio: TNA-PFN mask ratio ρ over the shared body (0 = plain ColD fusion; formerly
        ``anchor_ratio``, which still works with a `DeprecationWarning`).
      refresh_mask: draw a new anchor mask each round (False: one mask for all rounds).
      evaluate: ``evaluate(round, shared_body, heads, contributors) -> dict`` called after round 0
        (the pretrained body, ``contributors=None``) and every round; its dicts are returned.
      mask_kwargs: extra arguments of ``anchors.anchor_mask`` (granularity, include, exclude).
      round_fn: a round program from :func:`make_cold_round` with the same `net`, `steps`,
        `batch_size` and `head`, to share one compilation between calls (arms, seeds); default:
        a new one (compiled on first use).
      progress: show a progress bar over the rounds.
      hooks: callables ``hook(point, directory)`` called at ``round_end:<r>``
        (:class:`tna_jax.harness.Loop`; None: those installed with ``tna_jax.hooks.installed``).

    Returns:
      ``{"shared": body, "heads": stacked padded heads, "history": [evaluate dicts],
      "losses": [(C,) per round], "anchor_mask": body mask of the last round}``.

    Raises:
      ValueError: `rounds` not a non-negative integer; as many heads as tasks; a head whose class
        count differs from its task's; and the errors of :func:`pad_head` and :func:`cold_masks`.
      tna_jax.harness.TrainingDiverged: a contributor's training loss became NaN/inf (the message
        names the round and the task).
      tna_jax.harness.Preempted: SIGTERM/SIGINT arrived; the rounds stop at the next round boundary.

    Examples:
      Zero rounds evaluate the pretrained body with the padded heads and compile nothing
      (``configs/cold_minilm.py`` runs real rounds on all-MiniLM-L6-v2):

      >>> import jax, jax.numpy as jnp, numpy as np, optax
      >>> from tna_jax import models
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 3)
      >>> pretrained = jax.eval_shape(net.init, jax.random.key(0))["params"]
      >>> tasks = stack_tasks([(np.ones((6, 4), np.float32), np.array([0, 1, 2, 0, 1, 2]), 3),
      ...                      (np.ones((4, 4), np.float32), np.array([0, 1, 1, 0]), 2)])
      >>> heads = [{"kernel": jnp.zeros((8, 3)), "bias": jnp.zeros(3)}, {"kernel": jnp.zeros((8, 2)), "bias": jnp.zeros(2)}]
      >>> out = cold_fusion(net, optax.sgd(0.1), pretrained, heads, tasks, rounds=0, steps=5, batch_size=2,
      ...                   key=jax.random.key(0), evaluate=lambda r, body, heads, contributors: {"round": r})
      >>> out["history"], out["heads"]["bias"][1].tolist()
      ([{'round': 0}], [0.0, 0.0, -1000000000.0])
      >>> cold_fusion(net, optax.sgd(0.1), pretrained, heads[:1], tasks, rounds=1, steps=5, batch_size=2,
      ...             key=jax.random.key(0))
      Traceback (most recent call last):
      ...
      ValueError: heads has 1 entries for 2 tasks.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative integer; got {rounds!r}.")
    if len(heads) != len(tasks):
        raise ValueError(f"heads has {len(heads)} entries for {len(tasks)} tasks.")
    pretrained = dict(pretrained)
    body = {k: v for k, v in pretrained.items() if k != head}
    padded = [pad_head(h, tasks.max_classes) for h in heads]
    for i, (h, k) in enumerate(zip(heads, tasks.num_classes)):
        if np.shape(h["bias"])[-1] != k:
            raise ValueError(f"head {i} has {np.shape(h['bias'])[-1]} classes; task {tasks.names[i]!r} has {k}.")
    stacked_heads = stack_candidates([p for p, _ in padded])
    frozen_heads = stack_candidates([f for _, f in padded])
    if round_fn is None:
        round_fn = make_cold_round(net, base_tx, steps=steps, batch_size=batch_size, head=head)
    anchor_key = jax.random.fold_in(key, 2**31 - 1)
    tx_x, tx_y, tx_n = jnp.asarray(tasks.x), jnp.asarray(tasks.y), jnp.asarray(tasks.n)
    history = [evaluate(0, body, stacked_heads, None)] if evaluate is not None else []
    losses = []
    body_mask = None
    with Loop(rounds, unit="round", progress=progress, desc="ColD fusion", hooks=hooks) as loop:
        for r in (i + 1 for i in loop.iterations()):
            body_mask, masks = cold_masks(body, frozen_heads, anchor_key, ratio, r - 1, refresh=refresh_mask,
                                          head=head, **dict(mask_kwargs or {}))
            keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(key, r), c) for c in range(len(tasks))])
            body, stacked_heads, contributors, loss = round_fn(body, stacked_heads, body_mask, masks, tx_x, tx_y, tx_n,
                                                               keys)
            losses.append(np.asarray(loss))
            if not np.isfinite(losses[-1]).all():
                bad = int(np.argmax(~np.isfinite(losses[-1])))
                raise loop.diverged(f"ColD fusion diverged in round {r}: contributor {bad} ({tasks.names[bad]!r}) "
                                    f"had training loss {losses[-1][bad]}; lower the learning rate")
            if evaluate is not None:
                history.append(evaluate(r, body, stacked_heads, contributors))
            loop.point(f"round_end:{r}")
            loop.end_iteration(r, lambda: None)
    return {"shared": body, "heads": stacked_heads, "history": history, "losses": losses, "anchor_mask": body_mask}
