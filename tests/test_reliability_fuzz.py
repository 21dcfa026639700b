"""Fuzzing (issue 11): config overrides and public functions' arguments with wrong types, negative
sizes, huge values and empty strings. The only acceptable failures are a ``ValueError`` /
``TypeError`` (``ConfigError`` is one; absl's ``flags.Error`` for the command line) raised by
tna_jax's own checks, with a message; never an error from deep inside JAX, NumPy or orbax, and
never a hang (a time limit per example).
"""

import contextlib
import datetime
import os
import signal
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from hypothesis import given, settings
from hypothesis import strategies as st
from reliability_report import RECORDER
from util import ROOT

from tna_jax import anchors, data, lmc, models
from tna_jax import config as config_lib
from tna_jax import tree as tree_lib

sys.path.insert(0, ROOT)
import train  # noqa: E402

FAST = settings(deadline=datetime.timedelta(seconds=10))  # pure Python: a hang shows up here
COUNTS: dict[str, list[int]] = {}  # property -> [examples, clean outcomes], for the report


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises Hang in the test if the block runs longer than `seconds` (SIGALRM)."""
    def handler(signum, frame):
        raise Hang(f"no result after {seconds}s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def origin(err: BaseException) -> str:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename if tb is not None else ""


def _record(name: str) -> None:
    tried, ok = COUNTS[name]
    RECORDER.record(f"fuzzing.{name}", category="fuzzing", fault=f"hypothesis: nasty arguments to `{name}`",
                    tried=tried, survived=ok, test=os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                    check="a result, or ValueError/TypeError (ConfigError, flags.Error) raised by tna_jax's own "
                          "checks with a message; nothing from inside JAX/NumPy/orbax; no hang (deadline, SIGALRM)")


def clean(name: str, fn, *, allowed=(ValueError, TypeError), limit: float = 60.0):
    """Runs fn(); a result, or an allowed error raised in tna_jax (or train.py) with a message."""
    COUNTS.setdefault(name, [0, 0])[0] += 1
    _record(name)
    try:
        with time_limit(limit):
            out = fn()
    except allowed as err:
        where = origin(err)
        assert str(err).strip(), f"{name}: {type(err).__name__} without a message"
        assert f"{os.sep}tna_jax{os.sep}" in where or where.endswith("train.py"), \
            f"{name}: {type(err).__name__} raised in {where}, not by tna_jax's checks: {err}"
        out = err
    COUNTS[name][1] += 1
    _record(name)
    return out


# Values that break things: wrong types, negative and huge sizes, non-finite numbers, empty strings.
NASTY = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, -1, -(2**31), 2**31, 2**63, 10**30, 0.0, -0.5, 1e308, 1e-320, 3.5]),
    st.integers(-5, 10), st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from(["", " ", "abc", "0.5", "-1", "nan", "(", "\x00", "ünï"]),
    st.lists(st.integers(-2, 3), max_size=3), st.tuples(st.floats(-2, 2, allow_nan=False)),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 2), max_size=2),
)

SCHEMA = config_lib.flatten(config_lib.default_config())
FIELDS = sorted(SCHEMA)


def set_flat(field, value):
    raw = config_lib.default_config().to_dict()
    node = raw
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return ml_collections.ConfigDict(raw)  # not type-locked: any value reaches validate


@FAST
@given(field=st.sampled_from(FIELDS), value=NASTY)
def test_validate_accepts_or_rejects_naming_the_field(field, value):
    config = set_flat(field, value)
    out = clean("config.validate", lambda: config_lib.validate(config), allowed=(config_lib.ConfigError,))
    if isinstance(out, config_lib.ConfigError):
        assert f"config.{field}" in str(out) or "config.anchor.refresh_every" in str(out), str(out)


OVERRIDE_TEXT = st.one_of(
    st.sampled_from(["", " ", "abc", "-1", "-3", "0", "1e400", "-1e400", "nan", "inf", "99999999999999999999",
                     "(1,", "()", "(0.5, 'a')", "[]", "{}", "None", "True", "0x10", "1_0", "'", "\\", "0.5",
                     "-0.0", "1.5", "2", "../x", "/etc/passwd"]),
    st.text(max_size=6),
)


def parse(argv):
    sys.modules.pop("config_config", None)  # ml_collections reuses this module name per process
    fv = flags.FlagValues()
    train.define_flags(fv)
    full = ["train.py", *argv]
    with mock.patch.object(sys, "argv", full):  # ml_collections reads the overrides from sys.argv
        train.parse_flags(full, fv)
    return fv


@FAST
@given(field=st.sampled_from(FIELDS), text=OVERRIDE_TEXT)
def test_train_py_overrides_parse_or_fail_in_one_line(field, text, tmp_path_factory):
    if "\x00" in text:
        text = text.replace("\x00", "")  # argv cannot hold NUL bytes
    workdir = os.path.join(str(tmp_path_factory.getbasetemp()), "never_created")
    argv = [f"--config={os.path.join(ROOT, 'configs', 'quickstart.py')}", f"--config.{field}={text}",
            f"--workdir={workdir}"]
    out = clean("train.py flags", lambda: parse(argv), allowed=(flags.Error,))
    if isinstance(out, flags.Error):
        message = str(out)
        assert "\n" not in message and "Traceback" not in message, message
    assert not os.path.exists(workdir)


PARAMS = {"dense_0": {"kernel": jnp.zeros((5, 4)), "bias": jnp.zeros(4)},
          "head": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
KEYS = st.one_of(st.just(jax.random.key(3)), st.just(jax.random.PRNGKey(3)), NASTY,
                 st.just(jnp.zeros((2, 2), jnp.uint32)), st.just(jax.random.split(jax.random.key(0), 2)))
PATTERNS = st.one_of(st.none(), NASTY, st.sampled_from(["first", "last", "middle", "dense_0", "nomatch", "(", "[a-"]),
                     st.lists(st.sampled_from(["first", "head", 3, "", None]), max_size=2))


@given(ratio=st.one_of(NASTY, st.floats(0, 1)), key=KEYS, granularity=st.one_of(NASTY, st.sampled_from(["weight", "neuron"])),
       include=PATTERNS, exclude=PATTERNS)
def test_anchor_mask_arguments(ratio, key, granularity, include, exclude):
    out = clean("anchors.anchor_mask", lambda: anchors.anchor_mask(PARAMS, ratio, key, granularity=granularity,
                                                                      include=include, exclude=exclude))
    if not isinstance(out, Exception):
        anchors.check_mask(PARAMS, out)
        assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(out))


@given(ratio=st.one_of(NASTY, st.floats(0, 1)), key=KEYS, refresh=st.one_of(st.none(), NASTY),
       mask=st.one_of(st.none(), NASTY, st.just({"dense_0": {"kernel": jnp.zeros((5, 5), bool)}})))
def test_fixed_anchor_mask_and_prune_arguments(ratio, key, refresh, mask):
    def build():
        if mask is not None:
            return anchors.fixed_anchor_mask(mask=mask).init(PARAMS)
        return anchors.fixed_anchor_mask(ratio, key, refresh_every=refresh).init(PARAMS)

    clean("anchors.fixed_anchor_mask", build)
    clean("anchors.prune_at_init", lambda: anchors.prune_at_init(PARAMS, ratio, key))


def eval_fn(v, x, y):
    loss = jnp.mean((x * v["w"] - y) ** 2)
    return {"loss": loss, "accuracy": (loss < 1.0).astype(jnp.float32)}


A, B = {"w": jnp.array(0.0)}, {"w": jnp.array(2.0)}
ALPHAS = st.one_of(st.none(), NASTY, st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=0, max_size=3),
                   st.just([[0.0, 1.0]]), st.just(np.array([0.0, 0.5, 1.0])))
DATA = st.one_of(st.just((jnp.ones(4), jnp.ones(4))), NASTY, st.just((jnp.ones(4),)),
                 st.just((jnp.ones(4), jnp.ones(3))), st.just((jnp.ones(0), jnp.ones(0))))
MODELS = st.one_of(st.just(B), NASTY, st.just({"w": jnp.ones(3)}), st.just({"v": jnp.array(1.0)}), st.just("b"))


@given(alphas=ALPHAS, data_=DATA, chunk=st.one_of(st.none(), NASTY), b=MODELS,
       fn=st.one_of(st.just(eval_fn), NASTY))
def test_lmc_path_arguments(alphas, data_, chunk, b, fn):
    out = clean("lmc.lmc_path", lambda: lmc.lmc_path(fn, A, b, data_, alphas=alphas, chunk=chunk))
    if not isinstance(out, Exception):
        assert np.all(np.isfinite(np.asarray(out.loss)))
        if alphas is not None and np.size(alphas) and np.isclose(np.asarray(alphas, float), 0).any() \
                and np.isclose(np.asarray(alphas, float), 1).any():
            clean("lmc.barriers", lambda: lmc.barriers(out))


@FAST
@given(num=NASTY, n=NASTY, max_pairs=st.one_of(st.none(), NASTY),
       path=st.one_of(NASTY, st.just({}), st.just({"alpha": [0.0, 1.0], "loss": [1.0], "accuracy": [0.5, 0.5]}),
                      st.just({"alpha": [0.0, 0.5, 1.0], "loss": [1.0, 2.0, 1.0], "accuracy": "abc"})))
def test_lmc_helpers_arguments(num, n, max_pairs, path):
    out = clean("lmc.default_alphas", lambda: lmc.default_alphas(num))
    if not isinstance(out, Exception):
        assert out[0] == 0.0 and out[-1] == 1.0
    out = clean("lmc.all_pairs", lambda: lmc.all_pairs(n, max_pairs))
    if not isinstance(out, Exception):
        assert len(out) <= lmc.MAX_ALL_PAIRS and all(i < j for i, j in out)
    for mode in ("disjoint", "random", num):
        out = clean("lmc.select_pairs", lambda mode=mode: lmc.select_pairs(n, mode, max_pairs, seed=num))
        if not isinstance(out, Exception):
            assert len(out) <= lmc.MAX_ALL_PAIRS and all(0 <= i < j < n for i, j in out)
    clean("lmc.barriers", lambda: lmc.barriers(path))


@given(b=MODELS, alpha=st.one_of(NASTY, st.floats(-3, 3)), weights=st.one_of(st.none(), NASTY),
       axis=st.one_of(st.just(0), NASTY))
def test_tree_arithmetic_arguments(b, alpha, weights, axis):
    out = clean("tree.lerp", lambda: tree_lib.lerp(A, b, alpha))
    if not isinstance(out, Exception) and abs(float(alpha)) < 1e6:  # beyond, float32 overflows (fine)
        np.testing.assert_allclose(out["w"], 2.0 * float(alpha), rtol=1e-5, atol=1e-6)
    stacked = {"w": jnp.arange(6.0).reshape(3, 2)}
    clean("tree.weighted_mean", lambda: tree_lib.weighted_mean(stacked, weights, axis=axis))


MODEL_FIELDS = ["width", "depth", "activation", "norm", "dtype", "name"]


@FAST
@given(field=st.sampled_from(MODEL_FIELDS), value=NASTY, classes=st.one_of(st.just(10), NASTY))
def test_models_build_arguments(field, value, classes):
    cfg = {"name": "mlp", "width": 8, "depth": 1, field: value}
    out = clean("models.build", lambda: models.build(cfg, (12,), classes))
    if not isinstance(out, Exception):
        assert out.param_count() < 2**31  # nothing huge gets through build


DATA_FIELDS = ["val_fraction", "num_train", "split_seed", "test_fraction", "source"]


@given(field=st.sampled_from(DATA_FIELDS), value=NASTY)  # no deadline: the first call imports scikit-learn
def test_data_load_arguments(field, value):
    cfg = {"source": "digits", field: value}
    out = clean("data.load", lambda: data.load(cfg))
    if not isinstance(out, Exception):
        assert out.sizes()["train"] > 0
