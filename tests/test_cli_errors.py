"""What `train.py` prints when the command is wrong, the disk is full or the user presses Ctrl-C:
one line naming the field, file or value, exit code 2 (130 for Ctrl-C), no traceback unless
--verbose, and nothing left in a workdir the run created (issue 21)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from util import ROOT

import train  # noqa: E402  (the command line under test)
from tna_jax import workdir as workdir_lib
from tna_jax.config import default_config

TINY = ["--config=configs/quickstart.py", "--config.num_seeds=2", "--config.data.num_samples=600",
        "--config.model.width=32", "--config.train.epochs=2", "--config.train.batch_size=64",
        "--config.analysis.plots=False", "--config.train.progress=False", "--cpu_devices=1"]


def main_in_process(argv, monkeypatch, capsys):
    """``python train.py argv`` in this process: ``(exit code, stdout, stderr)``."""
    full = ["train.py", *argv]
    monkeypatch.setattr(sys, "argv", full)  # ml_collections reads the overrides from sys.argv
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # main() wraps it: restore after
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() sets the CPU device count
    monkeypatch.chdir(ROOT)
    sys.modules.pop("config_config", None)  # ml_collections reuses this module name per process
    fresh = train.flags.FlagValues()
    train.define_flags(fresh)
    monkeypatch.setattr(train, "FLAGS", fresh)
    handler = train.logging.get_absl_handler()
    filters = list(handler.filters)
    code = 0
    try:
        try:
            train.parse_flags(full, fresh)
        except train.flags.Error as err:
            print(f"FATAL Flags parsing error: {err}", file=sys.stderr)
            code = train.USER_ERROR_EXIT
        else:
            train.main(["train.py"])
    except SystemExit as exit_:
        code = exit_.code
    finally:
        handler.filters[:] = filters
    out = capsys.readouterr()
    return code, out.out, out.err


CASES = {
    "unknown model": (["--config.model.name=resnet_5O"], r"config.model.name='resnet_5O' is not a model; known "
                                                          r"models: cnn, mlp, resnet20"),
    "unknown data source": (["--config.data.source=mnist2d"], r"config.data.source='mnist2d' is not a data source; "
                                                              r"known sources: digits, mnist1d, synthetic"),
    "anchors select nothing": (["--config.anchor.include=dense_9"], r"config.anchor.include pattern 'dense_9' selects "
                                                                    r"no parameter; the paths are: dense_0/bias"),
    "unknown tfds dataset": (["--config.data.source=tfds:no_such_dataset"],
                             r"config.data.source='tfds:no_such_dataset': tensorflow-datasets has no dataset"),
    "tfds dataset not prepared": (["--config.data.source=tfds:mnist", "--config.data.data_dir={tmp}/tfds"],
                                  r"config.data.source='tfds:mnist': tfds dataset 'mnist' is not prepared in "
                                  r".*tfds build mnist"),
    "misspelled field": (["--config.anchor.ratoi=0.3"], r"--config.anchor.ratoi: config.anchor.ratoi is not a field "
                                                        r"of this config \(did you mean 'anchor.ratio'\?\)"),
    "wrong type": (["--config.train.epochs=many"], r"--config.train.epochs=many: invalid literal for int"),
    "bad ratio": (["--config.anchor.ratio=1.5"], r"config.anchor.ratio must be a number in \[0.0, 1.0\]; got 1.5"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_wrong_command_prints_one_line_exits_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    args, pattern = CASES[case]
    args = [a.format(tmp=tmp_path) for a in args]
    workdir = tmp_path / "run"
    code, out, err = main_in_process([*TINY, *args, f"--workdir={workdir}"], monkeypatch, capsys)
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) <= 2 and "Traceback" not in err, err  # absl's FATAL line may add "Pass --helpshort"
    assert re.search(pattern, lines[0]), lines[0]
    assert not workdir.exists()  # nothing written, not even config.json or the lock
    assert not (tmp_path / "tfds").exists()  # and no dataset directory made


def test_verbose_adds_the_traceback(tmp_path, monkeypatch, capsys):
    code, _, err = main_in_process([*TINY, "--config.model.name=nope", "--verbose", f"--workdir={tmp_path / 'w'}"],
                                   monkeypatch, capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "preflight.py" in err
    assert err.strip().splitlines()[-1].startswith("train.py: error: config.model.name='nope'")


def test_workdir_that_is_a_file_or_read_only_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").write_text("not a directory")
    for workdir, message in [(tmp_path / "taken", f"{tmp_path / 'taken'} is a file, not a directory"),
                             (tmp_path / "taken" / "run", f"{tmp_path / 'taken'} is a file, not a directory"),
                             # /proc/sys is mounted read-only (even for root, whom permissions do not stop).
                             ("/proc/sys/tna_jax_run", "/proc/sys is not writable by this user")]:
        code, _, err = main_in_process([*TINY, f"--workdir={workdir}"], monkeypatch, capsys)
        assert code == 2
        assert err == f"train.py: error: --workdir={workdir}: {message}; choose another --workdir" + (
            ".\n" if "file" in message else " or change its permissions.\n")
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_a_workdir_of_another_config_is_named_and_left_alone(tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "3").mkdir(parents=True)  # a run that got as far as a checkpoint
    other = default_config()
    other.optimizer.learning_rate = 0.5
    (workdir / "config.json").write_text(json.dumps(workdir_lib.config_dict(other)))
    before = (workdir / "config.json").read_text()
    code, _, err = main_in_process([*TINY, f"--workdir={workdir}"], monkeypatch, capsys)
    assert code == 2
    assert err.startswith(f"train.py: error: workdir {workdir} holds a run with a different config: ")
    assert "optimizer.learning_rate (was 0.5, now 0.05)" in err and err.count("\n") == 1
    assert (workdir / "config.json").read_text() == before
    assert sorted(os.listdir(workdir)) == [".lock", "checkpoints", "config.json"]  # the lock file stays, empty


def test_print_config_lists_every_field_with_overrides_and_helpshort_says_so(monkeypatch, capsys):
    code, out, _ = main_in_process([*TINY, "--print_config"], monkeypatch, capsys)
    assert code == 0
    printed = json.loads(out)
    assert printed["train"]["epochs"] == 2 and printed["model"]["width"] == 32
    assert set(printed) >= {"anchor", "data", "model", "optimizer", "train", "analysis"}
    helpshort = subprocess.run([sys.executable, "train.py", "--helpshort"], cwd=ROOT, capture_output=True, text=True)
    assert "--print_config" in helpshort.stdout and "prints every field" in helpshort.stdout


def start(args, workdir, **kw):
    """train.py in a child whose SIGINT is the default (bash gives background jobs SIG_IGN)."""
    default_sigint = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    return subprocess.Popen([sys.executable, "-c", default_sigint, "train.py", *args, f"--workdir={workdir}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(predicate, proc, timeout=240):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.multiprocess
def test_ctrl_c_while_starting_and_while_preparing_prints_one_line(tmp_path):
    # While Python imports (nothing written yet): one line, exit 130, no workdir.
    workdir = tmp_path / "early"
    proc = start(TINY, workdir)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err == "train.py: interrupted (Ctrl-C) while starting; nothing was written.\n"
    assert not workdir.exists()
    # Once the run holds its workdir (loading data, compiling): one line, and the first start undone.
    workdir = tmp_path / "preparing"
    proc = start(TINY, workdir)
    assert wait_for(lambda: (workdir / "config.json").exists(), proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    if proc.returncode == 143:  # the signal landed once training had begun: a checkpoint, then stop
        assert "stopped by SIGINT" in out and "Traceback" not in err
    else:
        assert proc.returncode == 130, err
        assert lines == [f"train.py: interrupted (Ctrl-C); the workdir keeps its last complete checkpoint, if any: "
                         f"rerun the same command to resume ({workdir})."]
        assert not workdir.exists() or (workdir / "checkpoints").exists()


@pytest.mark.multiprocess
def test_a_full_disk_prints_one_line_and_loses_nothing(tmp_path):
    """A tmpfs too small for the first checkpoint (mounting needs root, as CI and this machine
    have); then more space and the same command finishes the run. 100 KB holds config.json, the
    lock and the metrics but not the first checkpoint (~270 KB for this config); at 300 KB the
    whole run fitted on some machines."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    assert mounted.returncode == 0, f"this test mounts a small tmpfs and needs root: {mounted.stderr}"
    try:
        workdir = disk / "run"
        proc = start(TINY, workdir)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        assert "Traceback" not in err and "Error" not in err.replace("train.py: error:", ""), err
        assert err.strip().splitlines() == [
            f"train.py: error: no space left on the disk of --workdir={workdir} (No space left on device); the "
            "workdir keeps its last complete checkpoint and report: free space and rerun the same command to resume."]
        assert json.loads((workdir / "config.json").read_text())["train"]["epochs"] == 2  # complete, not cut
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        proc = start(TINY, workdir)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        report = json.loads((workdir / "report.json").read_text())
        assert report["training"]["epochs"] == 2 and report["training"]["resumed_from"] in (0, 1, 2)
        assert len(report["runs"]) == 4 and all(0 <= r["test_accuracy"] <= 1 for r in report["runs"])
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_an_old_field_name_on_the_command_line_sets_the_new_one(monkeypatch, capsys):
    with pytest.warns(DeprecationWarning, match=r"--config.federated.mask_ratio is now --config.federated.ratio"):
        code, out, _ = main_in_process(["--config=configs/fed_mnist1d.py", "--config.federated.mask_ratio=0.3",
                                        "--print_config"], monkeypatch, capsys)
    assert code == 0
    assert json.loads(out)["federated"]["ratio"] == 0.3 and "mask_ratio" not in json.loads(out)["federated"]
