"""Matplotlib figures from report dicts. Computes nothing; every figure is saved atomically.

Every figure says what its bands and bars are: the functions take a ``caption`` (e.g. "bands:
± sample std over 5 disjoint pairs of 10 seeds; shared anchor values"), drawn under the axes and
stored in the PNG's text chunks with the title (``Title`` and ``Description``, readable with
``PIL.Image.open(path).text``). Bands computed here from several rows are sample standard
deviations (ddof=1); a single row gets no band. Long curves (more than `DENSE_POINTS`
points, e.g. 200 federated rounds) get a marker every few points only, so that the bands stay
visible.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["save_figure", "plot_lmc_paths", "plot_ratio_sweep", "plot_barrier_bars", "plot_curves", "DENSE_POINTS"]

DENSE_POINTS = 30  # curves with more points than this get sparse markers (markevery)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _sample_band(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean over the rows of a 2-D array and their sample std (ddof=1; None for one row)."""
    return rows.mean(0), (rows.std(0, ddof=1) if rows.shape[0] >= 2 else None)


def _as_float(values: Any) -> np.ndarray:
    """Floats, None as NaN (a std that is undefined for one seed or pair)."""
    return np.asarray([np.nan if v is None else v for v in np.ravel(np.asarray(values, dtype=object))], dtype=float)


def _markevery(num_points: int) -> int | None:
    """None (every point) for short curves, else a stride giving about 15 markers."""
    return None if num_points <= DENSE_POINTS else max(1, num_points // 15)


def _caption(fig: Any, caption: str) -> None:
    """Writes `caption` under everything the axes draw (rotated tick labels included)."""
    if caption:
        fig.canvas.draw()  # lays the figure out, so the axes' extents are final
        renderer = fig.canvas.get_renderer()
        bottom = min((ax.get_tightbbox(renderer).y0 for ax in fig.axes), default=0.0)
        y = min(fig.transFigure.inverted().transform((0.0, bottom))[1], 0.0)
        fig.text(0.5, y - 0.01, caption, ha="center", va="top", fontsize=8, wrap=True)


def save_figure(fig: Any, path: str, dpi: int = 130, *, title: str = "", caption: str = "") -> str:
    """Saves `fig` to `path` (PNG) through a temporary file and a rename; closes it.

    A reader never sees a half-written PNG: the figure goes to a temporary file in the same
    directory, which is renamed onto `path` (and removed if saving fails).

    Args:
      fig: a matplotlib ``Figure``.
      path: output PNG; missing directories are created.
      dpi: resolution.
      title: stored as the PNG's ``Title`` text chunk (when not empty).
      caption: stored as its ``Description`` (when not empty).

    Returns:
      `path`.

    Examples:
      >>> import os, tempfile
      >>> import matplotlib.pyplot as plt
      >>> fig, ax = plt.subplots(figsize=(2, 2))
      >>> _ = ax.plot([0, 1], [1, 0])
      >>> out = save_figure(fig, os.path.join(tempfile.mkdtemp(), "plots", "line.png"), dpi=40)
      >>> os.path.basename(out), os.path.getsize(out) > 0, oct(os.stat(out).st_mode & 0o777)
      ('line.png', True, '0o644')
    """
    plt = _plt()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fig.", suffix=".png")
    os.close(fd)
    try:
        metadata = {k: v for k, v in (("Title", title), ("Description", caption)) if v}
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", metadata=metadata)
        os.chmod(tmp, 0o644)  # as the reports (mkstemp makes 0600: a figure must be readable by the group)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        plt.close(fig)
    return path


def plot_lmc_paths(curves: dict[str, dict[str, Any]], path: str, title: str = "Linear mode connectivity",
                   caption: str = "") -> str:
    """Accuracy and loss along α, mean ± sample std over pairs (a band), one line per arm.

    Args:
      curves: ``{label: {"alpha": (K,), "accuracy": (P, K), "loss": (P, K)}}`` (P pairs, K values
        of α; a 1-D ``(K,)`` curve counts as one pair and gets no band).
      path: output PNG.
      title: figure title.
      caption: what the bands are and over what (pairs, seeds, anchor values), under the axes.

    Returns:
      `path` (written with :func:`save_figure`).

    Examples:
      >>> import os, tempfile
      >>> curves = {"vanilla": {"alpha": [0, 0.5, 1], "accuracy": [[0.9, 0.5, 0.9]], "loss": [[0.3, 1.2, 0.3]]},
      ...           "TNA-PFN": {"alpha": [0, 0.5, 1], "accuracy": [[0.88, 0.8, 0.87]], "loss": [[0.3, 0.5, 0.3]]}}
      >>> out = plot_lmc_paths(curves, os.path.join(tempfile.mkdtemp(), "lmc.png"))
      >>> os.path.exists(out)
      True
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for label, c in curves.items():
        alpha = np.asarray(c["alpha"])
        for ax, key in zip(axes, ("accuracy", "loss")):
            mean, std = _sample_band(np.atleast_2d(np.asarray(c[key], dtype=float)))
            line = ax.plot(alpha, mean, label=label, marker="o", markersize=2.5, markevery=_markevery(alpha.size))[0]
            if std is not None:
                ax.fill_between(alpha, mean - std, mean + std, alpha=0.2, color=line.get_color())
    axes[0].set_ylabel("test accuracy")
    axes[1].set_ylabel("test loss")
    for ax in axes:
        ax.set_xlabel("α (interpolation A → B)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    _caption(fig, caption)
    return save_figure(fig, path, title=title, caption=caption)


def plot_ratio_sweep(rows: Sequence[dict[str, Any]], path: str, methods: Sequence[str] = ("anchor", "prune"),
                     title: str = "LMC vs mask ratio", caption: str = "") -> str:
    """The paper's Figure 2: "Avg. Acc." and "Interp. Acc." against the mask ratio, the accuracy
    barrier shaded between them, one panel per method.

    Args:
      rows: dicts with ``method``, ``ratio``, ``avg_endpoint_accuracy_mean``,
        ``interp_accuracy_mean`` (and optional ``*_std``, drawn as error bars on Interp. Acc.);
        rows of method ``"none"`` (ρ = 0) start every panel.
      path: output PNG.
      methods: the panels, in order; a method without rows of its own gets no panel (a sweep
        without pruning ratios draws no empty "prune at init" panel); with no such method at all,
        one panel of the ``"none"`` rows.
      title: figure title.
      caption: what the error bars are and over what (pairs, seeds, anchor values).

    Returns:
      `path` (written with :func:`save_figure`).

    Examples:
      >>> import os, tempfile
      >>> rows = [{"method": "none", "ratio": 0.0, "avg_endpoint_accuracy_mean": 0.9, "interp_accuracy_mean": 0.5},
      ...         {"method": "anchor", "ratio": 0.4, "avg_endpoint_accuracy_mean": 0.88, "interp_accuracy_mean": 0.7},
      ...         {"method": "prune", "ratio": 0.4, "avg_endpoint_accuracy_mean": 0.85, "interp_accuracy_mean": 0.5}]
      >>> out = plot_ratio_sweep(rows, os.path.join(tempfile.mkdtemp(), "sweep.png"))
      >>> os.path.exists(out)
      True
    """
    plt = _plt()
    present = [m for m in methods if any(r["method"] == m for r in rows)] or list(methods[:1])
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.8), squeeze=False,
                             layout="constrained")
    for ax, method in zip(axes[0], present):
        sel = sorted([r for r in rows if r["method"] in (method, "none")], key=lambda r: r["ratio"])
        ratio = np.array([r["ratio"] for r in sel])
        avg = np.array([r["avg_endpoint_accuracy_mean"] for r in sel])
        interp = np.array([r["interp_accuracy_mean"] for r in sel])
        ax.plot(ratio, avg, marker="o", label="Avg. Acc.")
        ax.plot(ratio, interp, marker="s", label="Interp. Acc.")
        ax.fill_between(ratio, interp, avg, alpha=0.25, color="tab:red", label="accuracy barrier")
        if sel and all("interp_accuracy_std" in r for r in sel):
            std = np.nan_to_num(_as_float([r["interp_accuracy_std"] for r in sel]))
            ax.errorbar(ratio, interp, yerr=std, fmt="none", ecolor="tab:orange", capsize=2,
                        label="± sample std (Interp. Acc.)")
        ax.set_xlabel("mask ratio ρ" if method == "anchor" else "pruning ratio")
        ax.set_ylabel("test accuracy")
        ax.set_title("TNA-PFN" if method == "anchor" else "prune at init")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    _caption(fig, caption)
    return save_figure(fig, path, title=title, caption=caption)


def plot_barrier_bars(rows: Sequence[dict[str, Any]], path: str, group_key: str, series_key: str,
                      value_key: str = "accuracy_barrier_mean", std_key: str | None = "accuracy_barrier_std",
                      ylabel: str = "accuracy barrier", title: str = "", caption: str = "") -> str:
    """Grouped bar chart (e.g. barrier per architecture, vanilla vs TNA-PFN).

    Args:
      rows: dicts, one per bar, with the keys below.
      path: output PNG.
      group_key: key of the x-axis groups (in order of first appearance).
      series_key: key of the bars within a group (one colour each); a missing (group, series) bar
        is left empty.
      value_key: key of the bar height.
      std_key: key of the error bar, or None for none (a None value: no bar for that one).
      ylabel, title: axis label and title (no title when empty).
      caption: what the error bars are and over what, under the axes.

    Returns:
      `path` (written with :func:`save_figure`).

    Examples:
      >>> import os, tempfile
      >>> rows = [{"model": "MLP", "arm": "vanilla", "accuracy_barrier_mean": 14.3, "accuracy_barrier_std": 4.4},
      ...         {"model": "MLP", "arm": "TNA-PFN", "accuracy_barrier_mean": 5.5, "accuracy_barrier_std": 1.3},
      ...         {"model": "CNN", "arm": "vanilla", "accuracy_barrier_mean": 47.2, "accuracy_barrier_std": 16.3}]
      >>> out = plot_barrier_bars(rows, os.path.join(tempfile.mkdtemp(), "bars.png"), "model", "arm")
      >>> os.path.exists(out)
      True
    """
    plt = _plt()
    groups = list(dict.fromkeys(r[group_key] for r in rows))
    series = list(dict.fromkeys(r[series_key] for r in rows))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(groups) * max(1, len(series)) / 2 + 3), 3.8))
    for k, s in enumerate(series):
        vals, errs = [], []
        for g in groups:
            match = [r for r in rows if r[group_key] == g and r[series_key] == s]
            vals.append(match[0][value_key] if match else np.nan)
            errs.append(match[0].get(std_key, 0.0) if (match and std_key) else 0.0)
        errs = np.nan_to_num(_as_float(errs))
        ax.bar(np.arange(len(groups)) + k * width - 0.4 + width / 2, vals, width, yerr=errs, capsize=2, label=str(s))
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels([str(g) for g in groups], rotation=20)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    _caption(fig, caption)
    return save_figure(fig, path, title=title, caption=caption)


def plot_curves(series: dict[str, dict[str, Any]], path: str, xlabel: str, ylabel: str, title: str = "",
                xscale: str = "linear", caption: str = "") -> str:
    """Lines with optional shaded std: ``{label: {"x": [...], "y": [...] or (S, T), "std": optional}}``.

    ``xscale="log2"`` puts x on a base-2 log axis (widths), "linear" otherwise. Curves of more
    than `DENSE_POINTS` points get about 15 markers, so the bands are not hidden.

    Args:
      series: ``{label: {"x": (T,), "y": (T,) or (S, T), "std": optional (T,)}}``; a 2-D ``y`` is
        drawn as its mean over the S rows with their sample std shaded (none for S = 1); a given
        ``std`` may hold None (no band there).
      path: output PNG.
      xlabel, ylabel: axis labels.
      title: title (none when empty).
      xscale: ``"linear"`` or ``"log2"``.
      caption: what the bands are and over what (seeds, pairs), under the axes.

    Returns:
      `path` (written with :func:`save_figure`).

    Examples:
      >>> import os, tempfile
      >>> series = {"FedAvg": {"x": [1, 2, 3], "y": [[0.3, 0.5, 0.6], [0.35, 0.5, 0.62]]},
      ...           "FedPFN": {"x": [1, 2, 3], "y": [0.3, 0.45, 0.55], "std": [0.01, 0.02, 0.02]}}
      >>> out = plot_curves(series, os.path.join(tempfile.mkdtemp(), "acc.png"), "round", "test accuracy")
      >>> os.path.exists(out)
      True
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, s in series.items():
        x = np.asarray(s["x"])
        y = np.asarray(s["y"], dtype=float)
        if y.ndim == 2:
            mean, std = _sample_band(y)
            std = np.zeros_like(mean) if std is None else std
        else:
            mean, std = y, np.nan_to_num(_as_float(s.get("std", np.zeros_like(y))))
        line = ax.plot(x, mean, label=label, marker="o", markersize=3, markevery=_markevery(x.size))[0]
        if np.any(std > 0):
            ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
    if xscale == "log2":
        ax.set_xscale("log", base=2)
        xs = sorted({float(v) for s in series.values() for v in np.asarray(s["x"]).ravel()})
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{v:g}" for v in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    _caption(fig, caption)
    return save_figure(fig, path, title=title, caption=caption)
