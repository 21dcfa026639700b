"""``kind="soup"``: model soups of a pretrained small ViT, fine-tuned with and without TNA-PFN
(Wortsman et al., ICML 2022; Li et al., TNA-PFN).

1. **Pretrain** one ViT (``config.model``) on the classes ``soup.pretrain_classes`` of
   ``config.data`` (default: scikit-learn's digits 0-4) with the plain training loop
   (:func:`tna_jax.training.fit`), and save it with orbax (:class:`tna_jax.checkpoint.Checkpointer`,
   ``<workdir>/pretrained``; a rerun restores it instead of training it again).
2. **Fine-tune** K = ``soup.candidates`` copies on the other task, the classes
   ``soup.finetune_classes`` (digits 5-9, a new head shared by all candidates): candidate k uses
   learning rate ``soup.learning_rates[k % len]``, weight decay ``soup.weight_decays[k % len]``
   and its own seed (batch order, dropout). Every arm (plain fine-tuning, and TNA-PFN at
   ``anchor.ratio``: a fraction of the weights fixed at their pretrained values, one mask for
   all candidates) and every repeat (``config.num_seeds``) is one batch axis of a single jitted
   program: arms x repeats x K models train at once, learning rates and anchor ratios being
   per-model values in the optimizer state (``optax.inject_hyperparams``).
3. **Soup** the K candidates of each (arm, repeat): the best single model (by validation
   accuracy), the uniform soup and the greedy soup (chosen on the validation split), all
   reported on the test split; mean ± sample std over repeats.

Config section ``soup`` (defaults)::

    c.kind = "soup"
    c.soup.pretrain_classes = (0, 1, 2, 3, 4)
    c.soup.finetune_classes = (5, 6, 7, 8, 9)
    c.soup.pretrain_epochs = 30
    c.soup.finetune_epochs = 10
    c.soup.candidates = 6
    c.soup.learning_rates = (1e-4, 3e-4, 1e-3)
    c.soup.weight_decays = (0.0, 0.1)

``config.optimizer`` trains the pretrained model; fine-tuning uses AdamW with the candidates'
hyperparameters and a cosine decay. Writes ``report.json``, ``report.md`` and ``soups.png``.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tna_jax import checkpoint as ckpt_lib
from tna_jax import config as config_lib
from tna_jax import evaluation, optimizers
from tna_jax import report as report_lib
from tna_jax import run_axis as run_axis_lib
from tna_jax.experiments import registry

__all__ = ["soup_experiment", "soup_options", "class_subset", "SOUP_DEFAULTS", "METHODS"]

SOUP_DEFAULTS: dict[str, Any] = {
    "pretrain_classes": (0, 1, 2, 3, 4), "finetune_classes": (5, 6, 7, 8, 9), "pretrain_epochs": 30,
    "finetune_epochs": 10, "candidates": 6, "learning_rates": (1e-4, 3e-4, 1e-3), "weight_decays": (0.0, 0.1),
}
METHODS = ("mean_individual", "best_single", "uniform_soup", "greedy_soup")


def soup_options(config: Any) -> dict[str, Any]:
    """``config.soup`` over :data:`SOUP_DEFAULTS`, checked.

    Args:
      config: the experiment config (its ``soup`` section may be missing: all defaults).

    Returns:
      The options dict (class lists and hyperparameters as tuples).

    Raises:
      ConfigError: unknown field; class lists that are empty, repeat a class or overlap; epochs,
        candidates or hyperparameters of the wrong type or range (names ``config.soup.<field>``).

    Examples:
      >>> from tna_jax.config import default_config
      >>> soup_options(default_config())["learning_rates"]
      (0.0001, 0.0003, 0.001)
    """
    section = config.get("soup") if hasattr(config, "get") else None
    section = dict(section) if section is not None else {}
    for key in section:
        if key not in SOUP_DEFAULTS:
            raise config_lib.ConfigError(f"config.soup.{key} is not a known field; allowed: {sorted(SOUP_DEFAULTS)}.")
    opts = {**SOUP_DEFAULTS, **section}
    for field in ("pretrain_classes", "finetune_classes"):
        v = tuple(opts[field])
        if len(v) < 2 or len(set(v)) != len(v) or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0
                                                       for c in v):
            raise config_lib.ConfigError(f"config.soup.{field} must be >= 2 distinct class indices; got {v!r}.")
        opts[field] = v
    both = set(opts["pretrain_classes"]) & set(opts["finetune_classes"])
    if both:
        raise config_lib.ConfigError(f"config.soup.pretrain_classes and finetune_classes must not overlap; both have "
                                     f"{sorted(both)}.")
    for field, lo in (("pretrain_epochs", 0), ("finetune_epochs", 1), ("candidates", 1)):
        v = opts[field]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise config_lib.ConfigError(f"config.soup.{field} must be an integer >= {lo}; got {v!r}.")
    for field, lo_open in (("learning_rates", True), ("weight_decays", False)):
        v = tuple(opts[field]) if not isinstance(opts[field], (int, float)) else (opts[field],)
        bad = [x for x in v if isinstance(x, bool) or not isinstance(x, (int, float)) or not np.isfinite(x)
               or x < 0 or (lo_open and x == 0)]
        if not v or bad:
            allowed = "positive numbers" if lo_open else "non-negative numbers"
            raise config_lib.ConfigError(f"config.soup.{field} must be a non-empty tuple of {allowed}; got {v!r}.")
        opts[field] = tuple(float(x) for x in v)
    return opts


def class_subset(dataset: Any, classes: tuple[int, ...], name: str) -> Any:
    """The examples of `dataset` whose label is in `classes`, relabelled ``classes[i] -> i``.

    Args:
      dataset: a ``tna_jax.data.Dataset``.
      classes: the class indices to keep, in their new order.
      name: the new dataset's name.

    Returns:
      A validated ``Dataset`` with ``len(classes)`` classes.

    Raises:
      ValueError: a class outside ``[0, num_classes)`` or with no training example.

    Examples:
      >>> from tna_jax import data
      >>> sub = class_subset(data.load({"source": "digits"}), (5, 6), "digits_5_6")
      >>> sub.num_classes, sorted(set(sub.y_train.tolist()))
      (2, [0, 1])
    """
    import dataclasses

    bad = [c for c in classes if not 0 <= c < dataset.num_classes]
    if bad:
        raise ValueError(f"classes {bad} are outside [0, {dataset.num_classes}) of {dataset.name}.")
    lut = np.full(dataset.num_classes, -1, np.int32)
    lut[list(classes)] = np.arange(len(classes), dtype=np.int32)
    parts = {}
    for split in ("train", "val", "test"):
        x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
        keep = lut[y] >= 0
        parts[f"x_{split}"], parts[f"y_{split}"] = x[keep], lut[y[keep]]
    missing = [c for c in classes if not np.any(dataset.y_train == c)]
    if missing:
        raise ValueError(f"{dataset.name} has no training example of classes {missing}.")
    return dataclasses.replace(dataset, name=name, num_classes=len(classes),
                               info={**dataset.info, "classes": list(classes)}, **parts).validate()


def _pretrain_config(config: Any, epochs: int) -> Any:
    c = copy.deepcopy(config)
    c.kind, c.num_seeds, c.baseline = "train", 1, False
    c.anchor.ratio, c.prune.ratio, c.anchor.refresh_every = 0.0, 0.0, 0
    c.sweep.anchor_ratios, c.sweep.prune_ratios = (), ()
    c.train.epochs = epochs
    return c


def pretrain(config: Any, net: Any, dataset: Any, workdir: str | None, epochs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains (or restores from ``<workdir>/pretrained``) the pretrained model's variables.

    Returns:
      ``(params, info)`` where info has the test accuracy and whether it was restored.

    Raises:
      CheckpointError: ``<workdir>/pretrained`` holds a checkpoint of another architecture or a
        damaged one (the message names the directory and what failed).
    """
    from tna_jax import training

    target = jax.eval_shape(net.init, jax.random.key(0))["params"]
    ckpt_dir = os.path.join(workdir, "pretrained") if workdir else None
    if ckpt_dir and os.path.isdir(ckpt_dir):
        checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=1)
        try:
            if checkpointer.latest_step() is not None:
                params, _, meta = checkpointer.restore(target, fallback=False)
                return params, {**meta, "restored": True}
        finally:
            checkpointer.close()
    result = training.fit(_pretrain_config(config, epochs), net, dataset, workdir=None)
    params = jax.tree.map(lambda p: p[0], result.state.params)
    info = {"test_accuracy": float(result.test["accuracy"][0]), "val_accuracy": float(result.val["accuracy"][0]),
            "epochs": epochs, "seconds": result.seconds, "restored": False}
    if ckpt_dir:
        checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=1)
        checkpointer.save(epochs, params, meta=info)
        checkpointer.close()
    return params, info


def _finetune_tx(lr: Any, wd: Any, ratio: Any, key: jax.Array, total_steps: int, mask_opts: dict[str, Any]):
    from tna_jax import anchors

    # inject_hyperparams keeps lr and weight decay in the state, so one transform updates models
    # with different hyperparameters inside one vmap; the cosine decay multiplies the update.
    return optax.chain(optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=wd),
                       optax.scale_by_schedule(optax.cosine_decay_schedule(1.0, total_steps)),
                       anchors.fixed_anchor_mask(ratio, key, **mask_opts))


def _arms(config: Any) -> list[tuple[str, float]]:
    ratio = float(config.anchor.ratio)
    arms = [("TNA-PFN" if ratio > 0 else "vanilla", ratio)]
    if ratio > 0 and config.baseline:
        arms.insert(0, ("vanilla", 0.0))
    return arms


def _markdown(report: dict[str, Any]) -> str:
    rows = []
    for arm, s in report["summary"].items():
        row = {"arm": arm}
        for m in METHODS:
            row[m] = report_lib.pm(s[m]["mean"], s[m]["std"])
        row["ingredients"] = f"{s['greedy_ingredients']['mean']:.1f}"
        rows.append(row)
    cols = [("arm", "arm"), ("mean_individual", "mean of the K models %"), ("best_single", "best single (val) %"),
            ("uniform_soup", "uniform soup %"), ("greedy_soup", "greedy soup %"),
            ("ingredients", "greedy ingredients")]
    head = (f"Test accuracy on {report['finetune']['name']}, K = {report['candidates']} candidates per soup, "
            f"mean ± sample std over {report['repeats']} repeats; pretrained on {report['pretrain']['name']} "
            f"(test accuracy {report['pretrain']['test_accuracy'] * 100:.1f}%).")
    return head + "\n\n" + report_lib.markdown_table(rows, cols)


@registry.register("soup")
def soup_experiment(config: Any, workdir: str | None) -> dict[str, Any]:
    """Pretrain a ViT, fine-tune K candidates per arm and repeat (vmapped), and soup them.

    Args:
      config: the experiment config (``kind="soup"``; see the module docstring).
      workdir: where the pretrained checkpoint, ``report.json``, ``report.md`` and ``soups.png``
        go (None: nothing is written and the model is pretrained every time).

    Returns:
      The report: per arm and repeat every candidate's validation and test accuracy, the best
      single model, the uniform and greedy soups (test accuracy, ingredients), and mean ± std.

    Raises:
      ConfigError: bad ``config.soup`` fields, or ``data.val_fraction = 0`` (no held-out split).
      TrainingDiverged: a candidate's fine-tuning loss became NaN/inf (names it and its lr).

    Examples:
      >>> from tna_jax.experiments import KINDS  # run: python train.py --config configs/soup_vit.py ...
      >>> KINDS["soup"] is soup_experiment
      True
    """
    from tna_jax import data as data_lib
    from tna_jax import models

    opts = soup_options(config)
    t0 = time.time()
    full = data_lib.load(config.data)
    pre_data = class_subset(full, opts["pretrain_classes"], f"{full.name}{list(opts['pretrain_classes'])}")
    ft_data = class_subset(full, opts["finetune_classes"], f"{full.name}{list(opts['finetune_classes'])}")
    if ft_data.sizes()["val"] == 0:
        raise config_lib.ConfigError("config.data.val_fraction must be > 0 for kind='soup': greedy soups are chosen "
                                     "on the validation split.")
    pre_net = models.build(config.model, full.input_shape, pre_data.num_classes)
    net = models.build(config.model, full.input_shape, ft_data.num_classes)
    pre_params, pre_info = pretrain(config, pre_net, pre_data, workdir, int(opts["pretrain_epochs"]))
    t_pre = time.time() - t0

    cands = _candidates(config, opts)
    dev = data_lib.to_device(ft_data, normalize=config.data.normalize)
    epochs = int(opts["finetune_epochs"])
    state, total, t_ft = _finetune(config, net, pre_params, cands, dev, epochs)
    per = _soup_rows(config, net, cands, state, dev)
    summary = _summary(per)
    report: dict[str, Any] = {
        "name": config.name, "kind": "soup", "options": {kk: list(v) if isinstance(v, tuple) else v for kk, v in opts.items()},
        "model": {"name": net.name, "params": net.param_count()},
        "pretrain": {"name": pre_data.name, "sizes": pre_data.sizes(), **pre_info,
                     "checkpoint": os.path.join(workdir, "pretrained") if workdir else None},
        "finetune": {"name": ft_data.name, "sizes": ft_data.sizes(), "epochs": epochs, "steps": total},
        "candidates": cands.k, "repeats": cands.repeats, "arms": dict(cands.arms),
        "hyperparameters": [{"learning_rate": cands.lrs[i], "weight_decay": cands.wds[i]} for i in range(cands.k)],
        "per_repeat": per, "summary": summary,
        "seconds": {"pretrain": t_pre, "finetune": t_ft, "total": time.time() - t0},
    }
    report["markdown"] = _markdown(report)
    print(report["markdown"])
    if workdir:
        report_lib.write_report(workdir, config, report, plots=lambda: [_plot(config, workdir, summary)])
    return report


class _Candidates(NamedTuple):
    """The fine-tuned models: one run per (arm, repeat, candidate), arm-major, then repeat."""

    arms: list[tuple[str, float]]  # (label, anchor ratio)
    repeats: int
    k: int  # candidates per soup
    lrs: list[float]  # each candidate's learning rate and weight decay
    wds: list[float]
    runs: list[tuple[int, int, int]]  # (arm, repeat, candidate) of each run


def _candidates(config: Any, opts: dict[str, Any]) -> _Candidates:
    """The runs: every arm x repeat x candidate, candidate i with the i-th hyperparameters (cycled)."""
    arms, repeats, k = _arms(config), int(config.num_seeds), int(opts["candidates"])
    lrs_c = [opts["learning_rates"][i % len(opts["learning_rates"])] for i in range(k)]
    wds_c = [opts["weight_decays"][i % len(opts["weight_decays"])] for i in range(k)]
    runs = [(a, s, i) for a in range(len(arms)) for s in range(repeats) for i in range(k)]
    return _Candidates(arms, repeats, k, lrs_c, wds_c, runs)


def _finetune(config: Any, net: Any, pre_params: Any, cands: _Candidates, dev: Any,
              epochs: int) -> tuple[Any, int, float]:
    """Fine-tunes every candidate from the pretrained body and one new head, all runs in one
    vmapped program; returns ``(state, total steps, seconds of training)``."""
    from tna_jax import training
    from tna_jax.data.batching import steps_per_epoch

    n = len(cands.runs)
    root = jax.random.key(int(config.seed))
    head = net.init(jax.random.fold_in(root, 1))["params"]["head"]  # one new head for every candidate
    body = {kk: v for kk, v in pre_params.items() if kk != "head"}
    params0 = {**body, "head": head}
    stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (n, *np.shape(p))), params0)
    spe = steps_per_epoch(int(dev.x_train.shape[0]), int(config.train.batch_size))
    mask_opts = optimizers.anchor_options(config, net)
    anchor_key = jax.random.fold_in(root, 2)
    lr = jnp.asarray([cands.lrs[i] for _, _, i in cands.runs], jnp.float32)
    wd = jnp.asarray([cands.wds[i] for _, _, i in cands.runs], jnp.float32)
    ratio = jnp.asarray([cands.arms[a][1] for a, _, _ in cands.runs], jnp.float32)
    total = spe * epochs
    opt_state = jax.jit(jax.vmap(lambda p, lr, wd, r: _finetune_tx(lr, wd, r, anchor_key, total, mask_opts).init(p)))(
        stacked, lr, wd, ratio)
    state = training.TrainState(stacked, {}, opt_state, jnp.zeros(n, jnp.int32))
    # Same candidate seed in every arm: paired runs (same batch order and dropout).
    seed_of = [s * cands.k + i for _, s, i in cands.runs]
    data_keys = jnp.stack([jax.random.key_data(jax.random.fold_in(jax.random.fold_in(root, 3), q)) for q in seed_of])
    drop_keys = jnp.stack([jax.random.key_data(jax.random.fold_in(jax.random.fold_in(root, 4), q)) for q in seed_of])
    update_tx = _finetune_tx(1.0, 0.0, 0.0, anchor_key, total, mask_opts)  # update reads lr, wd, mask from the state
    t1 = time.time()
    state = _finetune_epochs(config, net, update_tx, state, (data_keys, drop_keys), dev, epochs, cands)
    return state, total, time.time() - t1


def _finetune_epochs(config: Any, net: Any, update_tx: optax.GradientTransformation, state: Any,
                     keys: tuple[jax.Array, jax.Array], dev: Any, epochs: int, cands: _Candidates) -> Any:
    """The fine-tuning epochs, each in chunks of jitted steps; raises TrainingDiverged naming the
    first candidate whose loss became NaN/inf."""
    from tna_jax import training
    from tna_jax.data.batching import steps_per_epoch

    data_keys, drop_keys = keys
    num_train, bs = int(dev.x_train.shape[0]), int(config.train.batch_size)
    spe = steps_per_epoch(num_train, bs)
    run_axis = run_axis_lib.resolve_run_axis(config, net)
    chunk, unroll = run_axis_lib.loop_plan(net, spe, int(config.train.steps_per_call), int(config.train.unroll),
                                           runs_per_device=len(cands.runs) if run_axis == "loop" else 1)
    fns: dict[int, Any] = {}
    for epoch in range(epochs):
        done = 0
        while done < spe:
            m = min(chunk, spe - done)
            if m not in fns:
                fns[m] = training.make_train_epoch(net, update_tx, num_train=num_train, batch_size=bs, num_steps=m,
                                                   unroll=unroll, label_smoothing=float(config.train.label_smoothing),
                                                   run_axis=run_axis)
            state, metrics = fns[m](state, data_keys, drop_keys, epoch, done, dev.x_train, dev.y_train)
            done += m
        loss = np.asarray(metrics.loss_sum) / np.asarray(metrics.steps)
        if not np.isfinite(loss).all():
            bad = int(np.argmax(~np.isfinite(loss)))
            arm, _, candidate = cands.runs[bad]
            raise training.TrainingDiverged(f"fine-tuning diverged: candidate {candidate} (lr {cands.lrs[candidate]}) "
                                            f"of arm {cands.arms[arm][0]} had loss {loss[bad]} in epoch {epoch + 1}.")
    return state


def _soup_rows(config: Any, net: Any, cands: _Candidates, state: Any, dev: Any) -> dict[str, list[dict[str, Any]]]:
    """Per arm and repeat: every candidate's validation and test accuracy, the best single model
    (chosen on validation) and the uniform and greedy soups of the K candidates."""
    from tna_jax import fusion

    val = evaluation.evaluate_runs(net, state, (dev.x_val, dev.y_val), batch_size=int(config.train.eval_batch_size))
    test = evaluation.evaluate_runs(net, state, (dev.x_test, dev.y_test), batch_size=int(config.train.eval_batch_size))
    eval_fn = evaluation.make_eval_fn(net, int(config.train.eval_batch_size))
    test_eval = jax.jit(eval_fn)
    held_out, test_data = (dev.x_val, dev.y_val), (dev.x_test, dev.y_test)
    per: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in cands.arms}
    for a, (label, _) in enumerate(cands.arms):
        for s in range(cands.repeats):
            idx = np.asarray([q for q, (aa, ss, _) in enumerate(cands.runs) if aa == a and ss == s])
            cands_params = jax.tree.map(lambda p, idx=idx: p[idx], state.params)
            variables = {"params": cands_params}
            greedy = fusion.greedy_soup(eval_fn, variables, held_out)
            uniform = fusion.uniform_soup(eval_fn, variables, held_out)
            best = int(np.argmax(val.accuracy[idx]))
            per[label].append({
                "repeat": s, "val_accuracy": val.accuracy[idx].tolist(), "test_accuracy": test.accuracy[idx].tolist(),
                "mean_individual": float(np.mean(test.accuracy[idx])), "best_single": float(test.accuracy[idx][best]),
                "best_index": best, "uniform_soup": float(test_eval(uniform.params, *test_data)["accuracy"]),
                "uniform_soup_val": uniform.held_out_accuracy,
                "greedy_soup": float(test_eval(greedy.params, *test_data)["accuracy"]),
                "greedy_soup_val": greedy.held_out_accuracy, "greedy_ingredients": greedy.ingredients,
                "greedy_trials": greedy.trials})
    return per


def _summary(per: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per arm: mean and sample std over the repeats of every method and of the greedy soup's size."""
    summary = {}
    for label, rows in per.items():
        summary[label] = {m: dict(zip(("mean", "std"), report_lib.mean_std([r[m] for r in rows]))) for m in METHODS}
        summary[label]["greedy_ingredients"] = dict(zip(("mean", "std"), report_lib.mean_std(
            [len(r["greedy_ingredients"]) for r in rows])))
    return summary


def _plot(config: Any, workdir: str, summary: dict[str, Any]) -> str:
    from tna_jax import plotting

    rows = [{"method": m.replace("_", " "), "arm": arm, "value": s[m]["mean"], "std": s[m]["std"]}
            for arm, s in summary.items() for m in METHODS]
    return plotting.plot_barrier_bars(rows, os.path.join(workdir, "soups.png"), group_key="method",
                                      series_key="arm", value_key="value", std_key="std",
                                      ylabel="test accuracy", title=f"{config.name}: model soups",
                                      caption=f"Bars: mean, error bars: ± sample std over {config.num_seeds} repeats.")
