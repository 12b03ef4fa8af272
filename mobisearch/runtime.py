"""Process settings that make JAX training on the CPU fast: dispatch, allocator, collector.

* `inline_cpu_dispatch()`: XLA:CPU runs each computation on the calling thread, so a train
  step's temporaries come from the main heap (call before the first JAX computation).
* `keep_freed_memory()`: inside it, glibc keeps freed blocks, so repeated train steps
  reuse their temporaries' pages instead of faulting in fresh zeroed ones.
* `prepare_process()`: once per search, before the first candidate: build the native
  kernels, probe XLA's compile options, and freeze the heap alive now out of Python's
  cyclic garbage collector.

Each is a no-op where it does not apply (another C library, another platform).
docs/performance.md gives the figures behind them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import sys
from collections.abc import Callable, Iterator

import jax

from mobisearch import kernels

__all__ = ["inline_cpu_dispatch", "keep_freed_memory", "prepare_process"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # <malloc.h>
_GLIBC_DEFAULTS = ((_M_TRIM_THRESHOLD, 128 * 1024), (_M_MMAP_MAX, 65536))


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None under another C library or system."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
        mallopt: Callable[[int, int], int] = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return None
    return mallopt if libc.startswith("glibc") else None


# NOTE: XLA:CPU mallocs a train step's temporaries (hundreds of MB) on every call; glibc
# serves blocks that large with fresh mmaps, so each step would fault in tens of thousands of
# zeroed pages. Only the main heap can keep them (see `keep_freed_memory`), hence steps on
# the calling thread, and one arena for XLA's pool threads too (`M_ARENA_MAX` 1).
def inline_cpu_dispatch() -> None:
    """Run XLA:CPU computations on the calling thread instead of a worker thread.

    JAX reads the setting when its CPU backend starts, so call this before the process's
    first JAX computation; the `mobisearch` command and the benchmark scripts do. Later
    calls change nothing. `JAX_CPU_ENABLE_ASYNC_DISPATCH=1` in the environment overrides
    it. Under glibc it also makes threads started from now on allocate from the main heap.
    """
    if os.environ.get("JAX_CPU_ENABLE_ASYNC_DISPATCH") is None:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    mallopt = _mallopt()
    if mallopt is not None:
        mallopt(_M_ARENA_MAX, 1)


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Inside: glibc serves large blocks from its heap and keeps what is freed, so repeated
    train steps reuse their temporaries' pages (with `inline_cpu_dispatch`). On exit,
    glibc's default thresholds. A no-op off glibc or off the CPU platform."""
    mallopt = _mallopt()
    if mallopt is None or jax.default_backend() != "cpu":
        yield
        return
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        for param, value in _GLIBC_DEFAULTS:
            mallopt(param, value)


# NOTE: after importing jax, flax and optuna, Python tracks ~10^6 objects, and every full
# (generation 2) collection walks them all; frozen, later collections walk only what the
# search itself makes.
def prepare_process() -> None:
    """Once per process, before the first candidate: load the native kernels (building them
    if needed), ask XLA which compile options it knows, and exempt every object alive now
    (imported modules, the dataset) from Python's cyclic garbage collector (`gc.freeze`).

    The first two are one-time costs the first candidate's compile would pay otherwise; a
    long-running program that calls this more than once only freezes what it made since.
    """
    from mobisearch import compile as compile_

    kernels.available()
    compile_.train_compiler_options()
    compile_.inference_compiler_options("native")
    gc.collect()
    gc.freeze()
