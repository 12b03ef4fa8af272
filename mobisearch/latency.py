"""Wall-clock latency of a JAX function, and the fingerprint of the device it ran on.

How a measurement is taken (`measure_latency`):

1. ``warmup`` untimed calls, each blocked until ready, so that compilation, autotuning and
   first-touch allocation are not measured (flax: "so that we are not measuring just
   compilation").
2. ``iters`` timed calls. Each call is timed from just before the call until
   ``jax.block_until_ready`` returns on its result: JAX dispatches asynchronously, so
   without the block we would time only the dispatch.
3. The per-call times are summarised as percentiles plus min/max/mean/std (`Latency`), so a
   reader can see how noisy the number is, not just its median.

Latency numbers are comparable only between runs with the same `device_fingerprint` (same
backend, device, library versions, batch size). MACs (`mobisearch.cost`) are the
device-independent proxy.

Examples:
    >>> lat = Latency.from_times_s([0.002, 0.001, 0.003], batch_size=1)
    >>> lat.p50_ms, lat.min_ms, lat.max_ms, lat.iters
    (2.0, 1.0, 3.0, 3)
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np


def _check_count(name: str, value: object, lo: int) -> int:
    """Return `value` if it is an int >= `lo`, else raise ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"`{name}` (={value!r}) must be an integer >= {lo}")
    return value


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    """Summary of the per-call wall-clock times of one function, in milliseconds.

    Attributes:
        p50_ms: Median time per call.
        p10_ms: 10th percentile (linear interpolation, numpy's default).
        p90_ms: 90th percentile.
        min_ms: Fastest call.
        max_ms: Slowest call.
        mean_ms: Mean time per call.
        std_ms: Sample standard deviation (``ddof=1``); 0.0 when ``iters == 1``.
        iters: Number of timed calls.
        batch_size: Batch size of the inputs of each call (recorded, not used to divide:
            every figure is per call, i.e. per batch).
    """

    p50_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    std_ms: float
    iters: int
    batch_size: int

    def __post_init__(self) -> None:
        _check_count("iters", self.iters, 1)
        _check_count("batch_size", self.batch_size, 1)

    @classmethod
    def from_times_s(cls, times_s: Sequence[float], *, batch_size: int) -> Latency:
        """Summarise per-call times given in seconds.

        Args:
            times_s: One wall-clock duration per timed call, in seconds (non-empty, >= 0).
            batch_size: Batch size of the inputs of each call.

        Returns:
            The summary, in milliseconds.

        Raises:
            ValueError: If `times_s` is empty or holds a negative or non-finite time.

        Examples:
            >>> Latency.from_times_s([0.001, 0.002], batch_size=8).mean_ms
            1.5
        """
        ms = np.asarray(times_s, dtype=np.float64) * 1e3
        if ms.ndim != 1 or ms.size == 0:
            raise ValueError(f"`times_s` must be a non-empty 1-D sequence, got shape {ms.shape}")
        if not np.all(np.isfinite(ms)) or np.any(ms < 0):
            raise ValueError(
                f"`times_s` must be finite and >= 0 (a clock that went backwards?), got "
                f"min {ms.min() / 1e3!r} s, max {ms.max() / 1e3!r} s"
            )
        p10, p50, p90 = np.percentile(ms, [10.0, 50.0, 90.0])
        return cls(
            p50_ms=float(p50),
            p10_ms=float(p10),
            p90_ms=float(p90),
            min_ms=float(ms.min()),
            max_ms=float(ms.max()),
            mean_ms=float(ms.mean()),
            std_ms=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
            iters=int(ms.size),
            batch_size=batch_size,
        )

    def to_dict(self) -> dict[str, float | int]:
        """Return the fields as a plain, JSON-serialisable dict (``Latency(**d)`` reads it).

        Examples:
            >>> Latency.from_times_s([0.001], batch_size=1).to_dict()["p50_ms"]
            1.0
        """
        return dataclasses.asdict(self)


def measure_latency(
    fn: Callable[..., Any],
    *args: Any,
    warmup: int = 10,
    iters: int = 50,
    batch_size: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> Latency:
    """Time ``fn(*args)``: warm up, then time `iters` calls, each blocked until ready.

    Args:
        fn: The function to time, usually ``jax.jit``-ed. Its result may be any pytree; each
            result is passed to ``jax.block_until_ready`` before the clock is read.
        *args: Positional arguments for `fn` (bind keywords with ``functools.partial``).
        warmup: Untimed calls before timing, so compilation is not measured. ``>= 0``.
        iters: Timed calls. ``>= 1``.
        batch_size: Batch size of `args`, recorded in the result; the caller builds inputs
            of this size.
        clock: Monotonic clock returning seconds; injectable for tests.

    Returns:
        The per-call time summary.

    Raises:
        ValueError: If `warmup`, `iters` or `batch_size` is out of range, or the clock runs
            backwards.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> lat = measure_latency(jax.jit(jnp.sin), jnp.ones(4), warmup=1, iters=3)
        >>> lat.iters, lat.min_ms > 0
        (3, True)
    """
    _check_count("warmup", warmup, 0)
    _check_count("iters", iters, 1)
    _check_count("batch_size", batch_size, 1)
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times_s = []
    for _ in range(iters):
        start = clock()
        jax.block_until_ready(fn(*args))
        times_s.append(clock() - start)
    return Latency.from_times_s(times_s, batch_size=batch_size)


def _cpu_model() -> str:
    """Return the CPU model name (``/proc/cpuinfo`` on Linux), else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint(batch_size: int) -> dict[str, Any]:
    """Describe the machine a latency was measured on.

    Latencies are comparable only between equal fingerprints (`fingerprint_id`).

    Args:
        batch_size: Batch size the latency was measured at.

    Returns:
        A JSON-serialisable dict with keys ``backend`` (``jax.default_backend()``),
        ``device_kind`` (of ``jax.devices()[0]``), ``device_count``, ``jax_version``,
        ``jaxlib_version``, ``python_version``, ``platform`` (``platform.platform()``),
        ``processor`` (CPU model name), ``cpu_count``, ``batch_size`` and
        ``cpu_async_dispatch`` (whether JAX dispatches CPU computations to a worker thread,
        `jax_cpu_enable_async_dispatch`; inline dispatch makes small calls faster).

    Raises:
        ValueError: If `batch_size` is not a positive integer.

    Examples:
        >>> fp = device_fingerprint(batch_size=1)
        >>> fp["backend"], fp["batch_size"]
        ('cpu', 1)
    """
    _check_count("batch_size", batch_size, 1)
    try:
        jaxlib_version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        jaxlib_version = "unknown"
    return {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "batch_size": batch_size,
        "cpu_async_dispatch": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
    }


def fingerprint_id(fp: Mapping[str, Any]) -> str:
    """Return a short, stable id of a fingerprint: 12 hex digits of a SHA-256.

    The hash is over the fingerprint as canonical JSON (sorted keys), so it does not depend
    on key order, the process or the Python hash seed. A ``"fingerprint_id"`` key in `fp`
    itself is ignored.

    Args:
        fp: A dict from `device_fingerprint` (any JSON-serialisable mapping).

    Returns:
        The id, e.g. ``"3f2a9c0d41b7"``.

    Examples:
        >>> fingerprint_id({"backend": "cpu", "batch_size": 1})
        'dca54db1db50'
        >>> fingerprint_id({"batch_size": 1, "backend": "cpu"})
        'dca54db1db50'
    """
    body = {k: v for k, v in fp.items() if k != "fingerprint_id"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
