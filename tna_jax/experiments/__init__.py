"""Experiment kinds beyond plain multi-seed training, one module each.

Every module in this package registers its kinds with ``tna_jax.experiment.register`` when it is
imported; importing the package imports them all (so adding a kind means adding a module).
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
