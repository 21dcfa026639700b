"""A griffe extension that renders the docstrings' Sphinx (reST) markup as mkdocstrings Markdown.

The library's docstrings are Google style with reST inline markup (``:func:`fit```, ``:math:`x```,
``.. note::``). mkdocstrings renders Markdown, so without this extension the API pages would show
that markup raw. It runs once the package is loaded (before any docstring is parsed) and rewrites
every docstring's text:

- ``:func:``/``:class:``/``:meth:``/``:mod:``/``:attr:``/``:data:``/``:exc:``/``:obj:`` roles become
  autorefs cross-references, ``[`fit`][tna_jax.training.fit]``. Short names are resolved as Python
  resolves them from the docstring's owner (the class, then the enclosing modules), then by a
  unique rendered name anywhere in the package. ``!name`` shows the name without a link. A name whose target the site does not render
  (external, private, undocumented) becomes inline code, so ``mkdocs build --strict`` never meets
  a dangling reference. ``~a.b.c`` shows ``c``; ``title <target>`` shows the title.
- ``:math:`...``` becomes ``\\(...\\)`` and ``.. math::`` blocks become ``\\[...\\]``
  (pymdownx.arithmatex, typeset by MathJax).
- ``.. note::``, ``.. warning::`` and the other admonitions become Material admonitions
  (``!!! note``); ``.. seealso::``, ``.. deprecated::`` and ``.. versionadded::`` get titles.
- A name in single backticks (`fit`, Sphinx's default role) links too when it names an entry of
  the docstring owner's class or module (not one of its parameters), or is a full dotted path.
- Display math indented as under a reST list item (``  $$x$$``) moves to the margin, where
  Markdown and arithmatex see it as a block.
- A paragraph ending in the literal-block marker ``::`` ends in ``:`` (the indented block after
  it is a Markdown code block already).

Registered in mkdocs.yml under the python handler's ``extensions``. The ``:::`` directives of the
API pages (docs/api) tell which modules (and, with ``members: false``, which not their members)
the site renders, hence which references can link.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import griffe

__all__ = ["SphinxRoles", "documented_modules", "rewrite"]

# `name` (single backticks, not part of ``literal`` or of a [`link`][id]): Sphinx's default role.
_CODE_NAME = re.compile(r"(?<![`\[])`([A-Za-z_][\w.]*)`(?![`\]])")
_ROLE = re.compile(r":(?:py:)?(func|class|meth|mod|attr|data|exc|obj|const|math):`([^`]+)`")
_TITLED = re.compile(r"^(.*?)\s*<([^<>]+)>$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([a-z-]+)::\s*(.*)$")
_ADMONITIONS = {
    "note": ("note", None), "warning": ("warning", None), "tip": ("tip", None), "hint": ("tip", None),
    "important": ("important", None), "attention": ("warning", None), "caution": ("warning", None),
    "danger": ("danger", None), "error": ("danger", None), "seealso": ("note", "See also"),
    "deprecated": ("warning", "Deprecated since version {}"),
    "versionadded": ("note", "New in version {}"), "versionchanged": ("note", "Changed in version {}"),
}
# The names of the leaves an API page renders: ``::: module`` blocks with their options.
_API_DIRECTIVE = re.compile(r"^::: ([\w.]+)[ \t]*\n((?:[ \t]+.*\n?)*)", re.M)

_API_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "api")

Resolver = Callable[[str], "str | None"]


def documented_modules(api_dir: str) -> dict[str, bool]:
    """The modules the API pages render.

    Args:
      api_dir: the folder of the API pages (Markdown files with ``::: module`` directives).

    Returns:
      ``{module path: whether its members are rendered}`` (``members: false`` renders the heading
      and the module docstring only).

    Raises:
      FileNotFoundError: if ``api_dir`` is not a folder.
    """
    if not os.path.isdir(api_dir):
        raise FileNotFoundError(f"api_dir={api_dir!r}: not a folder (the API pages with '::: module' directives)")
    found: dict[str, bool] = {}
    for path in sorted(glob.glob(os.path.join(api_dir, "**", "*.md"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            for match in _API_DIRECTIVE.finditer(f.read()):
                members_shown = not re.search(r"^\s*members:\s*(false|\[\s*\])\s*$", match.group(2), re.M)
                found[match.group(1)] = found.get(match.group(1), False) or members_shown
    return found


def _role(kind: str, text: str, resolve: Resolver) -> str:
    if kind == "math":
        return rf"\({text}\)"
    if text.startswith("!"):  # Sphinx: show the name, do not link it
        return f"`{text[1:]}`"
    titled = _TITLED.match(text)
    if titled:
        title, target = titled.group(1), titled.group(2)
    else:
        target = text
        title = target.lstrip("~.").rsplit(".", 1)[-1] if target.startswith("~") else target.lstrip(".")
    target = target.lstrip("~.")
    path = resolve(target)
    return f"[`{title}`][{path}]" if path else f"`{title}`"


def _code_name(written: str, name: str, resolve: Resolver) -> str:
    path = resolve(name)
    return f"[`{name}`][{path}]" if path else written


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], start: int, indent: int) -> tuple[list[str], int]:
    """The lines from ``start`` indented deeper than ``indent`` (blank lines inside kept), dedented."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    body = lines[start:end]
    depth = min((_indent(line) for line in body if line.strip()), default=0)
    return [line[depth:] for line in body], end


def _directive(match: re.Match, lines: list[str], i: int, resolve: Resolver,
               resolve_code: Resolver | None) -> tuple[list[str], int] | None:
    pad, name, argument = match.group(1), match.group(2), match.group(3).strip()
    if name != "math" and name not in _ADMONITIONS:
        return None
    body, end = _block(lines, i + 1, len(pad))
    while body and (not body[0].strip() or re.match(r"^:[\w-]+:(\s|$)", body[0])):
        body = body[1:]  # the directive's options (:label: eq) and the blank line after them
    if name == "math":
        formula = ([argument] if argument else []) + [line for line in body if line.strip()]
        return ["", pad + r"\[", *(pad + line for line in formula), pad + r"\]", ""], end
    kind, title = _ADMONITIONS[name]
    if title and "{}" in title:  # ".. deprecated:: 1.2 text": the version goes in the title
        version, _, argument = argument.partition(" ")
        title = title.format(version).strip()
    head = f"{pad}!!! {kind}" + (f' "{title}"' if title else "")
    text = "\n".join(([argument.strip()] if argument.strip() else []) + body)
    text = rewrite(text, resolve, resolve_code).split("\n")
    return [head, *(pad + "    " + line if line.strip() else "" for line in text)], end


def _display_math(lines: list[str]) -> list[str]:
    """Display math (``$$ ... $$`` or ``\\[ ... \\]``) indented by 1-3 spaces, as under a
    reST list item, moved to the margin between blank lines: Markdown needs 4 spaces to continue
    a list, so it would end the list anyway, and arithmatex then sees ``$`` ``$x$`` ``$``."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        opening = "$$" if stripped.startswith("$$") else "\\[" if stripped == "\\[" else None
        if opening is None or not 0 < _indent(line) < 4:
            out.append(line)
            i += 1
            continue
        closing = "$$" if opening == "$$" else "\\]"
        end = i
        while end < len(lines) and not (lines[end].rstrip().endswith(closing) and (end > i or len(stripped) > 2)):
            end += 1
        block = [x.strip() for x in lines[i:end + 1]]
        out.extend(([""] if out and out[-1].strip() else []) + block + [""])
        i = end + 1
        while i < len(lines) and not lines[i].strip():
            i += 1
    return out


def rewrite(text: str, resolve: Resolver, resolve_code: Resolver | None = None) -> str:
    """A docstring with its reST markup replaced by Markdown that mkdocstrings renders.

    Args:
      text: the docstring.
      resolve: maps a role's target as written (``fit``, ``tna_jax.lmc.lmc_path``) to the identifier
        of a rendered API entry, or None when the site has no entry for it (then it is shown as code).
      resolve_code: the same for a name in single backticks (`fit`), which becomes a link when it
        names an entry for sure and stays code otherwise. None: such names stay code.

    Returns:
      The rewritten docstring. Fenced code and doctests (to the next blank line) are left as they are.
    """
    lines = text.split("\n")
    out: list[str] = []
    fenced = doctest = False
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
        doctest = stripped.startswith(">>>") or (doctest and bool(stripped))  # a doctest runs to a blank line
        if fenced or doctest:
            out.append(line)
            i += 1
            continue
        directive = _DIRECTIVE.match(line)
        converted = _directive(directive, lines, i, resolve, resolve_code) if directive else None
        if converted:
            out.extend(converted[0])
            i = converted[1]
            continue
        line = _ROLE.sub(lambda m: _role(m.group(1), m.group(2), resolve), line)
        if resolve_code is not None:
            line = _CODE_NAME.sub(lambda m: _code_name(m.group(0), m.group(1), resolve_code), line)
        if line.rstrip().endswith("::") and not line.rstrip().endswith(":::"):
            line = line.rstrip()[:-2].rstrip()
            line = line + ":" if line.strip() else line
        out.append(line)
        i += 1
    return "\n".join(_display_math(out))


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


def _final(obj: Any) -> griffe.Object | None:
    try:
        return obj.final_target if obj.is_alias else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


class SphinxRoles(griffe.Extension):
    """Rewrites the reST markup of every docstring of a package once it is loaded.

    Args:
      api_dir: the folder of the API pages; references link only to entries those pages render.
        Default: ``api/`` beside this file (docs/api, wherever mkdocs runs from). None: every
        public, documented object counts as rendered.
      link_code: also link names in single backticks (`fit`) that name an entry of the owner's
        class or module, or a full dotted path (Sphinx's ``default_role = "py:obj"``).
    """

    def __init__(self, api_dir: str | None = _API_DIR, link_code: bool = True) -> None:
        super().__init__()
        self.modules = documented_modules(api_dir) if api_dir else None
        self.link_code = link_code

    def rendered(self, obj: griffe.Object) -> bool:
        """Whether the site has an entry (an anchor) for ``obj``."""
        parts = obj.path.split(".")
        if any(part.startswith("_") for part in parts):
            return False
        if obj.is_module:
            return self.modules is None or obj.path in self.modules
        if not obj.docstring:
            return False
        parent = obj.parent
        if parent is None:
            return False
        if parent.is_module:
            return self.modules is None or self.modules.get(parent.path, False)
        return self.rendered(parent)

    def anchors(self, pkg: griffe.Module) -> dict[str, str]:
        """``{object path: the identifier of its entry}`` for every object the site renders.

        An object is rendered where it is defined, or else where a rendered module re-exports it
        (an alias listed in that module's ``__all__``), as ``tna_jax.data.Dataset``.
        """
        found = {obj.path: obj.path for obj in _objects(pkg) if self.rendered(obj)}
        for module in _objects(pkg):
            if not module.is_module or not (self.modules is None or self.modules.get(module.path, False)):
                continue
            for alias in module.members.values():
                target = _final(alias) if alias.is_alias and alias.is_exported else None
                if target is not None and target.path not in found and target.docstring \
                        and target.path.startswith(pkg.path + ".") and not alias.name.startswith("_"):
                    found[target.path] = alias.path
        return found

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if self.modules is not None and not any(m.split(".")[0] == pkg.path for m in self.modules):
            return  # a package loaded to resolve an alias, not one the site documents
        names = _Names(pkg, loader.modules_collection, self.anchors(pkg))
        for obj in _objects(pkg):
            if obj.docstring and obj.docstring.value:
                obj.docstring.value = rewrite(obj.docstring.value, names.role_resolver(obj),
                                              names.code_resolver(obj) if self.link_code else None)


class _Names:
    """Resolves the names a docstring mentions to the identifiers of the entries the site renders."""

    def __init__(self, pkg: griffe.Module, collection: griffe.ModulesCollection, anchors: dict[str, str]):
        self.pkg, self.collection, self.anchors = pkg, collection, anchors
        self.by_name: dict[str, set[str]] = {}
        for path in anchors:
            self.by_name.setdefault(path.rsplit(".", 1)[-1], set()).add(path)

    def lookup(self, path: str) -> griffe.Object | None:
        try:
            found = self.collection[path]
        except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
        return _final(found)

    def role_resolver(self, owner: griffe.Object) -> Resolver:
        """For roles: as Python resolves a name from the owner (its class, then the enclosing
        modules and packages), then a unique rendered name anywhere in the package."""
        scopes = []
        scope: griffe.Object | None = owner if (owner.is_class or owner.is_module) else owner.parent
        while scope is not None:
            scopes.append(scope.path)
            scope = scope.parent

        def resolve(name: str) -> str | None:
            for candidate in [f"{s}.{name}" for s in scopes] + [name]:
                target = self.lookup(candidate)
                if target is not None:
                    return self.anchors.get(target.path)
            matching = [p for p in self.by_name.get(name.rsplit(".", 1)[-1], ()) if p.endswith("." + name)]
            return self.anchors[matching[0]] if len(matching) == 1 else None

        return resolve

    def code_resolver(self, owner: griffe.Object) -> Resolver:
        """For `name`: stricter than a role, since such a name is often a parameter or a value. A
        bare name is looked up in the owner's own class and module only, never as a module or a
        parameter of the owner; a dotted one from the package or the owner's module."""
        parameters = {p.name for p in getattr(owner, "parameters", None) or ()}
        init = owner.members.get("__init__") if owner.is_class else None
        if init is not None and not init.is_alias:
            parameters |= {p.name for p in init.parameters}
        scopes = [s for s in (owner, owner.parent, owner.module) if s is not None and not s.is_function]

        def resolve(name: str) -> str | None:
            if name.split(".")[0] in parameters:
                return None
            if "." in name:
                prefix = "" if name.startswith(self.pkg.path + ".") else owner.module.path + "."
                candidates = [prefix + name]
            else:
                candidates = [f"{s.path}.{name}" for s in scopes]
            for candidate in candidates:
                target = self.lookup(candidate)
                if target is not None and target is not owner and ("." in name or not target.is_module):
                    return self.anchors.get(target.path)
            return None

        return resolve
