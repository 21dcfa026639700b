"""``kind="layerwise"``: layer-wise LMC barriers with and without anchors (Adilova et al., 2024).

Trains the arms of the config exactly like the "train" kind (by default plain training and
TNA-PFN at ``anchor.ratio``, several seeds each, in one program), reports their full LMC, and
then for every pair of seeds of each arm runs :func:`tna_jax.lmc.layerwise_lmc` in each mode of
``layerwise.modes``: one weight layer at a time ("single"), cumulatively from the input
("from_input") and from the output ("from_output"). Barriers are mean ± sample std over the
seed pairs of ``analysis.pairs`` (the same pairs as the full-model LMC; the tables say which).
Nets with BatchNorm are also reported with the statistics reset at every α.

Config section ``layerwise``::

    c.kind = "layerwise"
    c.layerwise.modes = ("single", "from_input", "from_output")
    c.layerwise.groups = ""   # "" = one group per weight layer; else comma-separated regexes

Writes ``report.json``, ``report.md`` (one table per mode) and ``layerwise_<mode>_<metric>.png``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from tna_jax import chunking, evaluation, lmc
from tna_jax import config as config_lib
from tna_jax import report as report_lib
from tna_jax.experiments import registry
from tna_jax.experiments import train as train_kind

__all__ = ["layerwise_experiment", "layerwise_options", "aggregate_pairs"]

_KEYS = ("modes", "groups")


def layerwise_options(config: Any) -> tuple[tuple[str, ...], list[str] | None]:
    """``(modes, groups)`` from ``config.layerwise`` (defaults: all modes, one group per layer).

    Args:
      config: the experiment config (its ``layerwise`` section may be missing).

    Returns:
      ``(modes, groups)``: a tuple of ``lmc.LAYERWISE_MODES`` entries, and the group regexes
      (None: one group per weight layer).

    Raises:
      ConfigError: an unknown field or mode, or groups that are not a string.

    Examples:
      >>> import ml_collections
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> layerwise_options(c)
      (('single', 'from_input', 'from_output'), None)
      >>> c.layerwise = ml_collections.ConfigDict({"modes": ("single",), "groups": "dense_0, head"})
      >>> layerwise_options(c)
      (('single',), ['dense_0', 'head'])
      >>> c.layerwise.modes = ("backwards",)
      >>> layerwise_options(c)
      Traceback (most recent call last):
      ...
      tna_jax.config.schema.ConfigError: config.layerwise.modes must be a non-empty tuple of ('single', 'from_input', 'from_output'); got ('backwards',).
    """
    section = config.get("layerwise") if hasattr(config, "get") else None
    section = section if section is not None else {}
    for key in section.keys():
        if key not in _KEYS:
            raise config_lib.ConfigError(f"config.layerwise.{key} is not a known field; allowed: {_KEYS}.")
    modes = section.get("modes", lmc.LAYERWISE_MODES)
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes or any(m not in lmc.LAYERWISE_MODES for m in modes):
        raise config_lib.ConfigError(f"config.layerwise.modes must be a non-empty tuple of {lmc.LAYERWISE_MODES}; "
                                     f"got {modes!r}.")
    groups = section.get("groups", "")
    if not isinstance(groups, str):
        raise config_lib.ConfigError(f"config.layerwise.groups must be a string of comma-separated regexes "
                                     f"('' = one group per weight layer); got {groups!r}.")
    patterns = [g.strip() for g in groups.split(",") if g.strip()]
    return modes, (patterns or None)


def aggregate_pairs(results: list[lmc.LayerwiseLMC]) -> dict[str, Any]:
    """Mean ± sample std (ddof=1; None for one pair) over pairs of `tna_jax.lmc.layerwise_lmc`
    outputs (same groups).

    Args:
      results: one ``layerwise_lmc`` output per seed pair, all over the same groups.

    Returns:
      ``{"groups", "pairs", "<b>_mean", "<b>_std", "<b>_per_pair" for b in (loss_barrier,
      accuracy_barrier), "interp_accuracy_mean", "interp_loss_mean"}`` (lists over groups).

    Examples:
      >>> import numpy as np
      >>> group = lmc.Barriers(*[0.0] * 8)._replace(interp_accuracy=0.5, interp_loss=1.0)
      >>> def pair(acc_barriers):
      ...     return lmc.LayerwiseLMC(mode="single", groups=["dense_0", "head"], members=[], paths=None,
      ...                             per_group=[group] * 2, loss_barrier=np.zeros(2),
      ...                             accuracy_barrier=np.array(acc_barriers))
      >>> out = aggregate_pairs([pair([0.1, 0.0]), pair([0.3, 0.02])])
      >>> out["pairs"], [round(v, 3) for v in out["accuracy_barrier_mean"]], [round(v, 4) for v in out["accuracy_barrier_std"]]
      (2, [0.2, 0.01], [0.1414, 0.0141])
    """
    out: dict[str, Any] = {"groups": results[0].groups, "pairs": len(results)}
    for key in ("loss_barrier", "accuracy_barrier"):
        vals = np.stack([getattr(r, key) for r in results])  # (pairs, groups)
        out[f"{key}_mean"] = vals.mean(0).tolist()
        out[f"{key}_std"] = vals.std(0, ddof=1).tolist() if len(results) >= 2 else [None] * vals.shape[1]
        out[f"{key}_per_pair"] = vals.tolist()
    for key in ("interp_accuracy", "interp_loss"):
        vals = np.array([[getattr(g, key) for g in r.per_group] for r in results])
        out[f"{key}_mean"] = vals.mean(0).tolist()
    return out


def _markdown(report: dict[str, Any]) -> str:
    parts = []
    lw = report["layerwise"]
    arms = list(lw)
    for mode in report["modes"]:
        groups = lw[arms[0]][mode]["groups"]
        rows = []
        for gi, group in enumerate(groups):
            row = {"group": f"`{group}`"}
            for arm in arms:
                m = lw[arm][mode]
                row[f"{arm}/acc"] = report_lib.pm(m["accuracy_barrier_mean"][gi], m["accuracy_barrier_std"][gi])
                row[f"{arm}/loss"] = report_lib.pm(m["loss_barrier_mean"][gi], m["loss_barrier_std"][gi], 1.0, 3)
            rows.append(row)
        full = {"group": "**full model (LMC)**"}
        for arm in arms:
            f = report["train"]["lmc"].get(arm.replace(" (BN reset)", ""), {})
            f = f.get("bn_reset", {}) if arm.endswith("(BN reset)") else f
            full[f"{arm}/acc"] = report_lib.pm(f.get("accuracy_barrier_mean"), f.get("accuracy_barrier_std"))
            full[f"{arm}/loss"] = report_lib.pm(f.get("loss_barrier_mean"), f.get("loss_barrier_std"), 1.0, 3)
        rows.append(full)
        cols = [("group", "layers interpolated" if mode != "single" else "layer")]
        for arm in arms:
            cols += [(f"{arm}/acc", f"{arm}: acc. barrier %"), (f"{arm}/loss", f"{arm}: loss barrier")]
        note = lw[arms[0]][mode].get("pairs_note")
        parts.append(f"### mode `{mode}`\n\n" + report_lib.markdown_table(rows, cols)
                     + (f"\n\nMean ± sample std over {note} of seeds per arm." if note else ""))
    return "\n\n".join(parts)


def _plots(config: Any, workdir: str, report: dict[str, Any]) -> list[str]:
    from tna_jax import plotting

    files = []
    lw = report["layerwise"]
    for mode in report["modes"]:
        note = next(iter(lw.values()))[mode].get("pairs_note", "seed pairs")
        caption = (f"Mean ± sample std over {note} of {config.num_seeds} seeds per arm; "
                   f"{train_kind.anchor_values_note(config)}; {config.analysis.split} split.")
        for key, ylabel in (("loss_barrier", "loss barrier"), ("accuracy_barrier", "accuracy barrier")):
            path = os.path.join(workdir, f"layerwise_{mode}_{key}.png")
            if mode == "single":
                rows = [{"group": g, "arm": arm, "value": m[f"{key}_mean"][i], "std": m[f"{key}_std"][i]}
                        for arm, by_mode in lw.items() for m in [by_mode[mode]] for i, g in enumerate(m["groups"])]
                files.append(plotting.plot_barrier_bars(rows, path, group_key="group", series_key="arm",
                                                        value_key="value", std_key="std", ylabel=ylabel,
                                                        title=f"{config.name}: {ylabel}, one layer at a time",
                                                        caption=caption))
            else:
                series = {arm: {"x": list(range(1, len(by_mode[mode]["groups"]) + 1)),
                                "y": by_mode[mode][f"{key}_mean"], "std": by_mode[mode][f"{key}_std"]}
                          for arm, by_mode in lw.items()}
                where = "input" if mode == "from_input" else "output"
                files.append(plotting.plot_curves(series, path, xlabel=f"layers interpolated (from the {where})",
                                                  ylabel=ylabel, title=f"{config.name}: cumulative from the {where}",
                                                  caption=caption))
    return files


@registry.register("layerwise")
def layerwise_experiment(config: Any, workdir: str | None) -> dict[str, Any]:
    """Trains the arms, then layer-wise LMC between the seeds of each arm in every mode.

    Args:
      config: a ``kind="layerwise"`` config (at least 2 seeds).
      workdir: the run directory (checkpoints, ``report.json``, ``report.md``, plots), or None.

    Returns:
      ``{"name", "kind": "layerwise", "modes", "layer_order", "train": the train report,
      "layerwise": {arm: {mode: aggregate_pairs(...) plus "members" and "pairs_note"}}, "markdown",
      timings}``.

    Raises:
      ConfigError: see :func:`layerwise_options`; fewer than 2 seeds (both before training); and
        the errors of :func:`tna_jax.experiments.train.train_and_analyse`.

    Examples:
      ``python train.py --config configs/layerwise.py --workdir runs/layerwise`` runs it; with one
      seed there is no pair, which is refused before training:

      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.kind, c.num_seeds = "layerwise", 1
      >>> layerwise_experiment(c, None)
      Traceback (most recent call last):
      ...
      tna_jax.config.schema.ConfigError: config.num_seeds must be >= 2 for kind='layerwise' (pairs of seeds); got 1.
    """
    from tna_jax import lmc

    modes, groups = layerwise_options(config)
    if config.num_seeds < 2:
        raise config_lib.ConfigError(f"config.num_seeds must be >= 2 for kind='layerwise' (pairs of seeds); "
                                     f"got {config.num_seeds}.")
    t0 = time.time()
    trained = train_kind.train_and_analyse(config, workdir, lmc=True)
    net, result, data = trained.net, trained.result, trained.data
    eval_fn = evaluation.make_eval_fn(net, config.train.eval_batch_size)
    evals = {"": eval_fn}
    reset_fn = train_kind.bn_reset_eval(config, net, eval_fn, data)
    if reset_fn is not None:
        evals[" (BN reset)"] = reset_fn
    x, y = data.split(config.analysis.split)
    alphas = lmc.default_alphas(config.analysis.num_alphas)
    chunk = int(config.analysis.chunk) or chunking.AUTO
    order = net.layer_order()
    arms: dict[int, list[int]] = {}
    for r in result.runs:
        arms.setdefault(r.arm_index, []).append(r.index)
    layerwise: dict[str, Any] = {}
    t1 = time.time()
    with report_lib.count_compiles() as compiles:
        for idx in arms.values():
            label = result.runs[idx[0]].arm.label
            variables = result.state.variables()
            pairs, note = train_kind.choose_pairs(config, len(idx))
            for suffix, fn in evals.items():
                by_mode = {}
                for mode in modes:
                    outs = []
                    for i, j in pairs:
                        a = jax.tree.map(lambda v, k=idx[i]: v[k], variables)
                        b = jax.tree.map(lambda v, k=idx[j]: v[k], variables)
                        outs.append(lmc.layerwise_lmc(fn, a, b, (x, y), groups=groups, alphas=alphas, mode=mode,
                                                      chunk=chunk, layer_order=order))
                    by_mode[mode] = aggregate_pairs(outs)
                    by_mode[mode]["members"] = outs[0].members
                    by_mode[mode]["pairs_note"] = note
                layerwise[label + suffix] = by_mode
    train_report = trained.report
    train_report["markdown"] = train_kind.markdown_summary(train_report)
    report = {"name": config.name, "kind": "layerwise", "modes": list(modes), "layer_order": order,
              "train": train_report, "layerwise": layerwise,
              "layerwise_seconds": time.time() - t1,
              "layerwise_compiles": {k: v for k, v in compiles.items() if "compute" in k},
              "seconds_total": time.time() - t0}
    text = "## training and full-model LMC\n\n" + train_report["markdown"] + "\n\n## layer-wise LMC\n\n" + _markdown(report)
    report["markdown"] = text
    print(text)
    if workdir:
        report_lib.write_report(workdir, config, report, plots=lambda: _plots(config, workdir, report))
    return report
