"""The ``align_compare`` experiment: post-training alignment against training-time alignment.

For every task (a dataset + model, ``config.align.tasks``), trains ``num_seeds`` models plain and
with TNA-PFN in one program (:func:`tna_jax.training.fit`), then for seed pairs within each arm
measures the linear-mode-connectivity barriers of

* ``none``: the raw pair (vanilla, or TNA-PFN: training-time alignment alone),
* ``WM``: weight matching (Git Re-Basin) of the second model to the first,
* ``AM``: activation matching (correlation of activations),
* ``STE``: straight-through estimator matching (Git Re-Basin's third method: the permutation is
  learnt by training the aligned midpoint),
* ``WM + REPAIR``: weight matching, then REPAIR of every interpolated model,

the relative distance ``‖θ_A − P θ_B‖ / ‖θ_A‖``, the number of weight-matching sweeps to
converge (with and without anchors), the MergeMany soup of every arm (all seeds aligned to their
consensus, then averaged) against the unaligned soup, and mode-connecting Bezier curves trained between the raw
and the WM-aligned endpoints (average and minimum accuracy along the curve). BatchNorm networks
are evaluated with their statistics reset on training data at every point of every path and
curve (otherwise every method looks broken by variance collapse). Writes ``report.json``,
``report.md`` and plots; each task's training lives in ``<workdir>/<task>/`` and resumes.

    python train.py --config configs/align_compare.py --workdir runs/align
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tna_jax import align, chunking, distributed, evaluation, lmc, models, norm_stats, plotting, training
from tna_jax import config as config_lib
from tna_jax import data as data_lib
from tna_jax import tree as tree_lib
from tna_jax.experiments.registry import register
from tna_jax.report import mean_std, pm, write_report
from tna_jax.workdir import prepare_workdir, workdir_path

__all__ = ["align_compare", "align_defaults", "check_align_options", "task_config", "comparison_name", "markdown"]

METHODS = ("none", "WM", "AM", "STE", "WM + REPAIR")
PATH_METHODS = ("none", "WM", "AM", "STE")


def align_defaults() -> ml_collections.ConfigDict:
    """The ``config.align`` section with its defaults."""
    c = ml_collections.ConfigDict()
    c.tasks = ml_collections.ConfigDict()  # name -> overrides of the top-level config; empty = one task
    c.run = ""  # comma-separated subset of the tasks ("" = all)
    c.max_pairs = 6  # seed pairs per arm, chosen as the task's analysis.pairs says (all | disjoint | random)
    c.wm_max_iter = 100
    c.stats_examples = 1000  # training examples for activation statistics, REPAIR (one batch) and BN reset
    c.stats_batch = 250
    c.repair_alphas = 11
    c.chunk = 0  # evaluate at most this many (pair, α) points at once (0 = auto, chunking.auto_chunk)
    c.curve_kind = "bezier"
    c.curve_pairs = 2  # pairs per arm that get curves (0 = none)
    c.curve_epochs = 10
    c.curve_batch = 128
    c.curve_num_t = 4
    c.curve_lr = 1e-3
    c.curve_points = 21
    c.ste_steps = 300  # STE matching steps per pair (0 = no STE rows)
    c.ste_batch = 128
    c.ste_lr = 1e-3
    c.merge = True  # MergeMany soup of every arm
    return c


def check_align_options(config: Any) -> ml_collections.ConfigDict:
    """``config.align`` merged over :func:`align_defaults`, checked field by field.

    Raises:
      tna_jax.config.ConfigError: unknown ``align.*`` field, bad value, unknown task in ``run``.
    """
    opts = align_defaults()
    given = config.get("align", ml_collections.ConfigDict()) if hasattr(config, "get") else config.align
    for key in given.keys():
        if key not in opts:
            raise config_lib.ConfigError(f"config.align.{key} is not a known field; known: {sorted(opts)}.")
        if key == "tasks":
            opts.tasks = given.tasks
        else:
            opts[key] = given[key]

    def integer(field: str, lo: int) -> None:
        v = opts[field]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise config_lib.ConfigError(f"config.align.{field} must be an integer >= {lo}; got {v!r}.")

    for field, lo in (("max_pairs", 1), ("wm_max_iter", 1), ("stats_examples", 2), ("stats_batch", 1),
                      ("repair_alphas", 2), ("chunk", 0), ("curve_pairs", 0), ("curve_epochs", 1),
                      ("curve_batch", 1), ("curve_num_t", 1), ("curve_points", 2), ("ste_steps", 0),
                      ("ste_batch", 1)):
        integer(field, lo)
    if opts.curve_kind not in align.curves.KINDS:
        raise config_lib.ConfigError(f"config.align.curve_kind must be one of {align.curves.KINDS}; "
                                     f"got {opts.curve_kind!r}.")
    for field in ("curve_lr", "ste_lr"):
        lr = opts[field]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise config_lib.ConfigError(f"config.align.{field} must be a positive number; got {lr!r}.")
    names = list(opts.tasks.keys()) or ["main"]
    wanted = [t.strip() for t in str(opts.run).split(",") if t.strip()]
    for t in wanted:
        if t not in names:
            raise config_lib.ConfigError(f"config.align.run names task {t!r}; the tasks are {names}.")
    return opts


def _merge(base: ml_collections.ConfigDict, overrides: Any, prefix: str) -> None:
    for key, value in overrides.items():
        if key == "model" and "name" in value and value["name"] != base.model.name:
            kept = {"init": base.model.init} if "init" in base.model else {}  # a protocol choice: kept
            base.model = ml_collections.ConfigDict({**kept, **dict(value)})  # another model: its own fields only
        elif isinstance(value, (ml_collections.ConfigDict, dict)):
            if key not in base:
                raise config_lib.ConfigError(f"config.align.tasks.{prefix}{key} is not a section of the config.")
            _merge(base[key], value, f"{prefix}{key}.")
        else:
            if key not in base and not prefix.startswith("model."):
                raise config_lib.ConfigError(f"config.align.tasks.{prefix}{key} is not a field of the config.")
            base[key] = value


def task_config(config: Any, name: str) -> ml_collections.ConfigDict:
    """The full config of one task: the top-level config with the task's overrides applied."""
    cfg = copy.deepcopy(config)
    tasks = config.align.tasks if "align" in config and "tasks" in config.align else {}
    with cfg.unlocked():
        if name in tasks:
            _merge(cfg, tasks[name], f"{name}.")
        if "align" in cfg:
            del cfg["align"]
        cfg.kind = "train"
        cfg.name = f"{config.name}/{name}"
    config_lib.validate(cfg)
    return cfg


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1) of the values that are not None (`tna_jax.report.mean_std`)."""
    return mean_std([v for v in values if v is not None])


def _rel_distance(a: Any, b: Any) -> float:
    pa, pb = a["params"], b["params"]
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
    den = sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(pa))
    return math.sqrt(num / den)


def _run_task(name: str, cfg: Any, opts: Any, workdir: str | None, log: Any) -> dict[str, Any]:
    t0, cpu0 = time.time(), time.process_time()
    t, t_train = _train_task(name, cfg, opts, workdir, log)
    log(f"[{name}] {t.net.name} on {t.dataset.name}: {len(t.spec)} permutations; trained in {t_train:.0f}s")
    phases = _Phases(name, log, {"train": t_train})
    arms, jobs, iters = _match_pairs(t)
    phases.lap("matching", f"matched {sum(len(j[2]) for j in jobs)} pairs (WM, AM{', STE' if opts.ste_steps else ''})")
    methods = [m for m in PATH_METHODS if m != "STE" or opts.ste_steps]
    rows, paths, entries = _linear_paths(t, jobs, methods)
    phases.lap("paths", f"evaluated {len(entries)} linear paths")
    _repair_paths(t, jobs, entries, rows, paths)
    rows.sort(key=lambda r: ([j[0] for j in jobs].index(r["arm"]), METHODS.index(r["method"])))
    phases.lap("repair", "REPAIRed the WM-aligned paths")
    soups = _soups(t.net, t.spec, jobs, t.key, t.path_eval, (t.x_eval, t.y_eval)) if opts.merge else []
    if opts.merge:
        phases.lap("merge", f"merged {len(soups)} arms (MergeMany)")
    curve_rows, curve_plots = _curve_rows(t, jobs, arms)
    phases.lap("curves", f"trained and evaluated {2 * len(curve_rows)} curves")
    return {
        "task": name, "data": {"name": t.dataset.name, "sizes": t.dataset.sizes()},
        "model": {"name": t.net.name, "params": t.net.param_count(), "batch_norm": t.net.has_batch_stats,
                  "config": config_lib.flatten(cfg.model.to_dict())},
        "spec": {"permutations": len(t.spec), "sizes": dict(t.spec.sizes), "describe": t.spec.describe()},
        "arms": training.summarize(t.result), "rows": rows, "wm_iterations": iters, "soups": soups,
        "curves": _curve_summary(curve_rows), "curve_pairs": curve_rows, "paths": paths,
        "curve_paths": curve_plots,
        "seconds": {**phases.seconds, "total": time.time() - t0, "cpu": time.process_time() - cpu0},
        "settings": {"epochs": cfg.train.epochs, "num_seeds": cfg.num_seeds, "anchor_ratio": cfg.anchor.ratio,
                     "split": cfg.analysis.split},
    }


class _Task(NamedTuple):
    """A task's trained runs and what every phase of its comparison reads."""

    cfg: Any
    opts: Any
    net: Any
    dataset: Any
    result: Any  # training.TrainResult
    data: Any  # the dataset on the devices
    x_eval: Any
    y_eval: Any
    x_stats: Any  # training examples for statistics (activation matching, BatchNorm reset, REPAIR)
    n_stats: int
    stats_batch: int
    spec: Any  # the permutation spec of the model
    eval_fn: Any
    reset: Any  # resets BatchNorm statistics on x_stats, or None without BatchNorm
    path_eval: Any  # eval_fn after the reset
    key: jax.Array
    chunk: int


class _Phases:
    """Times the phases of a task and logs each as it ends."""

    def __init__(self, name: str, log: Any, seconds: dict[str, float]):
        self.name, self.log, self.seconds = name, log, seconds
        self.start = time.time()

    def lap(self, phase: str, what: str) -> None:
        self.seconds[phase] = time.time() - self.start
        self.start = time.time()
        self.log(f"[{self.name}] {what} in {self.seconds[phase]:.0f}s")


def _train_task(name: str, cfg: Any, opts: Any, workdir: str | None, log: Any) -> tuple[_Task, float]:
    """Trains the task's runs (``training.fit``) and prepares its evaluation; returns the task and
    the seconds training took."""
    t0 = time.time()
    dataset = data_lib.load(cfg.data)
    net = models.build(cfg.model, dataset.input_shape, dataset.num_classes)
    augment = None
    if cfg.data.augment == "crop_flip":
        from tna_jax.data.augment import augment_images

        augment = augment_images
    if workdir and distributed.is_primary():  # under jax.distributed, process 0 writes the files
        prepare_workdir(cfg, workdir)
    result = training.fit(cfg, net, dataset, workdir=workdir, augment=augment, log=log)
    t_train = time.time() - t0
    data = data_lib.to_device(dataset, normalize=cfg.data.normalize)
    x_eval, y_eval = data.split(cfg.analysis.split)
    n_stats = min(int(opts.stats_examples), int(data.x_train.shape[0]))
    x_stats = data.x_train[:n_stats]
    sbatch = min(int(opts.stats_batch), n_stats)
    eval_fn = evaluation.make_eval_fn(net, cfg.train.eval_batch_size)

    @jax.jit
    def reset_stats(v, x):  # dropout, if any, with a fixed key
        return norm_stats.reset_bn_stats(net, v, x, batch_size=sbatch, rng=jax.random.key(0))

    reset = (lambda v: reset_stats(v, x_stats)) if net.has_batch_stats else None

    def path_eval(v, x, y):
        return eval_fn(v if reset is None else reset(v), x, y)

    task = _Task(cfg=cfg, opts=opts, net=net, dataset=dataset, result=result, data=data, x_eval=x_eval,
                 y_eval=y_eval, x_stats=x_stats, n_stats=n_stats, stats_batch=sbatch,
                 spec=align.permutation_spec(net), eval_fn=eval_fn, reset=reset, path_eval=path_eval,
                 key=jax.random.key(cfg.seed), chunk=int(opts.chunk) or chunking.AUTO)
    return task, t_train


def _match_pairs(t: _Task) -> tuple[dict[int, list[int]], list[tuple], list[dict[str, Any]]]:
    """Phase 1: every selected pair of seeds within every arm, aligned by weight matching (WM),
    activation matching (AM) and, with ``ste_steps``, the straight-through estimator (STE).

    Returns ``(run indices per arm, jobs, WM iteration records)``; a job is ``(arm label, arm
    index, pairs, models, {method: [aligned second model per pair]})``."""
    cfg, opts, spec, key = t.cfg, t.opts, t.spec, t.key
    n_train = int(t.data.x_train.shape[0])
    arms: dict[int, list[int]] = {}
    for r in t.result.runs:
        arms.setdefault(r.arm_index, []).append(r.index)
    jobs = []
    iters = []
    for arm_index, idx in arms.items():
        label = t.result.runs[idx[0]].arm.label
        ms = [t.result.state.variables(i) for i in idx]
        pairs = lmc.select_pairs(len(idx), cfg.analysis.pairs, int(opts.max_pairs), int(cfg.analysis.pairs_seed))
        pairs_note = lmc.describe_pairs(cfg.analysis.pairs, len(pairs), len(idx), int(cfg.analysis.pairs_seed))
        if not pairs:
            continue
        aligned: dict[str, list[Any]] = {"none": [ms[j] for _, j in pairs], "WM": [], "AM": [], "STE": []}
        wm_info = []
        for p, (i, j) in enumerate(pairs):
            tm = time.time()
            res = align.weight_matching(spec, ms[i], ms[j], jax.random.fold_in(key, 1000 * arm_index + p),
                                        max_iter=opts.wm_max_iter)
            wm_info.append({"pair": [idx[i], idx[j]], "iterations": res.iterations, "converged": res.converged,
                            "seconds": time.time() - tm, "objective_start": res.objective[0],
                            "objective_end": res.objective[-1]})
            aligned["WM"].append(align.apply_permutation(spec, res.perm, ms[j]))
            perm = align.activation_matching(t.net, ms[i], ms[j], t.x_stats, batch_size=t.stats_batch).perm
            aligned["AM"].append(align.apply_permutation(spec, perm, ms[j]))
            if opts.ste_steps:
                ste = align.ste_matching(t.net, ms[i], ms[j], (t.data.x_train, t.data.y_train), spec=spec,
                                         init=res.perm, key=jax.random.fold_in(key, 5000 + 1000 * arm_index + p),
                                         steps=int(opts.ste_steps), batch_size=min(int(opts.ste_batch), n_train),
                                         optimizer=optax.adam(float(opts.ste_lr)))
                aligned["STE"].append(align.apply_permutation(spec, ste.perm, ms[j]))
        it_mean, it_std = _mean_std([w["iterations"] for w in wm_info])
        iters.append({"arm": label, "pairs": len(pairs), "pairs_note": pairs_note, "iterations_mean": it_mean,
                      "iterations_std": it_std, "iterations": [w["iterations"] for w in wm_info],
                      "converged": sum(w["converged"] for w in wm_info),
                      "seconds_mean": _mean_std([w["seconds"] for w in wm_info])[0], "per_pair": wm_info})
        jobs.append((label, arm_index, pairs, ms, aligned))
    return arms, jobs, iters


def _linear_paths(t: _Task, jobs: list[tuple], methods: list[str]
                  ) -> tuple[list[dict[str, Any]], dict[str, Any], list[tuple[str, str, float]]]:
    """Phase 2: every (arm, method, pair) linear path in one vmapped, chunked evaluation.

    Returns ``(barrier rows, paths for the plots, (arm, method, distance) per path)``."""
    alphas = lmc.default_alphas(t.cfg.analysis.num_alphas)
    entries, stack = [], []
    for label, _, pairs, ms, aligned in jobs:
        for method in methods:
            for (i, _), b in zip(pairs, aligned[method]):
                entries.append((label, method, _rel_distance(ms[i], b)))
                stack += [ms[i], b]
    table = lmc.pairwise_barriers(t.path_eval, tree_lib.stack(stack), (t.x_eval, t.y_eval),
                                  pairs=[(2 * k, 2 * k + 1) for k in range(len(entries))], alphas=alphas,
                                  chunk=t.chunk)
    rows, paths = [], {}
    for label, _, _, _, _ in jobs:
        for method in methods:
            sel = [k for k, e in enumerate(entries) if e[0] == label and e[1] == method]
            rows.append(_row(label, method, [table.per_pair[k] for k in sel], [entries[k][2] for k in sel]))
            paths[f"{label} · {method}"] = {"alpha": table.paths.alpha.tolist(),
                                            "accuracy": table.paths.accuracy[sel].tolist(),
                                            "loss": table.paths.loss[sel].tolist()}
    return rows, paths, entries


def _repair_paths(t: _Task, jobs: list[tuple], entries: list[tuple[str, str, float]], rows: list[dict[str, Any]],
                  paths: dict[str, Any]) -> None:
    """Phase 3: REPAIR along the WM-aligned paths (one compiled program for all pairs); adds a
    "WM + REPAIR" row and path per arm to `rows` and `paths`."""
    r_alphas = jnp.asarray(lmc.default_alphas(t.opts.repair_alphas), jnp.float32)
    net, x_stats, n_stats, eval_fn, x_eval, y_eval = t.net, t.x_stats, t.n_stats, t.eval_fn, t.x_eval, t.y_eval

    @jax.jit
    def repair_path(a, b, al):
        fn = align.make_repair(net, a, b, x_stats, batch_size=n_stats)  # one batch: one pass per α
        return jax.lax.map(lambda a_: eval_fn(fn(a_), x_eval, y_eval), al)

    for label, _, pairs, ms, aligned in jobs:
        per_pair, acc, loss = [], [], []
        for (i, _), b in zip(pairs, aligned["WM"]):
            out = jax.device_get(repair_path(ms[i], b, r_alphas))
            path = lmc.LMCPath(alpha=np.asarray(r_alphas), loss=np.asarray(out["loss"]),
                               accuracy=np.asarray(out["accuracy"]))
            per_pair.append(lmc.barriers(path))
            acc.append(path.accuracy.tolist())
            loss.append(path.loss.tolist())
        dist = [e[2] for e in entries if e[0] == label and e[1] == "WM"]
        rows.append(_row(label, "WM + REPAIR", per_pair, dist))
        paths[f"{label} · WM + REPAIR"] = {"alpha": np.asarray(r_alphas).tolist(), "accuracy": acc, "loss": loss}


def _curve_rows(t: _Task, jobs: list[tuple], arms: dict[int, list[int]]
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Phase 4: Bezier or poly-chain curves trained between the raw and the WM-aligned endpoints
    of the first ``curve_pairs`` pairs of each arm; returns their rows and plot series."""
    opts = t.opts
    curve_rows: list[dict[str, Any]] = []
    curve_plots: dict[str, Any] = {}
    tx = optax.adam(float(opts.curve_lr))
    for label, arm_index, pairs, ms, aligned in jobs:
        for p, (i, j) in enumerate(pairs[: opts.curve_pairs]):
            curve_rows.append(_curves(t.net, t.cfg, t.eval_fn, opts, tx, label,
                                      (arms[arm_index][i], arms[arm_index][j]), ms[i],
                                      {"none": ms[j], "WM": aligned["WM"][p]}, t.data, (t.x_eval, t.y_eval),
                                      t.reset, jax.random.fold_in(t.key, 7919 + 100 * arm_index + p), curve_plots,
                                      t.chunk))
    return curve_rows, curve_plots


def _soups(net, spec, jobs, key, path_eval, eval_data) -> list[dict[str, Any]]:
    """Per arm: the MergeMany soup (all seeds aligned to their consensus, averaged) against the
    plain average of the same seeds and the seeds' own accuracy."""
    out = []
    for label, arm_index, _, ms, _ in jobs:
        t = time.time()
        res = align.merge_many(spec, ms, jax.random.fold_in(key, 9000 + arm_index))
        plain = tree_lib.weighted_mean(tree_lib.stack(ms))
        ev = {name: jax.device_get(path_eval(v, *eval_data)) for name, v in (("plain", plain), ("merged", res.merged))}
        ends = [float(jax.device_get(path_eval(m, *eval_data))["accuracy"]) for m in ms]
        out.append({"arm": label, "models": len(ms), "iterations": res.iterations, "converged": res.converged,
                    "seconds": time.time() - t, "endpoint_accuracy_mean": float(np.mean(ends)),
                    "soup_accuracy": float(ev["plain"]["accuracy"]), "soup_loss": float(ev["plain"]["loss"]),
                    "merged_accuracy": float(ev["merged"]["accuracy"]), "merged_loss": float(ev["merged"]["loss"])})
    return out


def comparison_name(arm: str, method: str) -> str:
    """The row's name in the tables: ``"vanilla"``, ``"TNA-PFN 0.4"``, ``"WM"``, ``"TNA-PFN 0.4 + WM"``...

    Args:
      arm: how the endpoints were trained (``"vanilla"`` or ``"TNA-PFN <ratio>"``).
      method: the post-training step (``"none"``, ``"WM"``, ``"AM"``, ``"WM + REPAIR"``...).

    Returns:
      The method alone for vanilla endpoints, the arm alone without a method, else both.

    Examples:
      >>> comparison_name("vanilla", "WM + REPAIR"), comparison_name("TNA-PFN 0.4", "none")
      ('WM + REPAIR', 'TNA-PFN 0.4')
    """
    if method == "none":
        return arm
    return method if arm == "vanilla" else f"{arm} + {method}"


def _row(arm: str, method: str, per_pair: list[lmc.Barriers], dist: list[float]) -> dict[str, Any]:
    row: dict[str, Any] = {"name": comparison_name(arm, method), "arm": arm, "method": method,
                           "pairs": len(per_pair)}
    for key in ("accuracy_barrier", "loss_barrier", "interp_accuracy", "avg_endpoint_accuracy", "interp_loss"):
        row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([getattr(p, key) for p in per_pair])
    row["distance_mean"], row["distance_std"] = _mean_std(dist)
    return row


def _curves(net, cfg, eval_fn, opts, tx, label, pair, a, bs, data, eval_data, reset, key, plots,
            chunk) -> dict[str, Any]:
    ts = np.linspace(0.0, 1.0, int(opts.curve_points))
    out: dict[str, Any] = {"arm": label, "pair": list(pair)}
    for method, b in bs.items():
        line = align.evaluate_curve(eval_fn, align.init_curve(a, b, "polychain"), eval_data, ts, bn_reset=reset,
                                    chunk=chunk)
        curve = align.init_curve(a, b, opts.curve_kind)
        curve, hist = align.train_curve(net, curve, (data.x_train, data.y_train), key=key,
                                        epochs=int(opts.curve_epochs),
                                        batch_size=min(int(opts.curve_batch), int(data.x_train.shape[0])),
                                        num_t=int(opts.curve_num_t), optimizer=tx,
                                        steps_per_call=int(cfg.train.steps_per_call))
        ev = align.evaluate_curve(eval_fn, curve, eval_data, ts, bn_reset=reset, chunk=chunk)
        out[method] = {"line_avg_accuracy": line["avg_accuracy"], "line_min_accuracy": line["min_accuracy"],
                       "curve_avg_accuracy": ev["avg_accuracy"], "curve_min_accuracy": ev["min_accuracy"],
                       "curve_max_loss": ev["max_loss"], "train_loss_first": hist[0]["loss"],
                       "train_loss_last": hist[-1]["loss"]}
        for kind, e in (("line", line), (opts.curve_kind, ev)):
            entry = plots.setdefault(f"{label} · {method} · {kind}", {"x": ts.tolist(), "y": []})
            entry["y"].append(e["accuracy"].tolist())
    return out


def _curve_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        sel = [r for r in rows if r["arm"] == arm]
        entry: dict[str, Any] = {"arm": arm, "pairs": len(sel)}
        for method in ("none", "WM"):
            for key in ("line_avg_accuracy", "line_min_accuracy", "curve_avg_accuracy", "curve_min_accuracy"):
                entry[f"{method}_{key}_mean"], entry[f"{method}_{key}_std"] = _mean_std([r[method][key] for r in sel])
        out.append(entry)
    return out


def _pm(mean: float | None, std: float | None, scale: float = 100.0, digits: int = 1) -> str:
    return pm(mean, std, scale, digits)


def markdown(report: dict[str, Any]) -> str:
    """The report's tables as Markdown (the ``report.md`` of an ``align_compare`` run).

    Args:
      report: the ``report.json`` contents of an ``align_compare`` run (``{"tasks": {...}}``).

    Returns:
      Per task: endpoint accuracies, the barrier table (one row per comparison) and the curve
      table, as one Markdown string.

    Examples:
      >>> import json
      >>> markdown({"tasks": {}})
      ''
    """
    parts = []
    for name, t in report["tasks"].items():
        parts.append(f"## {name}: {t['model']['name']} on {t['data']['name']} "
                     f"({t['spec']['permutations']} permutations, BatchNorm: {t['model']['batch_norm']})\n")
        accs = ", ".join(f"{a['arm']} {_pm(a['test_accuracy_mean'], a['test_accuracy_std'])}" for a in t["arms"])
        parts.append(f"Endpoint test accuracy (%, mean ± sample std over {t['settings'].get('num_seeds', '?')} "
                     f"seeds): {accs}.\n")
        reset = (" BatchNorm statistics are reset on training data at every α (REPAIR rows: REPAIR "
                 "corrects the statistics itself)." if t["model"]["batch_norm"] else "")
        notes = "; ".join(dict.fromkeys(it.get("pairs_note", "the seed pairs") for it in t["wm_iterations"])) or "seed pairs"
        parts.append(f"Barriers on the {t['settings'].get('split', 'test')} split, mean ± sample std over {notes} "
                     "of seeds per arm. WM: weight matching (Git Re-Basin), AM: activation matching, STE: "
                     "straight-through estimator matching, each applied to the second model of each pair; "
                     f"REPAIR: applied at every α of the WM-aligned path.{reset}\n")
        head = ("| comparison | pairs | acc. barrier % | loss barrier | Interp. Acc. % (α=0.5) | "
                "Avg. Acc. % | ‖θ_A − Pθ_B‖/‖θ_A‖ |\n|---|---|---|---|---|---|---|")
        lines = [head]
        for r in t["rows"]:
            lines.append(f"| {r['name']} | {r['pairs']} | "
                         f"{_pm(r['accuracy_barrier_mean'], r['accuracy_barrier_std'])} | "
                         f"{_pm(r['loss_barrier_mean'], r['loss_barrier_std'], 1.0, 3)} | "
                         f"{_pm(r['interp_accuracy_mean'], r['interp_accuracy_std'])} | "
                         f"{_pm(r['avg_endpoint_accuracy_mean'], r['avg_endpoint_accuracy_std'])} | "
                         f"{_pm(r['distance_mean'], r['distance_std'], 1.0, 3)} |")
        parts.append("\n".join(lines) + "\n")
        lines = ["| arm | pairs | WM sweeps to converge | converged | seconds per match |", "|---|---|---|---|---|"]
        for it in t["wm_iterations"]:
            lines.append(f"| {it['arm']} | {it['pairs']} | {pm(it['iterations_mean'], it['iterations_std'], 1.0, 2)} "
                         f"({', '.join(str(i) for i in it['iterations'])}) | {it['converged']}/{it['pairs']} | "
                         f"{it['seconds_mean']:.2f} |")
        parts.append("\n".join(lines) + "\n")
        if t.get("soups"):
            lines = ["| arm | models | seeds' mean acc. % | average (unaligned) acc. % | MergeMany soup acc. % | "
                     "rounds |", "|---|---|---|---|---|---|"]
            for sp in t["soups"]:
                lines.append(f"| {sp['arm']} | {sp['models']} | {100 * sp['endpoint_accuracy_mean']:.1f} | "
                             f"{100 * sp['soup_accuracy']:.1f} | {100 * sp['merged_accuracy']:.1f} | "
                             f"{sp['iterations']} |")
            parts.append("\n".join(lines) + "\n")
        if t["curves"]:
            lines = ["| arm | pairs | endpoints | line avg / min acc. % | Bezier avg / min acc. % |",
                     "|---|---|---|---|---|"]
            for c in t["curves"]:
                for method, what in (("none", "unaligned"), ("WM", "WM-aligned")):
                    lines.append(
                        f"| {c['arm']} | {c['pairs']} | {what} | "
                        f"{_pm(c[f'{method}_line_avg_accuracy_mean'], c[f'{method}_line_avg_accuracy_std'])} / "
                        f"{_pm(c[f'{method}_line_min_accuracy_mean'], c[f'{method}_line_min_accuracy_std'])} | "
                        f"{_pm(c[f'{method}_curve_avg_accuracy_mean'], c[f'{method}_curve_avg_accuracy_std'])} / "
                        f"{_pm(c[f'{method}_curve_min_accuracy_mean'], c[f'{method}_curve_min_accuracy_std'])} |")
            parts.append("\n".join(lines) + "\n")
        sec = t["seconds"]
        phases = ", ".join(f"{k} {sec[k]:.0f}" for k in ("train", "matching", "paths", "repair", "merge", "curves")
                           if k in sec)
        parts.append(f"Seconds: {phases}; total {sec['total']:.0f} (wall), {sec.get('cpu', math.nan):.0f} CPU.\n")
    return "\n".join(parts)


@register("align_compare")
def align_compare(config: Any, workdir: str | None) -> dict[str, Any]:
    """Runs every task of ``config.align.tasks`` (see the module docstring); returns the report."""
    opts = check_align_options(config)
    names = list(opts.tasks.keys()) or ["main"]
    wanted = [t.strip() for t in str(opts.run).split(",") if t.strip()] or names
    t0 = time.time()
    report: dict[str, Any] = {"name": config.name, "kind": "align_compare", "tasks": {},
                              "devices": {"backend": jax.default_backend(), "count": jax.device_count()}}
    task_dirs = {name: workdir_path(workdir, name, f"align.tasks.{name}") if workdir else None for name in wanted}
    for name in wanted:
        cfg = task_config(config, name)
        task_dir = task_dirs[name]
        report["tasks"][name] = _run_task(name, cfg, opts, task_dir, print)
    report["seconds_total"] = time.time() - t0
    text = markdown(report)
    report["markdown"] = text
    print(text)
    if workdir:
        write_report(workdir, config, report, plots=lambda: _plots(workdir, report, opts))
    return report


def _plots(workdir: str, report: dict[str, Any], opts: Any) -> list[str]:
    paths = []
    for name, t in report["tasks"].items():
        notes = "; ".join(dict.fromkeys(it.get("pairs_note", "seed pairs") for it in t["wm_iterations"]))
        caption = f"Mean ± sample std over {notes or 'seed pairs'} of {t['settings']['num_seeds']} seeds per arm."
        paths.append(plotting.plot_lmc_paths(t["paths"], os.path.join(workdir, f"lmc_{name}.png"),
                                             title=f"{name}: {t['model']['name']} on {t['data']['name']}",
                                             caption=caption))
        if t["curve_paths"]:
            paths.append(plotting.plot_curves(t["curve_paths"], os.path.join(workdir, f"curves_{name}.png"),
                                              xlabel="t along the path", ylabel="test accuracy",
                                              title=f"{name}: line vs trained {opts.curve_kind} curve",
                                              caption=caption))
    return paths
