"""``benchmarks/run_all.py`` writes BENCHMARKS.md by merging: ``--only X`` rewrites X's section and
summary rows alone, ``--collect`` rebuilds from the JSON results, and both keep hand-written notes.
Nothing is measured here: the results are JSON files written by the test."""

from __future__ import annotations

import json
import os

from util import ROOT

from benchmarks import benchmarks_md, multihost, run_all

MACHINE = {"device": "cpu", "backend": "cpu", "device_count": 2, "cpu_count": 2, "jax": "0.10.2", "python": "3.11.7"}


def write_result(out, name, ratios, table):
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({"benchmark": name, "machine": MACHINE, "ratios": ratios, "table": table}, f)


def collect(out, report, *only):
    assert run_all.main(["--collect", "--out", str(out), "--report", str(report),
                         *(["--only", *only] if only else [])]) == 0
    return report.read_text()


def test_only_rewrites_one_section_and_its_rows_and_keeps_notes(tmp_path):
    out, report = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    out.mkdir()
    write_result(out, "lmc", {"vmap_speedup": 3.26, "torch_ratio": 5.34}, "| lmc table v1 |")
    write_result(out, "align", {"small_to_convergence_min": 1.54}, "| align table v1 |")
    first = collect(out, report, "lmc", "align")
    assert "| lmc | `vmap_speedup` | 3.26x | >= 5x | below target |" in first
    assert "| align | `small_to_convergence_min` | 1.54x | >= 1x | met |" in first
    assert "- wall time" not in first  # collected results carry no wall time: none is invented
    # Hand-written notes: under the align block, between sections, after the last one.
    end_align = benchmarks_md.end("align")
    edited = (first.replace(end_align, end_align + "\n\nAlign note: measured at load 8.")
              .replace("## align", "A note between sections.\n\n## align")
              + "\n## Notes\n\nA closing section of our own.\n")
    report.write_text(edited)
    write_result(out, "lmc", {"vmap_speedup": 6.5, "torch_ratio": 5.34}, "| lmc table v2 |")
    write_result(out, "align", {"small_to_convergence_min": 0.2}, "| align table v2 |")  # not to be read
    second = collect(out, report, "lmc")
    assert "| lmc | `vmap_speedup` | 6.50x | >= 5x | met |" in second and "| lmc table v2 |" in second
    assert "| lmc table v1 |" not in second and "3.26x" not in second
    # align untouched: its rows, its table and every note.
    assert "| align | `small_to_convergence_min` | 1.54x | >= 1x | met |" in second and "| align table v1 |" in second
    for note in ("Align note: measured at load 8.", "A note between sections.", "## Notes\n\nA closing section"):
        assert note in second, note
    assert second.index("| lmc | `vmap_speedup`") < second.index("| align |")  # the summary keeps run_all's order
    # A full collect rewrites both sections and still keeps the notes.
    third = collect(out, report)
    assert "| align table v2 |" in third and "0.20x" in third and "Align note: measured at load 8." in third
    assert "A note between sections." in third and third.count("## lmc") == 1 and third.count("## align") == 1
    assert collect(out, report) == third  # idempotent


def without_benchmark(text: str, name: str) -> str:
    """`text` (a BENCHMARKS.md) without `name`'s summary rows and section."""
    text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith(f"| {name} |"))
    if f"## {name}\n" in text:
        start = text.index(f"## {name}\n")
        stop = text.index(benchmarks_md.end(name), start) + len(benchmarks_md.end(name))
        text = text[:start].rstrip("\n") + "\n" + text[stop:].lstrip("\n")
    return text


def test_a_new_benchmark_gets_its_section_and_the_committed_file_keeps_its_text(tmp_path):
    committed = open(os.path.join(ROOT, "BENCHMARKS.md")).read()
    # Every generated part of the committed file is marked, so a rerun keeps what is outside.
    for name in ["summary"] + [b.name for b in run_all.BENCHMARKS if f"## {b.name}\n" in committed]:
        assert benchmarks_md.begin(name) in committed and benchmarks_md.end(name) in committed, name
    assert run_all.markdown({}, [], committed) == committed  # nothing run: nothing changes
    committed = without_benchmark(committed, "multihost")  # the committed file may already hold it
    rows = [{"processes": 1, "runs_per_s_per_process": 8.0}, {"processes": 2, "runs_per_s_per_process": 6.0},
            {"processes": 4, "runs_per_s_per_process": 2.0}]
    ratios = multihost.scaling_ratios(rows)
    assert ratios == {"per_process_rate_2_over_1": 0.75, "per_process_rate_4_over_1": 0.25}
    assert {r.key for r in run_all.available()["multihost"].ratios} == set(ratios)
    results = {"multihost": {"ratios": ratios, "table": "| scaling |", "machine": MACHINE}}
    merged = run_all.markdown(results, run_all.ratio_rows(results), committed)
    end_summary = benchmarks_md.end("summary")
    old_summary, old_sections = committed.split(end_summary)
    new_summary, new_sections = merged.split(end_summary)
    assert new_summary.startswith(old_summary.rstrip())  # every old row kept, the new ones after them
    assert new_summary[len(old_summary.rstrip()):].strip().splitlines() == [
        "| multihost | `per_process_rate_2_over_1` | 0.75x |  | reported | run-epochs/s per process, 2 processes / 1 "
        "(1.0 = perfect scaling) |",
        "| multihost | `per_process_rate_4_over_1` | 0.25x |  | reported | run-epochs/s per process, 4 processes / 1 "
        "(1.0 = perfect scaling) |"]
    assert new_sections.startswith(old_sections.rstrip())  # every old section (and note) as it was
    assert new_sections.rstrip().endswith("- machine: cpu (cpu), 2 JAX devices, 2 CPUs, jax 0.10.2, Python 3.11.7\n"
                                          + benchmarks_md.end("multihost"))
