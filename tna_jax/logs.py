"""Metric logs of a run: ``metrics.jsonl`` (one line per epoch and run) and TensorBoard events.

``metrics.jsonl`` is append-only and fsynced every epoch; when a run resumes from the checkpoint
of epoch e, lines of later epochs (written before a crash) are dropped, a line cut by the crash
included, and the file is rewritten atomically. TensorBoard gets one run directory per arm and
seed (``tensorboard/<arm>/seed_<s>``), written through tensorboardX, so the usual ``tensorboard
--logdir <workdir>/tensorboard`` compares seeds and ratios. TensorBoard is a view of
``metrics.jsonl``: the event files are flushed at every checkpoint (:meth:`MetricsLog.flush`), and
when a run starts or resumes they are rewritten from ``metrics.jsonl``, so that points a crash
kept from reaching them (tensorboardX buffers up to 30 s) come back and lost epochs leave none.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from tna_jax import checkpoint as ckpt_lib

__all__ = ["MetricsLog", "read_metrics"]

SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def read_metrics(path: str, upto_epoch: int | None = None) -> list[dict[str, Any]]:
    r"""Complete lines of a metrics file (up to `upto_epoch`); stops at the first damaged line.

    Args:
      path: a ``metrics.jsonl`` file (missing: no rows).
      upto_epoch: keep only rows of epochs <= this (None: all).

    Returns:
      The rows as dicts, in file order.

    Examples:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
      >>> with open(path, "w") as f:
      ...     _ = f.write('{"epoch": 1, "run": 0}\n{"epoch": 2, "run": 0}\n{"epoch": 3, "ru')
      >>> read_metrics(path), read_metrics(path, upto_epoch=1)
      ([{'epoch': 1, 'run': 0}, {'epoch': 2, 'run': 0}], [{'epoch': 1, 'run': 0}])
    """
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything after it belongs to a lost epoch
            if upto_epoch is None or row.get("epoch", 0) <= upto_epoch:
                rows.append(row)
    return rows


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


class MetricsLog:
    """Writes per-epoch, per-run metric rows to a workdir (or nowhere when `workdir` is None).

    Args:
      workdir: the run directory, or None for no files.
      runs: ``[{"run", "arm", "seed", ...}]`` descriptions (one TensorBoard writer each).
      resume_epoch: the epoch training resumes from (0 for a fresh run).
      tensorboard: also write TensorBoard event files.

    Examples:
      >>> import os, tempfile
      >>> workdir = tempfile.mkdtemp()
      >>> log = MetricsLog(workdir, [{"run": 0, "arm": "vanilla", "seed": 0}])
      >>> log.write([{"epoch": 1, "run": 0, "arm": "vanilla", "seed": 0, "train_loss": 0.5}])
      >>> log.close()
      >>> read_metrics(os.path.join(workdir, "metrics.jsonl"))[0]["train_loss"]
      0.5
      >>> sorted(os.listdir(os.path.join(workdir, "tensorboard", "vanilla")))
      ['seed_0']
    """

    def __init__(self, workdir: str | None, runs: Sequence[dict[str, Any]], resume_epoch: int = 0,
                 tensorboard: bool = True):
        self.rows: list[dict[str, Any]] = []
        self._file = None
        self._writers: dict[int, Any] = {}
        if workdir is None:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        self.rows = read_metrics(path, resume_epoch)
        ckpt_lib.write_text(path, "".join(ckpt_lib.dumps(r) + "\n" for r in self.rows))
        self._file = open(path, "a")  # noqa: SIM115 (closed in close())
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional: JSONL stays the source of truth
                return
            for r in runs:
                logdir = os.path.join(workdir, "tensorboard", _safe(str(r["arm"])), f"seed_{r['seed']}")
                # Rewritten from metrics.jsonl (the source of truth): a crash may have kept any
                # number of buffered points from the old files, and left points of lost epochs.
                for old in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
                    os.remove(old)
                self._writers[r["run"]] = SummaryWriter(logdir, flush_secs=30)
            self._add_scalars(self.rows)
            self.flush()

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Appends rows (one per run of an epoch) and makes them durable (TensorBoard's copy
        at the next :meth:`flush`)."""
        self.rows.extend(rows)
        if self._file is not None:
            self._file.write("".join(ckpt_lib.dumps(r) + "\n" for r in rows))
            self._file.flush()
            os.fsync(self._file.fileno())
        self._add_scalars(rows)

    def flush(self) -> None:
        """Writes TensorBoard's buffered points to its event files (called at every checkpoint)."""
        for w in self._writers.values():
            w.flush()

    def _add_scalars(self, rows: Sequence[dict[str, Any]]) -> None:
        for r in rows:
            writer = self._writers.get(r["run"])
            if writer is None:
                continue
            for key in SCALARS:
                if key in r:
                    split, _, metric = key.partition("_")
                    writer.add_scalar(f"{split}/{metric}", r[key], global_step=r["epoch"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for w in self._writers.values():
            w.close()
        self._writers = {}
