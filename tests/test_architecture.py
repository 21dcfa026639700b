"""The package's shape, as docs/architecture.md describes it: import layers, no import cycles,
no private name used across modules, modules and functions of a readable size, the docstring
share the page states, and the page's toy experiment kind runs as printed.

Imports are read from the source with ``ast`` (module level and inside functions alike: a
function-level import is a dependency too), so nothing is imported to check them.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import json
import os
import re
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tna_jax")

# Lowest first. A module may import modules of its own layer or of a lower one, never of a higher
# one. docs/architecture.md shows the same table; `tna_jax/__init__.py` (the facade) is above all.
LAYERS = {
    "foundations": ["tree", "trace", "chunking", "config", "config.*", "hooks", "plotting", "runs", "sharding",
                    "deprecation", "programs", "steps", "distributed"],
    "data, models and files": ["data", "data.*", "models", "models.*", "checkpoint", "logs", "report", "workdir",
                               "preflight", "pretrained"],
    "anchors and evaluation": ["anchors", "anchors.*", "evaluation", "run_axis", "norm_stats", "optimizers"],
    "training": ["training", "epoch", "harness"],
    "analysis": ["lmc", "lmc.*", "align", "align.*", "fusion", "fusion.*", "federated", "federated.*"],
    "experiments": ["experiments", "experiments.*", "runner", "experiment", "dry_run"],
}
# The longest a library module may be. Above it a module holds more than one concern; split it
# (docs/architecture.md, "Modules"). An exception names its file and the most lines it may have.
MAX_LINES = 600
LONGER_MODULES: dict[str, int] = {}
# The longest a function may be, in lines of code: its lines without its docstring, blank lines
# and comment-only lines; nested functions count inside their parent. Above it a function does
# more than one thing; split it into helpers that each do one. An exception names the function
# ("path:qualified name") and why it may be longer.
MAX_FUNCTION_LINES = 80
LONGER_FUNCTIONS: dict[str, str] = {}


def _modules() -> dict[str, str]:
    """``{dotted module name: file}`` for every module of the package."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(module: str, path: str) -> set[str]:
    """The package's modules that ``module`` imports (``from pkg import name`` counts as
    ``pkg.name`` when that is a module, else as ``pkg``)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "tna_jax"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] == "tna_jax":
                found |= {f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names}
    return {name for name in found if name != module}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _layer(module: str) -> int | None:
    short = module.removeprefix("tna_jax.")
    for index, patterns in enumerate(LAYERS.values()):
        if any(fnmatch.fnmatchcase(short, p) for p in patterns):
            return index
    return None


def test_every_module_has_a_layer():
    homeless = [m for m in MODULES if m != "tna_jax" and _layer(m) is None]
    assert not homeless, f"add these modules to a layer in LAYERS (and to docs/architecture.md): {homeless}"


def test_no_module_imports_a_higher_layer():
    names = list(LAYERS)
    upward = [f"{m} ({names[_layer(m)]}) imports {i} ({names[_layer(i)]})"
              for m, imported in sorted(GRAPH.items()) if m != "tna_jax"
              for i in sorted(imported) if i != "tna_jax" and _layer(i) > _layer(m)]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# Deprecated shims that import their replacement when called: the one import that closes the loop,
# and why it may (each goes with its shim in the next release).
DEPRECATED_IMPORTS = {
    ("tna_jax.lmc.paths", "tna_jax.fusion.soups"): "lmc.fuse (deprecated) calls fusion.uniform_soup",
}


def test_no_import_cycles():
    graph = {m: {t for t in targets if (m, t) not in DEPRECATED_IMPORTS} for m, targets in GRAPH.items()}
    cycles = _cycles(graph)
    assert not cycles, f"modules that import each other (directly or around a loop): {cycles}"
    for (source, target), why in DEPRECATED_IMPORTS.items():
        assert target in GRAPH.get(source, set()), f"{source} no longer imports {target} ({why}): drop the entry"


def test_modules_stay_short():
    lengths = {}
    for path in MODULES.values():
        with open(path) as f:
            lengths[os.path.relpath(path, ROOT)] = sum(1 for _ in f)
    too_long = {p: n for p, n in lengths.items() if n > LONGER_MODULES.get(p, MAX_LINES)}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"
    stale = [p for p, limit in LONGER_MODULES.items() if lengths.get(p, 0) <= MAX_LINES]
    assert not stale, f"remove these from LONGER_MODULES, they fit in {MAX_LINES} lines now: {stale}"


def _code_lines(source: str) -> set[int]:
    """The line numbers (from 1) that hold code: a token other than a comment or a line break.
    A line inside a multi-line string is code; docstrings are taken out by `_docstring_lines`."""
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines


def _docstring_lines(tree: ast.AST) -> set[int]:
    """The line numbers of every docstring (module, class and function) in `tree`."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def function_lengths(source: str) -> dict[str, int]:
    """``{qualified name: lines of code}`` for every function of a module's source: the lines from
    its ``def`` to its end that hold code, without docstrings (its own and those of the functions
    and classes nested in it); a nested function's lines count in its parent too."""
    tree = ast.parse(source)
    code = _code_lines(source) - _docstring_lines(tree)
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lengths[name] = len(code & set(range(child.lineno, child.end_lineno + 1)))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return lengths


def test_function_lengths_are_counted_as_documented():
    source = (
        "def f(x):\n"
        '    """Docstring,\n'
        '    two lines."""\n'
        "    # a comment line\n"
        "\n"
        "    y = (x +\n"
        "         1)  # a comment after code\n"
        "\n"
        "    def inner():\n"
        '        """Nested docstring."""\n'
        "        return y\n"
        "    return inner\n"
        "\n"
        "class C:\n"
        '    """A class."""\n'
        "    def method(self):\n"
        '        text = """a string,\n'
        '        not a docstring"""\n'
        "        return text\n"
    )
    assert function_lengths(source) == {"f": 6, "f.inner": 2, "C.method": 4}


def test_functions_stay_short():
    too_long, lengths = {}, {}
    for path in MODULES.values():
        with open(path) as f:
            source = f.read()
        for name, n in function_lengths(source).items():
            where = f"{os.path.relpath(path, ROOT)}:{name}"
            lengths[where] = n
            if n > MAX_FUNCTION_LINES and where not in LONGER_FUNCTIONS:
                too_long[where] = n
    assert not too_long, (f"functions over {MAX_FUNCTION_LINES} lines of code (split them into helpers "
                          f"that each do one thing): {too_long}")
    stale = [w for w in LONGER_FUNCTIONS if lengths.get(w, 0) <= MAX_FUNCTION_LINES]
    assert not stale, f"remove these from LONGER_FUNCTIONS, they fit in {MAX_FUNCTION_LINES} lines now: {stale}"


def _private_imports(module: str, path: str) -> list[str]:
    """Private names (``_x``, not dunders) that `module` takes from another module of the package:
    ``from tna_jax.m import _x`` and ``m._x`` where ``m`` names a package module."""
    with open(path) as f:
        tree = ast.parse(f.read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    aliases, found = {}, []

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "tna_jax" or source == module:
                continue
            for alias in node.names:
                if private(alias.name):
                    found.append(f"from {source} import {alias.name}")
                elif f"{source}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and private(node.attr):
            target = aliases.get(node.value.id)
            if target is not None and target != module:
                found.append(f"{target}.{node.attr}")
    return found


def test_no_private_name_crosses_modules():
    crossing = {m: names for m, path in sorted(MODULES.items()) if (names := _private_imports(m, path))}
    assert not crossing, ("modules that use another module's private names (make the name public and "
                          f"document it, or move it where it is used): {crossing}")


def test_the_private_import_check_sees_both_forms(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("from tna_jax.anchors.masks import _parent, anchor_mask\n"
                    "from tna_jax import tree as tree_lib\n"
                    "x = tree_lib._hidden + tree_lib.named_leaves\n")
    assert _private_imports("tna_jax.probe", str(path)) == ["from tna_jax.anchors.masks import _parent",
                                                             "tna_jax.tree._hidden"]


def docstring_share() -> float:
    """The share of the library's lines (``tna_jax/**/*.py``, blank lines included) that are
    docstring lines."""
    docs = total = 0
    for path in MODULES.values():
        with open(path) as f:
            source = f.read()
        total += len(source.splitlines())
        docs += len(_docstring_lines(ast.parse(source)))
    return docs / total


def test_the_page_states_the_docstring_share():
    """docs/architecture.md gives the docstring share of the library; it stays within two points."""
    match = re.search(r"docstrings are (\d+)% of the library's lines", _page())
    assert match, "docs/architecture.md states the docstring share as 'docstrings are N% of the library's lines'"
    assert abs(int(match.group(1)) - 100 * docstring_share()) <= 2, f"measured {100 * docstring_share():.1f}%"


def _page() -> str:
    with open(os.path.join(ROOT, "docs", "architecture.md")) as f:
        return f.read()


def _page_block(marker: str) -> str:
    """The fenced Python block after ``<!-- test: marker -->`` in docs/architecture.md."""
    match = re.search(rf"<!-- test: {marker} -->\s*```python\n(.*?)```", _page(), re.S)
    assert match, f"docs/architecture.md has no Python block after <!-- test: {marker} -->"
    return match.group(1)


def test_the_toy_kind_of_the_page_runs(tmp_path, monkeypatch, capsys):
    from tna_jax.experiments import registry

    monkeypatch.setattr(registry, "KINDS", dict(registry.KINDS))  # the toy kind stays in this test
    monkeypatch.chdir(tmp_path)
    kind_code, run_code = _page_block("toy-kind"), _page_block("toy-run")
    assert len(kind_code.strip().splitlines()) <= 60  # adding a kind takes a page, not a module
    namespace: dict = {}
    exec(compile(kind_code, "docs/architecture.md (toy kind)", "exec"), namespace)
    exec(compile(run_code, "docs/architecture.md (toy run)", "exec"), namespace)
    report = namespace["report"]
    assert report["kind"] == "init_lmc"
    # The numbers the page prints: at initialisation no loss barrier, the endpoints near chance.
    assert report["loss_barrier"] == 0.0
    assert 0.0 < report["avg_endpoint_accuracy"] < 0.2
    assert report["markdown"] == "loss barrier 0.000, accuracy at α = 0.5 0.125\n"
    workdir = tmp_path / "runs" / "init_lmc"
    assert sorted(os.listdir(workdir)) == [".lock", "config.json", "report.json", "report.md"]
    with open(workdir / "report.json") as f:
        assert json.load(f)["loss_barrier"] == pytest.approx(report["loss_barrier"])
    assert "loss barrier 0.000, accuracy at α = 0.5 0.125" in _page()
    assert capsys.readouterr().out == report["markdown"] + "\n"


def _text_files(*tops: str) -> list[str]:
    """The Python, Markdown, YAML and notebook files under (or at) the given repository paths."""
    found = []
    for top in (os.path.join(ROOT, t) for t in tops):
        walked = os.walk(top) if os.path.isdir(top) else [(os.path.dirname(top), [], [os.path.basename(top)])]
        found += [os.path.join(d, n) for d, _, names in walked for n in names
                  if n.endswith((".py", ".md", ".yml", ".ipynb")) and os.path.exists(os.path.join(d, n))]
    return found


def test_docs_architecture_is_the_design_reference():
    """The architecture page is the project's own; nothing cites a design file outside the repository."""
    outside = "DESIGN" + ".md"
    citing = []
    for path in _text_files("tna_jax", "docs", "tests", "examples", "configs", "benchmarks", "colab", "README.md",
                            "BENCHMARKS.md", "train.py", "mkdocs.yml"):
        with open(path, encoding="utf-8") as f:
            if outside in f.read():
                citing.append(os.path.relpath(path, ROOT))
    assert not citing, f"cite docs/architecture.md instead of {outside} in: {citing}"
