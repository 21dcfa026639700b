"""The Colab notebooks: committed without outputs, and executed top to bottom in FAST mode.

Each notebook ends with a cell of assertions on its own results, so executing it checks the
outputs. Each notebook is one test (so xdist spreads them over its workers); their kernels share
the session's JAX persistent compilation cache (``tests/conftest.py``), so notebooks that train
the same programs (01 and 03) compile them once when one runs before the other.

Cost (2 shared CPU cores): about 220 s of CPU for notebooks 01, 02, 03 and 05 together, most of
it XLA compiling the vmapped initialisation (the anchor mask's per-leaf threefry draws compile in
~5 s for a 6-leaf MLP, ~15 s under a vmap over runs). Hence the ``slow`` mark.
"""

from __future__ import annotations

import glob
import json
import os
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
# A notebook that needs a package tna_jax does not have yet runs once it lands (helper branches merge
# one at a time); every other notebook must run.


def _cells(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)["cells"]


def test_notebooks_exist():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    for expected in ("01_quickstart.ipynb", "02_mask_ratio_sweep.ipynb", "03_alignment.ipynb", "05_fusion.ipynb"):
        assert expected in names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs_and_with_badge_install_and_checks(path):
    cells = _cells(path)
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{os.path.basename(path)} cell {i} has outputs: strip them"
            assert cell.get("execution_count") is None, f"{os.path.basename(path)} cell {i} has an execution count"
    first = "".join(cells[0]["source"])
    assert "colab.research.google.com/github/" not in first, "no badge of a repository that may not exist"
    assert f"colab/{os.path.basename(path)}" in first and "TNA_JAX_SOURCE" in first, "say how to open it on Colab"
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert code[0] == "".join(_cells(NOTEBOOKS[0])[1]["source"]), "every notebook has the same install cell"
    assert 'TNA_JAX_SOURCE = os.environ.get("TNA_JAX_SOURCE", "")' in code[0], "the install cell names its source"
    assert "TNA_JAX_FAST" in code[1], "the second code cell is the parameter cell with the FAST switch"
    assert "assert " in code[-1], "the last code cell checks the notebook's results"


def _execute(path: str, cache_dir: str) -> float:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_before = {k: os.environ.get(k) for k in ("TNA_JAX_FAST", "JAX_COMPILATION_CACHE_DIR",
                                                  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                                                  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "MPLBACKEND")}
    # The kernel inherits the environment: FAST sizes, the shared compilation cache, no GUI backend.
    os.environ.update({"TNA_JAX_FAST": "1", "JAX_COMPILATION_CACHE_DIR": cache_dir,
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "MPLBACKEND": "Agg"})
    t0 = time.time()
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return time.time() - t0


@pytest.mark.slow  # ~50 s of CPU per notebook, most of it compiling (see the module docstring)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom_in_fast_mode(path):
    # The session's compilation cache (tests/conftest.py): 03 loads what 01 compiled when 01 ran first.
    seconds = _execute(path, os.environ["JAX_COMPILATION_CACHE_DIR"])
    print(f"{os.path.basename(path)}: {seconds:.1f} s")


def _install_cell() -> str:
    return "".join(_cells(NOTEBOOKS[0])[1]["source"])


def test_install_cell_installs_from_a_wheel_and_explains_a_missing_source(tmp_path):
    """The first cell's logic, as Colab runs it, against a wheel built from this checkout: pip
    installs it (into a target directory here, so the test environment is untouched); with no
    source set it stops with a message saying what to set."""
    import subprocess
    import sys

    wheels = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), ROOT], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("tna_jax-*.whl")
    target = tmp_path / "site"
    env = {**os.environ, "TNA_JAX_FORCE_INSTALL": "1", "TNA_JAX_SOURCE": str(wheel),
           "TNA_JAX_PIP_ARGS": f"--no-deps --target {target}"}
    done = subprocess.run([sys.executable, "-c", _install_cell()], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"installed tna_jax from {wheel}" in done.stdout
    assert (target / "tna_jax" / "anchors" / "transform.py").exists()
    assert (target / "tna_jax" / "experiments" / "registry.py").exists()
    env.pop("TNA_JAX_SOURCE")
    missing = subprocess.run([sys.executable, "-c", _install_cell()], env=env, capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert missing.returncode != 0 and "set TNA_JAX_SOURCE at the top of this cell" in missing.stderr
