"""``train.py`` with the fault hooks the environment arms (tests only; see `fault_hooks`).

``python tests/train_with_faults.py --config ... --workdir ...`` takes the same flags as
``train.py``: it installs the hooks of :func:`fault_hooks.from_environment` for the whole run,
then calls ``train.py``'s own ``main``.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import fault_hooks  # noqa: E402
from absl import app  # noqa: E402

import train  # noqa: E402
from tna_jax import hooks  # noqa: E402

if __name__ == "__main__":
    with hooks.installed(fault_hooks.from_environment()):
        app.run(train.main, flags_parser=train.parse_flags_or_exit)
