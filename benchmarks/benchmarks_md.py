"""BENCHMARKS.md: the generated parts, and their merge into the file as it stands.

The generator owns only the text between a pair of markers::

    <!-- generated: NAME -->
    ...
    <!-- end generated: NAME -->

``summary`` (the machine line and the table of every ratio) sits before the first section; each
benchmark has a section ``## NAME`` holding its block. Everything else is hand-written and kept:
the title and text before the summary, notes under a section's block, sections of other names.
Rewriting one benchmark (``run_all.py --only NAME``) replaces its block and its rows of the
summary table; the other sections and rows stay as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SUMMARY = "summary"
TABLE_HEAD = ["| benchmark | ratio | value | target | status | meaning |", "|---|---|---|---|---|---|"]
HEADING = re.compile(r"^## (\S+)\s*$")
MACHINE = re.compile(r"^- machine: (.*)$", re.M)
HOW_TO_EDIT = ("<!-- Text between \"generated\" markers is rewritten by benchmarks/run_all.py; write notes outside "
               "them (under a section's block, or between sections): they are kept. -->")


def begin(name: str) -> str:
    return f"<!-- generated: {name} -->"


def end(name: str) -> str:
    return f"<!-- end generated: {name} -->"


def block(name: str, body: str) -> str:
    """`body` between the markers of `name`."""
    return f"{begin(name)}\n{body.strip()}\n{end(name)}"


def machine_line(machine: dict) -> str:
    """One line naming the machine of a benchmark's JSON payload (``benchmarks.common.machine_info``)."""
    return (f"{machine.get('device', '?')} ({machine.get('backend', '?')}), {machine.get('device_count', '?')} JAX "
            f"devices, {machine.get('cpu_count', '?')} CPUs, jax {machine.get('jax', '?')}, Python "
            f"{machine.get('python', '?')}")


def ratio_line(row: dict) -> str:
    value = "" if row["value"] is None else f"{row['value']:.2f}x"
    target = "" if row["target"] is None else f">= {row['target']:g}x"
    return f"| {row['benchmark']} | `{row['ratio']}` | {value} | {target} | {row['status']} | {row['meaning']} |"


def section_body(what: str, payload: dict) -> str:
    """The generated part of one benchmark's section: what it measures, its tables, its extras."""
    lines = [what + ".", ""]
    if "error" in payload:
        return "\n".join([*lines, f"Not run: {payload['error']}."])
    for key in ("table", "tables"):
        tables = payload.get(key)
        for table in ([tables] if isinstance(tables, str) else (tables or [])):
            lines += [table, ""]
    extras = {k: payload[k] for k in ("compile_s", "compile_s_8_seeds", "steady_epoch_s", "steady_epoch_s_8_seeds",
                                      "matmul_peak_gflops", "achieved_gflops", "peak_fraction", "note")
              if k in payload}
    for k, v in extras.items():
        lines.append(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}")
    if "machine" in payload:
        lines.append(f"- machine: {machine_line(payload['machine'])}")
    if payload.get("wall_s") is not None:  # absent when collected from JSON files: not invented as 0 s
        lines.append(f"- wall time: {payload['wall_s']:.0f} s")
    return "\n".join(lines)


def _split(text: str) -> tuple[str, list[tuple[str | None, str]]]:
    """``(preamble, [(heading name or None, section text)])``; sections start at ``## `` lines."""
    preamble, sections, current, name = [], [], None, None
    for line in text.splitlines():
        heading = HEADING.match(line)
        if heading:
            if current is not None:
                sections.append((name, "\n".join(current)))
            current, name = [line], heading.group(1)
        elif current is None:
            preamble.append(line)
        else:
            current.append(line)
    if current is not None:
        sections.append((name, "\n".join(current)))
    return "\n".join(preamble), sections


def _replace_block(text: str, name: str, body: str) -> str | None:
    """`text` with the block of `name` replaced by `body` (None when `text` has no such block)."""
    pattern = re.compile(re.escape(begin(name)) + r".*?" + re.escape(end(name)), re.S)
    if not pattern.search(text):
        return None
    return pattern.sub(lambda _: block(name, body), text, count=1)


def _block_body(text: str, name: str) -> str:
    match = re.search(re.escape(begin(name)) + r"\n?(.*?)" + re.escape(end(name)), text, re.S)
    return match.group(1) if match else ""


def _summary_body(rows: list[str], machines: list[str]) -> str:
    distinct = sorted(set(machines))
    if len(distinct) == 1:
        machine = f"Machine: {distinct[0]}."
    elif distinct:
        machine = "Machines differ between benchmarks: each section names its own."
    else:
        machine = "Machine: not recorded."
    return "\n".join([machine, "", *TABLE_HEAD, *rows])


def merge(existing: str | None, sections: dict[str, str], rows: dict[str, list[str]], order: Sequence[str],
          header: str) -> str:
    """BENCHMARKS.md with the generated parts of `sections` rewritten and everything else kept.

    Args:
      existing: the file's text (None or empty: a new file).
      sections: ``{name: generated body}`` of the benchmarks written now.
      rows: ``{name: summary table lines}`` of the same benchmarks.
      order: every known benchmark name, in the order of the summary table and of new sections.
      header: the title and text of a new file (before the summary block).

    Returns:
      The new text. Rows and sections of benchmarks not in `sections` are the existing ones;
      a section that exists without markers (a file from before them) is replaced whole.
    """
    preamble, existing_sections = _split(existing or "")
    if begin(SUMMARY) not in preamble:
        preamble = f"{header.rstrip()}\n\n{HOW_TO_EDIT}\n\n{block(SUMMARY, '')}\n"

    out_sections, seen = [], set()
    for name, text in existing_sections:
        if name in sections:
            seen.add(name)
            replaced = _replace_block(text, name, sections[name])
            if replaced is None:
                print(f"BENCHMARKS.md: section {name!r} had no generated markers; it was replaced whole")
                replaced = f"## {name}\n\n{block(name, sections[name])}\n"
            text = replaced
        out_sections.append((name, text))
    for name in order:
        if name in sections and name not in seen:
            out_sections.append((name, f"## {name}\n\n{block(name, sections[name])}\n"))

    # The summary: this run's rows, then the kept rows of the others, in `order`.
    kept: dict[str, list[str]] = {}
    for line in _block_body(preamble, SUMMARY).splitlines():
        cell = re.match(r"^\| ([^|]+?) \| `", line)
        if cell and cell.group(1) not in sections:
            kept.setdefault(cell.group(1), []).append(line)
    all_rows = {**kept, **rows}
    names = [n for n in order if n in all_rows] + [n for n in all_rows if n not in order]
    machines = []
    old_machine = re.search(r"^Machine: (.*)\.$", _block_body(preamble, SUMMARY), re.M)
    for name, text in out_sections:
        if name in order:
            # A section from before the machine bullets was measured on the summary's old machine.
            machines += MACHINE.findall(_block_body(text, name)) or ([old_machine.group(1)] if old_machine else [])
    summary = _summary_body([line for n in names for line in all_rows[n]], machines)
    preamble = _replace_block(preamble, SUMMARY, summary)

    parts = [preamble.rstrip() + "\n"] + [text.rstrip() + "\n" for _, text in out_sections]
    return "\n".join(parts)
