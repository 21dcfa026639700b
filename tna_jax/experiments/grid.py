"""``kind="grid"``: the train experiment over model variants of different shapes, one table.

Models of different depth, width or architecture cannot share one stacked pytree, so a grid
loops over *variants*: each is the base config with some fields overridden, trained and
analysed by the "train" kind (:func:`tna_jax.experiments.train.train_and_analyse`) in its own
sub-workdir ``<workdir>/variants/<name>`` (checkpoints, metrics, its own report). A finished
variant whose config is unchanged is not trained again, so rerunning the command resumes the
grid. The grid then aggregates one row per (variant, arm) into ``report.json`` / ``report.md``
and plots the barriers: against ``x`` for variants that name an ``axis`` (the paper's Figure 4:
depth and width) and as grouped bars for the others (Figure 5: architectures).

Config section ``grid``::

    c.kind = "grid"
    c.grid.variants = ml_collections.ConfigDict({
        "depth1": {"axis": "depth", "x": 1, "set": {"model": {"name": "mlp", "depth": 1, "width": 128}}},
        "cnn": {"label": "CNN", "set": {"model": {"name": "cnn"}, "optimizer": {"learning_rate": 0.02}}},
    })

``set`` holds config overrides; a ``model`` entry replaces the whole model section (model fields
differ per architecture) except ``model.init``, which every variant takes from the base config
unless its ``model`` names one; other sections are updated field by field. ``axis`` (optional) and
``x`` put the variant on a curve; ``label`` names it in tables (default: its key). Variants
run and are listed in key order (``ml_collections`` sorts keys): prefix keys with a number
(``"1_mlp"``, ``"2_cnn"``) to choose the order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from tna_jax import checkpoint as ckpt_lib
from tna_jax import config as config_lib
from tna_jax import distributed
from tna_jax import report as report_lib
from tna_jax import workdir as workdir_lib
from tna_jax.experiments import registry
from tna_jax.experiments import train as train_kind

__all__ = ["grid_experiment", "variant_configs", "grid_rows", "GRID_COLUMNS"]

_VARIANT_KEYS = ("axis", "x", "label", "set")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _as_dict(node: Any) -> dict[str, Any]:
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else dict(node)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any], prefix: str = "") -> None:
    for key, value in overrides.items():
        if prefix == "" and key == "model":
            # Another architecture: its own fields only, but the base's init ("flax" / "torch") is kept:
            # it is a protocol choice for the whole grid, not a field of one architecture.
            kept = {"init": base["model"]["init"]} if "init" in base.get("model", {}) else {}
            base["model"] = {**kept, **dict(value)}
        elif isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            _merge(base[key], value, f"{prefix}{key}.")
        else:
            base[key] = value


def variant_configs(config: Any) -> list[tuple[str, dict[str, Any], ml_collections.ConfigDict]]:
    """``[(name, variant spec, train config), ...]`` from ``config.grid.variants``, validated.

    Args:
      config: a ``kind="grid"`` config with a ``grid.variants`` section (see the module docstring).

    Returns:
      One ``(name, spec, train config)`` per variant in key order; each train config is the base
      config with the variant's ``set`` applied, ``kind="train"`` and ``name="<name>/<variant>"``.

    Raises:
      ConfigError: no variants, a bad variant name or key, a non-numeric ``x``, or an override
        that makes an invalid train config (the message names the variant and the field).

    Examples:
      >>> import ml_collections
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.kind = "grid"
      >>> c.grid = ml_collections.ConfigDict({"variants": {
      ...     "depth_1": {"axis": "depth", "x": 1, "set": {"model": {"name": "mlp", "depth": 1}}},
      ...     "depth_3": {"axis": "depth", "x": 3, "set": {"model": {"name": "mlp", "depth": 3}, "num_seeds": 2}}}})
      >>> [(name, sub.name, sub.model.depth, sub.num_seeds) for name, _, sub in variant_configs(c)]
      [('depth_1', 'experiment/depth_1', 1, 4), ('depth_3', 'experiment/depth_3', 3, 2)]
      >>> c.grid.variants.depth_1.colour = "red"
      >>> variant_configs(c)
      Traceback (most recent call last):
      ...
      tna_jax.config.schema.ConfigError: config.grid.variants.depth_1.colour is not a known field; allowed: ('axis', 'x', 'label', 'set').
    """
    grid = config.get("grid") if hasattr(config, "get") else None
    if grid is None or "variants" not in grid:
        raise config_lib.ConfigError("config.grid.variants must hold at least one variant for kind='grid'; got none.")
    for key in grid.keys():
        if key != "variants":
            raise config_lib.ConfigError(f"config.grid.{key} is not a known field (grid has only 'variants').")
    variants = _as_dict(grid.variants)
    if not variants:
        raise config_lib.ConfigError("config.grid.variants must hold at least one variant; got an empty mapping.")
    base = _as_dict(config)
    base.pop("grid", None)
    base["kind"] = "train"
    out = []
    for name, spec in variants.items():
        if not _NAME.match(str(name)) or str(name) in (".", ".."):
            raise config_lib.ConfigError(f"config.grid.variants key {name!r} must use only letters, digits, '_', '.' "
                                         "and '-' (it names a sub-directory).")
        if not isinstance(spec, Mapping):
            raise config_lib.ConfigError(f"config.grid.variants.{name} must be a mapping with keys {_VARIANT_KEYS}; "
                                         f"got {spec!r}.")
        for key in spec:
            if key not in _VARIANT_KEYS:
                raise config_lib.ConfigError(f"config.grid.variants.{name}.{key} is not a known field; allowed: "
                                             f"{_VARIANT_KEYS}.")
        x = spec.get("x")
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
            raise config_lib.ConfigError(f"config.grid.variants.{name}.x must be a number; got {x!r}.")
        if spec.get("axis") and x is None:
            raise config_lib.ConfigError(f"config.grid.variants.{name} names axis {spec['axis']!r} but no x.")
        merged = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
        merged = ml_collections.ConfigDict(merged).to_dict()  # deep copy
        _merge(merged, spec.get("set", {}) or {})
        merged["name"] = f"{config.name}/{name}"
        sub = ml_collections.ConfigDict(merged)
        try:
            config_lib.validate(sub)
        except config_lib.ConfigError as err:
            raise config_lib.ConfigError(f"config.grid.variants.{name}: {err}") from None
        out.append((str(name), dict(spec), sub))
    return out


def _load_finished(sub: Any, subdir: str) -> dict[str, Any] | None:
    report_path = os.path.join(subdir, "report.json")
    config_path = os.path.join(subdir, "config.json")
    if not (os.path.exists(report_path) and os.path.exists(config_path)):
        return None
    try:
        if ckpt_lib.read_json(config_path) != workdir_lib.config_dict(sub):
            return None
        return ckpt_lib.read_json(report_path)
    except ValueError:
        return None


def grid_rows(name: str, spec: Mapping[str, Any], report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per arm (and per arm with BN reset) of a variant's train report.

    Args:
      name: the variant's key.
      spec: its spec (``label``, ``axis``, ``x``).
      report: its train report (:func:`tna_jax.experiments.train.train_experiment`).

    Returns:
      Dicts with the variant, arm, model, parameter count, seeds, test accuracy and, for every key
      of ``train_kind.LMC_KEYS``, ``<key>_mean``/``<key>_std`` (means and sample stds over the
      arm's seed pairs; NaN when the arm has no LMC), ``pairs`` and ``pairs_note`` (how the pairs
      were chosen, ``analysis.pairs``).

    Examples:
      >>> report = {"arms": [{"arm": "vanilla", "method": "none", "ratio": 0.0, "test_accuracy_mean": 0.98,
      ...                     "test_accuracy_std": 0.004}],
      ...           "lmc": {"vanilla": {"accuracy_barrier_mean": 0.143, "accuracy_barrier_std": 0.044,
      ...                               "per_pair": [{}, {}, {}]}},
      ...           "model": {"name": "mlp", "params": 26122}, "training": {"seconds": 12.0}}
      >>> row, = grid_rows("1_mlp", {"label": "MLP"}, report)
      >>> row["label"], row["arm"], row["accuracy_barrier_mean"], row["pairs"], row["loss_barrier_mean"]
      ('MLP', 'vanilla', 0.143, 3, nan)
    """
    rows = []
    for arm in report["arms"]:
        lm = report.get("lmc", {}).get(arm["arm"], {})
        for suffix, stats in (("", lm), (" (BN reset)", lm.get("bn_reset"))):
            if stats is None or (suffix and not stats):
                continue
            row = {"variant": name, "label": spec.get("label") or name, "axis": spec.get("axis", ""),
                   "x": spec.get("x"), "arm": arm["arm"] + suffix, "method": arm["method"], "ratio": arm["ratio"],
                   "bn_reset": bool(suffix), "model": report["model"]["name"], "params": report["model"]["params"],
                   "test_accuracy_mean": arm["test_accuracy_mean"], "test_accuracy_std": arm["test_accuracy_std"],
                   "train_seconds": report["training"]["seconds"]}
            for key in train_kind.LMC_KEYS:
                row[f"{key}_mean"] = stats.get(f"{key}_mean", float("nan"))
                row[f"{key}_std"] = stats.get(f"{key}_std", float("nan"))
            row["pairs"] = len(stats.get("per_pair", []))
            row["pairs_note"] = lm.get("pairs_note")
            row["seeds"] = arm.get("seeds")
            rows.append(row)
    return rows


GRID_COLUMNS = [("label", "variant"), ("arm", "arm"), ("params", "params"), ("acc", "test acc %"),
                ("avg", "Avg. Acc. %"), ("interp", "Interp. Acc. %"), ("abar", "acc. barrier %"),
                ("lbar", "loss barrier"), ("pairs", "pairs")]


def _markdown(rows: list[dict[str, Any]]) -> str:
    pm = report_lib.pm
    shown = [{**r, "acc": pm(r["test_accuracy_mean"], r["test_accuracy_std"]),
              "avg": pm(r["avg_endpoint_accuracy_mean"], r["avg_endpoint_accuracy_std"]),
              "interp": pm(r["interp_accuracy_mean"], r["interp_accuracy_std"]),
              "abar": pm(r["accuracy_barrier_mean"], r["accuracy_barrier_std"]),
              "lbar": pm(r["loss_barrier_mean"], r["loss_barrier_std"], scale=1.0, digits=3)} for r in rows]
    seeds = sorted({r["seeds"] for r in rows if r.get("seeds")})
    notes = list(dict.fromkeys(r["pairs_note"] for r in rows if r.get("pairs_note")))
    note = (f"Test accuracy: mean ± sample std over {'/'.join(map(str, seeds)) or '?'} seeds; LMC columns: "
            f"mean ± sample std over {'; '.join(notes) or 'the pairs in the last column'} of seeds per arm.")
    return report_lib.markdown_table(shown, GRID_COLUMNS) + "\n\n" + note


def _plots(config: Any, workdir: str, rows: list[dict[str, Any]]) -> list[str]:
    from tna_jax import plotting

    files = []
    notes = "; ".join(dict.fromkeys(r["pairs_note"] for r in rows if r.get("pairs_note"))) or "seed pairs"
    caption = (f"Mean ± sample std over {notes} of seeds per arm; {train_kind.anchor_values_note(config)}; "
               f"model.init={config.model.get('init', 'flax')} unless a variant sets it.")
    axes = list(dict.fromkeys(r["axis"] for r in rows if r["axis"]))
    for axis in axes:
        for key, ylabel in (("accuracy_barrier", "accuracy barrier"), ("loss_barrier", "loss barrier")):
            series = {}
            for arm in dict.fromkeys(r["arm"] for r in rows if r["axis"] == axis):
                sel = sorted([r for r in rows if r["axis"] == axis and r["arm"] == arm], key=lambda r: r["x"])
                series[arm] = {"x": [r["x"] for r in sel], "y": [r[f"{key}_mean"] for r in sel],
                               "std": [r[f"{key}_std"] for r in sel]}
            xs = [r["x"] for r in rows if r["axis"] == axis]
            # Axes spanning a factor >= 8 of positive values (widths) are drawn on a log2 scale.
            scale = "log2" if min(xs) > 0 and max(xs) / min(xs) >= 8 else "linear"
            path = os.path.join(workdir, f"{key}_vs_{re.sub(r'[^A-Za-z0-9_.-]+', '_', axis)}.png")
            files.append(plotting.plot_curves(series, path, xlabel=axis, ylabel=ylabel, xscale=scale,
                                              title=f"{config.name}: {ylabel} vs {axis}", caption=caption))
    flat = [r for r in rows if not r["axis"]]
    if flat:
        for key, ylabel in (("accuracy_barrier", "accuracy barrier"), ("loss_barrier", "loss barrier")):
            path = os.path.join(workdir, f"{key}_bars.png")
            files.append(plotting.plot_barrier_bars(flat, path, group_key="label", series_key="arm",
                                                    value_key=f"{key}_mean", std_key=f"{key}_std", ylabel=ylabel,
                                                    title=f"{config.name}: {ylabel}", caption=caption))
    return files


@registry.register("grid")
def grid_experiment(config: Any, workdir: str | None) -> dict[str, Any]:
    """Trains and analyses every variant of ``config.grid.variants``; one aggregated report.

    Each variant runs the ``"train"`` kind in ``<workdir>/variants/<name>``; a variant whose
    ``report.json`` exists there with the same config is reused, so a rerun resumes the grid.

    Args:
      config: a ``kind="grid"`` config.
      workdir: the grid's directory (``report.json``, ``report.md``, the plots, ``variants/``), or
        None to write nothing.

    Returns:
      ``{"name", "kind": "grid", "rows": grid_rows of every variant, "variants": their reports
      without per-run details, "markdown", "seconds_total", "seconds_variants"[, "plots"]}``.

    Raises:
      ConfigError: see :func:`variant_configs` (checked before anything trains).

    Examples:
      ``python train.py --config configs/lmc_depth_width.py --workdir runs/lmc_depth_width`` runs
      the paper's Figure 4 grid; a grid without variants stops before training:

      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.kind = "grid"
      >>> grid_experiment(c, None)
      Traceback (most recent call last):
      ...
      tna_jax.config.schema.ConfigError: config.grid.variants must hold at least one variant for kind='grid'; got none.
    """
    import time

    t0 = time.time()
    variants = variant_configs(config)
    rows: list[dict[str, Any]] = []
    reports: dict[str, Any] = {}
    for name, spec, sub in variants:
        print(f"== grid variant {name} ({sub.model.name}) ==")
        subdir = workdir_lib.workdir_path(workdir, f"variants/{name}", f"grid.variants.{name}") if workdir else None
        report = _load_finished(sub, subdir) if subdir else None
        # Several processes: all train a variant or all reuse it, as process 0 finds it.
        if not distributed.primary_says(report is not None):
            report = None
        elif report is None:
            report = _load_finished(sub, subdir)
        if report is None:
            if subdir and distributed.is_primary():
                workdir_lib.prepare_workdir(sub, subdir)
            report = train_kind.train_experiment(sub, subdir)
        else:
            print(f"   reusing the finished report in {subdir}")
        reports[name] = {k: v for k, v in report.items() if k not in ("lmc", "runs")}
        rows.extend(grid_rows(name, spec, report))
    text = _markdown(rows)
    print(text)
    out = {"name": config.name, "kind": "grid", "rows": rows, "variants": reports, "markdown": text,
           "seconds_total": time.time() - t0,
           # Wall time of the variants' own runs (also of those reused from an earlier invocation).
           "seconds_variants": float(sum(r.get("seconds_total", 0.0) for r in reports.values()))}
    if workdir:
        drawable = rows and np.isfinite([r["accuracy_barrier_mean"] for r in rows]).any()
        report_lib.write_report(workdir, config, out, plots=(lambda: _plots(config, workdir, rows)) if drawable else None)
    return out
