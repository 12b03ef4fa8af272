"""Sampled and multi-fidelity searches (`mobisearch.halving`): rungs, promotions, noise
re-runs, the budget, duplicates, and resume after Ctrl-C or a kill.

The studies are real (SQLite files; in-memory where a property test runs many searches)
and the evaluator is a cost-only fake: `run_halving` takes `evaluate` injected by design.
tests/test_fidelity.py trains rungs for real; tests/test_cli.py runs whole searches.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import random
import signal
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from typing import Any

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.trial import FrozenTrial, TrialState

from mobisearch import halving, results, search, workers
from mobisearch.arch import ArchSpec
from mobisearch.cost import Cost, count_cost
from mobisearch.fidelity import RungPlan
from mobisearch.halving import Job, make_sampler, run_halving, rung_job_key, rung_shares
from mobisearch.pareto import rank_points
from mobisearch.space import SearchSpace, apply_overrides, load_space, resolve_space_path

optuna.logging.set_verbosity(optuna.logging.WARNING)

# 4 widths x 2 resolutions x 2 kernels = 16 candidates: rungs of 16, 6 and 2.
QUICK_RUNGS = [
    "fidelity.rungs=[0.5, 1, 2]",
    "axes.width=[0.25, 0.5, 0.75, 1.0]",
    "axes.kernel=[3, 5]",
]


def _drawn(t: optuna.trial.FrozenTrial) -> bool:
    """Whether the sampler proposed trial `t` (the search's own trials carry parameters too,
    marked `drawn = False`)."""
    return bool(t.params) and t.user_attrs.get("drawn", True)


def quick_rungs(*extra: str) -> SearchSpace:
    """The quick grid, 16 candidates, rungs at 0.5, 1 and 2 epochs (eta 3, 3 noise runs)."""
    return apply_overrides(load_space(resolve_space_path("quick")), [*QUICK_RUNGS, *extra])


# What the tests below count on, whatever the shipped file says.
STAGE_SETTINGS = ["search.population=4", "fidelity.noise_candidates=3", "fidelity.eta=3"]


def stages(*extra: str) -> SearchSpace:
    """The shipped per-stage space (2.6e9 candidates), with a small NSGA-II population and
    3 noise re-runs."""
    space = load_space(resolve_space_path("fashion_mnist_stages"))
    return apply_overrides(space, [*STAGE_SETTINGS, *extra])


def rung_kwargs(space: SearchSpace, n_train: int) -> dict[str, tuple[int, ...]]:
    """`rung_steps` and `rung_decay` of the space's rungs over `n_train` images."""
    assert space.fidelity is not None and space.train is not None
    plan = RungPlan.build(space.fidelity, space.train, n_train=n_train)
    return {"rung_steps": plan.steps, "rung_decay": plan.decay}


STAGES = stages()
STAGE_RUNGS = rung_kwargs(STAGES, 55_000)  # 60,000 training images less 5,000 held out


def _unit(*parts: object) -> float:
    """A number in [0, 1) fixed by `parts` (a seeded hash, no global RNG)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fake_metrics(job: Job) -> dict[str, Any]:
    """Accuracy grows with MACs and with the rung, plus seed noise; latency grows with the
    parameters, plus measurement noise. A job given a latency (measured at a lower rung)
    keeps it, as `mobisearch.rank.Ranker.run_job` does."""
    key = job.arch.arch_key()
    noise = _unit(key, job.seed, job.rung)
    acc = 0.5 + 0.05 * math.log10(job.cost.macs) + 0.02 * job.rung + 0.05 * noise
    if job.latency is not None:
        latency = dict(job.latency)
    else:
        ms = job.cost.params / 1e4 + _unit(key, "latency")
        latency = {"latency_ms": ms, "latency_p90_ms": ms * 1.1, "latency_batch": 1}
    return {"status": "ok", "val_accuracy": acc, **latency}


class Recorder:
    """The fake evaluator, recording every job it is given; Ctrl-C at call `interrupt_at`."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.jobs: list[Job] = []
        self.interrupt_at = interrupt_at

    def __call__(self, job: Job) -> dict[str, Any]:
        self.jobs.append(job)
        assert job.cost == count_cost(job.arch)
        if len(self.jobs) == self.interrupt_at:
            raise KeyboardInterrupt
        return fake_metrics(job)

    def keys(self, seed: int = 0) -> list[str]:
        return [job_key(j, seed) for j in self.jobs]


def job_key(job: Job, seed: int = 0) -> str:
    return rung_job_key(job.arch, job.rung, job.seed - seed)


def sqlite_study(tmp_path: Any, space: SearchSpace, name: str = "s") -> optuna.Study:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    return search.open_or_create_study(url, name, search.study_fingerprint(space))


def memory_study() -> optuna.Study:
    return optuna.create_study(directions=list(search.DIRECTIONS))


def complete(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def latency_attrs(t: FrozenTrial) -> dict[str, Any]:
    return {k: v for k, v in t.user_attrs.items() if k.startswith("latency")}


def check_search(study: optuna.Study, space: SearchSpace) -> list[list[FrozenTrial]]:
    """Check a finished search's bookkeeping from its study alone; return the COMPLETE
    rung trials of each rung, in trial order.

    Every job has exactly one COMPLETE trial; rung r + 1 holds the best ceil(n_r / eta) of
    rung r's n_r candidates by `rank_points`; the noise re-runs are the best of rung 0,
    with the next seed; every job after the first rung keeps the first rung's latency; the
    records give one row per candidate, at the highest rung it reached.
    """
    fid, train = space.fidelity, space.train
    assert fid is not None and train is not None
    done = sorted(complete(study), key=lambda t: t.number)
    keys = [t.user_attrs["job_key"] for t in done]
    assert len(keys) == len(set(keys)), collections.Counter(keys).most_common(3)
    rungs = [
        [t for t in done if t.user_attrs["rung"] == r and t.user_attrs["role"] == "rung"]
        for r in range(len(fid.rungs))
    ]
    counts = [len(ts) for ts in rungs]
    expected = [counts[0]]
    for _ in fid.rungs[1:]:
        expected.append(math.ceil(expected[-1] / fid.eta))
    assert counts == expected
    first = {t.user_attrs["candidate_key"]: t for t in rungs[0]}

    def best(trials: list[FrozenTrial], k: int) -> list[str]:
        order = rank_points([t.values for t in trials], search.DIRECTIONS) if trials else []
        return [trials[i].user_attrs["candidate_key"] for i in order[:k]]

    for r, trials in enumerate(rungs):
        for t in trials:
            arch = ArchSpec.from_dict(t.user_attrs["arch"])
            assert t.user_attrs["candidate_key"] == arch.arch_key()
            assert t.user_attrs["job_key"] == rung_job_key(arch, r)
            assert t.user_attrs["seed"] == train.seed
            base = first[t.user_attrs["candidate_key"]]
            assert latency_attrs(t) == latency_attrs(base)  # measured once, at rung 0
        if r:
            assert sorted(t.user_attrs["candidate_key"] for t in trials) == sorted(
                best(rungs[r - 1], counts[r])
            )
    noise = [t for t in done if t.user_attrs["role"] == "noise"]
    k = min(fid.noise_candidates, counts[0]) if counts[0] >= 2 else 0
    assert sorted(t.user_attrs["candidate_key"] for t in noise) == sorted(best(rungs[0], k))
    for t in noise:
        arch = ArchSpec.from_dict(t.user_attrs["arch"])
        assert t.user_attrs["rung"] == 0 and t.user_attrs["seed"] == train.seed + 1
        assert t.user_attrs["job_key"] == rung_job_key(arch, 0, 1)
        assert latency_attrs(t) == latency_attrs(first[t.user_attrs["candidate_key"]])
    # trials.csv: one row per candidate, its result at the highest rung it reached.
    top = {}
    for r, trials in enumerate(rungs):
        top |= {t.user_attrs["candidate_key"]: (r, t.number) for t in trials}
    records = results.candidate_records(results.trial_records(study))
    finished = [rec for rec in records if rec["state"] == "COMPLETE"]
    assert len(finished) == counts[0]
    for rec in finished:
        r, number = top[rec["candidate_key"]]
        assert (rec["rung"], rec["number"], rec["rungs"]) == (r, number, list(range(r + 1)))
    return rungs


# --- units ---------------------------------------------------------------------------------


def test_rung_shares_by_hand() -> None:
    # Rung r trains n / 3**r candidates from S_{r-1} - D_{r-1} to S_r:
    # 10 steps, then (30 - 8) / 3, then (90 - 26) / 9: 90/9, 66/9, 64/9 of 220/9.
    shares = rung_shares([10, 30, 90], [2, 4, 12], 3)
    assert shares == pytest.approx([90 / 220, 66 / 220, 64 / 220], rel=1e-12)
    assert rung_shares([100], [20], 3) == [1.0]
    # eta 2: 16, (40 - 13) / 2 = 13.5: 16/29.5 and 13.5/29.5.
    assert rung_shares([16, 40], [3, 5], 2) == pytest.approx([16 / 29.5, 13.5 / 29.5])


@st.composite
def rung_steps(draw: st.DrawFn) -> tuple[list[int], list[int], int]:
    """Increasing steps S_r, decays 1 <= D_r <= S_r - S_{r-1}, and eta."""
    gaps = draw(st.lists(st.integers(1, 10_000), min_size=1, max_size=5))
    steps, decay, start = [], [], 0
    for gap in gaps:
        steps.append(start + gap)
        decay.append(draw(st.integers(1, gap)))
        start += gap
    return steps, decay, draw(st.integers(2, 5))


@settings(deadline=None, max_examples=100)
@given(rung_steps())
def test_rung_shares_sum_to_one(problem: tuple[list[int], list[int], int]) -> None:
    steps, decay, eta = problem
    shares = rung_shares(steps, decay, eta)
    assert len(shares) == len(steps) and all(s > 0 for s in shares)
    assert math.fsum(shares) == pytest.approx(1.0, abs=1e-12)
    # Exact in fractions: each rung's new steps over eta**r.
    costs = [Fraction(steps[0])] + [
        Fraction(steps[r] - (steps[r - 1] - decay[r - 1]), eta**r) for r in range(1, len(steps))
    ]
    assert shares == pytest.approx([float(c / sum(costs)) for c in costs], rel=1e-12)


def test_rung_job_key() -> None:
    space = quick_rungs()
    a, b = space.candidates()[:2]
    keys = {
        rung_job_key(a, None),
        rung_job_key(a, 0),
        rung_job_key(a, 1),
        rung_job_key(a, 2),
        rung_job_key(a, 0, 1),
        rung_job_key(a, 1, 1),
        rung_job_key(b, 0),
    }
    assert len(keys) == 7  # rungs, seeds and networks apart
    assert rung_job_key(a, None) == a.arch_key() == search.job_key(a)  # a search without rungs
    assert rung_job_key(a, 2, 1) == f"{a.arch_key()}@r2@s+1"
    # Equal networks, however they are spelled or named, share their keys.
    again = ArchSpec.from_dict(json.loads(json.dumps(a.to_dict())))
    renamed = dataclasses.replace(a, name="renamed")
    for arch in (again, renamed):
        assert rung_job_key(arch, 1) == rung_job_key(a, 1)
        assert rung_job_key(arch, 0, 1) == rung_job_key(a, 0, 1)


def test_make_sampler() -> None:
    assert isinstance(make_sampler("nsga2", seed=0, population=4), optuna.samplers.NSGAIISampler)
    assert isinstance(make_sampler("tpe", seed=0, population=4), optuna.samplers.TPESampler)
    assert isinstance(make_sampler("random", seed=0, population=4), optuna.samplers.RandomSampler)
    with pytest.raises(ValueError, match=r"`sampler` \(='cma'\) must be one of"):
        make_sampler("cma", seed=0, population=4)


def test_rungs_need_their_steps() -> None:
    with pytest.raises(ValueError, match="needs `rung_steps` and `rung_decay`"):
        run_halving(memory_study(), quick_rungs(), Recorder())


# --- bookkeeping ---------------------------------------------------------------------------


def test_grid_rungs_promotions_and_noise() -> None:
    """A grid with rungs: 16 candidates at rung 0, the best 6 at rung 1, the best 2 at rung
    2; 3 noise re-runs; every job once; a rerun evaluates nothing."""
    space = quick_rungs()
    study = memory_study()
    evaluate = Recorder()
    run_halving(study, space, evaluate, **rung_kwargs(space, 2000))
    rungs = check_search(study, space)
    assert [len(r) for r in rungs] == [16, 6, 2]
    assert len(evaluate.jobs) == 16 + 3 + 6 + 2
    assert sorted(evaluate.keys()) == sorted(t.user_attrs["job_key"] for t in complete(study))
    # In order: rung 0 (by MACs), the noise re-runs, then each rung best first.
    assert [(j.rung, j.role) for j in evaluate.jobs] == (
        [(0, "rung")] * 16 + [(0, "noise")] * 3 + [(1, "rung")] * 6 + [(2, "rung")] * 2
    )
    assert [j.arch for j in evaluate.jobs[:16]] == [a for a, _ in search.plan_search(space).kept]
    # Rung 0 measures each candidate's latency; every later job is given that measurement.
    assert all(j.latency is None for j in evaluate.jobs[:16])
    measured = {t.user_attrs["candidate_key"]: latency_attrs(t) for t in rungs[0]}
    assert all(j.latency == measured[j.arch.arch_key()] for j in evaluate.jobs[16:])
    for r in (1, 2):
        promoted = [j.arch.arch_key() for j in evaluate.jobs if j.rung == r]
        trials = rungs[r - 1]
        order = rank_points([t.values for t in trials], search.DIRECTIONS)
        assert promoted == [trials[i].user_attrs["candidate_key"] for i in order[: len(promoted)]]
    again = Recorder()
    run_halving(study, space, again, **rung_kwargs(space, 2000))
    assert again.jobs == []
    assert len(study.trials) == 27


def test_grid_budget_and_trials() -> None:
    """A grid within a budget trains only what fits, the first `trials` of them by MACs."""
    space = quick_rungs()
    plan = search.plan_search(space)
    budget = plan.kept[9][1].macs
    study = memory_study()
    evaluate = Recorder()
    run_halving(study, space, evaluate, max_macs=budget, trials=7, **rung_kwargs(space, 2000))
    rungs = check_search(study, space)
    assert [len(r) for r in rungs] == [7, 3, 1]
    assert [j.arch for j in evaluate.jobs[:7]] == [a for a, _ in plan.kept[:7]]
    assert all(j.cost.macs <= budget for j in evaluate.jobs)


def test_per_stage_search() -> None:
    """A per-stage space within 3M MACs: 10 candidates drawn by NSGA-II (population 4),
    then 4 and 2; draws over the budget pruned, none trained."""
    study = memory_study()
    evaluate = Recorder()
    run_halving(study, STAGES, evaluate, max_macs=3_000_000, trials=10, **STAGE_RUNGS)
    rungs = check_search(study, STAGES)
    assert [len(r) for r in rungs] == [10, 4, 2]
    assert len(evaluate.jobs) == 10 + 3 + 4 + 2
    assert len(set(evaluate.keys())) == len(evaluate.jobs)
    assert all(j.cost.macs <= 3_000_000 for j in evaluate.jobs)
    check_draws(study, STAGES, max_macs=3_000_000, max_params=None)
    # The rung-0 jobs are the sampler's own trials (its parameters and generation).
    for t in rungs[0]:
        assert STAGES.arch_from_params(t.params).arch_key() == t.user_attrs["candidate_key"]
        assert "NSGAIISampler:generation" in t.system_attrs
    assert max(t.system_attrs["NSGAIISampler:generation"] for t in rungs[0]) >= 2


def check_draws(
    study: optuna.Study, space: SearchSpace, *, max_macs: int | None, max_params: int | None
) -> None:
    """Every draw over the budget is PRUNED as `over_budget`, never claimed, and nothing
    over it finished; a draw of a network proposed before FAILs as `duplicate`; a claimed
    draw that did not finish was stopped (Ctrl-C, a kill) and its job retried."""

    def over(cost: Cost) -> bool:
        return (max_macs is not None and cost.macs > max_macs) or (
            max_params is not None and cost.params > max_params
        )

    proposed: set[str] = set()  # networks of the sampler's claimed draws so far
    records = {r["number"]: r for r in results.trial_records(study)}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == TrialState.COMPLETE:
            assert max_macs is None or t.user_attrs["macs"] <= max_macs
            assert max_params is None or t.user_attrs["params"] <= max_params
        if t.state == TrialState.PRUNED:
            assert t.params and t.user_attrs["status"] == "over_budget"
        if not _drawn(t):
            continue  # a job after the first rung, a noise re-run, or a retried job
        arch = space.arch_from_params(t.params)
        cost = count_cost(arch)
        if over(cost):
            assert t.state == TrialState.PRUNED, t
            assert t.user_attrs["reason"].split(" ")[0] in ("MACs", "params")
            assert "job_key" not in t.user_attrs  # never claimed, never trained
        elif "job_key" not in t.user_attrs:
            assert t.state == TrialState.FAIL and t.user_attrs["status"] == "duplicate"
            assert arch.arch_key() in proposed
        else:
            assert t.user_attrs["job_key"] == rung_job_key(arch, 0)
            assert arch.arch_key() not in proposed
            proposed.add(arch.arch_key())
            if t.state != TrialState.COMPLETE:  # claimed, then stopped: its job was retried
                assert records[t.number]["status"] == "interrupted", t.user_attrs


# --- the budget, duplicates ----------------------------------------------------------------


def _extreme(space: SearchSpace, pick: Any) -> Cost:
    return count_cost(space.arch_from_params({k: pick(v) for k, v in space.params().items()}))


CHEAPEST, DEAREST = _extreme(STAGES, min), _extreme(STAGES, max)
GIVE_UP_AFTER = 40  # over-budget or duplicate draws in a row, in the tests below


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_sampled_candidates_stay_within_the_budget(data: st.DataObject) -> None:
    """Over random budgets between the space's cheapest and dearest network: nothing over
    the budget is evaluated or finishes; over-budget draws are PRUNED as `over_budget`; no
    network is evaluated twice at a rung."""
    limit = data.draw(st.sampled_from(["macs", "params", "both"]), label="limit")
    max_macs = max_params = None
    if limit != "params":
        max_macs = data.draw(st.integers(CHEAPEST.macs, DEAREST.macs), label="max_macs")
    if limit != "macs":
        max_params = data.draw(st.integers(CHEAPEST.params, DEAREST.params), label="max_params")
    sampler = data.draw(st.sampled_from(["nsga2", "random"]), label="sampler")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    study, evaluate, trials = memory_study(), Recorder(), 5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(halving, "MAX_REJECTED_DRAWS", GIVE_UP_AFTER)
        run_halving(
            study, STAGES, evaluate, max_macs=max_macs, max_params=max_params, trials=trials,
            sampler=make_sampler(sampler, seed=seed, population=2), **STAGE_RUNGS,
        )  # fmt: skip
    for job in evaluate.jobs:
        assert max_macs is None or job.cost.macs <= max_macs
        assert max_params is None or job.cost.params <= max_params
    assert len(set(evaluate.keys())) == len(evaluate.jobs)
    check_draws(study, STAGES, max_macs=max_macs, max_params=max_params)
    rungs = check_search(study, STAGES)
    if len(rungs[0]) < trials:  # gave up: only after that many rejections in a row
        drawn = [t for t in study.trials if _drawn(t)]
        assert len(drawn) >= GIVE_UP_AFTER
        assert all(t.state != TrialState.COMPLETE for t in drawn[-GIVE_UP_AFTER:])


def test_the_cheapest_network_alone_fits() -> None:
    """A budget that only the cheapest network meets: the search gives up after
    `MAX_REJECTED_DRAWS` draws in a row, having trained nothing over the budget."""
    study, evaluate = memory_study(), Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(halving, "MAX_REJECTED_DRAWS", GIVE_UP_AFTER)
        run_halving(study, STAGES, evaluate, max_macs=CHEAPEST.macs, max_params=CHEAPEST.params,
                    trials=3, **STAGE_RUNGS)  # fmt: skip
    assert all(j.cost.macs <= CHEAPEST.macs for j in evaluate.jobs)
    assert len(study.trials) - len(evaluate.jobs) >= GIVE_UP_AFTER
    check_draws(study, STAGES, max_macs=CHEAPEST.macs, max_params=CHEAPEST.params)


def test_draws_over_the_budget_give_up_in_a_row_not_in_total() -> None:
    """Half the space fits: 40 candidates need about 40 rejected draws in all, but never
    `MAX_REJECTED_DRAWS` (here 20) in a row, so all 40 are found."""
    costs = sorted(count_cost(STAGES.sample(random.Random(i))).macs for i in range(400))
    median = costs[len(costs) // 2]
    study, evaluate = memory_study(), Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(halving, "MAX_REJECTED_DRAWS", 20)
        sampler = make_sampler("random", seed=0, population=2)
        run_halving(
            study, STAGES, evaluate, max_macs=median, trials=40, sampler=sampler, **STAGE_RUNGS
        )
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert len(pruned) > 20
    assert len([j for j in evaluate.jobs if j.rung == 0 and j.role == "rung"]) == 40
    check_search(study, STAGES)


def tiny_stage_space() -> SearchSpace:
    """A per-stage space of 6 networks and 8 assignments: the last stage has depth 1 or 2
    and a kernel per block, so at depth 1 the second block's kernel names no network."""
    doc = load_space(resolve_space_path("quick")).to_dict()
    doc["axes"] = {
        "resolution": [16],
        "stages": {
            "width": [0.25],
            "2": {"depth": [1, 2], "kernel": [3, 5], "per_block": ["kernel"]},
        },
    }
    doc["fidelity"] = {"rungs": [0.5, 1, 2], "eta": 3, "noise_candidates": 2}
    doc["search"] = {"sampler": "nsga2", "population": 2, "trials": 6, "seed": 0}
    return SearchSpace.from_dict(doc, source="tiny stages")


def test_duplicates_are_recognised_by_their_network() -> None:
    """Draws of a network trained already, the same parameters or an alias of them (a
    kernel past the stage's depth), FAIL as `duplicate` and are never evaluated."""
    space = tiny_stage_space()
    assert space.size() == 6 and len(space.params()) == 3
    study = memory_study()
    first = {"s2.depth": 1, "s2.b0.kernel": 3, "s2.b1.kernel": 3}
    alias = {**first, "s2.b1.kernel": 5}
    second = {"s2.depth": 2, "s2.b0.kernel": 5, "s2.b1.kernel": 3}
    for params in (first, first, alias, second, alias):
        study.enqueue_trial(params)
    evaluate = Recorder()
    run_halving(study, space, evaluate, trials=2, **rung_kwargs(space, 2000))
    drawn = [(t.params, t.state, t.user_attrs.get("status")) for t in study.trials if _drawn(t)]
    assert drawn == [
        (first, TrialState.COMPLETE, "ok"),
        (first, TrialState.FAIL, "duplicate"),
        (alias, TrialState.FAIL, "duplicate"),
        (second, TrialState.COMPLETE, "ok"),
    ]
    assert [j.arch for j in evaluate.jobs if j.role == "rung" and j.rung == 0] == [
        space.arch_from_params(first),
        space.arch_from_params(second),
    ]
    check_search(study, space)


def test_a_space_smaller_than_trials_is_searched_once() -> None:
    """Asked for more candidates than the space holds: each of its 6 networks is trained
    once, then the sampler's draws are all duplicates and the search stops."""
    space = tiny_stage_space()
    study = memory_study()
    evaluate = Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(halving, "MAX_REJECTED_DRAWS", GIVE_UP_AFTER)
        run_halving(study, space, evaluate, trials=10, **rung_kwargs(space, 2000))
    rungs = check_search(study, space)
    assert sorted(t.user_attrs["candidate_key"] for t in rungs[0]) == sorted(
        a.arch_key() for a in space.candidates()
    )
    assert [len(r) for r in rungs] == [6, 2, 1]
    assert len(set(evaluate.keys())) == len(evaluate.jobs)
    check_draws(study, space, max_macs=None, max_params=None)
    duplicates = [t for t in study.trials if t.user_attrs.get("status") == "duplicate"]
    assert len(duplicates) >= GIVE_UP_AFTER


# --- resume --------------------------------------------------------------------------------


def outcome(study: optuna.Study) -> dict[str, tuple[float, ...]]:
    """Job key -> values of its COMPLETE trial."""
    return {t.user_attrs["job_key"]: tuple(t.values) for t in complete(study)}


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, tuple[float, ...]]:
    space = quick_rungs()
    study = memory_study()
    run_halving(study, space, Recorder(), **rung_kwargs(space, 2000))
    return outcome(study)


@pytest.mark.parametrize(
    "interrupt_at",
    [
        pytest.param(5, id="rung0", marks=pytest.mark.slow),
        pytest.param(18, id="noise", marks=pytest.mark.slow),
        pytest.param(21, id="rung1"),
        pytest.param(27, id="rung2-last", marks=pytest.mark.slow),
    ],
)
def test_ctrl_c_then_resume_on_a_grid(
    tmp_path: Any, uninterrupted: Any, interrupt_at: int
) -> None:
    """Ctrl-C in the middle of a job (of rung 0, a noise re-run, rung 1 or the very last
    job): a rerun on the same study evaluates exactly the jobs left, the interrupted one
    first, and ends with the same results as a search never stopped."""
    space = quick_rungs()
    study = sqlite_study(tmp_path, space)
    first = Recorder(interrupt_at=interrupt_at)
    with pytest.raises(KeyboardInterrupt):
        run_halving(study, space, first, **rung_kwargs(space, 2000))
    assert len(first.jobs) == interrupt_at
    finished = set(outcome(study))
    assert finished == set(first.keys()[:-1])
    (stopped,) = study.get_trials(states=(TrialState.FAIL,))
    assert stopped.user_attrs["status"] == "interrupted"
    assert stopped.user_attrs["job_key"] == first.keys()[-1]
    assert not study.get_trials(states=(TrialState.RUNNING,))

    second = Recorder()
    run_halving(study, space, second, **rung_kwargs(space, 2000))
    assert second.keys()[0] == first.keys()[-1]
    assert not finished & set(second.keys())
    assert len(first.jobs) - 1 + len(second.jobs) == 27
    assert outcome(study) == uninterrupted
    check_search(study, space)


@pytest.mark.slow
def test_ctrl_c_then_resume_on_a_sampled_space(tmp_path: Any) -> None:
    """Ctrl-C at the third candidate of a sampled search: the rerun keeps every finished
    job, retries the interrupted one, draws new candidates (its sampler is seeded with the
    trials so far: it does not replay the first run's draws) and finishes the search."""
    study = sqlite_study(tmp_path, STAGES)
    budget = {"max_macs": 10_000_000, "trials": 8, **STAGE_RUNGS}
    first = Recorder(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_halving(study, STAGES, first, **budget)
    finished = set(outcome(study))
    assert len(finished) == 2
    before = len(study.trials)
    draws = [t.params for t in study.trials if _drawn(t)]

    second = Recorder()
    run_halving(study, STAGES, second, **budget)
    assert first.keys()[-1] in second.keys()
    assert not finished & set(second.keys())
    rungs = check_search(study, STAGES)
    assert [len(r) for r in rungs] == [8, 3, 1]
    new_draws = [t.params for t in study.trials[before:] if _drawn(t)]
    n = min(len(draws), len(new_draws))
    assert n >= 3 and new_draws[:n] != draws[:n]
    check_draws(study, STAGES, max_macs=10_000_000, max_params=None)


# A search on a sampled space in its own process, killed (SIGKILL: no clean-up) at job
# `kill_at`; the evaluator takes a few milliseconds per job.
KILLED_SEARCH = textwrap.dedent(
    """
    import hashlib, json, os, signal, sys, time
    from mobisearch import search, workers
    from mobisearch.halving import run_halving
    from mobisearch.space import apply_overrides, load_space, resolve_space_path

    url, kill_at, args = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    space = apply_overrides(load_space(resolve_space_path("fashion_mnist_stages")),
                            args.pop("overrides"))
    storage = workers.open_storage(url, heartbeat_s=args.pop("optuna_heartbeat_s"))
    study = search.open_or_create_study(storage, "s", search.study_fingerprint(space))
    calls = []

    def evaluate(job):
        calls.append(job)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.005)
        h = hashlib.sha256(f"{job.arch.arch_key()}{job.seed}{job.rung}".encode()).digest()
        latency = job.latency or {"latency_ms": job.cost.params / 1e4}
        return {"status": "ok", "val_accuracy": h[0] / 256, **latency}

    run_halving(study, space, evaluate, **args)
    """
)


def _killed_then_resumed(tmp_path: Any, kill_at: int, optuna_heartbeat_s: int | None) -> None:
    """Kill a sampled search in its own process at job `kill_at`, then rerun it here: the
    killed job is taken over once its claim went stale, no finished job runs again, and
    the search ends complete. With `optuna_heartbeat_s`, as `mobisearch search` opens its
    storage, optuna also fails the dead trial by its own heartbeat."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    heartbeat_s = 0.5 if optuna_heartbeat_s is None else optuna_heartbeat_s
    budget = {"max_macs": 10_000_000, "trials": 8, "heartbeat_s": heartbeat_s, **STAGE_RUNGS}
    args = {
        **budget,
        "overrides": STAGE_SETTINGS,
        "optuna_heartbeat_s": optuna_heartbeat_s,
    }
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_SEARCH, url, str(kill_at), json.dumps(args)],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    storage = workers.open_storage(url, heartbeat_s=optuna_heartbeat_s)
    study = optuna.load_study(study_name="s", storage=storage)
    (killed,) = study.get_trials(states=(TrialState.RUNNING,))
    finished = set(outcome(study))
    assert len(finished) == kill_at - 1
    before = len(study.trials)
    draws = [t.params for t in study.trials if _drawn(t)]

    resume = Recorder()
    t0 = time.monotonic()
    run_halving(study, STAGES, resume, **budget)
    assert time.monotonic() - t0 < 30  # the dead worker's claim went stale in 3 beats
    assert killed.user_attrs["job_key"] in resume.keys()
    assert not finished & set(resume.keys())
    assert len(set(resume.keys())) == len(resume.jobs)
    assert study.trials[killed.number].state == TrialState.FAIL
    (record,) = [r for r in results.trial_records(study) if r["number"] == killed.number]
    assert record["status"] == "interrupted"
    rungs = check_search(study, STAGES)
    assert [len(r) for r in rungs] == [8, 3, 1]
    check_draws(study, STAGES, max_macs=10_000_000, max_params=None)
    new_draws = [t.params for t in study.trials[before:] if _drawn(t)]
    n = min(len(draws), len(new_draws))
    if n:  # the rerun drew candidates: not the first run's draws again
        assert new_draws[:n] != draws[:n]
    workers.close_storage(storage)


def test_killed_process_resumes_mid_rung_zero(tmp_path: Any) -> None:
    _killed_then_resumed(tmp_path, kill_at=3, optuna_heartbeat_s=None)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [10, 13, 15], ids=["noise", "rung1", "rung2"])
def test_killed_process_resumes_in_a_later_rung(tmp_path: Any, kill_at: int) -> None:
    _killed_then_resumed(tmp_path, kill_at=kill_at, optuna_heartbeat_s=1)


def test_every_trial_of_a_per_stage_search_keeps_the_sampler_s_search_space() -> None:
    """Promotions and noise re-runs carry their candidate's parameters: a sampler's search
    space is the intersection of its finished trials' parameters, and one without them would
    leave it empty (NSGA-II would then draw at random)."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    run_halving(study, STAGES, Recorder(), max_macs=3_000_000, trials=6, **STAGE_RUNGS)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert {t.user_attrs["rung"] for t in done} == {0, 1, 2}
    names = set(STAGES.params())
    assert all(set(t.params) == names for t in done)
    space = optuna.search_space.IntersectionSearchSpace().calculate(study)
    assert set(space) == names
