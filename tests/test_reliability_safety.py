"""Safety (issue 11): no pickle anywhere, orbax only behind the Checkpointer, nothing read from a
workdir is executed (the explicit restore target is checked in test_reliability_inputs.py)."""

import os
import re

import jax.numpy as jnp
from util import ROOT

from tna_jax import checkpoint as ckpt_lib

# What may not appear in the package, the entry point, configs or benchmarks.
FORBIDDEN = {
    "pickle import": re.compile(r"^\s*(import|from)\s+(c?pickle|_pickle|cloudpickle|dill|joblib)\b", re.M),
    "pickle call": re.compile(r"\b(c?pickle|cloudpickle|dill|joblib)\.(loads?|dumps?|Unpickler|Pickler)\b"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "np.load without allow_pickle=False": re.compile(r"\bnp\.load\((?![^)]*allow_pickle\s*=\s*False)[^)]*\)"),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\s*\("),
    "torch.load": re.compile(r"\btorch\.load\("),
}
SCANNED = ("tna_jax", "train.py", "configs", "benchmarks")


def scan(paths):
    hits = []
    for top in paths:
        files = [top] if top.endswith(".py") else [os.path.join(r, f) for r, _, fs in os.walk(top) for f in fs
                                                   if f.endswith(".py")]
        for path in files:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            for what, pattern in FORBIDDEN.items():
                for m in pattern.finditer(text):
                    hits.append((os.path.relpath(path, ROOT), text[: m.start()].count("\n") + 1, what))
    return hits


def test_no_pickle_anywhere(tmp_path, reliability):
    # The scanner finds what it looks for (a scanner that cannot fail proves nothing).
    planted = tmp_path / "planted.py"
    planted.write_text("import pickle\nx = np.load(f, allow_pickle=True)\ny = np.load(f)\nz = cloudpickle.loads(b)\n"
                       "eval('1')\nok = np.load(f, allow_pickle=False)\n")
    assert sorted(w for _, _, w in scan([str(planted)])) == sorted(
        ["pickle import", "allow_pickle=True", "np.load without allow_pickle=False",
         "np.load without allow_pickle=False", "pickle call", "eval/exec"])
    hits = scan([os.path.join(ROOT, p) for p in SCANNED])
    files = sum(len([f for _, _, fs in os.walk(os.path.join(ROOT, p)) for f in fs if f.endswith(".py")])
                if not p.endswith(".py") else 1 for p in SCANNED)
    reliability.record("safety.no_pickle", category="safety",
                       fault=f"scan of {files} Python files ({', '.join(SCANNED)}) for pickle/cloudpickle/dill/joblib, "
                             "allow_pickle=True, np.load without allow_pickle=False, eval/exec, torch.load",
                       tried=files, survived=files - len({h[0] for h in hits}),
                       check="no match (the scanner is checked on a planted file first)")
    assert hits == []


def test_orbax_is_used_only_through_the_checkpointer():
    users = []
    for r, _, fs in os.walk(os.path.join(ROOT, "tna_jax")):
        for f in fs:
            if f.endswith(".py"):
                text = open(os.path.join(r, f), encoding="utf-8").read()
                if re.search(r"^\s*(import|from)\s+orbax", text, re.M):
                    users.append(os.path.relpath(os.path.join(r, f), ROOT))
    assert users == ["tna_jax/checkpoint.py"]  # the one module that talks to orbax
    text = open(os.path.join(ROOT, "tna_jax", "checkpoint.py"), encoding="utf-8").read()
    assert "import orbax.checkpoint as ocp" in text
    assert not re.search(r"StandardRestore\(\s*\)|PyTreeRestore\(|restore\(\s*step\s*\)", text)


def test_reading_a_workdir_executes_nothing(tmp_path):
    """config.json and checkpoint metadata are JSON: a file holding code is data, not a program."""
    marker = tmp_path / "executed"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "c"))
    ckpt.save(1, {"w": jnp.ones(2)}, meta={"note": payload, "epoch": payload})
    ckpt_lib.write_json(str(tmp_path / "config.json"), {"name": payload})
    assert ckpt.read_meta(1)["note"] == payload
    assert ckpt_lib.read_json(str(tmp_path / "config.json"))["name"] == payload
    assert os.stat(tmp_path / "config.json").st_mode & 0o777 == 0o644  # atomic writes keep files readable
    ckpt.restore({"w": jnp.zeros(2)})
    ckpt.close()
    assert not marker.exists()
