"""Every shell command in README.md and docs/**/*.md is checked (issue 21).

- ``python train.py ...``: run through train.py's own flag parsing and ``--dry_run`` (config file,
  overrides, preflight, the model built abstractly; nothing trained or written), in one process
  for all of them: a typo, a renamed field or a missing config file fails here, naming the page
  and line. A ``tfds:`` dataset cannot be prepared in the tests: for those the dry run must stop
  at exactly that check (so everything before it, overrides included, passed).
- ``python <script> ...`` (benchmarks, examples): the script parses ``--help`` and has every flag
  the page gives it.
- ``pip install``: the extras named exist in pyproject.toml, and the target is this checkout.
- ``python -m pytest``: the README's test command (the one CI runs), wherever it is shown.
- Tools of other projects (tfds, tensorboard, gcloud, mkdocs): named on purpose in `EXTERNAL`.

The README's quickstart is run for real, exactly as written, by tests/test_quickstart.py.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest
from doc_commands import Command, all_commands, commands_of, flag_value, replace_flag, split_commands
from util import ROOT

EXTERNAL = {
    "tfds": "TensorFlow Datasets' CLI (prepares a dataset)",
    "tensorboard": "TensorBoard",
    "gcloud": "Google Cloud's CLI",
    "mkdocs": "the docs site (mkdocs.yml)",
    "cd": "shell",
    "wait": "shell",
}
# Stand-ins for the variables the pages use; the tests write nothing outside their temp dir.
VARIABLES = ("HOME", "SCRATCH")
COMMANDS = all_commands()


def test_the_parser_splits_as_a_shell_does():
    text = "\n".join([
        "```bash",
        "python train.py --config=configs/a.py --workdir=runs/x --cpu_devices=2 \\",
        "    --coordinator=127.0.0.1:1 --process_id=0 &   # the first",
        'nice -n 10 python train.py --config c.py --config.sweep.r="(0.0, 0.2)" && echo done',
        "#SBATCH --nodes=2",
        "srun python x.py --workdir=$SCRATCH/r",
        'gcloud ssh vm --command "cd tna && python train.py --config=configs/b.py"',
        "```",
        "Run `python benchmarks/align.py --quick` or `python train.py --config configs/<file>.py`.",
    ])
    found = [(c.line, c.argv, c.background, c.inline) for c in commands_of(text)]
    assert found == [
        (2, ("python", "train.py", "--config=configs/a.py", "--workdir=runs/x", "--cpu_devices=2",
             "--coordinator=127.0.0.1:1", "--process_id=0"), True, False),
        (4, ("python", "train.py", "--config", "c.py", "--config.sweep.r=(0.0, 0.2)"), False, False),
        (4, ("echo", "done"), False, False),
        (6, ("python", "x.py", "--workdir=$SCRATCH/r"), False, False),
        (7, ("gcloud", "ssh", "vm", "--command", "cd tna && python train.py --config=configs/b.py"), False, False),
        (7, ("cd", "tna"), False, False),
        (7, ("python", "train.py", "--config=configs/b.py"), False, False),
        (9, ("python", "benchmarks/align.py", "--quick"), False, True),  # the template with <file> is skipped
    ]
    assert flag_value(["--workdir", "a", "--workdir=b"], "--workdir") == "b"
    assert replace_flag(["--workdir", "a", "-q"], "--workdir", "t") == ["--workdir=t", "-q"]
    assert split_commands("pip install -e . # comment") == [(["pip", "install", "-e", "."], False)]


def _extras() -> set[str]:
    """The optional-dependency groups of pyproject.toml."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+) = \[", section, re.M))


def _readme_test_command() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read().split("<!-- test-command -->", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]


def _is_train(c: Command) -> bool:
    return c.argv[:2] == ("python", "train.py")


def _check_pip(c: Command) -> str | None:
    args = [a for a in c.argv[2:] if a not in ("-e", "-q", "-U", "--upgrade")]
    if c.argv[1] != "install" or not args:
        return "a pip command other than 'pip install <this checkout>'"
    for arg in args:
        target, _, extras = arg.partition("[")
        if target != ".":
            return f"installs {arg!r}: tna_jax is installed from this checkout ('.'), it is not on PyPI"
        unknown = set(extras.rstrip("]").split(",")) - _extras() - {""}
        if unknown:
            return f"names extras {sorted(unknown)} that pyproject.toml does not define ({sorted(_extras())})"
    return None


def _check_static(c: Command) -> str | None:
    """Why the command is wrong without running it, or None."""
    program = c.argv[0]
    if program == "pip":
        return _check_pip(c)
    if program == "python":
        if c.argv[1:3] == ("-m", "pytest"):
            paths = [a for a in c.argv[3:] if a.startswith("tests/")]
            if paths:  # a part of the suite: the files must exist
                missing = [p for p in paths if not glob.glob(os.path.join(ROOT, p.split("::")[0]))]
                return f"no test files {missing}" if missing else None
            readme = _readme_test_command().split("&& ", 1)[1]
            return None if c.text() == readme else f"differs from the README's test command {readme!r}"
        script = os.path.join(ROOT, c.argv[1])
        return None if os.path.isfile(script) else f"{c.argv[1]} does not exist"
    if program in EXTERNAL:
        return None if program != "mkdocs" or os.path.exists(os.path.join(ROOT, "mkdocs.yml")) else "no mkdocs.yml"
    return f"{program!r} is not a command these tests know: check it and add it to EXTERNAL, or fix the page"


def test_every_command_names_what_exists():
    assert sum(_is_train(c) for c in COMMANDS) >= 30, "the pages' train.py commands were not found"
    wrong = [f"{c.where()}: `{c.text()}`: {why}" for c in COMMANDS if (why := _check_static(c))]
    assert not wrong, "\n".join(wrong)


DRIVER = r"""
import contextlib, io, json, os, runpy, sys, traceback
root, jobs, out_path = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
import train
results = []
for job in jobs:
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = list(job["argv"])  # ml_collections reads the overrides from sys.argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if job["train"]:
                sys.modules.pop("config_config", None)  # ml_collections' module name for every config file
                train.FLAGS = train.flags.FlagValues()
                train.define_flags(train.FLAGS)
                try:
                    train.parse_flags(sys.argv, train.FLAGS)
                except train.flags.Error as e:
                    print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
                    code = train.USER_ERROR_EXIT
                else:
                    train.main(["train.py"])
            else:
                runpy.run_path(os.path.join(root, job["argv"][0]), run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
with open(out_path, "w") as f:
    json.dump(results, f)
"""


def _expand(arg: str, env: dict[str, str]) -> str:
    for name in re.findall(r"\$\{?(\w+)", arg):
        assert name in env, f"a page uses ${name}: add a stand-in to VARIABLES"
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], arg)


def _train_job(c: Command, tmp, env) -> list[str]:
    """The page's train.py argv, variables expanded and an absolute workdir moved into `tmp`."""
    argv = [_expand(a, env) for a in c.argv[1:]]
    workdir = flag_value(argv, "--workdir")
    if workdir and os.path.isabs(workdir) and not workdir.startswith(str(tmp)):
        argv = replace_flag(argv, "--workdir", str(tmp / "root") + workdir)
    return [*argv, "--dry_run"]


def _script_job(c: Command) -> tuple[list[str], list[str]]:
    """``(argv for --help, the flags the page passes)``."""
    given = [re.sub(r"[\[\]]", "", a).split("=", 1)[0] for a in c.argv[2:] if a.lstrip("[").startswith("-")]
    return [c.argv[1], "--help"], given


# Commands with one mistake each, and what their error must name.
WRONG = [
    (["train.py", "--config=configs/quickstart.py", "--config.train.epochz=3"], "config.train.epochz"),
    (["train.py", "--config=configs/no_such.py"], "configs/no_such.py"),
    (["train.py", "--config=configs/quickstart.py", "--workdir=gs://bucket/run"], "--workdir=gs://bucket/run: a URL"),
    (["train.py", "--config=configs/quickstart.py", "--config.anchor.include=dense_9"], "selects no parameter"),
    (["train.py", "--config=configs/quickstart.py", "--config.train.epochs=-1"], "config.train.epochs"),
    # ../held: a workdir with checkpoints of the quickstart at another learning rate (made below).
    (["train.py", "--config=configs/quickstart.py", "--workdir=../held"],
     "holds a run with a different config: optimizer.learning_rate (was 0.01, now 0.05)"),
]


def held_workdir(path):
    """A workdir holding a run of the quickstart at learning rate 0.01 (config.json, a checkpoint)."""
    from configs.quickstart import get_config
    from tna_jax import checkpoint as ckpt_lib
    from tna_jax import workdir as workdir_lib

    config = get_config()
    config.optimizer.learning_rate = 0.01
    os.makedirs(path / "checkpoints" / "5")
    ckpt_lib.write_json(str(path / "config.json"), workdir_lib.config_dict(config))


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """Every train.py command (dry run) and every script's ``--help``, in one process from an
    empty directory that holds only a link to configs/ (the pages' relative paths work there)."""
    tmp = tmp_path_factory.mktemp("doc_commands")
    cwd = tmp / "cwd"
    cwd.mkdir()
    os.symlink(os.path.join(ROOT, "configs"), cwd / "configs")
    held_workdir(tmp / "held")
    env = {name: str(tmp / name.lower()) for name in VARIABLES}
    commands = [c for c in COMMANDS if c.argv[0] == "python" and c.argv[1] != "-m"
                and not (c.inline and _is_train(c) and flag_value(c.argv, "--config") is None)]  # a mention
    jobs, flags = [], []
    for c in commands:
        if _is_train(c):
            jobs.append({"train": True, "argv": _train_job(c, tmp, env)})
            flags.append([])
        else:
            argv, given = _script_job(c)
            jobs.append({"train": False, "argv": argv})
            flags.append(given)
    jobs += [{"train": True, "argv": [*argv, "--dry_run"]} for argv, _ in WRONG]
    unique = list(dict.fromkeys(json.dumps(j, sort_keys=True) for j in jobs))  # many pages repeat a command
    (tmp / "jobs.json").write_text("[" + ",".join(unique) + "]")
    run_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, ROOT, str(tmp / "jobs.json"), str(tmp / "results.json")],
                          cwd=cwd, env=run_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_job = dict(zip(unique, json.loads((tmp / "results.json").read_text())))
    results = [by_job[json.dumps(j, sort_keys=True)] for j in jobs]
    return {"tmp": tmp, "cwd": cwd, "commands": commands, "jobs": jobs, "flags": flags, "results": results}


# The one failure a dry run may end with in the tests: a tfds dataset that is not prepared (or
# tensorflow-datasets not installed). The config and its overrides passed to get there.
MAX_PARAMETERS = 100_000_000  # the largest model of the configs is a few million
UNPREPARED = re.compile(r"config\.data\.source='tfds:\w+': .*(is not prepared in|needs tensorflow-datasets|"
                        r"tensorflow-datasets is not installed)")


def test_every_train_command_passes_a_dry_run(dry_runs):
    failed, checked = [], 0
    for c, job, r in zip(dry_runs["commands"], dry_runs["jobs"], dry_runs["results"]):
        if not job["train"]:
            continue
        checked += 1
        last = (r["stderr"].strip().splitlines() or [""])[-1]
        if "--print_config" in job["argv"]:
            ok = r["code"] == 0 and json.loads(r["stdout"])["name"]
        elif UNPREPARED.search(r["stderr"]):
            uses_tfds = any("tfds" in a for a in c.argv) or "cifar10" in (flag_value(c.argv, "--config") or "")
            ok = r["code"] == 2 and uses_tfds
        else:
            ok = r["code"] == 0 and r["stdout"].rstrip().endswith("dry run: nothing was trained or written.")
        if not ok:
            failed.append(f"{c.where()}: `{c.text()}` failed its dry run (exit {r['code']}): {last or r['stdout'][-500:]}")
        # A model no machine here could hold is a mistake too (a CNN given an MLP's width once had 3.5e9).
        huge = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) parameters", r["stdout"])
                if int(n.replace(",", "")) > MAX_PARAMETERS]
        if huge:
            failed.append(f"{c.where()}: `{c.text()}` builds a model of {huge[0]:,} parameters")
    assert checked >= 30
    assert not failed, "\n".join(failed)
    # Nothing was written: the working directory holds only the link, the stand-in dirs do not exist.
    assert os.listdir(dry_runs["cwd"]) == ["configs"]
    assert sorted(os.listdir(dry_runs["tmp"])) == ["cwd", "held", "jobs.json", "results.json"]


def test_every_script_command_has_the_flags_it_is_given(dry_runs):
    failed = []
    for c, job, given, r in zip(dry_runs["commands"], dry_runs["jobs"], dry_runs["flags"], dry_runs["results"]):
        if job["train"]:
            continue
        if r["code"] != 0 or "usage:" not in r["stdout"]:
            failed.append(f"{c.where()}: `{' '.join(job['argv'])}` exits {r['code']}: {r['stderr'][-500:]}")
            continue
        unknown = [f for f in given if not re.search(rf"(^|[\s\[,]){re.escape(f)}\b", r["stdout"])]
        if unknown:
            failed.append(f"{c.where()}: `{c.text()}`: {c.argv[1]} has no flag {unknown}")
    assert not failed, "\n".join(failed)



def test_a_wrong_command_fails_its_dry_run_in_one_line_naming_the_mistake(dry_runs):
    """What the checks above rely on (these run in the same process, after the pages' commands)."""
    results = dry_runs["results"][len(dry_runs["commands"]):]
    assert len(results) == len(WRONG)
    for (argv, named), r in zip(WRONG, results):
        assert r["code"] == 2 and named in r["stderr"], (argv, r["stderr"][-2000:])
        assert "Traceback" not in r["stderr"] and len(r["stderr"].strip().splitlines()) <= 2, r["stderr"]
    held = dry_runs["tmp"] / "held"
    assert sorted(os.listdir(held)) == ["checkpoints", "config.json"]  # checked, not touched
    assert '"learning_rate": 0.01' in (held / "config.json").read_text()
