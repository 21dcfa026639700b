"""Shared test settings: CPU only, hypothesis profiles that suit JAX's compile times."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One JAX persistent compilation cache for the whole session: both xdist workers and every
# process a test starts (train.py runs, crash chains, notebooks, several-process runs) inherit it,
# so a program compiled once (the same model, optimizer and shapes in another test or process)
# is loaded, not compiled again. Compiling is most of this suite's CPU time. The same executable
# gives the same bits, and a torn or missing entry only means a fresh compile. A test that needs
# a process compiled afresh removes the variable from that process's environment.
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getppid()}-{os.getpid()}"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"tna_jax_test_cache_{_run}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# XLA's LLVM backend at -O0 for the suite (and the processes it starts, unless a test sets
# XLA_FLAGS itself): compiling is most of the suite's time and -O0 compiles 20-30% faster
# (measured: the conv-net training test 41 -> 29 s, the soup experiment 55 -> 45 s), while the
# heavy kernels (Eigen matmuls and convolutions) are precompiled either way. Users and the
# benchmarks get XLA's default level; no test compares numbers across the two levels.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from hypothesis import HealthCheck, settings  # noqa: E402

# JAX compiles on first use, so the first example of a property can take a second or more:
# no per-example deadline. "ci" keeps the suite inside CI's time budget; "thorough" is for
# local runs with HYPOTHESIS_PROFILE=thorough.
settings.register_profile(
    "ci", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# The reliability report (docs/reliability.md): tests record what they tried via the
# `reliability` fixture; the session writes the table when it ends.
import pytest  # noqa: E402
from reliability_report import RECORDER, write_report  # noqa: E402


@pytest.fixture
def reliability(request):
    RECORDER.current_test = request.node.nodeid
    return RECORDER


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        RECORDER.failed_tests.add(item.nodeid)


def pytest_sessionfinish(session, exitstatus):
    write_report(RECORDER)
