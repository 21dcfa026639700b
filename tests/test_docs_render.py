"""docs/griffe_sphinx_roles.py: the griffe extension that renders the docstrings' reST markup.

The whole site is built by tests/test_docs.py (which fails on raw markup left in the API pages);
these tests pin the rewriting rules on small inputs and the name resolution on a toy package.
"""

from __future__ import annotations

import importlib.util
import os
import textwrap

import griffe
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("griffe_sphinx_roles", os.path.join(ROOT, "docs", "griffe_sphinx_roles.py"))
roles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(roles)


def _known(name):
    return {"fit": "pkg.training.fit", "pkg.models.Net": "pkg.models.Net", "Net": "pkg.models.Net"}.get(name)


@pytest.mark.parametrize("text, expected", [
    ("Calls :func:`fit` once.", "Calls [`fit`][pkg.training.fit] once."),
    (":class:`~pkg.models.Net` and :class:`pkg.models.Net`",
     "[`Net`][pkg.models.Net] and [`pkg.models.Net`][pkg.models.Net]"),
    (":func:`the loop <fit>`", "[`the loop`][pkg.training.fit]"),
    (":py:class:`Net`", "[`Net`][pkg.models.Net]"),
    (":func:`jax.jit` and :data:`UNKNOWN`", "`jax.jit` and `UNKNOWN`"),
    (":func:`!fit` is not linked", "`fit` is not linked"),
    (r"with :math:`\mu_k = s\, u_k`", r"with \(\mu_k = s\, u_k\)"),
    ("Fields::\n\n    a = 1", "Fields:\n\n    a = 1"),
    ("text\n\n::\n\n    code", "text\n\n\n\n    code"),
    (">>> f(':func:`fit`')\n':func:`fit`'", ">>> f(':func:`fit`')\n':func:`fit`'"),
    ("```\n:func:`fit`\n```", "```\n:func:`fit`\n```"),
])
def test_inline_markup(text, expected):
    assert roles.rewrite(text, _known) == expected


def test_math_block():
    text = "Before.\n\n.. math::\n   :label: barrier\n\n   B = \\max_\\alpha L(\\alpha)\n   - L_0\n\nAfter."
    assert roles.rewrite(text, _known) == "Before.\n\n\n\\[\nB = \\max_\\alpha L(\\alpha)\n- L_0\n\\]\n\n\nAfter."
    assert roles.rewrite(".. math:: a = b", _known) == "\n\\[\na = b\n\\]\n"


def test_display_math_under_a_list_item_moves_to_the_margin():
    text = "* MergeMany: the average of\n  the aligned models:\n\n  $$P_i \\leftarrow x$$\n\nAfter."
    assert roles.rewrite(text, _known) == "* MergeMany: the average of\n  the aligned models:\n\n$$P_i \\leftarrow x$$\n\nAfter."
    assert roles.rewrite("- a\n\n  $$x\n  = y$$\n  - b", _known) == "- a\n\n$$x\n= y$$\n\n  - b"
    assert roles.rewrite("Admonition body:\n\n    $$x$$", _known) == "Admonition body:\n\n    $$x$$"


def test_admonitions():
    text = "Intro.\n\n.. note::\n   One :func:`fit`.\n\n   Two.\n\nOutside."
    assert roles.rewrite(text, _known) == (
        "Intro.\n\n!!! note\n    One [`fit`][pkg.training.fit].\n\n    Two.\n\nOutside.")
    assert roles.rewrite(".. warning:: Inline body.", _known) == "!!! warning\n    Inline body."
    assert roles.rewrite(".. deprecated:: 0.3 Use :func:`fit`.", _known) == (
        '!!! warning "Deprecated since version 0.3"\n    Use [`fit`][pkg.training.fit].')
    assert roles.rewrite("  .. seealso::\n\n     :class:`Net`", _known) == (
        '  !!! note "See also"\n      [`Net`][pkg.models.Net]')
    assert roles.rewrite(".. unknown:: kept", _known) == ".. unknown:: kept"


def _toy_package(root):
    files = {
        "toy/__init__.py": '''
            """The toy package: :class:`Net`, :func:`helper`, :mod:`toy.core`."""
            from toy.core import Net, helper
            from toy.hidden import Hidden
            __all__ = ["Net", "helper", "Hidden"]
            ''',
        "toy/core.py": '''
            """Core: :class:`Net`, :func:`~toy.core.helper`, :func:`_private`, :func:`undocumented`,
            :func:`jax.jit`, :func:`Hidden`, :meth:`Net.apply`."""

            class Net:
                """A net; :meth:`apply` runs it, :func:`helper` helps."""

                def apply(self):
                    """Runs the net."""

            def helper():
                """Helps :class:`Net`."""

            def _private():
                """Private."""

            def undocumented():
                pass

            def uses(net, helper):
                """Takes `net` and `helper`, returns a `Net`; see `toy.core.Net.apply`, `toy`, `uses`."""
            ''',
        "toy/hidden.py": '''
            """Not on any page."""

            class Hidden:
                """Rendered only through the package's re-export."""
            ''',
    }
    for path, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
        with open(os.path.join(root, path), "w") as f:
            f.write(textwrap.dedent(text).lstrip())
    api = os.path.join(root, "api")
    os.makedirs(api)
    with open(os.path.join(api, "toy.md"), "w") as f:
        f.write("# toy\n\n::: toy\n\n::: toy.core\n    options:\n      show_source: false\n")
    return api


def test_names_resolve_to_the_entries_the_site_renders(tmp_path):
    api = _toy_package(str(tmp_path))
    assert roles.documented_modules(api) == {"toy": True, "toy.core": True}
    extension = roles.SphinxRoles(api_dir=api)
    toy = griffe.load("toy", search_paths=[str(tmp_path)], extensions=griffe.load_extensions(extension))
    core = toy["core"]
    assert toy.docstring.value == (
        "The toy package: [`Net`][toy.core.Net], [`helper`][toy.core.helper], [`toy.core`][toy.core].")
    # Private and undocumented names have no entry: code. Hidden is shown where toy re-exports it.
    assert core.docstring.value == (
        "Core: [`Net`][toy.core.Net], [`helper`][toy.core.helper], `_private`, `undocumented`,\n"
        "`jax.jit`, [`Hidden`][toy.Hidden], [`Net.apply`][toy.core.Net.apply].")
    assert core["Net"].docstring.value == (
        "A net; [`apply`][toy.core.Net.apply] runs it, [`helper`][toy.core.helper] helps.")
    # `name` links only when it surely names an entry: not a parameter, a bare module or itself.
    assert core["uses"].docstring.value == (
        "Takes `net` and `helper`, returns a [`Net`][toy.core.Net]; see "
        "[`toy.core.Net.apply`][toy.core.Net.apply], `toy`, `uses`.")
    plain = griffe.load("toy", search_paths=[str(tmp_path)],
                        extensions=griffe.load_extensions(roles.SphinxRoles(api_dir=api, link_code=False)))
    assert plain["core.uses"].docstring.value.startswith("Takes `net` and `helper`, returns a `Net`;")


def test_members_false_pages_link_only_their_heading(tmp_path):
    api = _toy_package(str(tmp_path))
    with open(os.path.join(api, "toy.md"), "w") as f:
        f.write("::: toy\n    options:\n      members: false\n\n::: toy.hidden\n")
    extension = roles.SphinxRoles(api_dir=api)
    toy = griffe.load("toy", search_paths=[str(tmp_path)], extensions=griffe.load_extensions(extension))
    assert toy["core"].docstring.value.startswith("Core: `Net`, `helper`, `_private`")
    assert "[`Hidden`][toy.hidden.Hidden]" in toy["core"].docstring.value
    assert toy.docstring.value == "The toy package: `Net`, `helper`, `toy.core`."


def test_api_dir_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="api_dir="):
        roles.SphinxRoles(api_dir=str(tmp_path / "missing"))


def test_packages_the_site_does_not_document_are_left_alone(tmp_path):
    api = _toy_package(str(tmp_path))
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "__init__.py").write_text('"""Uses :func:`helper`."""\n\ndef helper():\n    """Helps."""\n')
    other = griffe.load("other", search_paths=[str(tmp_path)],
                        extensions=griffe.load_extensions(roles.SphinxRoles(api_dir=api)))
    assert other.docstring.value == "Uses :func:`helper`."
