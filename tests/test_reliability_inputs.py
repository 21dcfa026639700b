"""Corrupted and wrong inputs (issue 11): damaged checkpoint files, a checkpoint of another model,
a mask of the wrong shapes, broken config files, datasets with NaN features or bad labels.

Each must give a clear error naming the file or field, and overwrite nothing.
"""

import hashlib
import os
import re
import shutil
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from util import ROOT, tiny_config

from tna_jax import anchors, data, models, optimizers, runner, training
from tna_jax import checkpoint as ckpt_lib
from tna_jax import runs as runs_lib
from tna_jax import workdir as workdir_lib
from tna_jax.config import ConfigError, validate

sys.path.insert(0, ROOT)
import train  # noqa: E402  (the command line: its flag parsing is under test)


def tree_hash(directory):
    """SHA-256 over every file (path and bytes) under `directory`, ignoring the lock file."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(directory)):
        dirs.sort()
        for name in sorted(files):
            if name == ".lock":
                continue
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, directory).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny two-epoch run (checkpoints at epochs 1 and 2) and its final state digest."""
    workdir = str(tmp_path_factory.mktemp("finished"))
    config = tiny_config(train__epochs=2, analysis__lmc=False)
    report = runner.run(config, workdir)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    steps = ckpt.steps()
    digest = ckpt.read_meta(steps[-1])["state_digest"]
    ckpt.close()
    return workdir, config, steps, digest, report


def state_target(config):
    """The abstract train state of `config` (what fit() restores into), from the public functions."""
    ds = data.load(config.data)
    net = models.build(config.model, ds.input_shape, ds.num_classes)
    runs = runs_lib.make_runs(config)
    base = optimizers.make_optimizer(config.optimizer, 6, config.train.epochs)
    factory = optimizers.make_transform(base, config, net, runs_lib.arms_from_config(config))
    return jax.eval_shape(lambda k: training.init_runs(net, factory, runs, k), runs_lib.make_run_keys(config, runs))


def copy_run(finished_run, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(finished_run[0], dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Damaged checkpoint files.
# ---------------------------------------------------------------------------------------------

DAMAGES = ("flip a bit", "truncate to half", "delete")


def damage(path, how, rng):
    data_ = bytearray(open(path, "rb").read())
    if how.startswith("flip") and data_:
        i = int(rng.integers(len(data_)))
        data_[i] ^= 1 << int(rng.integers(8))
        open(path, "wb").write(bytes(data_))
    elif how.startswith("flip"):
        open(path, "wb").write(b"\x01")
    elif how == "truncate to half":
        open(path, "wb").write(bytes(data_[: len(data_) // 2]))
    else:
        os.remove(path)


def test_every_damaged_checkpoint_file_is_detected_or_harmless(tmp_path, reliability):
    """Each file of a checkpoint step, damaged five ways: restoring either raises CheckpointError
    naming the step directory or returns exactly the saved arrays; never other numbers."""
    state = {"params": {"dense": {"kernel": jnp.arange(24.0).reshape(4, 6), "bias": jnp.linspace(-1, 1, 6)}},
             "opt_state": (jnp.zeros((4, 6)), {"count": jnp.int32(7)}), "step": jnp.int32(3)}
    extras = {"mask": {"dense": {"kernel": jnp.arange(24).reshape(4, 6) % 3 == 0, "bias": jnp.ones(6, bool)}}}
    src = str(tmp_path / "src")
    ckpt = ckpt_lib.Checkpointer(src)
    ckpt.save(5, state, extras=extras, meta={"epoch": 1})
    ckpt.close()
    want_state, want_extras = ckpt_lib.tree_digest(state), ckpt_lib.tree_digest(extras)
    files = sorted(os.path.relpath(os.path.join(r, f), src) for r, _, fs in os.walk(src) for f in fs)
    rng = np.random.default_rng(0)
    detected, harmless, wrong, unclear, touched = 0, 0, [], [], []
    for rel in files:
        path = os.path.join(src, rel)
        with open(path, "rb") as f:
            original = f.read()
        for how in DAMAGES:
            damage(path, how, rng)
            before = tree_hash(src)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    c = ckpt_lib.Checkpointer(src)
                    got, got_extras, _ = c.restore(state, extras_target=extras, fallback=False)
                    c.close()
            except ckpt_lib.CheckpointError as err:
                detected += 1
                if os.path.join(src, "5") not in str(err):
                    unclear.append((rel, how, str(err)[:200]))
            else:
                if ckpt_lib.tree_digest(got) == want_state and ckpt_lib.tree_digest(got_extras) == want_extras:
                    harmless += 1  # files orbax does not read back (per-process copies, markers)
                else:
                    wrong.append((rel, how))
            if tree_hash(src) != before:
                touched.append((rel, how))
            with open(path, "wb") as f:  # undo, for the next damage
                f.write(original)
    tried = len(files) * len(DAMAGES)
    reliability.record("corruption.checkpoint_files", category="corruption",
                       fault=f"each of the {len(files)} files of a checkpoint step bit-flipped, truncated to half "
                             "or deleted",
                       tried=tried, survived=tried - len(wrong) - len(unclear) - len(touched),
                       check=f"restore raised CheckpointError naming the step ({detected}x) or returned the saved "
                             f"arrays exactly ({harmless}x: files orbax does not read); never other numbers; "
                             "restoring changed no file")
    assert not wrong, wrong
    assert not unclear, unclear
    assert not touched, touched
    assert detected >= len(files)  # most damage is detected, not ignored


def test_a_damaged_latest_checkpoint_falls_back_and_the_run_ends_bit_identical(tmp_path, finished_run,
                                                                             reliability):
    workdir = copy_run(finished_run, tmp_path)
    _, config, steps, digest, _ = finished_run
    latest = os.path.join(workdir, "checkpoints", str(steps[-1]), "state", "d")
    for name in os.listdir(latest):  # the array data of the last step
        damage(os.path.join(latest, name), "flip a bit", np.random.default_rng(1))
    with pytest.warns(UserWarning, match=rf"checkpoint .*/checkpoints/{steps[-1]} could not be restored"):
        report = runner.run(config, workdir)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    same = ckpt.read_meta(ckpt.latest_step())["state_digest"] == digest
    ckpt.close()
    reliability.record("corruption.latest_step_fallback", category="corruption",
                       fault="the newest checkpoint step's arrays bit-flipped, then the run restarted",
                       tried=1, survived=int(same and report["training"]["resumed_from"] == 1),
                       check="a warning names the damaged step; the run resumes from the previous good step and "
                             "ends bit-identical (state SHA-256) to the undamaged run")
    assert report["training"]["resumed_from"] == 1
    assert same


def test_a_checkpoint_of_another_model_is_refused_naming_the_leaf_and_nothing_is_overwritten(
        tmp_path, finished_run, reliability):
    workdir = str(tmp_path / "other")
    shutil.copytree(os.path.join(finished_run[0], "checkpoints"), os.path.join(workdir, "checkpoints"))
    before = tree_hash(os.path.join(workdir, "checkpoints"))
    config = tiny_config(train__epochs=2, analysis__lmc=False, model__width=24)  # the run had width 32
    with pytest.raises(ckpt_lib.CheckpointError) as info:
        runner.run(config, workdir)
    message = str(info.value)
    clear = ("was saved for another model" in message and os.path.join(workdir, "checkpoints") in message
             and "state 'params/dense_0/bias' has shape (4, 32)" in message and "expected shape (4, 24)" in message)
    untouched = tree_hash(os.path.join(workdir, "checkpoints")) == before
    no_report = not os.path.exists(os.path.join(workdir, "report.json"))
    reliability.record("corruption.other_model", category="corruption",
                       fault="the checkpoints of another model (width 32) in the workdir of a width-24 config",
                       tried=1, survived=int(clear and untouched and no_report),
                       check="CheckpointError names the directory, the first leaf and both shapes; the checkpoint "
                             "files are byte-identical afterwards; no report is written")
    assert clear, message
    assert untouched and no_report


def raises(fn, error, pattern):
    """Whether fn() raises `error` with a message matching `pattern` (False for anything else)."""
    try:
        fn()
    except error as err:
        return re.search(pattern, str(err)) is not None
    except Exception:  # noqa: BLE001 (another error is a failed check, reported below)
        return False
    return False


def test_a_mask_of_the_wrong_shapes_is_refused_naming_the_leaf(tmp_path, reliability):
    params = {"dense": {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(4)}}
    mask = anchors.anchor_mask(params, 0.5, jax.random.key(0))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "c"))
    ckpt.save(1, params, extras={"mask": mask})
    before = tree_hash(str(tmp_path / "c"))
    step_dir = re.escape(str(tmp_path / "c" / "1"))
    wrong = {"mask": {"dense": {"kernel": jnp.zeros((8, 5), bool), "bias": jnp.zeros(5, bool)}}}
    got, _ = ckpt.restore_extras({"mask": jax.tree.map(jnp.zeros_like, mask)})
    checks = {
        "other shapes": raises(lambda: ckpt.restore_extras(wrong), ckpt_lib.CheckpointError,
                               rf"{step_dir} was saved for another model: extras 'mask/dense/bias' has shape \(4,\) "
                               r"and dtype bool there; expected shape \(5,\)"),
        "other dtype": raises(lambda: ckpt.restore_extras({"mask": jax.tree.map(lambda m: m.astype(jnp.float32), mask)}),
                              ckpt_lib.CheckpointError, r"extras 'mask/dense/(bias|kernel)' has shape .* dtype bool "
                              r"there; expected .* dtype float32"),
        "given to the optimizer": raises(
            lambda: anchors.fixed_anchor_mask(mask={"dense": {"kernel": jnp.zeros((8, 5), bool),
                                                              "bias": jnp.zeros(4, bool)}}).init(params),
            ValueError, r"params and mask differ in shape at path 'dense/kernel': \(8, 4\) vs \(8, 5\)"),
        "right target exact": all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(got["mask"]),
                                                                       jax.tree.leaves(mask))),
        "file unchanged": tree_hash(str(tmp_path / "c")) == before,
    }
    ckpt.close()
    reliability.record("bad input.mask_shapes", category="bad input",
                       fault="an anchor mask of other shapes or dtype (restored from a checkpoint, or given to "
                             "fixed_anchor_mask)", tried=len(checks), survived=sum(checks.values()),
                       check="CheckpointError / ValueError names the step directory and the leaf with both shapes or "
                             "dtypes; the right target restores the mask exactly; the files are unchanged")
    assert all(checks.values()), checks


def test_every_restore_has_an_explicit_abstract_target(tmp_path, finished_run, monkeypatch, reliability):
    """Spies on orbax: a resume and a mask read pass a full ShapeDtypeStruct tree for every array
    item, so nothing in the files decides what is built."""
    import orbax.checkpoint as ocp

    seen = []
    original = ocp.args.StandardRestore

    def spy(item=None, *args, **kwargs):
        seen.append(item)
        return original(item, *args, **kwargs)

    monkeypatch.setattr(ocp.args, "StandardRestore", spy)
    workdir = copy_run(finished_run, tmp_path)
    report = runner.run(finished_run[1], workdir)  # everything trained: restores, evaluates
    assert report["training"]["resumed_from"] == 2
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    mask, _ = ckpt.restore_extras({"mask": training.find_mask(state_target(finished_run[1]).opt_state)})
    ckpt.close()
    assert 0.3 < anchors.mask_summary(jax.tree.map(lambda m: m[2], mask["mask"]))["overall"] < 0.5  # TNA-PFN run
    explicit = [item is not None and jax.tree.leaves(item) and all(isinstance(x, jax.ShapeDtypeStruct)
                                                                   for x in jax.tree.leaves(item)) for item in seen]
    reliability.record("safety.explicit_target", category="safety",
                       fault="orbax restores during a resume and a mask read (spied)", tried=len(seen),
                       survived=sum(bool(e) for e in explicit),
                       check="every StandardRestore gets a full tree of ShapeDtypeStruct (shapes, dtypes, "
                             "shardings) built by the code, never None")
    assert len(seen) >= 2 and all(explicit)


# ---------------------------------------------------------------------------------------------
# Config files and the workdir's config.json.
# ---------------------------------------------------------------------------------------------


def parse(argv, monkeypatch):
    """train.py's flag parsing on fresh flags (what `python train.py argv...` would parse)."""
    sys.modules.pop("config_config", None)  # ml_collections reuses this module name per process
    fv = flags.FlagValues()
    train.define_flags(fv)
    full = ["train.py", *argv]
    monkeypatch.setattr(sys, "argv", full)  # ml_collections reads the overrides from sys.argv
    train.parse_flags(full, fv)
    return fv


CONFIG_FILES = {
    "syntax.py": ("def get_config(:\n    pass\n", r"syntax.py, line 1: .*'def get_config\(:'"),
    "unknown_key.py": ("from tna_jax.config import default_config\n\ndef get_config():\n    c = default_config()\n"
                       "    c.train.epoch = 3\n    return c\n",
                       r"unknown_key.py: config.train.epoch is not a known field \(did you mean 'train.epochs'\?\)"),
    "bad_value.py": ("from tna_jax.config import default_config\n\ndef get_config():\n    c = default_config()\n"
                     "    c.anchor.ratio = 1.5\n    return c\n",
                     r"bad_value.py: config.anchor.ratio must be a number in \[0.0, 1.0\]; got 1.5"),
    "raises.py": ("def get_config():\n    raise RuntimeError('no such dataset here')\n",
                  r"raises.py.*RuntimeError: no such dataset here"),
    "no_get_config.py": ("x = 1\n", r"no_get_config.py.*get_config"),
}


def test_broken_config_files_fail_in_flag_parsing_naming_the_file(tmp_path, monkeypatch, reliability):
    survived = 0
    for name, (text, pattern) in CONFIG_FILES.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(flags.Error, match=pattern) as info:
            parse([f"--config={path}", f"--workdir={tmp_path / 'w'}"], monkeypatch)
        survived += int("\n" not in str(info.value) and "Traceback" not in str(info.value))
    with pytest.raises(flags.Error, match=r"--config=.*missing.py: .*No such file or directory"):
        parse([f"--config={tmp_path / 'missing.py'}", f"--workdir={tmp_path / 'w'}"], monkeypatch)
    with pytest.raises(flags.Error, match=r"--config.train.epochz: config.train.epochz is not a field of this config "
                                          r"\(did you mean 'train.epochs'\?\)"):
        parse(["--config=configs/quickstart.py", "--config.train.epochz=3", f"--workdir={tmp_path / 'w'}"], monkeypatch)
    assert not (tmp_path / "w").exists()  # nothing was created, let alone overwritten
    reliability.record("bad input.config_files", category="bad input",
                       fault="config files with a syntax error, an unknown key, a bad value, an exception in "
                             "get_config, no get_config; a missing file; an override of a missing field",
                       tried=len(CONFIG_FILES) + 2, survived=survived + 2,
                       check="train.py stops in flag parsing with one line naming the file (and line) or the field "
                             "(`FATAL Flags parsing error: ...`, exit 2); the workdir is not created")
    assert survived == len(CONFIG_FILES)


def test_a_damaged_config_json_in_the_workdir_is_named_and_left_alone(tmp_path, finished_run, reliability):
    workdir = copy_run(finished_run, tmp_path)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])
    before = tree_hash(workdir)
    with pytest.raises(ValueError, match=rf"{path} is damaged \(.*not valid JSON.*\); move the workdir aside"):
        runner.run(finished_run[1], workdir)
    same = tree_hash(workdir) == before
    reliability.record("corruption.config_json", category="corruption",
                       fault="the workdir's config.json cut in half", tried=1, survived=int(same),
                       check="ValueError names the file and the JSON error; no file in the workdir changes")
    assert same


# ---------------------------------------------------------------------------------------------
# Datasets.
# ---------------------------------------------------------------------------------------------

def _bad_source(kind):
    def source(cfg):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(200, 12)).astype(np.float32)
        y = rng.integers(0, 3, 200).astype(np.int32)
        xt, yt = x[:50].copy(), y[:50].copy()
        if kind == "nan":
            x[17, 3] = np.nan
            x[40, 0] = np.inf
        elif kind == "label_high":
            yt[4] = 3
        elif kind == "label_negative":
            y[0] = -1
        elif kind == "float_labels":
            y = y.astype(np.float32) + 0.5
        elif kind == "ragged":
            y = y[:150]
        return x, y, xt, yt, 3, "features", {}

    return source


DATA_FAULTS = {
    "nan": r"bad_nan: x_(train|val) has [12] examples with NaN or infinite features",
    "label_high": r"bad_label_high: y_test has labels in \[0, 3\], outside \[0, 2\] for num_classes=3",
    "label_negative": r"bad_label_negative: y_(train|val) has labels in \[-1, 2\], outside \[0, 2\]",
    "float_labels": r"bad_float_labels: y_(train|val) must hold integer class labels; got dtype float32",
    "ragged": r"bad_ragged: x_train has 200 rows but y_train has 150",
}


def test_datasets_with_nan_features_or_bad_labels_are_refused_naming_the_split(tmp_path, monkeypatch, reliability):
    survived = 0
    for kind, pattern in DATA_FAULTS.items():
        name = f"bad_{kind}"
        monkeypatch.setitem(data.SOURCES, name, _bad_source(kind))
        with pytest.raises(data.DataError, match=pattern):
            data.load({"source": name, "val_fraction": 0.0 if kind == "ragged" else 0.1})
        config = tiny_config(analysis__lmc=False)
        config.data.source = name
        workdir = tmp_path / name
        with pytest.raises(data.DataError, match=pattern):
            runner.run(config, str(workdir))
        survived += int(not workdir.exists())  # a first start that fails leaves no workdir behind
    reliability.record("bad input.datasets", category="bad input",
                       fault="a data source with NaN/inf features, labels above or below the classes, float "
                             "labels, or x and y of different lengths", tried=len(DATA_FAULTS), survived=survived,
                       check="DataError (a ValueError) names the dataset, the split and what is wrong, before any "
                             "training; a workdir the run created is removed again")
    assert survived == len(DATA_FAULTS)


def test_train_py_reports_user_errors_in_one_line(tmp_path, monkeypatch, capsys):
    """main() turns the library errors that name their cause into one line on stderr and exit 2."""
    argv = ["train.py", "--config=configs/quickstart.py", f"--workdir={tmp_path}", "--cpu_devices=off"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(ROOT)
    train.parse_flags(argv)
    for error in train.USER_ERRORS:
        def fail(config, workdir, error=error):
            raise error(f"{error.__name__} names the field or file")

        monkeypatch.setattr(train.runner, "run", fail)
        with pytest.raises(SystemExit) as info:
            train.main(["train.py"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err == f"train.py: error: {error.__name__} names the field or file\n"


BAD_PATHS = ["/etc/passwd", "../up.json", "a/../../b", "~/x", "a\0b", "..", "\\\\server\\share"]


@pytest.mark.parametrize("value", BAD_PATHS)
def test_config_paths_cannot_leave_the_workdir(value):
    c = tiny_config()
    with c.unlocked():
        c.soup = ml_collections.ConfigDict({"out_file": value})
    with pytest.raises(ConfigError, match=r"config.soup.out_file must be a relative path inside the workdir"):
        validate(c)


def test_paths_built_from_configs_stay_in_the_workdir(tmp_path, reliability):
    c = tiny_config()
    with c.unlocked():
        c.soup = ml_collections.ConfigDict({"out_file": "soups/greedy.json", "log_path": ""})
    validate(c)  # a plain relative path is fine, and "" means unset
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(str(tmp_path / "outside"), str(run / "escape"))
    checks = []
    with pytest.raises(ConfigError, match=r"config.grid.variants.x='escape/f' resolves to .*outside the workdir"):
        workdir_lib.workdir_path(str(run), "escape/f", "grid.variants.x")
    checks.append(workdir_lib.workdir_path(str(run), "sub/f", "f") == str(run / "sub" / "f"))
    with pytest.raises(ConfigError, match="config.f must be a relative path"):
        workdir_lib.workdir_path(str(run), "", "f")
    # An align_compare task is a sub-directory named after its key; ConfigDict keys may hold '/'.
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import align_compare as align_config

    cfg = align_config.get_config()
    with cfg.unlocked():
        cfg.align.tasks = ml_collections.ConfigDict({str(tmp_path / "outside" / "task"): {"train": {"epochs": 1}}})
        cfg.align.run = ""
    with pytest.raises(ConfigError, match=r"config.align.tasks./.*/outside/task must be a relative path inside the "
                                          r"workdir"):
        runner.run(cfg, str(run))  # before this check it trained into <tmp>/outside/task
    checks.append(not list((tmp_path / "outside").iterdir()))
    values = BAD_PATHS
    reliability.record("safety.config_paths", category="safety",
                       fault="config paths that would leave the workdir: absolute, '..', '~', NUL, UNC, a symlink "
                             "out of the workdir, an empty path, an align_compare task named by an absolute path",
                       tried=len(values) + 3, survived=len(values) + 3 * int(all(checks)),
                       check="config.validate checks every *_path/*_file/*_subdir field; tna_jax.workdir.workdir_path "
                             "resolves symlinks; ConfigError names config.<field>, the value and what is allowed")
    assert all(checks)


def test_a_model_too_big_for_memory_is_refused_before_anything_is_allocated(tmp_path, reliability):
    c = tiny_config(model__width=1 << 20, model__depth=2, analysis__lmc=False)  # 4 runs x 2^40 weights
    with pytest.raises(ValueError, match=r"the training state of 4 runs needs \d+\.\d GiB .* more than the "
                                         r"\d+\.\d GiB of memory of 1 device\(s\); lower config.model.width"):
        runner.run(c, str(tmp_path))
    left = sorted(os.listdir(tmp_path))
    reliability.record("bad input.huge_model", category="bad input",
                       fault="--config.model.width=1048576 (a 16 TiB training state)", tried=1,
                       survived=int(left == []),
                       check="ValueError before any allocation, naming the size, the memory and the fields to lower; "
                             "the first start is undone: the workdir is left empty")
    assert left == []


@pytest.mark.parametrize("flags_, message", [
    ((None, 2, None), r"--num_processes and --process_id need --coordinator"),
    (("localhost", 2, 0), r"--coordinator must be HOST:PORT or 'auto'; got 'localhost'"),
    (("127.0.0.1:1234", 0, 0), r"--num_processes must be a positive integer with --coordinator; got 0"),
    (("127.0.0.1:1234", 2, 2), r"--process_id must be in \[0, 2\) \(--num_processes=2\); got 2"),
    (("127.0.0.1:1234", 2, None), r"--process_id must be in \[0, 2\)"),
])
def test_bad_multiprocess_flags_name_the_flag(flags_, message):
    from absl import app

    with pytest.raises(app.UsageError, match=message):
        train.initialize_distributed(*flags_)
    train.initialize_distributed(None, None, None)  # one process: nothing to do


def test_kinds_that_run_in_one_process_refuse_several(monkeypatch, tmp_path):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(runner, "MULTIPROCESS_KINDS", ("federated",))
    with pytest.raises(ConfigError, match=r"config.kind='train' runs in one process; 2 processes were started "
                                          r"\(jax.distributed\). Kinds that span processes: \['federated'\]"):
        runner.run(tiny_config(), str(tmp_path))
    assert os.listdir(tmp_path) == []  # refused before the workdir is touched
