"""Budget fit of a search space: how many candidates fit a MAC / parameter budget, and what
those candidates cost.

`fit_report` costs every candidate of a space small enough to list, and otherwise a seeded
uniform sample of it, whose fraction within the budget carries a 95% Wilson score interval
(Wilson 1927; it stays inside [0, 1] and is sound for fractions near 0 or 1, where the
normal approximation is not). This is the distribution MCUNet (Lin et al. 2020,
https://arxiv.org/abs/2007.10319) chooses its space from, before anything is trained.
`format_fit_report` renders a report as text with histograms; `plot_fit_report` as a PNG.

Pure module: standard library only (matplotlib is imported by `plot_fit_report` alone).

Examples:
    >>> from mobisearch.space import load_space, resolve_space_path
    >>> report = fit_report(load_space(resolve_space_path("fashion_mnist")), max_macs=20_000_000)
    >>> report.size, report.fitting, report.exact
    (24, 16, True)
    >>> wilson_interval(50, 100)
    (0.4038..., 0.5961...)
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import TYPE_CHECKING, Any

from mobisearch.cost import count_cost, format_count

if TYPE_CHECKING:
    from mobisearch.space import SearchSpace

__all__ = [
    "Bin",
    "FitReport",
    "fit_record",
    "fit_report",
    "format_fit_report",
    "format_size",
    "histogram",
    "plot_fit_report",
    "wilson_interval",
]

# z of a two-sided 95% normal interval.
_Z95 = 1.959963984540054


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FitReport:
    """How the candidates of a space sit against a budget.

    Attributes:
      size: the number of candidates of the space (exact).
      max_macs, max_params: the budget (None: no limit).
      exact: True when every candidate was costed, False for a sample.
      evaluated: candidates costed: `size` when exact, else the sample size (drawn
        uniformly with replacement).
      seed: the sampling seed; None when exact.
      macs: MACs of the evaluated candidates within the budget, ascending.
      params: parameters of the same candidates, ascending (sorted on their own).
      min_macs, min_params: the smallest MACs and parameter counts among all evaluated
        candidates, within the budget or not (what the budget would have to allow).
    """

    size: int
    max_macs: int | None
    max_params: int | None
    exact: bool
    evaluated: int
    seed: int | None
    macs: tuple[int, ...]
    params: tuple[int, ...]
    min_macs: int
    min_params: int

    @property
    def fitting(self) -> int:
        """Evaluated candidates within the budget (all of them that fit, when exact)."""
        return len(self.macs)

    @property
    def fraction(self) -> float:
        """The fraction of evaluated candidates within the budget."""
        return self.fitting / self.evaluated

    @property
    def estimate(self) -> float:
        """The number of candidates of the space within the budget (exact when `exact`)."""
        return float(self.fitting) if self.exact else self.size * self.fraction

    def interval(self) -> tuple[float, float]:
        """95% interval on the number within the budget: Wilson's on the sampled fraction,
        scaled to `size`; `(fitting, fitting)` when exact."""
        if self.exact:
            return float(self.fitting), float(self.fitting)
        lo, hi = wilson_interval(self.fitting, self.evaluated)
        return self.size * lo, self.size * hi


def wilson_interval(successes: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial fraction (95% for the default `z`).

    Args:
      successes: how many of the `n` draws counted.
      n: the number of draws (> 0).
      z: the normal quantile of the two-sided level.

    Returns:
      `(low, high)`, with `0 <= low <= successes / n <= high <= 1`.

    Raises:
      ValueError: if `n < 1` or `successes` is not in `[0, n]`.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(
            f"`successes` (={successes}) and `n` (={n}) need 0 <= successes <= n, n >= 1"
        )
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # NOTE: clamped so that rounding never puts the observed fraction outside the interval.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def fit_report(
    space: SearchSpace,
    *,
    max_macs: int | None = None,
    max_params: int | None = None,
    sample_size: int = 10_000,
    exact_limit: int = 100_000,
    seed: int = 0,
) -> FitReport:
    """Count the candidates of `space` within a budget and collect what they cost.

    Args:
      space: the search space.
      max_macs, max_params: the budget; None leaves that cost unlimited.
      sample_size: candidates drawn (uniformly, with replacement, by `space.sample`) when
        the space has more than `exact_limit`.
      exact_limit: the largest space costed candidate by candidate.
      seed: seed of the sample (`random.Random(seed)`): the same seed gives the same report.

    Returns:
      The `FitReport`. Costs are `mobisearch.cost.count_cost`'s.

    Raises:
      ValueError: if `sample_size` or `exact_limit` is below 1.
    """
    for name, value in (("sample_size", sample_size), ("exact_limit", exact_limit)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` (={value!r}) must be a positive integer")
    size = space.size()
    exact = size <= exact_limit
    if exact:
        archs = space.candidates()
    else:
        rng = random.Random(seed)
        archs = tuple(space.sample(rng) for _ in range(sample_size))
    macs, params = [], []
    min_macs = min_params = None
    for arch in archs:
        cost = count_cost(arch)
        min_macs = cost.macs if min_macs is None else min(min_macs, cost.macs)
        min_params = cost.params if min_params is None else min(min_params, cost.params)
        if (max_macs is None or cost.macs <= max_macs) and (
            max_params is None or cost.params <= max_params
        ):
            macs.append(cost.macs)
            params.append(cost.params)
    assert min_macs is not None and min_params is not None
    return FitReport(
        size=size,
        max_macs=max_macs,
        max_params=max_params,
        exact=exact,
        evaluated=len(archs),
        seed=None if exact else seed,
        macs=tuple(sorted(macs)),
        params=tuple(sorted(params)),
        min_macs=min_macs,
        min_params=min_params,
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Bin:
    """One histogram bin: values `lo <= v < hi` (`<= hi` for the last bin)."""

    lo: int
    hi: int
    count: int


def histogram(values: tuple[int, ...] | list[int], bins: int = 10) -> tuple[Bin, ...]:
    """Equal-width bins from the smallest to the largest value.

    Args:
      values: the counts to bin (e.g. `FitReport.macs`).
      bins: the number of bins (>= 1); fewer when the values span fewer integers.

    Returns:
      The bins in ascending order, their counts summing to `len(values)`; `()` for no values.

    Examples:
      >>> [(b.lo, b.hi, b.count) for b in histogram([1, 2, 2, 9], bins=2)]
      [(1, 5, 3), (5, 9, 1)]
    """
    if bins < 1:
        raise ValueError(f"`bins` (={bins}) must be >= 1")
    if not values:
        return ()
    lo, hi = min(values), max(values)
    bins = max(1, min(bins, hi - lo))
    edges = [lo + (hi - lo) * i // bins for i in range(bins + 1)]
    counts = [0] * bins
    for v in values:
        # Integer arithmetic keeps the bin of a value exact at the edges.
        i = min(bins - 1, (v - lo) * bins // (hi - lo)) if hi > lo else 0
        while i > 0 and v < edges[i]:
            i -= 1
        while i < bins - 1 and v >= edges[i + 1]:
            i += 1
        counts[i] += 1
    return tuple(Bin(lo=edges[i], hi=edges[i + 1], count=counts[i]) for i in range(bins))


def fit_record(report: FitReport, *, bins: int = 10) -> dict[str, Any]:
    """A JSON-ready summary of a report: counts, interval, cost ranges and histograms.

    Histograms are lists of `[lo, hi, count]`; ranges are `[min, max]` or None when
    nothing fits.
    """
    lo, hi = report.interval()
    fits = bool(report.fitting)
    return {
        "size": report.size,
        "max_macs": report.max_macs,
        "max_params": report.max_params,
        "exact": report.exact,
        "evaluated": report.evaluated,
        "seed": report.seed,
        "fitting": report.fitting,
        "fraction": report.fraction,
        "estimate": report.estimate,
        "ci95": [lo, hi],
        "macs_range": [report.macs[0], report.macs[-1]] if fits else None,
        "params_range": [report.params[0], report.params[-1]] if fits else None,
        "min_macs": report.min_macs,
        "min_params": report.min_params,
        "macs_histogram": [[b.lo, b.hi, b.count] for b in histogram(report.macs, bins)],
        "params_histogram": [[b.lo, b.hi, b.count] for b in histogram(report.params, bins)],
    }


def format_size(n: int, digits: int = 2) -> str:
    """A count as it reads best: exact below 10,000, else scientific with `digits`
    significant digits.

    Examples:
      >>> format_size(24), format_size(3_110_400_000), format_size(2_494_000_000, 3)
      ('24', '3.1e9', '2.49e9')
    """
    if n < 10_000:
        return str(n)
    text = f"{n:.{digits - 1}e}"  # e.g. '3.1e+09'
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def _budget_text(report: FitReport) -> str:
    parts = []
    if report.max_macs is not None:
        parts.append(f"{format_count(report.max_macs)} MACs")
    if report.max_params is not None:
        parts.append(f"{format_count(report.max_params)} params")
    return "within " + " and ".join(parts) if parts else "with no budget"


def _bars(title: str, bins: tuple[Bin, ...], width: int) -> list[str]:
    most = max(b.count for b in bins)
    rows = [title]
    for b in bins:
        bar = "#" * max(1 if b.count else 0, round(width * b.count / most))
        span = f"{format_count(b.lo):>7} - {format_count(b.hi):<7}"
        rows.append(f"  {span} |{bar:<{width}} {b.count:,}")
    return rows


def format_fit_report(report: FitReport, *, bins: int = 10, width: int = 40) -> list[str]:
    """The report as text lines: size, how many fit, their cost ranges and histograms.

    Examples:
      >>> from mobisearch.space import load_space, resolve_space_path
      >>> space = load_space(resolve_space_path("fashion_mnist"))
      >>> print(format_fit_report(fit_report(space, max_macs=20_000_000))[1])
      within 20M MACs: 16 of 24 candidates (66.67%, exact)
    """
    n = report.size
    lines = [f"{format_size(n)} candidates" + (f" ({n:,})" if n >= 10_000 else "")]
    budget = _budget_text(report)
    if report.exact:
        lines.append(
            f"{budget}: {report.fitting:,} of {n:,} candidates "
            f"({100 * report.fraction:.2f}%, exact)"
        )
    else:
        lo, hi = report.interval()
        lines.append(
            f"{budget}: about {format_size(round(report.estimate), 3)} candidates (95% CI "
            f"{format_size(math.floor(lo), 3)} to {format_size(math.ceil(hi), 3)}), from "
            f"{report.fitting:,} of {report.evaluated:,} sampled with seed {report.seed} "
            f"({100 * report.fraction:.2f}%)"
        )
    if not report.fitting:
        lines.append(
            f"none fits: the cheapest evaluated candidate has {format_count(report.min_macs)} "
            f"MACs, the smallest {format_count(report.min_params)} params"
        )
        return lines
    which = "these" if report.exact else "the sampled ones"
    lines.append(
        f"MACs of {which}: {format_count(report.macs[0])} to {format_count(report.macs[-1])}; "
        f"params: {report.params[0]:,} to {report.params[-1]:,}"
    )
    # About sqrt(n) bins for few candidates, so that a small grid's bars are not mostly empty.
    bins = min(bins, max(1, math.isqrt(report.fitting)))
    lines += _bars("MACs histogram:", histogram(report.macs, bins), width)
    lines += _bars("params histogram:", histogram(report.params, bins), width)
    return lines


def plot_fit_report(report: FitReport, path: str, *, title: str = "", bins: int = 30) -> str:
    """Draw the MACs and parameter histograms of the candidates within budget as a PNG.

    Args:
      report: from `fit_report`.
      path: the PNG file to write.
      title: the figure title (e.g. the space's name).
      bins: bins per histogram.

    Returns:
      `path`.

    Raises:
      ImportError: if matplotlib (the ``[plot]`` extra) is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            f"plotting needs matplotlib: pip install 'mobisearch[plot]' ({e})"
        ) from None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    what = "all" if report.exact else f"{report.evaluated:,} sampled"
    for ax, values, label, limit in (
        (axes[0], report.macs, "MACs", report.max_macs),
        (axes[1], report.params, "parameters", report.max_params),
    ):
        if values:
            ax.hist(values, bins=min(bins, max(1, len(set(values)))), color="tab:blue")
        if limit is not None:
            ax.axvline(
                limit, color="tab:red", linestyle="--", label=f"budget {format_count(limit)}"
            )
            ax.legend()
        ax.set_xlabel(label)
        ax.set_ylabel("candidates")
        ax.set_title(f"{label} of {report.fitting:,} within budget ({what})")
    fig.suptitle(title or f"{format_size(report.size)} candidates, {_budget_text(report)}")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
