"""Tests for `mobisearch.latency`: the timing harness (fake clock), a real jit sanity
check, and the device fingerprint."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobisearch.latency import Latency, device_fingerprint, fingerprint_id, measure_latency


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
