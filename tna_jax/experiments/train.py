"""The `"train"` kind: arms x seeds trained as one program (`tna_jax.training.fit`), then
pairwise LMC and fusion within each arm, a report and plots. `grid` and `layerwise` reuse its
pieces (`train_and_analyse`, `analyse_lmc`)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from tna_jax import chunking, distributed, evaluation, norm_stats
from tna_jax import config as config_lib
from tna_jax.experiments.registry import register
from tna_jax.report import count_compiles, markdown_table, mean_std, pm, write_report

__all__ = [
    "train_experiment", "Trained", "load_problem", "train_and_analyse", "write_train_outputs", "analyse_lmc",
    "lmc_stats", "choose_pairs", "statistics_note", "anchor_values_note", "anchor_report", "markdown_summary",
]


def choose_pairs(config: Any, n: int) -> tuple[list[tuple[int, int]], str]:
    """The seed pairs of an arm of n seeds that ``config.analysis`` asks for, and how to say so.

    Args:
      config: the experiment config (``analysis.pairs``, ``analysis.max_pairs``,
        ``analysis.pairs_seed``; absent fields take their defaults).
      n: the arm's seeds.

    Returns:
      ``(pairs, description)``: `tna_jax.lmc.select_pairs` and
      `tna_jax.lmc.describe_pairs` of them.

    Examples:
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.analysis.pairs = "disjoint"
      >>> choose_pairs(c, 10)
      ([(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)], '5 disjoint pairs')
    """
    from tna_jax import lmc

    a = config.analysis
    mode, seed = a.get("pairs", "all"), int(a.get("pairs_seed", 0))
    pairs = lmc.select_pairs(n, mode, int(a.max_pairs), seed)
    return pairs, lmc.describe_pairs(mode, len(pairs), n, seed)


def anchor_values_note(config: Any) -> str:
    """How anchored entries were initialised, for captions and tables.

    Args:
      config: the experiment config (``anchor.share_values``).

    Returns:
      ``"shared anchor values"`` (the same values in every seed, the paper's setting) or
      ``"per-model anchor values"``.

    Examples:
      >>> from tna_jax.config import default_config
      >>> anchor_values_note(default_config())
      'shared anchor values'
    """
    return "shared anchor values" if config.anchor.share_values else "per-model anchor values"


LMC_KEYS = ("loss_barrier", "accuracy_barrier", "avg_endpoint_accuracy", "interp_accuracy",
            "avg_endpoint_loss", "interp_loss")


def lmc_stats(eval_fn: Any, stacked: Any, x: Any, y: Any, *, pairs: list[tuple[int, int]], alphas: Any,
              chunk: int | None = None) -> dict[str, Any]:
    """Pairwise LMC of stacked models: ``<key>_mean``/``<key>_std`` (sample std, None for one pair;
    `mean_std`) over pairs for every key of `LMC_KEYS`, the per-pair barriers, the
    curves, and the fusion of all models.

    Args:
      eval_fn: ``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for one model
        (``evaluation.make_eval_fn``).
      stacked: the models' variables on a leading axis.
      x, y: the split the paths are evaluated on.
      pairs: the ``(i, j)`` index pairs (``lmc.all_pairs``).
      alphas: the interpolation coefficients.
      chunk: evaluate at most this many (pair, α) points at once (None: all).

    Returns:
      ``{"<key>_mean", "<key>_std" for key in LMC_KEYS, "per_pair": [...], "curve": {"alpha",
      "accuracy", "loss"} (lists, pairs x alphas), "fusion": the uniform soup of all models against them
      (``fusion.SoupResult.fusion_numbers``)}``.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):  # loss (w - 1)^2 - 1: convex, so no loss barrier; accuracy 1 near 0 and 2
      ...     loss = (v["w"] - 1.0) ** 2 - 1.0
      ...     return {"loss": loss, "accuracy": jnp.where(jnp.abs(loss) < 0.1, 1.0, 0.0)}
      >>> stats = lmc_stats(eval_fn, {"w": jnp.array([0.0, 2.0])}, jnp.zeros(1), jnp.zeros(1),
      ...                   pairs=[(0, 1)], alphas=jnp.linspace(0, 1, 3))
      >>> stats["accuracy_barrier_mean"], stats["loss_barrier_mean"], stats["curve"]["accuracy"]
      (1.0, 0.0, [[1.0, 0.0, 1.0]])
    """
    from tna_jax import fusion, lmc

    table = lmc.pairwise_barriers(eval_fn, stacked, (x, y), pairs=pairs, alphas=alphas, chunk=chunk)
    out: dict[str, Any] = {}
    for key in LMC_KEYS:
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std([getattr(p, key) for p in table.per_pair])
    out["per_pair"] = [p._asdict() for p in table.per_pair]
    out["curve"] = {"alpha": table.paths.alpha.tolist(), "accuracy": table.paths.accuracy.tolist(),
                    "loss": table.paths.loss.tolist()}
    out["fusion"] = fusion.uniform_soup(eval_fn, stacked, (x, y)).fusion_numbers()
    return out


def bn_reset_eval(config: Any, net: Any, eval_fn: Any, data: Any) -> Any | None:
    """``eval_fn`` with BatchNorm statistics reset from training data (None for nets without
    BatchNorm or with ``analysis.bn_reset`` off). Uses the first ``analysis.bn_reset_examples``
    training examples (0 = all) in batches of ``train.batch_size`` (the training batch size)."""

    if not (config.analysis.bn_reset and net.has_batch_stats):
        return None
    n = int(config.analysis.bn_reset_examples) or int(data.x_train.shape[0])
    x_reset = data.x_train[: min(n, int(data.x_train.shape[0]))]
    return norm_stats.with_bn_reset(net, eval_fn, x_reset, batch_size=min(int(config.train.batch_size), int(x_reset.shape[0])))


def analyse_lmc(config: Any, net: Any, result: Any, data: Any) -> dict[str, Any]:
    """Pairwise LMC between the seeds of each arm, and the fusion of all seeds of each arm.

    For nets with BatchNorm (and ``analysis.bn_reset``, the default) every arm is reported both
    ways: with the interpolated running statistics (top level) and with the statistics reset
    from training data at every α (``"bn_reset"``; :func:`tna_jax.norm_stats.with_bn_reset`).

    Args:
      config: the experiment config (``analysis.*``: split, α count, pair cap, chunk, BN reset).
      net: the model.
      result: the :class:`tna_jax.training.TrainResult` of the runs.
      data: the dataset on the device (:class:`tna_jax.data.DeviceData`).

    Returns:
      ``{arm label: {"runs": [...], and for arms with 2+ seeds the `lmc_stats` numbers
      (means and sample stds over the pairs), "pairs" (run indices), "pairs_note" (how they were
      chosen: ``config.analysis.pairs``, `choose_pairs`) and, with BN reset, "bn_reset"}}``.

    Examples:
      An arm with one seed has no pair, so nothing is evaluated (:func:`lmc_stats` shows the
      numbers an arm with 2+ seeds gets):

      >>> import jax.numpy as jnp, numpy as np
      >>> from tna_jax import models, training
      >>> from tna_jax import runs as runs_lib
      >>> from tna_jax.config import default_config
      >>> from tna_jax.data import Dataset, to_device
      >>> net = models.build({"name": "mlp", "depth": 0}, (1,), 2)
      >>> runs = [runs_lib.Run(0, 0, runs_lib.Arm("none", 0.0), 0), runs_lib.Run(1, 1, runs_lib.Arm("anchor", 0.4), 0)]
      >>> head = {"kernel": jnp.zeros((2, 1, 2)), "bias": jnp.zeros((2, 2))}
      >>> state = training.TrainState({"head": head}, {}, (), jnp.zeros(2, jnp.int32))
      >>> result = training.TrainResult(state, runs, [], {}, {}, None, 0.0, 0)
      >>> x, y = np.zeros((4, 1), np.float32), np.array([0, 0, 1, 1], np.int32)
      >>> analyse_lmc(default_config(), net, result, to_device(Dataset("toy", x, y, x, y, x, y, 2), normalize=False))
      {'vanilla': {'runs': [0]}, 'TNA-PFN 0.4': {'runs': [1]}}
    """
    from tna_jax import lmc

    eval_fn = evaluation.make_eval_fn(net, config.train.eval_batch_size)
    reset_fn = bn_reset_eval(config, net, eval_fn, data)
    x, y = data.split(config.analysis.split)
    alphas = lmc.default_alphas(config.analysis.num_alphas)
    chunk = int(config.analysis.chunk) or chunking.AUTO
    out: dict[str, Any] = {}
    arms: dict[int, list[int]] = {}
    for r in result.runs:
        arms.setdefault(r.arm_index, []).append(r.index)
    for idx in arms.values():
        label = result.runs[idx[0]].arm.label
        stacked = jax.tree.map(lambda v, idx=idx: v[np.asarray(idx)], result.state.variables())
        entry: dict[str, Any] = {"runs": idx}
        pairs, note = choose_pairs(config, len(idx))
        if pairs:
            entry.update(lmc_stats(eval_fn, stacked, x, y, pairs=pairs, alphas=alphas, chunk=chunk))
            entry["pairs"] = [[idx[i], idx[j]] for i, j in pairs]
            entry["pairs_note"] = note
            if reset_fn is not None:
                entry["bn_reset"] = lmc_stats(reset_fn, stacked, x, y, pairs=pairs, alphas=alphas, chunk=chunk)
        out[label] = entry
    return out


SUMMARY_COLUMNS = [("arm", "arm"), ("seeds", "seeds"), ("acc", "test acc %"), ("avg", "Avg. Acc. %"),
                   ("interp", "Interp. Acc. % (α=0.5)"), ("abar", "acc. barrier %"),
                   ("lbar", "loss barrier"), ("fused", "all-seed fusion acc %")]


def summary_row(label: str, seeds: Any, acc: str, lm: dict[str, Any]) -> dict[str, Any]:
    fusion = lm.get("fusion", {})
    return {
        "arm": label, "seeds": seeds, "acc": acc,
        "avg": pm(lm.get("avg_endpoint_accuracy_mean"), lm.get("avg_endpoint_accuracy_std")),
        "interp": pm(lm.get("interp_accuracy_mean"), lm.get("interp_accuracy_std")),
        "abar": pm(lm.get("accuracy_barrier_mean"), lm.get("accuracy_barrier_std")),
        "lbar": pm(lm.get("loss_barrier_mean"), lm.get("loss_barrier_std"), scale=1.0, digits=3),
        "fused": f"{fusion['fused_accuracy'] * 100:.1f}" if fusion else "—",
    }


def statistics_note(report: dict[str, Any]) -> str:
    """The sentence under a train table saying what its "±" are.

    Args:
      report: a train report (``arms``, optional ``lmc`` with ``pairs_note``, and ``anchor_values``,
        said when an arm has anchors).

    Returns:
      E.g. ``"Test accuracy: mean ± sample std over 10 seeds. LMC columns: mean ± sample std over
      5 disjoint pairs of seeds per arm. Anchors: shared anchor values."``

    Examples:
      >>> statistics_note({"arms": [{"seeds": 4}], "lmc": {"vanilla": {"pairs_note": "2 disjoint pairs"}}})
      'Test accuracy: mean ± sample std over 4 seeds. LMC columns: mean ± sample std over 2 disjoint pairs of seeds per arm.'
    """
    seeds = sorted({a["seeds"] for a in report.get("arms", [])})
    notes = list(dict.fromkeys(e["pairs_note"] for e in report.get("lmc", {}).values() if "pairs_note" in e))
    text = f"Test accuracy: mean ± sample std over {'/'.join(map(str, seeds)) or '?'} seeds."
    if notes:
        text += f" LMC columns: mean ± sample std over {'; '.join(notes)} of seeds per arm."
    if report.get("anchor_values") and any(a.get("method") == "anchor" for a in report.get("arms", [])):
        text += f" Anchors: {report['anchor_values']}."
    return text


def markdown_summary(report: dict[str, Any]) -> str:
    """The arms table of a train report: accuracy, LMC barriers and fusion, mean ± sample std over
    pairs (barriers) or seeds (accuracy), and a sentence saying which (`statistics_note`).
    Nets with BatchNorm get a second row per arm with the statistics reset at every α ("BN
    reset").

    Args:
      report: a train report (`train_and_analyse`).

    Returns:
      Markdown: the anchor line, the table and the statistics note.
    """
    rows = []
    for arm in report["arms"]:
        lm = report.get("lmc", {}).get(arm["arm"], {})
        acc = pm(arm["test_accuracy_mean"], arm["test_accuracy_std"])
        rows.append(summary_row(arm["arm"], arm["seeds"], acc, lm))
        if "bn_reset" in lm:
            rows.append(summary_row(f"{arm['arm']} (BN reset)", arm["seeds"], acc, lm["bn_reset"]))
    return anchor_line(report) + markdown_table(rows, SUMMARY_COLUMNS) + "\n\n" + statistics_note(report)


# The jitted training function(s) of tna_jax.training (one compile = the whole sweep is one program).
_STEP_FUNCTIONS = ("jit(run_chunk)", "jit(run_epoch)")


@dataclasses.dataclass
class Trained:
    """What :func:`train_and_analyse` returns: the report and the objects behind it.

    Attributes:
      report: the train report (JSON-ready dict).
      net: the model (``tna_jax.models.Net``).
      dataset: the host dataset (``tna_jax.data.Dataset``).
      result: the ``tna_jax.training.TrainResult`` of :func:`tna_jax.training.fit`.
      data: the dataset on the device (``tna_jax.data.DeviceData``).

    Examples:
      >>> trained = Trained(report={"name": "toy", "markdown": "| arm |"}, net=None, dataset=None, result=None,
      ...                   data=None)
      >>> trained.report["name"]
      'toy'
    """

    report: dict[str, Any]
    net: Any
    dataset: Any
    result: Any
    data: Any  # DeviceData


def load_problem(config: Any) -> tuple[Any, Any, Any]:
    """``(dataset, net, augment)`` from ``config.data`` and ``config.model``.

    Args:
      config: the experiment config.

    Returns:
      ``(dataset, net, augment)``: the loaded :class:`tna_jax.data.Dataset`, the model built for
      its input shape and class count, and ``augment(key, x)`` for ``data.augment="crop_flip"``
      (None otherwise).

    Raises:
      tna_jax.config.ConfigError: ``data.augment="crop_flip"`` on data that are not images,
        ``anchor.include``/``exclude`` patterns that select no weight of the model; and
        the errors of :func:`tna_jax.data.load` and :func:`tna_jax.models.build`.

    Examples:
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.data.source, c.data.num_samples, c.model.name = "synthetic", 200, "cnn"
      >>> c.data.synthetic.shape = (8, 8, 1)
      >>> dataset, net, augment = load_problem(c)
      >>> dataset.input_shape, dataset.sizes(), net.name, augment is None
      ((8, 8, 1), {'train': 144, 'val': 16, 'test': 40}, 'cnn', True)
      >>> c.data.synthetic.shape, c.data.augment, c.model.name = (32,), "crop_flip", "mlp"
      >>> load_problem(c)
      Traceback (most recent call last):
      ...
      tna_jax.config.schema.ConfigError: config.data.augment='crop_flip' needs images; synthetic has features.
    """
    from tna_jax import data as data_lib
    from tna_jax import models

    dataset = data_lib.load(config.data)
    net = models.build(config.model, dataset.input_shape, dataset.num_classes)
    if "anchor" in config:
        from tna_jax.optimizers import check_anchor_options

        check_anchor_options(config, net)
    augment = None
    if config.data.augment == "crop_flip":
        if dataset.kind != "image":
            raise config_lib.ConfigError(f"config.data.augment='crop_flip' needs images; {dataset.name} has "
                                         f"{dataset.kind}.")
        from tna_jax.data.augment import augment_images

        augment = augment_images
    return dataset, net, augment


def train_and_analyse(config: Any, workdir: str | None, *, lmc: bool | None = None) -> Trained:
    """Multi-seed training of every arm (resuming from `workdir`'s checkpoints), then the train
    report: per-arm accuracy, masks and (when ``lmc``, default ``config.analysis.lmc``) pairwise
    LMC and fusion. Writes nothing but what :func:`tna_jax.training.fit` writes.

    Args:
      config: the experiment config.
      workdir: the run directory (checkpoints, metrics), or None.
      lmc: run the LMC analysis (None: ``config.analysis.lmc``; needs at least 2 seeds).

    Returns:
      A :class:`Trained` with the report (``data``, ``model``, ``devices``, ``training``,
      ``arms``, ``runs``, ``mask``, ``lmc``, ``seconds_total``) and the objects behind it.

    Raises:
      tna_jax.config.ConfigError: see :func:`load_problem`; and the errors of
        :func:`tna_jax.training.fit` (``TrainingDiverged``, ``Preempted``, a bad batch size).

    Examples:
      A real run trains (``tests/test_training.py``); a config that cannot work stops before any:

      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.data.source, c.data.augment = "synthetic", "crop_flip"
      >>> train_and_analyse(c, None)
      Traceback (most recent call last):
      ...
      tna_jax.config.schema.ConfigError: config.data.augment='crop_flip' needs images; synthetic has features.
    """
    from tna_jax import data as data_lib
    from tna_jax import training

    t0 = time.time()
    dataset, net, augment = load_problem(config)
    with count_compiles() as compiles:
        result = training.fit(config, net, dataset, workdir=workdir, augment=augment)
    report: dict[str, Any] = {
        "name": config.name,
        "kind": "train",
        "data": {"name": dataset.name, "sizes": dataset.sizes(), "input_shape": list(dataset.input_shape),
                 "num_classes": dataset.num_classes},
        "model": {"name": net.name, "params": net.param_count(), "batch_norm": net.has_batch_stats,
                  "init": net.init_scheme},
        "devices": {"backend": jax.default_backend(), "count": jax.device_count(), "processes": jax.process_count()},
        "anchor_values": anchor_values_note(config),
        "statistics": {"std": "sample standard deviation (ddof=1) over seeds or seed pairs",
                       "pairs": config.analysis.get("pairs", "all"), "max_pairs": int(config.analysis.max_pairs),
                       "pairs_seed": int(config.analysis.get("pairs_seed", 0))},
        "training": {"seconds": result.seconds, "epochs": config.train.epochs, "resumed_from": result.resumed_from,
                     "runs": len(result.runs), "epoch_compiles": sum(n for f, n in compiles.items() if f in _STEP_FUNCTIONS)},
        "arms": training.summarize(result),
        "runs": [{**r.describe(), "test_accuracy": float(result.test["accuracy"][r.index]),
                  "test_loss": float(result.test["loss"][r.index]),
                  "val_accuracy": float(result.val["accuracy"][r.index])} for r in result.runs],
    }
    if result.mask is not None:
        from tna_jax import anchors

        report["mask"] = {r.arm.label: anchors.mask_summary(distributed.to_host(
                              jax.tree.map(lambda m, i=r.index: m[i], result.mask)))["overall"]
                          for r in result.runs if r.seed == 0}
        report["anchor"] = anchor_report(config, result)
    device_data = data_lib.to_device(dataset, normalize=config.data.normalize)
    if (config.analysis.lmc if lmc is None else lmc) and config.num_seeds >= 2:
        report["lmc"] = analyse_lmc(config, net, result, device_data)
    report["seconds_total"] = time.time() - t0
    return Trained(report=report, net=net, dataset=dataset, result=result, data=device_data)


def anchor_report(config: Any, result: Any) -> dict[str, Any]:
    """What a report says about the anchors: whether their values were shared across seeds,
    the mask-drawing scheme, the refresh period, and per arm whether every run's anchored
    entries still hold their values (`tna_jax.anchors.verify`).

    Args:
      config: the experiment config (`config.anchor`).
      result: the `TrainResult` of `fit`.

    Returns:
      `{"values": "shared" | "per-model", "mask_scheme", "refresh_every", "granularity",
      "verified": {arm label: bool}}`.
    """
    from tna_jax import anchors

    held = distributed.to_host(jax.vmap(anchors.verify)(result.state.params, result.state.opt_state))
    arms: dict[str, bool] = {}
    for run in result.runs:
        if run.arm.ratio > 0:
            arms[run.arm.label] = arms.get(run.arm.label, True) and bool(held[run.index])
    return {"values": "shared" if config.anchor.share_values else "per-model",
            "mask_scheme": anchors.MASK_SCHEME, "refresh_every": int(config.anchor.refresh_every),
            "granularity": config.anchor.granularity, "verified": arms}


def anchor_line(report: dict[str, Any]) -> str:
    """One Markdown line on the anchors of a train report ("" when it has none)."""
    a = report.get("anchor")
    if not a:
        return ""
    held = "hold their values in every run" if all(a["verified"].values()) else \
        "DO NOT all hold their values: " + ", ".join(k for k, v in a["verified"].items() if not v)
    refresh = f", a fresh mask every {a['refresh_every']} steps" if a.get("refresh_every") else ""
    return (f"Anchors: {a['values']} values across seeds, {a['granularity']} granularity{refresh}; "
            f"mask scheme `{a['mask_scheme']}`; anchored entries {held} (checked after training).\n\n")


def _sweep_rows(report: dict[str, Any], key: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for arm in report["arms"]:
        lm = report.get("lmc", {}).get(arm["arm"], {})
        lm = lm.get(key, {}) if key else lm
        if "interp_accuracy_mean" in lm:
            rows.append({"method": arm["method"], "ratio": arm["ratio"], **{k: v for k, v in lm.items()
                                                                             if k.endswith(("_mean", "_std"))}})
    return rows


def write_train_outputs(config: Any, workdir: str, trained: Trained) -> None:
    """``report.json``, ``report.md`` and the plots of a train report: ``lmc_paths.png`` (the
    arms of ``analysis.plot_ratios``, or all), and for ratio sweeps ``ratio_sweep.png`` (the
    paper's Figure 2; ``ratio_sweep_bn_reset.png`` too for BatchNorm nets).

    Args:
      config: the experiment config (``analysis.plots``, ``analysis.plot_ratios``, the sweep).
      workdir: the run directory.
      trained: what :func:`train_and_analyse` returned, its report with a ``markdown`` table.

    Examples:
      >>> import os, tempfile
      >>> from tna_jax.config import default_config
      >>> workdir = tempfile.mkdtemp()
      >>> trained = Trained(report={"name": "toy", "arms": [], "markdown": "| arm |"}, net=None, dataset=None,
      ...                   result=None, data=None)
      >>> write_train_outputs(default_config(), workdir, trained)  # no "lmc" in the report: no plots
      >>> sorted(os.listdir(workdir)), open(os.path.join(workdir, "report.md")).read().splitlines()
      (['report.json', 'report.md'], ['# experiment', '', '| arm |'])
    """
    report = trained.report
    write_report(workdir, config, report, plots=(lambda: _train_plots(config, workdir, trained))
                 if "lmc" in report else None)


def _train_plots(config: Any, workdir: str, trained: Trained) -> list[str]:
    from tna_jax import plotting

    report, paths = trained.report, []
    sweep = bool(len(config.sweep.anchor_ratios) or len(config.sweep.prune_ratios))
    title = f"{config.name}: {trained.net.name} on {trained.dataset.name}"
    if "anchor" in report:
        title += f" ({anchor_values_note(config)})"
    shown = {float(r) for r in config.analysis.plot_ratios}
    arms = {a["arm"]: a for a in report["arms"]}
    curves = {}
    for label, e in report["lmc"].items():
        if "curve" not in e or (shown and float(arms[label]["ratio"]) not in shown):
            continue
        curves[label] = e["curve"]
        if "bn_reset" in e:
            curves[f"{label} (BN reset)"] = e["bn_reset"]["curve"]
    notes = "; ".join(dict.fromkeys(e["pairs_note"] for e in report["lmc"].values() if "pairs_note" in e))
    setting = (f"{config.num_seeds} seeds per arm; {anchor_values_note(config)}; model.init={trained.net.init_scheme}; "
               f"{config.analysis.split} split")
    if curves:
        paths.append(plotting.plot_lmc_paths(curves, os.path.join(workdir, "lmc_paths.png"), title=title,
                                             caption=f"Lines: mean, bands: ± sample std over {notes}. {setting}."))
    if sweep:
        caption = (f"Points: mean over {notes}; error bars: ± sample std of Interp. Acc.; shaded: the accuracy "
                   f"barrier (Avg. Acc. − Interp. Acc.). {setting}.")
        paths.append(plotting.plot_ratio_sweep(_sweep_rows(report), os.path.join(workdir, "ratio_sweep.png"),
                                               title=title, caption=caption))
        if trained.net.has_batch_stats and _sweep_rows(report, "bn_reset"):
            paths.append(plotting.plot_ratio_sweep(_sweep_rows(report, "bn_reset"),
                                                   os.path.join(workdir, "ratio_sweep_bn_reset.png"),
                                                   title=f"{title} (BN reset)", caption=caption))
    return paths


@register("train")
def train_experiment(config: Any, workdir: str | None) -> dict[str, Any]:
    """Multi-seed training of every arm, then pairwise LMC and fusion within each arm.

    The ``"train"`` kind: :func:`train_and_analyse`, the arms table (``report["markdown"]``,
    printed) and, with a workdir, :func:`write_train_outputs`.

    Args:
      config: the experiment config.
      workdir: the run directory, or None to write nothing.

    Returns:
      The train report (see :func:`train_and_analyse`) with its ``markdown`` table.

    Raises:
      tna_jax.config.ConfigError: see :func:`train_and_analyse`.

    Examples:
      ``python train.py --config configs/quickstart.py --workdir runs/quick`` runs this kind; a
      config that cannot work stops before training:

      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.data.source, c.data.augment = "synthetic", "crop_flip"
      >>> from tna_jax.experiments import KINDS
      >>> KINDS["train"] is train_experiment
      True
      >>> train_experiment(c, None)
      Traceback (most recent call last):
      ...
      tna_jax.config.schema.ConfigError: config.data.augment='crop_flip' needs images; synthetic has features.
    """
    trained = train_and_analyse(config, workdir)
    report = trained.report
    report["markdown"] = markdown_summary(report)
    if distributed.is_primary():  # under jax.distributed, process 0 prints and writes
        print(report["markdown"])
        if workdir:
            write_train_outputs(config, workdir, trained)
    return report
