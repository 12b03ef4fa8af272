"""Sampled and multi-fidelity searches: candidates drawn inside the budget by an optuna
sampler, and successive halving over rungs of training.

`run_halving` drives a search whose space has `[fidelity]` rungs, or is too large to
enumerate (a per-stage space), or both:

1. **Rung 0.** A grid space trains every candidate within the budget, in order. A
   per-stage space asks its sampler (`[search] sampler`: NSGA-II by default, seeded) for
   candidates over the space's choices (`SearchSpace.params`); the exact cost model checks
   each draw, and a draw over the budget is told `PRUNED` (status `"over_budget"`) and
   never compiled; a draw whose network was trained already (the same `arch_key`, however
   its parameters were spelled) is told `FAIL` (status `"duplicate"`). Proposals stop at
   `trials` candidates or when rung 0's share of the time budget is spent.
2. **Noise.** `noise_candidates` of the first rung's best candidates are trained again with
   the next seed: the seed-to-seed spread of the score (`mobisearch.results`).
3. **Promotion.** Once every rung-`r` job is done, the best `ceil(n / eta)` of its `n`
   candidates go to rung `r + 1`: ranked by non-dominated sorting of (validation
   accuracy, latency), then crowding distance, then trial order
   (`mobisearch.pareto.rank_points`). Optuna's pruners do not handle multi-objective
   studies, so this is ours, on the study as the store.

Every job (a candidate at a rung, for a seed) is named by `rung_job_key` and runs exactly
once through `mobisearch.search.run_claimed` and the claims of `mobisearch.workers`, so
any number of workers can share the search, and a rerun after a kill continues: finished
jobs are never trained again, a running one is retried, and the promotions follow from the
finished results alone.

This module imports optuna but not jax: the evaluator is injected.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from mobisearch.arch import ArchSpec
from mobisearch.cost import Cost, count_cost, format_count
from mobisearch.pareto import rank_points
from mobisearch.search import (
    DIRECTIONS,
    Plan,
    _fail,
    _jobs,
    cost_attrs,
    plan_search,
    run_claimed,
)
from mobisearch.space import SearchSpace
from mobisearch.workers import DEFAULT_HEARTBEAT_S, Claims, claims_for, fail_stale_trials

__all__ = ["Job", "make_sampler", "rung_job_key", "run_halving", "rung_shares"]

# Draws in a row that may fall over the budget before the search gives up proposing.
MAX_REJECTED_DRAWS = 2000


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work: a candidate trained (with `seed`) to a rung and scored there.

    Attributes:
      arch, cost: the candidate and its exact cost.
      rung: the rung index (0 for a search without rungs).
      seed: the run's seed.
      role: `"rung"`, or `"noise"` for a re-run with another seed.
      latency: the candidate's measured latency (`latency_ms` and its spread), when a
        lower rung measured it already: weights do not change latency.
    """

    arch: ArchSpec
    cost: Cost
    rung: int = 0
    seed: int = 0
    role: str = "rung"
    latency: Mapping[str, Any] | None = None


def rung_job_key(arch: ArchSpec, rung: int | None, seed_offset: int = 0) -> str:
    """The key of a candidate's job: `arch.arch_key()`, then `@r<rung>` in a search with
    rungs (None: without), then `@s+<offset>` for a re-run with another seed."""
    key = arch.arch_key()
    if rung is not None:
        key += f"@r{rung}"
    if seed_offset:
        key += f"@s+{seed_offset}"
    return key


def make_sampler(sampler: str, *, seed: int, population: int) -> optuna.samplers.BaseSampler:
    """The optuna sampler named by a space's `[search] sampler`."""
    if sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"`sampler` (={sampler!r}) must be one of 'nsga2', 'tpe', 'random'")


def rung_shares(steps: Sequence[int], decay: Sequence[int], eta: int) -> list[float]:
    """Each rung's share of a search's training compute: rung `r` trains `n / eta**r`
    candidates for its new stable steps and its decay branch.

    Examples:
      >>> [round(x, 2) for x in rung_shares([143, 430, 1289], [29, 57, 172], 3)]
      [0.41, 0.3, 0.29]
    """
    costs, start = [], 0
    for r, (s, d) in enumerate(zip(steps, decay, strict=True)):
        costs.append((s - start) / eta**r)
        start = s - d
    total = sum(costs)
    return [c / total for c in costs]


@dataclasses.dataclass
class _Result:
    """A finished rung job, as promotion reads it."""

    arch: ArchSpec
    cost: Cost
    values: tuple[float, float]
    number: int
    latency: dict[str, Any]


class _Search:
    """The state of one worker's multi-fidelity search (see `run_halving`)."""

    def __init__(
        self,
        study: optuna.Study,
        space: SearchSpace,
        evaluate: Callable[[Job], Mapping[str, Any]],
        *,
        max_macs: int | None,
        max_params: int | None,
        plan: Plan | None,
        predict_latency: Callable[[ArchSpec], float] | None,
        max_latency_ms: float | None,
        trials: int | None,
        time_budget_s: float | None,
        rung_steps: Sequence[int],
        rung_decay: Sequence[int],
        heartbeat_s: float,
        claims: Claims,
        on_start: Callable[[Job, int, int], None] | None,
        on_done: Callable[[Job, Mapping[str, Any]], None] | None,
        clock: Callable[[], float],
    ) -> None:
        self.study, self.space, self.evaluate = study, space, evaluate
        self.max_macs, self.max_params, self.trials = max_macs, max_params, trials
        self.plan, self.predict_latency, self.max_latency_ms = (
            plan,
            predict_latency,
            max_latency_ms,
        )
        self.fidelity = space.fidelity
        self.n_rungs = len(rung_steps) if self.fidelity else 1
        self.seed = space.train.seed if space.train else 0
        self.heartbeat_s, self.claims = heartbeat_s, claims
        self.on_start, self.on_done, self.clock = on_start, on_done, clock
        self.start = clock()
        self.time_budget_s = time_budget_s
        eta = self.fidelity.eta if self.fidelity else 3
        shares = rung_shares(rung_steps, rung_decay, eta) if self.fidelity else [1.0]
        self.deadlines = [float(x) for x in np.cumsum(shares)]

    # --- bookkeeping ------------------------------------------------------------------

    def key(self, arch: ArchSpec, rung: int, seed_offset: int = 0) -> str:
        return rung_job_key(arch, rung if self.fidelity else None, seed_offset)

    def time_left(self, rung: int) -> bool:
        """Whether rung `rung` may still start work under the time budget."""
        if self.time_budget_s is None:
            return True
        return self.clock() - self.start < self.deadlines[rung] * self.time_budget_s

    def over_budget(self, arch: ArchSpec, cost: Cost) -> str:
        why = []
        if self.max_macs is not None and cost.macs > self.max_macs:
            why.append(f"MACs {format_count(cost.macs)} > {format_count(self.max_macs)}")
        if self.max_params is not None and cost.params > self.max_params:
            why.append(f"params {format_count(cost.params)} > {format_count(self.max_params)}")
        if not why and self.predict_latency is not None and self.max_latency_ms is not None:
            predicted = self.predict_latency(arch)
            if predicted > self.max_latency_ms:
                why.append(f"latency {predicted:.3g} ms (predicted) > {self.max_latency_ms:g} ms")
        return "; ".join(why)

    def rung_trials(self, rung: int, role: str = "rung") -> list[optuna.trial.FrozenTrial]:
        return [
            t
            for t in self.study.get_trials(deepcopy=False)
            if t.user_attrs.get("rung") == rung
            and t.user_attrs.get("role", "rung") == role
            and isinstance(t.user_attrs.get("job_key"), str)
        ]

    def results(self, rung: int) -> list[_Result]:
        """The finished (COMPLETE) rung-`rung` jobs, one per candidate, in trial order."""
        seen, out = set(), []
        for t in sorted(self.rung_trials(rung), key=lambda t: t.number):
            key = t.user_attrs["job_key"]
            if t.state != TrialState.COMPLETE or key in seen:
                continue
            seen.add(key)
            arch = ArchSpec.from_dict(t.user_attrs["arch"], source=f"trial {t.number}")
            latency = {k: v for k, v in t.user_attrs.items() if k.startswith("latency")}
            values = (float(t.values[0]), float(t.values[1]))
            out.append(_Result(arch, count_cost(arch), values, t.number, latency))
        return out

    def rung0_candidates(self) -> list[tuple[ArchSpec, Cost]]:
        """Rung-0 candidates proposed so far (claimed, running or finished), in order."""
        seen, out = set(), []
        for t in sorted(self.rung_trials(0), key=lambda t: t.number):
            key = t.user_attrs["job_key"]
            if key in seen or t.user_attrs.get("status") == "duplicate":
                continue
            seen.add(key)
            arch = ArchSpec.from_dict(t.user_attrs["arch"], source=f"trial {t.number}")
            out.append((arch, count_cost(arch)))
        return out

    # --- running jobs -----------------------------------------------------------------

    def attrs(self, job: Job) -> dict[str, Any]:
        offset = job.seed - self.seed
        return {
            **cost_attrs(job.arch, job.cost),
            "job_key": self.key(job.arch, job.rung, offset),
            "candidate_key": job.arch.arch_key(),
            "rung": job.rung,
            "role": job.role,
            "seed": job.seed,
        }

    def run_job(self, job: Job, claim: Any, progress: tuple[int, int], trial: Any = None) -> None:
        def run() -> Mapping[str, Any]:
            if self.on_start is not None:
                self.on_start(job, *progress)
            return self.evaluate(job)

        params, distributions = None, None
        if trial is None and not self.space.is_grid:
            params, distributions = self.space.params_from_arch(job.arch), self.distributions()
        # `drawn`: the sampler proposed this trial (its other trials carry the candidate's
        # parameters too, so that the sampler's search space stays whole).
        metrics = run_claimed(
            self.study,
            self.claims,
            claim,
            self.attrs(job) | {"drawn": trial is not None},
            run,
            self.heartbeat_s,
            trial=trial,
            params=params,
            distributions=distributions,
        )
        if metrics is not None and self.on_done is not None:
            self.on_done(job, metrics)

    def run_jobs(self, jobs: Sequence[Job]) -> None:
        """Run every job not done, each exactly once across workers; return when all are
        done (waiting for other workers' jobs, taking over those whose worker stopped)."""
        by_key = {self.key(j.arch, j.rung, j.seed - self.seed): j for j in jobs}
        errors_at_start = {k: j.errors for k, j in _jobs(self.study).items()}
        while True:
            state = _jobs(self.study)
            todo = [
                k
                for k in by_key
                if not (j := state.get(k))
                or (not j.done and j.errors <= errors_at_start.get(k, 0))
            ]
            if not todo:
                return
            held, claim = self.claims.held(), None
            for key in todo:
                owner_age = held.get(key)
                if owner_age is None or owner_age[1] > self.claims.grace_s:
                    if (claim := self.claims.claim(key)) is not None:
                        break
            if claim is None:
                time.sleep(min(self.heartbeat_s, 1.0))
                fail_stale_trials(self.study)
                continue
            try:
                self.run_job(by_key[claim.key], claim, (len(by_key) - len(todo), len(by_key)))
            finally:
                self.claims.release(claim)

    # --- rung 0 -----------------------------------------------------------------------

    def distributions(self) -> dict[str, BaseDistribution]:
        """The sampler's view of the space: one categorical choice per parameter."""
        return {
            name: CategoricalDistribution(list(choices))
            for name, choices in self.space.params().items()
        }

    def propose(self) -> bool:
        """Ask the sampler for one new candidate within the budget and train it; False
        when the sampler keeps drawing candidates over the budget or already trained."""
        distributions = self.distributions()
        rejected = 0  # draws in a row, since the last candidate proposed
        while rejected < MAX_REJECTED_DRAWS:
            with warnings.catch_warnings():
                # optuna warns that its trial heartbeat is meant for `Study.optimize`; the
                # claims' heartbeat records it for our ask/tell loop (`workers.Heartbeat`).
                warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                trial = self.study.ask(distributions)
            arch = self.space.arch_from_params(trial.params)
            cost = count_cost(arch)
            why = self.over_budget(arch, cost)
            if why:
                rejected += 1
                trial.set_user_attr("status", "over_budget")
                trial.set_user_attr("reason", why)
                self.study.tell(trial, state=TrialState.PRUNED)
                continue
            key = self.key(arch, 0)
            job = _jobs(self.study).get(key)
            claim = None if job is not None and job.done else self.claims.claim(key)
            if claim is None:
                rejected += 1
                _fail(self.study, trial._trial_id, "duplicate", "this network was proposed before")
                continue
            try:
                done = len(self.rung0_candidates())
                total = self.trials or self.space.search.trials
                self.run_job(Job(arch, cost, 0, self.seed), claim, (done, total), trial)
            finally:
                self.claims.release(claim)
            return True
        return False

    def rung0(self) -> None:
        if self.space.is_grid:
            plan = self.plan or plan_search(
                self.space, max_macs=self.max_macs, max_params=self.max_params
            )
            self.run_jobs([Job(a, c, 0, self.seed) for a, c in plan.kept[: self.trials]])
            return
        trials = self.trials or self.space.search.trials
        while len(self.rung0_candidates()) < trials and self.time_left(0):
            if not self.propose():
                break
        # Wait for (or take over) other workers' rung-0 jobs.
        self.run_jobs([Job(a, c, 0, self.seed) for a, c in self.rung0_candidates()])

    # --- noise and promotions ---------------------------------------------------------

    def noise(self) -> None:
        k = self.fidelity.noise_candidates if self.fidelity else 0
        results = self.results(0)
        if not k or len(results) < 2:
            return
        order = rank_points(np.array([r.values for r in results]), DIRECTIONS)
        picks = [results[i] for i in order[:k]]
        self.run_jobs([Job(r.arch, r.cost, 0, self.seed + 1, "noise", r.latency) for r in picks])

    def promote(self, rung: int) -> list[_Result]:
        """The best `ceil(n / eta)` finished rung-`rung` candidates, best first."""
        results = self.results(rung)
        if not results or self.fidelity is None:
            return []
        order = rank_points(np.array([r.values for r in results]), DIRECTIONS)
        return [results[i] for i in order[: math.ceil(len(results) / self.fidelity.eta)]]

    def run(self) -> None:
        fail_stale_trials(self.study)
        self.rung0()
        if self.fidelity is None:
            return
        self.noise()
        for rung in range(1, self.n_rungs):
            if not self.time_left(rung):
                # Out of time: promote only what another worker started already.
                started = {t.user_attrs["job_key"] for t in self.rung_trials(rung)}
                if not started:
                    return
            promoted = self.promote(rung - 1)
            if not promoted:
                return
            self.run_jobs(
                [Job(r.arch, r.cost, rung, self.seed, "rung", r.latency) for r in promoted]
            )


def _undone(job: Any, errors_at_start: int) -> bool:
    """Whether a job is left to run: never started, or not done and not failed with an error
    since this worker started (errors seen at the start are retried once)."""
    return job is None or (not job.done and job.errors <= errors_at_start)


def run_halving(
    study: optuna.Study,
    space: SearchSpace,
    evaluate: Callable[[Job], Mapping[str, Any]],
    *,
    max_macs: int | None = None,
    max_params: int | None = None,
    plan: Plan | None = None,
    predict_latency: Callable[[ArchSpec], float] | None = None,
    max_latency_ms: float | None = None,
    trials: int | None = None,
    time_budget_s: float | None = None,
    rung_steps: Sequence[int] = (),
    rung_decay: Sequence[int] = (),
    sampler: optuna.samplers.BaseSampler | None = None,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    claims: Claims | None = None,
    on_start: Callable[[Job, int, int], None] | None = None,
    on_done: Callable[[Job, Mapping[str, Any]], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> optuna.Study:
    """Run a sampled and/or multi-fidelity search on `study` (see the module docstring).

    Args:
      study: from `mobisearch.search.open_or_create_study`.
      space: the search space (its `[fidelity]` rungs, `[search]` sampler settings).
      evaluate: `job -> metrics` (`status`, and `val_accuracy` and `latency_ms` if ok);
        `mobisearch.rank.Ranker.run_job` on real data.
      max_macs, max_params: the budget: candidates over it are never trained.
      plan: a grid space's candidates (default: `plan_search` of the budget), e.g. after
        dropping those measured over a latency budget.
      predict_latency, max_latency_ms: a per-stage space's draws whose predicted latency
        (`mobisearch.latency_model.LatencyModel.predict`) is over `max_latency_ms` are
        skipped like those over the MACs budget (told PRUNED, status `"over_budget"`).
      trials: rung-0 candidates of a per-stage space (default: its `[search] trials`); a
        grid space trains every candidate within the budget, in order (or the first
        `trials`).
      time_budget_s: wall-clock budget of this worker: each rung may start work until its
        share of the budget (`rung_shares`) has passed; None for no limit.
      rung_steps, rung_decay: each rung's steps and decay-branch length
        (`mobisearch.fidelity.RungPlan`), to split the time budget between the rungs.
      sampler: the sampler of a per-stage space (default `make_sampler` of `[search]`,
        seeded with its `seed` plus the number of trials so far, so a resumed search does
        not repeat its first draws).
      heartbeat_s: seconds between two heartbeats of a claim.
      claims: the claim store (default: the study's storage's).
      on_start, on_done: progress callbacks, `(job, done, total)` and `(job, metrics)`.
      clock: monotonic seconds (injectable for tests).

    Returns:
      The study.
    """
    if space.fidelity is not None and not rung_steps:
        raise ValueError("a search with [fidelity] rungs needs `rung_steps` and `rung_decay`")
    if not space.is_grid:
        cfg = space.search
        seed = cfg.seed + len(study.get_trials(deepcopy=False))
        study.sampler = sampler or make_sampler(cfg.sampler, seed=seed, population=cfg.population)
    _Search(
        study,
        space,
        evaluate,
        max_macs=max_macs,
        max_params=max_params,
        plan=plan,
        predict_latency=predict_latency,
        max_latency_ms=max_latency_ms,
        trials=trials,
        time_budget_s=time_budget_s,
        rung_steps=rung_steps,
        rung_decay=rung_decay,
        heartbeat_s=heartbeat_s,
        claims=claims or claims_for(study, heartbeat_s=heartbeat_s),
        on_start=on_start,
        on_done=on_done,
        clock=clock,
    ).run()
    return study
