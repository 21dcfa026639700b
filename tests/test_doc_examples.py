"""Every Python block in README.md and the docs runs, and what it prints matches the output block
the page shows below it: the same lines and words, and the same numbers within a tolerance
(results of other XLA programs differ in the last bits, and a few epochs can amplify that).

A page's blocks run in order in one fresh process (later blocks use earlier names), in a
temporary working directory. An output block is a fence without a language (or ``text``) right
after a Python block, with only blank lines between them.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^```(\S*)\s*$")
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
# Numbers agree when within 2% or 0.01 (the tables show 3 decimals of quantities in [0, 3]): the
# blocks run at XLA's default optimisation level, as a reader's do, but other programs around them
# may compile differently on another machine.
RTOL, ATOL = 0.02, 0.01


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, first line)`` of each fenced block, and ``("", "", n)`` markers for
    prose between blocks (so that "right after" can be told)."""
    out, lang, body, start = [], None, [], 0
    prose = False
    for n, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if lang is None:
            if fence:
                if prose:
                    out.append(("<prose>", "", n))
                    prose = False
                lang, body, start = fence.group(1), [], n
            elif line.strip():
                prose = True
        elif fence and not fence.group(1):
            out.append((lang, "\n".join(body), start))
            lang = None
        else:
            body.append(line)
    return out


def examples(path: str) -> list[dict]:
    """The page's Python blocks, each with the output block shown after it (or None)."""
    with open(path) as f:
        return examples_of(f.read())


def examples_of(text: str) -> list[dict]:
    blocks = fenced_blocks(text)
    found = []
    for i, (lang, code, line) in enumerate(blocks):
        if lang != "python":
            continue
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        expected = nxt[1] if nxt is not None and nxt[0] in ("", "text") else None
        found.append({"code": code, "line": line, "expected": expected})
    return found


PAGES = sorted(p for p in [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                         recursive=True)]
               if examples(p))

DRIVER = r"""
import contextlib, io, json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
results = []
for block in blocks:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(block["code"], f"<block at line {block['line']}>", "exec"), namespace)
    except BaseException:
        results.append({"line": block["line"], "stdout": out.getvalue(), "error": traceback.format_exc()})
        break
    results.append({"line": block["line"], "stdout": out.getvalue(), "error": None})
json.dump(results, open(sys.argv[2], "w"))
"""


def same_output(shown: str, printed: str) -> str | None:
    """None when `printed` matches `shown` (lines, words, numbers within tolerance); else why not."""
    want = [ln.rstrip() for ln in shown.strip().splitlines()]
    got = [ln.rstrip() for ln in printed.strip().splitlines()]
    if len(want) != len(got):
        return f"{len(got)} lines printed, the page shows {len(want)}"
    for w, g in zip(want, got):
        if NUMBER.sub("#", w).split() != NUMBER.sub("#", g).split():
            return f"line differs: page {w!r}, printed {g!r}"
        for a, b in zip(NUMBER.findall(w), NUMBER.findall(g)):
            if not math.isclose(float(a), float(b), rel_tol=RTOL, abs_tol=ATOL):
                return f"number {b} printed where the page shows {a}: page {w!r}, printed {g!r}"
    return None


def test_the_comparison_catches_wrong_numbers_and_words():
    assert same_output("acc 0.364, loss 1.17\n", "acc 0.366, loss 1.171") is None
    assert "number 0.41" in same_output("acc 0.364", "acc 0.41")
    assert "line differs" in same_output("accuracy 0.364", "loss 0.364")
    assert "2 lines printed" in same_output("a 1", "a 1\nb 2")


def test_blocks_and_their_outputs_are_found():
    text = "intro\n```python\nprint(1)\n```\n\n```\n1\n```\nprose\n```python\nx = 2\n```\nmore\n```\nnot output\n```\n"
    blocks = fenced_blocks(text)
    assert [b[0] for b in blocks] == ["<prose>", "python", "", "<prose>", "python", "<prose>", ""]
    assert [e["expected"] for e in examples_of(text)] == ["1", None]


@pytest.mark.parametrize("page", [os.path.relpath(p, ROOT) for p in PAGES])
def test_page_examples_run_and_print_what_the_page_shows(page, tmp_path):
    blocks = examples(os.path.join(ROOT, page))
    src, out = tmp_path / "blocks.json", tmp_path / "results.json"
    src.write_text(json.dumps(blocks))
    # XLA's default optimisation level, as a reader gets it (tests/conftest.py lowers it for speed).
    xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_backend_optimization_level" not in f)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "XLA_FLAGS": xla_flags}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(src), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    failed = [r for r in results if r["error"]]
    assert not failed, f"{page}, block at line {failed[0]['line']}:\n{failed[0]['error'][-3000:]}"
    assert len(results) == len(blocks)
    for block, result in zip(blocks, results):
        if block["expected"] is not None:
            why = same_output(block["expected"], result["stdout"])
            assert why is None, f"{page}, block at line {block['line']}: {why}"
