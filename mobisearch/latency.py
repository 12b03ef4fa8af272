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

Ranking candidates by latency (`measure_candidates`): one latency backend measures every
candidate (untrained weights serve: weights do not change latency):

* ``"jax"``: the compiled eval-mode forward pass the search measures
  (`mobisearch.compile.compiled_forward`, on the model backend ``"native"`` or ``"xla"``),
  on float32 images at the candidate's resolution; XLA:CPU uses its own thread pool.
* ``"onnxruntime"``: the exported ONNX graph (`mobisearch.export.onnx_model`: uint8 images
  in, preprocessing inside) in an onnxruntime CPU session with a fixed number of intra-op
  threads, 1 by default (one phone core).

To be stable enough to rank on a shared machine, every candidate is warmed up, then
measured in `rounds` rounds; each round visits the candidates in a fresh seeded order
(round-robin, so a burst of load hits all of them rather than one) and times
`iters_per_round` calls of each after one untimed call. A candidate's latency is the lower
quartile (`quantile`, 25%) of all its timed calls: other processes only ever add time to a
call, so a low quantile tracks the candidate's own cost while the median moves with the
load (measured in results/latency/). Its spread is the interquartile range of the same
quantile taken round by round. Each record carries the backend, its version, the threads
and the device fingerprint.

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
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

if TYPE_CHECKING:
    from mobisearch.arch import ArchSpec


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


# --- ranking candidates: latency backends, round-robin measurement --------------------------

#: Where a candidate's latency is measured: JAX's compiled forward, or the exported ONNX
#: graph in onnxruntime.
LATENCY_BACKENDS: tuple[str, ...] = ("jax", "onnxruntime")
#: onnxruntime's intra-op threads unless told otherwise: one thread stands for a phone core.
DEFAULT_THREADS = 1


def check_latency_backend(backend: object) -> str:
    """Return `backend` if it is one of `LATENCY_BACKENDS`; raise ValueError naming it.

    Examples:
        >>> check_latency_backend("onnxruntime")
        'onnxruntime'
    """
    if not isinstance(backend, str) or backend not in LATENCY_BACKENDS:
        raise ValueError(f"latency backend (={backend!r}) must be one of {LATENCY_BACKENDS}")
    return backend


def check_threads(backend: str, threads: object) -> int | None:
    """The thread count a latency `backend` runs with: `threads` (an integer >= 1) or
    `DEFAULT_THREADS` for onnxruntime; None for jax, whose XLA:CPU thread pool is sized
    when the process starts (a number there is an error, not silently ignored).

    Examples:
        >>> check_threads("onnxruntime", None), check_threads("onnxruntime", 4)
        (1, 4)
        >>> check_threads("jax", None) is None
        True
    """
    check_latency_backend(backend)
    if backend == "jax":
        if threads is not None:
            raise ValueError(
                f"`threads` (={threads!r}) applies to the onnxruntime latency backend only; "
                "jax uses XLA:CPU's own thread pool"
            )
        return None
    if threads is None:
        return DEFAULT_THREADS
    return _check_count("threads", threads, 1)


def latency_backend_record(backend: str, threads: int | None, batch_size: int) -> dict[str, Any]:
    """What every measurement records about where it ran: ``latency_backend``,
    ``latency_backend_version`` (jax's, or onnxruntime's), ``threads`` (None: XLA's pool)
    and ``device`` (`device_fingerprint`, plus the onnxruntime version for that backend, so
    that `fingerprint_id` tells the backends apart).

    Raises:
      ValueError: an unknown backend, or bad threads or batch size.
      mobisearch.export.MissingExtraError: onnxruntime is not installed.
    """
    threads = check_threads(backend, threads)
    device = device_fingerprint(batch_size)
    if backend == "onnxruntime":
        from mobisearch.export import onnx_versions

        version = onnx_versions()["onnxruntime"]
    else:
        version = jax.__version__
    device |= {"latency_backend": backend, "latency_backend_version": version, "threads": threads}
    return {
        "latency_backend": backend,
        "latency_backend_version": version,
        "threads": threads,
        "device": device,
    }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CandidateLatency:
    """One candidate's latency from `measure_candidates`, in milliseconds per call.

    Attributes:
        display_id: the candidate's display id.
        latency_ms: the `quantile` of all timed calls (the figure to rank by).
        round_p25_ms: first quartile of `round_ms`.
        round_p75_ms: third quartile of `round_ms`.
        median_ms: median of all timed calls (what a call took under the load of the time).
        min_ms: fastest call.
        round_ms: the `quantile` of each round's calls, in round order.
        quantile: the quantile, in percent (25: the lower quartile).
        rounds: number of rounds.
        iters_per_round: timed calls per round.
        batch_size: images per call.
        latency_backend: ``"jax"`` or ``"onnxruntime"``.
        latency_backend_version: jax's or onnxruntime's version.
        threads: onnxruntime's intra-op threads; None for jax (XLA's pool).
        model_backend: for jax, the model's operations (``"native"`` or ``"xla"``); for
            onnxruntime, ``"onnx"``.
        device: `device_fingerprint` with the backend, its version and the threads.
    """

    display_id: str
    latency_ms: float
    round_p25_ms: float
    round_p75_ms: float
    median_ms: float
    min_ms: float
    round_ms: tuple[float, ...]
    quantile: float
    rounds: int
    iters_per_round: int
    batch_size: int
    latency_backend: str
    latency_backend_version: str
    threads: int | None
    model_backend: str
    device: dict[str, Any]

    @property
    def spread(self) -> float:
        """Interquartile range of `round_ms` over the latency, e.g. 0.05 = 5%."""
        return (
            (self.round_p75_ms - self.round_p25_ms) / self.latency_ms if self.latency_ms else 0.0
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (round_ms as a list), keys as a trial stores them."""
        d = dataclasses.asdict(self)
        d["round_ms"] = list(self.round_ms)
        d["spread"] = self.spread
        return d


def measure_round_robin(
    runners: Sequence[Callable[[], Any]],
    *,
    rounds: int,
    iters_per_round: int,
    warmup: int,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[list[float]]]:
    """Time several callables interleaved: warm-up, then rounds in a seeded random order.

    Each runner is called `warmup` times untimed first. In each round every runner is
    visited once, in an order drawn from ``numpy.random.default_rng(seed)``; a visit makes
    one untimed call (the previous runner's data left the caches) and `iters_per_round`
    timed calls. A runner must block until its result is ready.

    Args:
        runners: zero-argument callables, one per candidate.
        rounds: rounds (>= 1).
        iters_per_round: timed calls per visit (>= 1).
        warmup: untimed calls per runner before the first round (>= 0).
        seed: seed of the visiting orders.
        clock: monotonic clock in seconds; injectable for tests.

    Returns:
        ``times_s[i][r]``: the `iters_per_round` durations (seconds) of runner ``i`` in
        round ``r``.

    Examples:
        >>> calls = []
        >>> t = measure_round_robin(
        ...     [lambda: calls.append("a"), lambda: calls.append("b")],
        ...     rounds=3, iters_per_round=2, warmup=1)
        >>> len(t), len(t[0]), len(t[0][0]), calls.count("a")
        (2, 3, 2, 10)
    """
    _check_count("rounds", rounds, 1)
    _check_count("iters_per_round", iters_per_round, 1)
    _check_count("warmup", warmup, 0)
    for run in runners:
        for _ in range(warmup):
            run()
    rng = np.random.default_rng(seed)
    times_s: list[list[list[float]]] = [[] for _ in runners]
    for _ in range(rounds):
        for i in rng.permutation(len(runners)):
            run = runners[i]
            run()
            visit = []
            for _ in range(iters_per_round):
                start = clock()
                run()
                visit.append(clock() - start)
            times_s[i].append(visit)
    return times_s


def summarise_rounds(
    times_s: Sequence[Sequence[float]], *, quantile: float = 25.0
) -> dict[str, Any]:
    """The robust summary of one runner's rounds (from `measure_round_robin`), in ms.

    Args:
        times_s: per round, the timed durations in seconds.
        quantile: the percentile that ranks (25: the lower quartile; 50: the median).

    Returns:
        ``latency_ms`` (the `quantile` of all calls), ``round_ms`` (the `quantile` of each
        round), ``round_p25_ms``, ``round_p75_ms`` (quartiles of ``round_ms``),
        ``median_ms`` (median of all calls), ``min_ms`` (fastest call) and ``quantile``.

    Raises:
        ValueError: no rounds, an empty round, a negative or non-finite time, or a quantile
            outside [0, 100].

    Examples:
        >>> s = summarise_rounds([[0.001, 0.003, 0.002], [0.004, 0.004, 0.009]], quantile=50)
        >>> s["latency_ms"], s["round_ms"], s["min_ms"]
        (3.5, (2.0, 4.0), 1.0)
    """
    if len(times_s) == 0 or any(len(r) == 0 for r in times_s):
        raise ValueError("`times_s` must hold at least one round, each with one time or more")
    if isinstance(quantile, bool) or not 0 <= quantile <= 100:
        raise ValueError(f"`quantile` (={quantile!r}) must be a percentile in [0, 100]")
    all_ms = np.concatenate([np.asarray(r, np.float64) for r in times_s]) * 1e3
    if not np.all(np.isfinite(all_ms)) or np.any(all_ms < 0):
        raise ValueError("times must be finite and >= 0 (a clock that went backwards?)")
    per_round = np.array(
        [np.percentile(np.asarray(r, np.float64) * 1e3, quantile) for r in times_s]
    )
    p25, p75 = np.percentile(per_round, [25.0, 75.0])
    return {
        "latency_ms": float(np.percentile(all_ms, quantile)),
        "round_p25_ms": float(p25),
        "round_p75_ms": float(p75),
        "median_ms": float(np.median(all_ms)),
        "min_ms": float(all_ms.min()),
        "round_ms": tuple(float(m) for m in per_round),
        "quantile": float(quantile),
    }


def latency_runner(
    arch: ArchSpec,
    *,
    backend: str = "jax",
    threads: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    model_backend: str | None = None,
    image_hw: tuple[int, int] | None = None,
) -> Callable[[], Any]:
    """A zero-argument callable running one forward pass of an untrained `arch` on a latency
    backend, blocking until the result is ready (what `measure_candidates` times).

    Args:
        arch: the candidate.
        backend: ``"jax"`` or ``"onnxruntime"`` (`LATENCY_BACKENDS`).
        threads: onnxruntime's intra-op threads (default 1); must be None for jax.
        batch_size: images per call.
        seed: seed of the initial weights and of the random input.
        model_backend: jax only: the model's operations, ``"native"`` or ``"xla"``
            (default `mobisearch.ops.default_backend()`).
        image_hw: onnxruntime only: the ``(h, w)`` of the uint8 images the graph takes
            (default the candidate's resolution: no resize in the graph).

    Raises:
        ValueError: an unknown backend, bad threads or batch size.
        mobisearch.export.MissingExtraError: onnxruntime is not installed.
    """
    from mobisearch.train import fresh_split

    threads = check_threads(check_latency_backend(backend), threads)
    _check_count("batch_size", batch_size, 1)
    rng = np.random.default_rng(seed)
    r, c = arch.resolution, arch.in_ch
    if backend == "jax":
        from mobisearch import ops
        from mobisearch.compile import compiled_forward

        model_backend = ops.check_backend(model_backend or ops.default_backend())
        _, params, rest = fresh_split(arch, model_backend, training=False, seed=seed)
        forward = compiled_forward(arch, model_backend, batch=batch_size).bind(params, rest)
        x = jax.device_put(rng.standard_normal((batch_size, r, r, c), np.float32))
        return lambda: jax.block_until_ready(forward(x))

    from mobisearch.export import inference_session, onnx_model

    _, params, rest = fresh_split(arch, "xla", training=False, seed=seed)
    stats = (np.zeros(c, np.float32), np.ones(c, np.float32))
    proto = onnx_model(arch, (params, rest), stats=stats, image_hw=image_hw)
    assert threads is not None  # check_threads gives onnxruntime a count
    session = inference_session(proto, threads=threads)
    h, w = image_hw or (r, r)
    feed = {"images": rng.integers(0, 256, (batch_size, h, w, c), dtype=np.uint8)}
    return lambda: session.run(None, feed)


def measure_candidates(
    archs: Sequence[ArchSpec],
    *,
    backend: str = "jax",
    threads: int | None = None,
    batch_size: int = 1,
    rounds: int = 20,
    iters_per_round: int = 10,
    warmup: int = 10,
    seed: int = 0,
    quantile: float = 25.0,
    model_backend: str | None = None,
    image_hw: tuple[int, int] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[CandidateLatency]:
    """Measure the latency of several candidates so that their order is stable.

    Builds a runner per candidate (`latency_runner`: compile, or export and open a
    session), then times them all with `measure_round_robin` and summarises each with
    `summarise_rounds` (see the module docstring).

    Args:
        archs: the candidates (untrained networks are built; weights do not change latency).
        backend: ``"jax"`` or ``"onnxruntime"``.
        threads: onnxruntime's intra-op threads (default 1); None for jax.
        batch_size: images per call.
        rounds, iters_per_round, warmup: see `measure_round_robin`.
        seed: seed of the weights, the inputs and the visiting orders.
        quantile: the percentile of the calls that ranks (`summarise_rounds`).
        model_backend: jax only: ``"native"`` or ``"xla"`` (default: this machine's).
        image_hw: onnxruntime only: the input image size (default: each resolution).
        clock: monotonic clock in seconds.

    Returns:
        One `CandidateLatency` per candidate, in the order of `archs`.

    Raises:
        ValueError: an unknown backend, bad threads or counts.
        mobisearch.export.MissingExtraError: onnxruntime is not installed.
    """
    record = latency_backend_record(backend, threads, _check_count("batch_size", batch_size, 1))
    _check_count("rounds", rounds, 1)
    _check_count("iters_per_round", iters_per_round, 1)
    _check_count("warmup", warmup, 0)
    summarise_rounds([[0.0]], quantile=quantile)  # a bad quantile fails before any compile
    if backend == "jax":
        from mobisearch import ops

        model_backend = ops.check_backend(model_backend or ops.default_backend())
    else:
        model_backend = "onnx"
    runners = [
        latency_runner(
            arch,
            backend=backend,
            threads=record["threads"],
            batch_size=batch_size,
            seed=seed,
            model_backend=None if backend != "jax" else model_backend,
            image_hw=image_hw,
        )
        for arch in archs
    ]
    times = measure_round_robin(
        runners,
        rounds=rounds,
        iters_per_round=iters_per_round,
        warmup=warmup,
        seed=seed,
        clock=clock,
    )
    return [
        CandidateLatency(
            display_id=arch.display_id,
            rounds=rounds,
            iters_per_round=iters_per_round,
            batch_size=batch_size,
            model_backend=model_backend,
            **summarise_rounds(t, quantile=quantile),
            **record,
        )
        for arch, t in zip(archs, times, strict=True)
    ]


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b rank correlation of two equally long sequences (ties counted as
    scipy.stats.kendalltau does): 1 for the same order, -1 for the reverse.

    Raises:
        ValueError: sequences of different lengths, fewer than 2 values, or a sequence
            whose values are all equal (τ is undefined).

    Examples:
        >>> kendall_tau([1, 2, 3, 4], [10, 20, 30, 40])
        1.0
        >>> kendall_tau([1, 2, 3, 4], [10, 30, 20, 40])
        0.6666666666666666
    """
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"need two 1-D sequences of one length >= 2, got {a.shape}, {b.shape}")
    i, j = np.triu_indices(a.size, k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    n_a, n_b = np.count_nonzero(da), np.count_nonzero(db)
    if n_a == 0 or n_b == 0:
        raise ValueError("Kendall's tau is undefined when all values of a sequence are equal")
    return float(np.sum(da * db) / np.sqrt(float(n_a) * float(n_b)))
