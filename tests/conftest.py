"""Shared test settings: CPU only, hypothesis profiles that suit JAX's compile times."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from hypothesis import HealthCheck, settings  # noqa: E402

# JAX compiles on first use, so the first example of a property can take a second or more:
# no per-example deadline. "ci" keeps the suite inside CI's time budget; "thorough" is for
# local runs with HYPOTHESIS_PROFILE=thorough.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
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
