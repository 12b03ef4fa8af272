"""Tests for `mobisearch.fit`: the budget-fit report, its interval, histograms and output."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobisearch.cost import count_cost
from mobisearch.fit import (
    fit_record,
    fit_report,
    format_fit_report,
    format_size,
    histogram,
    plot_fit_report,
    wilson_interval,
)
from mobisearch.space import SearchSpace, load_space, resolve_space_path

PROPERTY = settings(max_examples=200, deadline=None)

# 2 x 2 x (3 x 3 x 3) x (2 x 2 x 3) x (3 x 3) = 11,664 candidates: few enough to cost all.
MEDIUM = """\
[space]
name = "m"

[axes]
resolution = [16, 24]
stem_ch = [8, 16]

[axes.stages]
width = [0.25, 0.5, 1.0]
kernel = [3, 5, 7]

[axes.stages.0]
depth = [1, 2, 3]

[axes.stages.1]
depth = [1, 2]
width = [0.5, 1.0]

[arch]
stem_ch = 16
stem_stride = 1
num_classes = 10
in_ch = 1
arch_def = [["dsa_c32"], ["dsa_s2_c64"], ["dsa_s2_c128"]]
"""


@pytest.fixture(scope="module")
def medium() -> SearchSpace:
    return SearchSpace.from_dict(tomllib.loads(MEDIUM), source="medium.toml")


def brute_force(space: SearchSpace, max_macs: int | None, max_params: int | None) -> list[int]:
    costs = [count_cost(a) for a in space.candidates()]
    return sorted(
        c.macs
        for c in costs
        if (max_macs is None or c.macs <= max_macs)
        and (max_params is None or c.params <= max_params)
    )


def test_exact_report_of_a_grid() -> None:
    space = load_space(resolve_space_path("mobilenet_v1_paper"))
    report = fit_report(space, max_macs=150_000_000)
    assert report.exact and report.seed is None and report.evaluated == report.size == 48
    assert list(report.macs) == brute_force(space, 150_000_000, None)
    assert report.estimate == report.fitting and report.interval() == (report.fitting,) * 2
    assert report.min_macs == min(count_cost(a).macs for a in space.candidates())


def test_exact_report_of_a_per_stage_space(medium: SearchSpace) -> None:
    assert medium.size() == 2 * 2 * 27 * 12 * 9
    report = fit_report(medium, max_macs=2_000_000, max_params=20_000)
    assert report.exact and report.size == medium.size()
    assert list(report.macs) == brute_force(medium, 2_000_000, 20_000)
    assert 0 < report.fitting < report.size
    assert report.params[-1] <= 20_000 and report.macs[-1] <= 2_000_000


def test_sampled_estimate_covers_the_exact_count(medium: SearchSpace) -> None:
    exact = fit_report(medium, max_macs=1_000_000)
    sampled = fit_report(medium, max_macs=1_000_000, exact_limit=100, sample_size=4000, seed=1)
    assert not sampled.exact and sampled.evaluated == 4000 and sampled.seed == 1
    lo, hi = sampled.interval()
    assert lo <= exact.fitting <= hi
    assert abs(sampled.estimate - exact.fitting) < 0.05 * exact.size
    # The same seed gives the same report; another seed another sample.
    again = fit_report(medium, max_macs=1_000_000, exact_limit=100, sample_size=4000, seed=1)
    assert again == sampled
    other = fit_report(medium, max_macs=1_000_000, exact_limit=100, sample_size=4000, seed=2)
    assert other != sampled


def test_shipped_stages_space_holds_small_and_large_networks() -> None:
    space = load_space(resolve_space_path("fashion_mnist_stages"))
    small = fit_report(space, max_macs=3_000_000, max_params=100_000, sample_size=2000)
    assert small.fitting > 0 and small.params[-1] < 100_000 and small.macs[-1] <= 3_000_000
    wide = fit_report(space, sample_size=2000)
    assert wide.macs[-1] > 20_000_000  # the current 20M-MAC networks are inside too
    assert not wide.exact and wide.size == 2_624_400_000


def test_report_rejects_bad_sizes(medium: SearchSpace) -> None:
    with pytest.raises(ValueError, match="`sample_size` \\(=0\\) must be a positive integer"):
        fit_report(medium, sample_size=0)


@PROPERTY
@given(n=st.integers(1, 10_000), data=st.data())
def test_wilson_interval(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(k, n)
    assert 0 <= lo <= k / n <= hi <= 1
    # More draws at the same fraction narrow it.
    lo4, hi4 = wilson_interval(4 * k, 4 * n)
    assert hi4 - lo4 <= hi - lo + 1e-12


def test_wilson_interval_known_value() -> None:
    # Wilson (1927) / Newcombe (1998), method 3: 81 of 263 gives 0.2553 to 0.3662.
    lo, hi = wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


@PROPERTY
@given(values=st.lists(st.integers(0, 10**9), min_size=1, max_size=200), bins=st.integers(1, 20))
def test_histogram(values: list[int], bins: int) -> None:
    hist = histogram(values, bins)
    assert sum(b.count for b in hist) == len(values)
    assert hist[0].lo == min(values) and hist[-1].hi == max(values)
    assert all(a.hi == b.lo for a, b in zip(hist, hist[1:], strict=False))
    for i, b in enumerate(hist):
        last = i == len(hist) - 1
        inside = [v for v in values if b.lo <= v and (v < b.hi or (last and v <= b.hi))]
        assert b.count == len(inside)


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 9999, 10_000, 3_110_400_000, 99_999)] == [
        "0",
        "9999",
        "1.0e4",
        "3.1e9",
        "1.0e5",
    ]


def test_text_report(medium: SearchSpace) -> None:
    lines = format_fit_report(fit_report(medium, max_macs=1_000_000))
    assert lines[0] == "1.2e4 candidates (11,664)"
    assert lines[1].startswith("within 1M MACs: ") and lines[1].endswith("%, exact)")
    assert lines[3] == "MACs histogram:" and any(
        line.startswith("params histogram") for line in lines
    )
    sampled = format_fit_report(fit_report(medium, max_params=10_000, exact_limit=10))
    assert "sampled with seed 0" in sampled[1] and "95% CI" in sampled[1]
    none = format_fit_report(fit_report(medium, max_macs=1000))
    assert none[-1].startswith("none fits: the cheapest evaluated candidate has")


def test_record_is_json_ready(medium: SearchSpace) -> None:
    record = fit_record(fit_report(medium, max_macs=1_000_000, exact_limit=10, sample_size=500))
    assert record["evaluated"] == 500 and not record["exact"]
    assert record["ci95"][0] <= record["estimate"] <= record["ci95"][1]
    assert sum(c for _, _, c in record["macs_histogram"]) == record["fitting"]
    assert record["macs_range"][1] <= 1_000_000


def test_plot(tmp_path: Path, medium: SearchSpace) -> None:
    report = fit_report(medium, max_macs=1_000_000, exact_limit=10, sample_size=300)
    path = plot_fit_report(report, str(tmp_path / "fit.png"))
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = dataclasses.replace(report, macs=(), params=())
    assert Path(plot_fit_report(empty, str(tmp_path / "none.png"))).exists()


def test_cost_of_a_candidate_is_fast(medium: SearchSpace) -> None:
    # The fit report costs thousands of candidates; a budget well above what it needs.
    import random
    import time

    rng = random.Random(0)
    start = time.perf_counter()
    for _ in range(2000):
        count_cost(medium.sample(rng))
    per_candidate = (time.perf_counter() - start) / 2000
    assert per_candidate < 2e-3, f"{1e6 * per_candidate:.0f} us per candidate"
    assert math.isfinite(per_candidate)


def test_import_is_pure() -> None:
    code = (
        "import sys, mobisearch.fit; "
        "bad = sorted(m for m in ('jax', 'flax', 'optax', 'optuna', 'matplotlib') "
        "if m in sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
