"""The shell commands that README.md and docs/**/*.md show, split as a shell splits them.

A command is taken from every ``bash``/``sh``/``shell`` fenced block (lines joined at a trailing
backslash, comments dropped, ``&&``/``||``/``;``/``&``/``|`` separating commands) and from every
inline code span that starts with ``python `` or ``pip install`` (spans with ``<placeholders>``
are templates, not commands). Wrappers (``nice -n 10``, ``srun``, ``time``, leading ``VAR=value``)
are removed, and a quoted argument holding a command of its own (``gcloud ... --command "cd x &&
python train.py ..."``) is parsed too, so every ``python train.py`` a page shows is found.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex

from util import ROOT

SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
SEPARATORS = ("&&", "||", ";", "&", "|")
FENCE = re.compile(r"^```(\S*)\s*$")
INLINE = re.compile(r"`((?:python|pip install) [^`]+)`")


@dataclasses.dataclass(frozen=True)
class Command:
    page: str  # relative to the repository root
    line: int  # where the command starts on the page
    argv: tuple[str, ...]
    background: bool = False  # ended by "&"
    inline: bool = False  # from a `code span` in the text (it may only name a script)

    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def text(self) -> str:
        return shlex.join(self.argv) + (" &" if self.background else "")


def pages() -> list[str]:
    """README.md and every page under docs/, relative to the repository root."""
    found = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)]
    return sorted(os.path.relpath(p, ROOT) for p in found)


def logical_lines(code: str, first_line: int) -> list[tuple[int, str]]:
    """``(line, text)`` of a block's lines, a line ending in a backslash joined with the next."""
    out, pending, start = [], "", None
    for n, line in enumerate(code.splitlines(), first_line):
        if start is None:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending, start = "", None
    if pending:
        out.append((start, pending))
    return out


def _unwrap(argv: list[str]) -> list[str]:
    while argv and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):
        argv = argv[1:]  # VAR=value before the command
    if argv[:1] == ["nice"]:
        argv = argv[3:] if argv[1:2] == ["-n"] else argv[2:] if re.fullmatch(r"-\d+", argv[1]) else argv[1:]
        return _unwrap(argv)
    if argv[:1] in (["srun"], ["time"]):
        return _unwrap(argv[1:])
    return argv


def split_commands(text: str) -> list[tuple[list[str], bool]]:
    """``[(argv, background), ...]`` of one logical shell line (comments dropped)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in SEPARATORS:
            if current:
                commands.append((_unwrap(current), token == "&"))
            current = []
        else:
            current.append(token)
    if current:
        commands.append((_unwrap(current), False))
    out = []
    for argv, background in commands:
        if argv:
            out.append((argv, background))
        for arg in argv[1:]:  # a command inside an argument (ssh, gcloud --command "...")
            if re.search(r"\b(python|pip) ", arg):
                out += split_commands(arg)
    return out


def fenced_shell_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line of the code, code)`` of each shell block."""
    out, lang, body, start = [], None, [], 0
    for n, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if lang is None:
            if fence:
                lang, body, start = fence.group(1), [], n + 1
        elif fence and not fence.group(1):
            if lang in SHELL_LANGUAGES:
                out.append((start, "\n".join(body)))
            lang = None
        else:
            body.append(line)
    return out


def commands_of(text: str, page: str = "<text>") -> list[Command]:
    """Every command of a page: its shell blocks, then its inline ``python``/``pip`` spans."""
    found = []
    for start, code in fenced_shell_blocks(text):
        for line, logical in logical_lines(code, start):
            found += [Command(page, line, tuple(argv), bg) for argv, bg in split_commands(logical)]
    in_fence = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for span in INLINE.findall(line):
            if "<" not in span:
                found += [Command(page, n, tuple(argv), bg, inline=True) for argv, bg in split_commands(span)]
    return found


def page_commands(page: str) -> list[Command]:
    with open(os.path.join(ROOT, page)) as f:
        return commands_of(f.read(), page)


def all_commands() -> list[Command]:
    return [c for page in pages() for c in page_commands(page)]


def flag_value(argv: tuple[str, ...] | list[str], flag: str) -> str | None:
    """The value of ``--flag=v`` or ``--flag v`` in `argv` (the last one given), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"{flag}="):
            value = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def replace_flag(argv: tuple[str, ...] | list[str], flag: str, value: str) -> list[str]:
    """`argv` with every ``--flag=v`` / ``--flag v`` set to `value` (in the ``--flag=value`` form)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(f"{flag}="):
            out.append(f"{flag}={value}")
        elif arg == flag and i + 1 < len(argv):
            out.append(f"{flag}={value}")
            skip = True
        else:
            out.append(arg)
    return out
