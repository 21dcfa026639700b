"""The README's main job, run exactly as the README writes it, and its results table compared with
the run's report (issue 21).

The command is read from the README's set-up block (the ``python train.py`` after ``pip install
-e . &&``) and run with this Python from an empty directory that holds links to train.py and
configs/, so ``--workdir runs/quick`` lands in the test's temp dir. It runs at XLA's default
optimisation level, as a reader's does (tests/conftest.py lowers it for the rest of the suite).

Tolerance: the numbers the pages show are those of this command on a 2-core CPU. On one machine
and one jax/XLA version a rerun gives the same bits (the seeds are fixed and the program is
deterministic), so the pages and the run agree exactly there. Another CPU, core count (the
seeds are sharded over one device per core) or XLA version changes float rounding, which 30
epochs can amplify; the comparison allows what tests/test_doc_examples.py allows (2% or 0.01,
on the numbers as printed, 1 decimal for accuracies in %), so a stale table (numbers from
another config or code) fails while a rounding flip of the last digit passes.
"""

from __future__ import annotations

import os
import subprocess
import sys

from doc_commands import page_commands
from test_doc_examples import same_output
from util import ROOT

# Pages that show the quickstart's results table, each right after the quickstart command.
RESULT_PAGES = ("README.md", "docs/results/quickstart.md")


def readme_quickstart():
    """The README's first train.py command (the set-up block's main job)."""
    return next(c for c in page_commands("README.md") if c.argv[:2] == ("python", "train.py"))


def results_table(text: str) -> str:
    """The first markdown table that starts with ``| arm |`` in `text`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| arm |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def test_the_pages_show_the_readme_command():
    command = readme_quickstart()
    assert command.argv == ("python", "train.py", "--config", "configs/quickstart.py", "--workdir", "runs/quick")
    for page in ("docs/getting-started.md", "docs/results/quickstart.md"):
        assert command.argv in [c.argv for c in page_commands(page)], page


def test_the_readme_quickstart_runs_as_written_and_prints_the_tables_the_pages_show(tmp_path):
    command = readme_quickstart()
    for name in ("train.py", "configs"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_backend_optimization_level" not in f)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}
    proc = subprocess.run([sys.executable, *command.argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workdir = tmp_path / "runs" / "quick"
    report = (workdir / "report.md").read_text()
    table = results_table(report)
    assert table in proc.stdout  # printed as written
    assert {"report.json", "report.md", "config.json", "metrics.jsonl"} <= set(os.listdir(workdir))
    for page in RESULT_PAGES:
        with open(os.path.join(ROOT, page)) as f:
            shown = results_table(f.read())
        why = same_output(shown, table)
        assert why is None, f"{page}: the quickstart table differs from the run's: {why}\nthe run:\n{table}"
