"""Old names, old call signatures and dict-style access to typed results keep working for one
release, each with a `DeprecationWarning` that names the replacement."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["warn", "legacy_item_access", "legacy_call"]


def warn(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warns that `old` is deprecated in favour of `new` (removed in the next release).

    Args:
      old: what the caller wrote, e.g. ``"lmc_path(eval_fn, a, b, alphas, data)"``.
      new: what to write instead.
      stacklevel: as in `warnings.warn` (3: the caller of the deprecated function).
    """
    warnings.warn(f"{old} is deprecated; use {new}. The old form goes in the next release.", DeprecationWarning,
                  stacklevel=stacklevel)


def _getitem(self: Any, key: Any) -> Any:
    if isinstance(key, str):
        if key not in self._fields:
            raise KeyError(key)
        warn(f'result["{key}"]', f"result.{key} ({type(self).__name__} is a NamedTuple)")
        return getattr(self, key)
    return tuple.__getitem__(self, key)


def _keys(self: Any) -> Any:
    warn("result.keys()", f"result._fields ({type(self).__name__} is a NamedTuple)")
    return self._asdict().keys()


def _items(self: Any) -> Any:
    warn("result.items()", f"result._asdict().items() ({type(self).__name__} is a NamedTuple)")
    return self._asdict().items()


def _get(self: Any, key: str, default: Any = None) -> Any:
    warn(f'result.get("{key}")', f"result.{key} ({type(self).__name__} is a NamedTuple)")
    return getattr(self, key, default)


def legacy_item_access(cls: type) -> type:
    """Class decorator for a NamedTuple result that used to be a dict: ``r["loss"]``, ``r.keys()``,
    ``r.items()`` and ``r.get("loss")`` keep working, with a `DeprecationWarning`; integer
    indexing and unpacking are the tuple's.

    Args:
      cls: a `typing.NamedTuple` class.

    Returns:
      `cls`, with the dict-style methods added.

    Examples:
      >>> import warnings
      >>> from typing import NamedTuple
      >>> @legacy_item_access
      ... class Pair(NamedTuple):
      ...     loss: float
      ...     accuracy: float
      >>> p = Pair(0.5, 0.9)
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     old = p["accuracy"]
      >>> old, p[1], caught[0].category.__name__
      (0.9, 0.9, 'DeprecationWarning')
    """
    cls.__getitem__ = _getitem
    cls.keys = _keys
    cls.items = _items
    cls.get = _get
    return cls


def legacy_call(adapt: Callable[[tuple, dict], tuple[tuple, dict]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: `adapt` rewrites a call in an old argument order into the new one (warning with
    :func:`warn`, ``stacklevel=4``) before the decorated function runs; new calls pass through.

    Args:
      adapt: ``adapt(args, kwargs) -> (args, kwargs)``.

    Returns:
      The decorator; the wrapped function keeps its name, docstring and signature.

    Examples:
      >>> def swap(args, kwargs):  # old order f(b, a)
      ...     if isinstance(args[0], str):
      ...         warn("f(name, x)", "f(x, name)", stacklevel=4)
      ...         args = args[::-1]
      ...     return args, kwargs
      >>> @legacy_call(swap)
      ... def f(x, name):
      ...     return f"{name}={x}"
      >>> import warnings
      >>> with warnings.catch_warnings():
      ...     warnings.simplefilter("ignore")
      ...     f(1, "a"), f("a", 1)
      ('a=1', 'a=1')
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = adapt(args, kwargs)
            return fn(*args, **kwargs)

        return wrapper

    return decorate
