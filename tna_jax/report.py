"""What every experiment kind writes at its end: statistics (mean ± sample std), Markdown
tables, `report.json` / `report.md` written atomically before the plots, and a count of XLA
compilations (one program per sweep is a claim the reports check)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from tna_jax import checkpoint as ckpt_lib

__all__ = ["count_compiles", "mean_std", "pm", "markdown_table", "write_report"]


@contextlib.contextmanager
def count_compiles():
    """Counts XLA compilations by function name while the block runs: ``{"jit(run_epoch)": 1}``.

    Uses ``jax.monitoring``'s backend-compile events (no log output). A sweep whose arms are
    one compiled program shows exactly one compile of the training step function.

    Yields:
      A dict ``{function name: compilations}`` filled while the block runs.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> with count_compiles() as compiles:
      ...     f = jax.jit(lambda x: x * 3.0 + 1.0)
      ...     _ = f(jnp.arange(7.0)), f(jnp.arange(7.0) + 1.0)
      >>> compiles["jit(<lambda>)"]
      1
    """
    counts: dict[str, int] = {}

    def listener(event: str, seconds: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            name = str(kwargs.get("fun_name", "?"))
            counts[name] = counts.get(name, 0) + 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def mean_std(values: Any) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``ddof=1``, the unbiased variance's root).

    Every "± std" in tna_jax's reports is this one: over seeds, or over seed pairs (say which
    pairs, `tna_jax.lmc.describe_pairs`). With one value there is no spread to estimate, so
    the std is None (``null`` in JSON, no "±" in tables), and with none the mean is None too.

    Args:
      values: numbers.

    Returns:
      ``(mean, std)``: floats, or None where they are undefined.

    Examples:
      >>> mean_std([1.0, 3.0]), mean_std([2.0]), mean_std([])
      ((2.0, 1.4142135623730951), (2.0, None), (None, None))
    """
    arr = np.asarray(values, dtype=float).ravel()
    if not arr.size:
        return None, None
    return float(np.mean(arr)), (float(np.std(arr, ddof=1)) if arr.size >= 2 else None)


def pm(mean: float | None, std: float | None, scale: float = 100.0, digits: int = 1) -> str:
    """``"mean ± std"`` scaled (percent by default); the mean alone without a std (one value);
    "—" for a missing mean.

    Args:
      mean, std: the numbers (None or NaN: missing).
      scale: multiplies both (100: percent).
      digits: decimals.

    Returns:
      The text of a table cell.

    Examples:
      >>> pm(0.5, 0.01), pm(0.5, None), pm(None, None)
      ('50.0 ± 1.0', '50.0', '—')
    """
    if mean is None or not np.isfinite(mean):
        return "—"
    if std is None or not np.isfinite(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A markdown table: ``columns`` are ``(key, header)`` pairs.

    Args:
      rows: one dict per row (missing keys give empty cells).
      columns: ``(key, header)`` pairs in column order.

    Returns:
      The table as Markdown text.

    Examples:
      >>> print(markdown_table([{"arm": "vanilla", "acc": 0.5}], [("arm", "arm"), ("acc", "accuracy")]))
      | arm | accuracy |
      |---|---|
      | vanilla | 0.5 |
    """
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(c[0], "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_report(workdir: str, config: Any, report: dict[str, Any],
                 plots: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Writes an experiment's ``report.json`` and ``report.md``, then its plots: every kind's last step.

    ``report.md`` is ``# <config.name>`` and ``report["markdown"]``. Both files are written
    atomically before any plot is drawn, so a plotting failure (a missing font, a full disk)
    still leaves a complete report; when ``config.analysis.plots`` is on, ``plots()`` draws the
    figures and returns their paths, whose file names are recorded in ``report["plots"]`` and
    ``report.json`` is written again. Under ``jax.distributed`` only process 0 writes (the others
    return `report` as it is).

    Args:
      workdir: the run directory.
      config: the experiment config (``name``, ``analysis.plots``).
      report: the JSON-serialisable report, with a ``"markdown"`` entry.
      plots: draws the figures into `workdir`, returns their paths (None: no figures).

    Returns:
      `report` (with ``"plots"`` when figures were drawn).

    Examples:
      >>> import json, os, tempfile
      >>> from tna_jax.config import default_config
      >>> workdir, c = tempfile.mkdtemp(), default_config()
      >>> def draw():
      ...     open(os.path.join(workdir, "bars.png"), "wb").close()
      ...     return [os.path.join(workdir, "bars.png")]
      >>> _ = write_report(workdir, c, {"markdown": "| a |"}, plots=draw)
      >>> json.load(open(os.path.join(workdir, "report.json")))["plots"], sorted(os.listdir(workdir))
      (['bars.png'], ['bars.png', 'report.json', 'report.md'])
    """
    from tna_jax import distributed

    if not distributed.is_primary():  # under jax.distributed, process 0 writes the files
        return report
    json_path = os.path.join(workdir, "report.json")
    ckpt_lib.write_json(json_path, report)
    ckpt_lib.write_text(os.path.join(workdir, "report.md"), f"# {config.name}\n\n{report['markdown']}\n")
    if plots is not None and config.analysis.plots:
        report["plots"] = [os.path.basename(p) for p in plots() or []]
        ckpt_lib.write_json(json_path, report)
    return report
