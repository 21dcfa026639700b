"""Compiled analysis programs cached per evaluation function, without keeping it alive.

Every analysis (LMC paths, pairwise tables, layer-wise LMC, soups) compiles one program per
``(eval_fn, options)``. The cache holds `eval_fn` by a weak reference: when the caller drops its
`eval_fn` (and with it whatever the function closes over, e.g. the BatchNorm-reset data of
`tna_jax.norm_stats.with_bn_reset`), its programs and their device constants go too. An equal
but fresh `eval_fn` reuses the programs only if it is the same object: `make_eval_fn` returns
one function per ``(net, batch_size)`` for that reason.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["cached_per_eval_fn"]


def cached_per_eval_fn(build: Callable[..., Callable[..., Any]]) -> Callable[..., Callable[..., Any]]:
    """Decorator: ``build(eval_fn, *options) -> program`` memoised per `eval_fn` (weakly) and `options`.

    `build` receives a stand-in for `eval_fn` that calls it through a weak reference, so the
    cached program does not keep `eval_fn` alive. The stand-in is only called while the program
    is traced, which happens inside a call that holds `eval_fn`.

    Args:
      build: the program factory; `options` must be hashable.

    Returns:
      ``get(eval_fn, *options) -> program``. An `eval_fn` that cannot be weakly referenced gets a
      fresh, uncached program every call.

    Examples:
      >>> import gc, jax, jax.numpy as jnp
      >>> @cached_per_eval_fn
      ... def doubled(fn, scale):
      ...     return jax.jit(lambda x: scale * fn(x))
      >>> def square(x):
      ...     return x * x
      >>> doubled(square, 2) is doubled(square, 2), float(doubled(square, 2)(jnp.float32(3.0)))
      (True, 18.0)
      >>> alive = weakref.ref(square)
      >>> del square; _ = gc.collect()
      >>> alive() is None  # the cache did not keep it
      True
    """
    cache: weakref.WeakKeyDictionary[Any, dict[Hashable, Callable[..., Any]]] = weakref.WeakKeyDictionary()

    @functools.wraps(build)
    def get(eval_fn: Callable[..., Any], *options: Hashable) -> Callable[..., Any]:
        try:
            per_fn = cache.setdefault(eval_fn, {})
        except TypeError:  # not weakly referenceable (a builtin): no caching
            return build(eval_fn, *options)
        if options not in per_fn:
            ref = weakref.ref(eval_fn)

            def call(*args: Any, **kwargs: Any) -> Any:
                return ref()(*args, **kwargs)

            # jit names its programs after the function (compile counts in reports match on it).
            call.__name__ = getattr(eval_fn, "__name__", call.__name__)
            call.__qualname__ = getattr(eval_fn, "__qualname__", call.__qualname__)

            per_fn[options] = build(call, *options)
        return per_fn[options]

    get.cache_size = lambda: sum(len(programs) for programs in cache.values())  # programs held now
    return get
