"""The documentation site: ``mkdocs build --strict`` passes, every public module has an API page
that renders every name of its ``__all__``, and every figure in docs/figures is shown on a page.

mkdocs and mkdocstrings come with the ``test`` extra (through ``docs``), so CI always builds the
site: a broken reference, a missing page or a docstring that griffe cannot parse fails here.
"""

from __future__ import annotations

import glob
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys

import pytest

import tna_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")


def _public_modules() -> dict[str, list[str]]:
    """``{module: __all__}`` for every tna_jax module that declares one."""
    out = {}
    names = ["tna_jax"] + sorted(i.name for i in pkgutil.walk_packages(tna_jax.__path__, "tna_jax."))
    for name in names:
        module = importlib.import_module(name)
        if hasattr(module, "__all__"):
            out[name] = list(module.__all__)
    return out


def _directives() -> set[str]:
    found = set()
    for path in glob.glob(os.path.join(DOCS, "api", "*.md")):
        with open(path) as f:
            found |= set(re.findall(r"^::: ([\w.]+)", f.read(), re.M))
    return found


def _documented(module: str, name: str) -> bool:
    """Functions and classes get an entry of their own; submodules and constants do not."""
    obj = getattr(importlib.import_module(module), name)
    return inspect.isfunction(obj) or inspect.isclass(obj)


def _home(module: str, name: str) -> str:
    """Where a public name is documented: the module that defines it (packages re-export)."""
    obj = getattr(importlib.import_module(module), name)
    home = getattr(obj, "__module__", None) if (inspect.isfunction(obj) or inspect.isclass(obj)) else None
    return home if home and home.startswith("tna_jax") else module


def test_every_public_module_has_an_api_page():
    directives = _directives()
    missing = [m for m, names in _public_modules().items()
               if m not in directives and not all(_home(m, n) in directives for n in names if _documented(m, n))]
    assert not missing, f"add '::: <module>' to a page in docs/api/ (and mkdocs.yml's nav) for: {missing}"


def test_every_figure_is_shown_on_a_page():
    text = ""
    for path in glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True):
        with open(path) as f:
            text += f.read()
    figures = [os.path.basename(p) for p in glob.glob(os.path.join(DOCS, "figures", "*.png"))]
    assert figures, "docs/figures holds the figures the results pages show"
    unlinked = [f for f in figures if f"figures/{f}" not in text]
    assert not unlinked, f"show these figures on a results page: {unlinked}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return str(out)


def test_strict_build_renders_every_public_name(site):
    rendered = ""
    for path in glob.glob(os.path.join(site, "api", "**", "index.html"), recursive=True):
        with open(path) as f:
            rendered += f.read()
    absent = []
    for module, names in _public_modules().items():
        for name in names:
            if not _documented(module, name):
                continue  # submodules have their own section; constants are listed in the module text
            if f'id="{module}.{name}"' not in rendered and f'id="{_home(module, name)}.{name}"' not in rendered:
                absent.append(f"{module}.{name}")
    assert not absent, f"public names without an entry in the API reference: {absent}"


def test_pages_and_math(site):
    for page in ("getting-started", "concepts/anchors", "concepts/lmc", "concepts/alignment", "concepts/fusion",
                 "concepts/federated", "howto/optimizer", "howto/sweep", "howto/accelerators", "howto/resume",
                 "howto/own-model-and-data", "howto/logs", "notebooks", "results/quickstart", "architecture"):
        assert os.path.exists(os.path.join(site, page, "index.html")), page
    with open(os.path.join(site, "concepts", "lmc", "index.html")) as f:
        lmc_page = f.read()
    assert lmc_page.count('class="arithmatex"') >= 3  # the barrier formulas are typeset as math


def test_getting_started_has_the_readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read().splitlines()
    marker = readme.index("<!-- test-command -->")
    test_command = readme[marker + 2]  # the line CI runs (.ci/run reads it the same way)
    run_command = next(line for line in readme if line.startswith("pip install -e . && python train.py"))
    with open(os.path.join(DOCS, "getting-started.md")) as f:
        page = f.read()
    for command in (run_command, test_command):
        assert command in page, f"docs/getting-started.md must show the README command {command!r}"


# What reST markup looks like when mkdocstrings shows it raw (docs/griffe_sphinx_roles.py rewrites it).
_RAW_MARKUP = {
    "role": re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const|math|ref|doc):"),
    "directive": re.compile(r"\.\. [a-z-]+::"),
    "literal-block marker": re.compile(r"::\s*</p>"),
    "unresolved reference": re.compile(r"\]\[[\w.]+\]"),
    "unresolved code reference": re.compile(r"\[<code>[^<]*</code>\]\["),
    "stray backtick": re.compile(r"`"),
    "stray dollar": re.compile(r"\$"),  # math that arithmatex did not take
}


def _prose(html: str) -> str:
    """The page's text outside code, math, scripts and styles, with the paragraph ends kept."""
    html = re.sub(r"<(script|style|pre|code)\b.*?</\1>", " ", html, flags=re.S)
    html = re.sub(r'<(span|div) class="arithmatex">.*?</\1>', " ", html, flags=re.S)
    return re.sub(r"<(?!/p>)[^>]+>", " ", html)


def test_pages_render_the_docstring_markup(site):
    """No reST markup left on any page (the API pages render the docstrings), math typeset, links."""
    raw = []
    for path in sorted(glob.glob(os.path.join(site, "**", "index.html"), recursive=True)):
        with open(path) as f:
            html = f.read()
        text = _prose(html)
        for what, pattern in _RAW_MARKUP.items():
            source = html if what == "unresolved code reference" else text
            raw += [f"{os.path.relpath(path, site)}: {what}: ...{source[max(m.start() - 40, 0):m.end() + 40]!r}..."
                    for m in pattern.finditer(source)]
    assert not raw, f"{len(raw)} pieces of raw markup on the pages:\n" + "\n".join(raw[:20])
    with open(os.path.join(site, "api", "federated", "index.html")) as f:
        federated_page = f.read()
    assert federated_page.count('class="arithmatex"') >= 10  # :math: roles are typeset by MathJax
    with open(os.path.join(site, "api", "lmc", "index.html")) as f:
        lmc_page = f.read()  # :func: roles link to the entries, on the page and across pages
    assert len(re.findall(r'<a class="autorefs autorefs-internal" [^>]*href="#tna_jax\.', lmc_page)) >= 15
    assert re.search(r'<a class="autorefs autorefs-internal" [^>]*href="\.\./tree/#tna_jax\.tree\.', lmc_page)
