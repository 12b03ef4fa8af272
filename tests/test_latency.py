"""Tests for `mobisearch.latency`: the timing harness (fake clock), a real jit sanity
check, and the device fingerprint."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobisearch.latency import (
    Latency,
    check_threads,
    device_fingerprint,
    fingerprint_id,
    kendall_tau,
    latency_backend_record,
    measure_candidates,
    measure_latency,
    measure_round_robin,
    summarise_rounds,
)
from mobisearch.presets import tiny


class FakeClock:
    """Clock that advances by the next scripted duration between a start and a stop read.

    Every read is logged in `events` next to the calls and blocks, so the test can check
    what happens inside the timed window.
    """

    def __init__(self, durations_s: list[float], events: list[str]) -> None:
        self._durations = list(durations_s)
        self._events = events
        self._now = 100.0
        self._started = False

    def __call__(self) -> float:
        self._events.append("clock")
        if self._started:
            self._now += self._durations.pop(0)
        self._started = not self._started
        return self._now


@pytest.fixture
def spy_block(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Log every `jax.block_until_ready` call into the returned event list."""
    events: list[str] = []
    real = jax.block_until_ready

    def block(x: Any) -> Any:
        events.append("block")
        return real(x)

    monkeypatch.setattr(jax, "block_until_ready", block)
    return events


def test_fake_clock_gives_exact_statistics(spy_block: list[str]) -> None:
    events = spy_block
    durations_ms = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 7.0, 9.0, 8.0]
    clock = FakeClock([d / 1e3 for d in durations_ms], events)

    def fn(x: jax.Array) -> jax.Array:
        events.append("call")
        return x + 1

    lat = measure_latency(fn, jnp.ones(3), warmup=3, iters=10, batch_size=4, clock=clock)

    ms = np.array(durations_ms)
    p10, p50, p90 = np.percentile(ms, [10, 50, 90])
    expected = Latency(
        p50_ms=p50,
        p10_ms=p10,
        p90_ms=p90,
        min_ms=1.0,
        max_ms=10.0,
        mean_ms=5.5,
        std_ms=float(np.std(ms, ddof=1)),
        iters=10,
        batch_size=4,
    )
    for field in dataclasses.fields(Latency):
        assert getattr(lat, field.name) == pytest.approx(getattr(expected, field.name))
    assert lat.p50_ms == pytest.approx(5.5)
    # Warm-up calls are blocked but not timed; every timed call is blocked inside the window.
    assert events == ["call", "block"] * 3 + ["clock", "call", "block", "clock"] * 10


def test_zero_warmup_and_single_iter() -> None:
    calls = []
    lat = measure_latency(lambda: calls.append(1), warmup=0, iters=1, clock=FakeClock([0.002], []))
    assert len(calls) == 1
    assert lat.iters == 1 and lat.std_ms == 0.0
    assert lat.p10_ms == lat.p50_ms == lat.p90_ms == lat.min_ms == lat.max_ms
    assert lat.p50_ms == pytest.approx(2.0)


def test_args_are_passed_through() -> None:
    seen = []
    measure_latency(lambda a, b: seen.append((a, b)), 1, "x", warmup=1, iters=2)
    assert seen == [(1, "x")] * 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"iters": 0}, r"`iters` \(=0\)"),
        ({"warmup": -1}, r"`warmup` \(=-1\)"),
        ({"batch_size": 0}, r"`batch_size` \(=0\)"),
        ({"iters": 2.5}, r"`iters` \(=2.5\)"),
        ({"warmup": True}, r"`warmup` \(=True\)"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        measure_latency(lambda: None, **kwargs)


def test_clock_running_backwards_is_an_error() -> None:
    with pytest.raises(ValueError, match="went backwards"):
        measure_latency(lambda: None, warmup=0, iters=2, clock=FakeClock([0.001, -0.5], []))


def test_latency_to_dict_round_trip() -> None:
    lat = Latency.from_times_s([0.003, 0.001, 0.002], batch_size=2)
    d = lat.to_dict()
    assert list(d) == [
        "p50_ms",
        "p10_ms",
        "p90_ms",
        "min_ms",
        "max_ms",
        "mean_ms",
        "std_ms",
        "iters",
        "batch_size",
    ]
    assert Latency(**d) == lat  # type: ignore[arg-type]
    assert json.loads(json.dumps(d)) == d


def test_latency_validates() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        Latency.from_times_s([], batch_size=1)
    with pytest.raises(ValueError, match="finite"):
        Latency.from_times_s([0.001, float("nan")], batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        Latency.from_times_s([0.001], batch_size=0)


def test_real_jitted_function_sanity() -> None:
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    lat = measure_latency(f, jnp.ones((32, 32)), warmup=2, iters=7)
    assert lat.iters == 7 and lat.batch_size == 1
    assert 0 < lat.min_ms <= lat.p10_ms <= lat.p50_ms <= lat.p90_ms <= lat.max_ms
    assert lat.min_ms <= lat.mean_ms <= lat.max_ms
    assert np.isfinite(lat.std_ms) and lat.std_ms >= 0


def test_device_fingerprint_keys() -> None:
    fp = device_fingerprint(batch_size=8)
    assert set(fp) == {
        "backend",
        "device_kind",
        "device_count",
        "jax_version",
        "jaxlib_version",
        "python_version",
        "platform",
        "processor",
        "cpu_count",
        "batch_size",
        "cpu_async_dispatch",
    }
    assert fp["backend"] == jax.default_backend() == "cpu"  # conftest pins the CPU
    assert fp["device_kind"] == jax.devices()[0].device_kind
    assert fp["jax_version"] == jax.__version__
    assert fp["batch_size"] == 8
    assert fp["cpu_async_dispatch"] is jax.config.read("jax_cpu_enable_async_dispatch")
    assert json.loads(json.dumps(fp)) == fp
    with pytest.raises(ValueError, match="batch_size"):
        device_fingerprint(batch_size=0)


def test_fingerprint_id_is_short_and_stable() -> None:
    fp = device_fingerprint(batch_size=1)
    fid = fingerprint_id(fp)
    assert len(fid) == 12 and int(fid, 16) >= 0
    assert fingerprint_id(device_fingerprint(batch_size=1)) == fid
    assert fingerprint_id(dict(reversed(list(fp.items())))) == fid
    assert fingerprint_id({**fp, "fingerprint_id": fid}) == fid
    assert fingerprint_id(device_fingerprint(batch_size=2)) != fid
    # Pinned: the id must not change between processes or releases for the same dict.
    assert fingerprint_id({"backend": "cpu", "batch_size": 1}) == "dca54db1db50"


# --- ranking candidates: latency backends, round-robin measurement --------------------------


def _have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


needs_onnx = pytest.mark.skipif(
    not all(_have(m) for m in ("onnxruntime", "onnx", "jax2onnx")),
    reason="the onnx extra is not installed (pip install -e '.[onnx]')",
)


def test_round_robin_interleaves_candidates_in_seeded_orders() -> None:
    events: list[str] = []
    runners = [lambda name=name: events.append(name) for name in "abc"]
    durations = iter(range(1, 10_000))

    class Clock:
        """Each timed call lasts 1 ms more than the one before."""

        now, started = 0.0, False

        def __call__(self) -> float:
            if self.started:
                self.now += next(durations) / 1e3
            self.started = not self.started
            return self.now

    times = measure_round_robin(
        runners, rounds=4, iters_per_round=2, warmup=3, seed=7, clock=Clock()
    )
    assert events[:9] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3  # warm-up, one after the other
    visits = events[9:]
    assert len(visits) == 4 * 3 * 3  # each visit: one untimed call, two timed
    order = visits[::3]
    assert [visits[i : i + 3] for i in range(0, len(visits), 3)] == [[v] * 3 for v in order]
    rounds = [order[i : i + 3] for i in range(0, 12, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every candidate once a round
    assert len({tuple(r) for r in rounds}) > 1  # in changing orders
    events.clear()
    again = measure_round_robin(runners, rounds=4, iters_per_round=2, warmup=0, seed=7)
    assert events[::3] == order  # same seed, same orders
    # times[i][r] holds the two timed durations of runner i in round r, in clock order.
    assert [len(t) for t in times] == [4, 4, 4] and all(len(v) == 2 for t in times for v in t)
    flat = sorted(d for t in times for v in t for d in v)
    assert flat == pytest.approx([k / 1e3 for k in range(1, 25)])
    assert len(again) == 3


def test_summarise_rounds_ranks_by_a_low_quantile_of_all_calls() -> None:
    rounds = [[0.001, 0.002, 0.009], [0.003, 0.003, 0.003], [0.0015, 0.0005, 0.0025], [0.1]]
    s = summarise_rounds(rounds)
    ms = [1.0, 2.0, 9.0, 3.0, 3.0, 3.0, 1.5, 0.5, 2.5, 100.0]
    assert s["quantile"] == 25.0
    assert s["latency_ms"] == pytest.approx(np.percentile(ms, 25))  # a slow call moves it little
    assert s["median_ms"] == pytest.approx(2.75) and s["min_ms"] == pytest.approx(0.5)
    assert s["round_ms"] == pytest.approx((1.5, 3.0, 1.0, 100.0))  # each round's quartile
    assert s["round_p25_ms"] == pytest.approx(1.375) and s["round_p75_ms"] == pytest.approx(27.25)
    assert summarise_rounds(rounds, quantile=50)["latency_ms"] == pytest.approx(2.75)
    with pytest.raises(ValueError, match="at least one round"):
        summarise_rounds([[0.001], []])
    with pytest.raises(ValueError, match="went backwards"):
        summarise_rounds([[0.001, -0.001]])
    with pytest.raises(ValueError, match=r"`quantile` \(=101\) must be a percentile"):
        summarise_rounds([[0.001]], quantile=101)


def test_kendall_tau() -> None:
    assert kendall_tau([1, 2, 3], [1, 2, 3]) == 1.0
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    # tau-b with ties: scipy.stats.kendalltau([1, 1, 2, 3], [1, 2, 2, 3]) = 0.8
    assert kendall_tau([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(24), rng.standard_normal(24)
    stats = pytest.importorskip("scipy.stats")
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)
    with pytest.raises(ValueError, match="one length >= 2"):
        kendall_tau([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="undefined"):
        kendall_tau([1, 1, 1], [1, 2, 3])


@pytest.mark.parametrize(
    ("backend", "threads", "match"),
    [
        ("tflite", None, r"latency backend \(='tflite'\) must be one of \('jax', 'onnxruntime'\)"),
        ("onnxruntime", 0, r"`threads` \(=0\) must be an integer >= 1"),
        ("onnxruntime", 1.5, r"`threads` \(=1.5\) must be an integer >= 1"),
        ("jax", 2, r"`threads` \(=2\) applies to the onnxruntime latency backend only"),
    ],
)
def test_bad_latency_backend_or_threads(backend: str, threads: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_threads(backend, threads)
    with pytest.raises(ValueError, match=match):
        measure_candidates([tiny()], backend=backend, threads=threads)


def test_measure_candidates_on_jax(tiny_arch: Any) -> None:
    archs = [tiny_arch, dataclasses.replace(tiny_arch, width=0.5)]
    recs = measure_candidates(archs, backend="jax", rounds=3, iters_per_round=2, warmup=1)
    assert [r.display_id for r in recs] == [a.display_id for a in archs]
    for r in recs:
        assert r.latency_backend == "jax" and r.latency_backend_version == jax.__version__
        assert r.threads is None and r.model_backend in ("native", "xla")
        assert r.rounds == 3 and len(r.round_ms) == 3 and r.iters_per_round == 2
        assert 0 < r.min_ms <= r.latency_ms <= r.median_ms and r.quantile == 25.0
        assert r.round_p25_ms <= r.round_p75_ms and r.spread >= 0
        assert r.device["latency_backend"] == "jax" and r.device["batch_size"] == 1
        d = r.to_dict()
        assert json.loads(json.dumps(d)) == d and d["latency_ms"] == r.latency_ms


@needs_onnx
def test_measure_candidates_on_onnxruntime(tiny_arch: Any) -> None:
    import onnxruntime

    recs = measure_candidates(
        [tiny_arch], backend="onnxruntime", batch_size=2, rounds=2, iters_per_round=2, warmup=1
    )
    (r,) = recs
    assert r.latency_backend == "onnxruntime" and r.model_backend == "onnx"
    assert r.latency_backend_version == onnxruntime.__version__
    assert r.threads == 1 and r.device["threads"] == 1 and r.batch_size == 2
    assert r.device["latency_backend_version"] == onnxruntime.__version__
    assert fingerprint_id(r.device) != fingerprint_id(device_fingerprint(batch_size=2))
    assert 0 < r.min_ms <= r.latency_ms
    two = latency_backend_record("onnxruntime", 2, 1)
    assert two["threads"] == 2 and two["device"]["threads"] == 2


def test_onnxruntime_latency_without_onnxruntime_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mobisearch.export import MissingExtraError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(
        MissingExtraError, match=r"onnxruntime is not installed .*mobisearch\[onnx\]"
    ):
        measure_candidates([tiny()], backend="onnxruntime")
