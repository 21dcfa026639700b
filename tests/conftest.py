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
