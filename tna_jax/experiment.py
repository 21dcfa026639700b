"""Deprecated: the names of `tna_jax.experiment` (0.1) now live in `tna_jax.runner` (`run`),
`tna_jax.workdir`, `tna_jax.report` and `tna_jax.experiments` (the kinds). They stay importable
from here for one release, each with a DeprecationWarning naming its new home."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_HOMES = {
    "tna_jax.runner": ("run", "is_primary", "MULTIPROCESS_KINDS"),
    "tna_jax.workdir": ("WorkdirLock", "WorkdirBusy", "prepare_workdir", "workdir_path", "config_dict"),
    "tna_jax.report": ("count_compiles", "mean_std", "pm", "markdown_table", "write_report"),
    "tna_jax.experiments.registry": ("register",),
    "tna_jax.experiments.train": ("train_experiment", "Trained", "load_problem", "train_and_analyse",
                                  "write_train_outputs", "analyse_lmc", "lmc_stats", "choose_pairs",
                                  "statistics_note", "anchor_values_note", "anchor_report", "markdown_summary",
                                  "LMC_KEYS", "SUMMARY_COLUMNS", "summary_row", "bn_reset_eval"),
}
_MOVED = {name: home for home, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name == "EXPERIMENTS":
        warnings.warn("tna_jax.experiment.EXPERIMENTS moved to tna_jax.experiments.KINDS; the old name goes in the "
                      "next release.", DeprecationWarning, stacklevel=2)
        return importlib.import_module("tna_jax.experiments").load_all()
    if name in _MOVED:
        warnings.warn(f"tna_jax.experiment.{name} moved to {_MOVED[name]}.{name}; the old name goes in the next "
                      "release.", DeprecationWarning, stacklevel=2)
        if _MOVED[name] == "tna_jax.experiments.train":
            importlib.import_module("tna_jax.experiments")
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'tna_jax.experiment' has no attribute {name!r}")
