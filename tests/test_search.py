"""The search driver over a real SQLite study, with a cost-only evaluator injected.

(Many workers at once, on SQLite, PostgreSQL and journal files: tests/test_workers.py.)
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from mobisearch import search
from mobisearch.arch import ArchSpec
from mobisearch.cost import count_cost, format_count
from mobisearch.space import apply_overrides, load_space, resolve_space_path

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def space():  # type: ignore[no-untyped-def]
    return load_space(resolve_space_path("quick"))


def fake_metrics(arch: ArchSpec) -> dict[str, Any]:
    """Accuracy grows with MACs, latency too: every candidate is on the frontier."""
    macs = count_cost(arch).macs
    return {"status": "ok", "val_accuracy": 0.5 + macs / 1e8, "latency_ms": macs / 1e5}


class Recorder:
    def __init__(self, fail: dict[str, Any] | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail or {}

    def __call__(self, arch: ArchSpec) -> dict[str, Any]:
        self.calls.append(arch.display_id)
        action = self.fail.get(arch.display_id)
        if action == "interrupt":
            raise KeyboardInterrupt
        if action == "raise":
            raise RuntimeError("out of memory")
        if action == "diverge":
            return {"status": "diverged", "reason": "loss became nan at step 5"}
        return fake_metrics(arch)


def new_study(tmp_path, space, name: str = "s"):  # type: ignore[no-untyped-def]
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    return search.open_or_create_study(storage, name, search.study_fingerprint(space))


def test_plan_drops_over_budget_before_anything_runs(space) -> None:  # type: ignore[no-untyped-def]
    costs = sorted(count_cost(a).macs for a in space.candidates())
    plan = search.plan_search(space, max_macs=costs[1])
    assert plan.total == len(space.candidates()) == 4
    assert [c.macs for _, c in plan.kept] == costs[:2]
    assert all(c.macs > costs[1] for _, c, _ in plan.dropped)
    assert all("MACs" in why for _, _, why in plan.dropped)
    assert "4 candidates, 2 within the budget" in plan.summary()
    assert f"dropped 2: MACs over {format_count(costs[1])}" in plan.summary()


def test_plan_max_params(space) -> None:  # type: ignore[no-untyped-def]
    params = sorted(count_cost(a).params for a in space.candidates())
    plan = search.plan_search(space, max_params=params[0])
    assert all(c.params <= params[0] for _, c in plan.kept)
    assert all("params" in why for _, _, why in plan.dropped)


def test_budget_below_cheapest_names_it(space) -> None:  # type: ignore[no-untyped-def]
    cheapest = min(space.candidates(), key=lambda a: count_cost(a).macs)
    with pytest.raises(search.BudgetError) as e:
        search.plan_search(space, max_macs=1000)
    assert cheapest.display_id in str(e.value)
    assert f"{count_cost(cheapest).macs:,}" in str(e.value)


def test_search_stores_every_candidate_once(tmp_path, space) -> None:  # type: ignore[no-untyped-def]
    plan = search.plan_search(space)
    study = new_study(tmp_path, space)
    evaluate = Recorder()
    search.run_search(study, plan, evaluate)
    assert sorted(evaluate.calls) == sorted(a.display_id for a, _ in plan.kept)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 4
    for t in trials:
        arch = ArchSpec.from_dict(t.user_attrs["arch"])
        assert arch.display_id == t.user_attrs["display_id"]
        assert t.user_attrs["macs"] == count_cost(arch).macs
        assert t.values == [t.user_attrs["val_accuracy"], t.user_attrs["latency_ms"]]
        assert t.user_attrs["job_key"] == search.job_key(arch)
        assert t.user_attrs["attempt"] == 1
    # A second run with the same arguments evaluates nothing.
    again = Recorder()
    search.run_search(study, plan, again)
    assert again.calls == []
    assert len(study.trials) == 4


def test_diverged_is_recorded_and_not_retried(tmp_path, space) -> None:  # type: ignore[no-untyped-def]
    plan = search.plan_search(space)
    bad = plan.kept[1][0].display_id
    study = new_study(tmp_path, space)
    search.run_search(study, plan, Recorder({bad: "diverge"}))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.user_attrs["display_id"] for t in failed] == [bad]
    assert failed[0].user_attrs["status"] == "diverged"
    assert "nan" in failed[0].user_attrs["reason"]
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    again = Recorder()
    search.run_search(study, plan, again)
    assert again.calls == []


def test_error_is_recorded_and_search_goes_on(tmp_path, space) -> None:  # type: ignore[no-untyped-def]
    plan = search.plan_search(space)
    bad = plan.kept[0][0].display_id
    study = new_study(tmp_path, space)
    evaluate = Recorder({bad: "raise"})
    search.run_search(study, plan, evaluate)
    assert len(evaluate.calls) == 4
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    assert failed.user_attrs["status"] == "error"
    assert "out of memory" in failed.user_attrs["reason"]
    # An error (unlike a divergence) is retried by the next run.
    again = Recorder()
    search.run_search(study, plan, again)
    assert again.calls == [bad]
    (retried,) = [t for t in study.get_trials() if t.state == TrialState.COMPLETE and
                  t.user_attrs["display_id"] == bad]  # fmt: skip
    assert retried.user_attrs["attempt"] == 2


def test_a_failing_candidate_is_tried_once_per_run(tmp_path, space) -> None:  # type: ignore[no-untyped-def]
    """A worker does not retry an error that happened after it started (no retry loop)."""
    plan = search.plan_search(space)
    bad = plan.kept[0][0].display_id
    study = new_study(tmp_path, space)
    evaluate = Recorder({bad: "raise"})
    search.run_search(study, plan, evaluate)
    search.run_search(study, plan, evaluate)
    assert evaluate.calls.count(bad) == 2  # once per run


def test_interrupt_then_resume(tmp_path, space) -> None:  # type: ignore[no-untyped-def]
    plan = search.plan_search(space)
    ids = [a.display_id for a, _ in plan.kept]
    study = new_study(tmp_path, space)
    first = Recorder({ids[2]: "interrupt"})
    with pytest.raises(KeyboardInterrupt):
        search.run_search(study, plan, first)
    assert first.calls == ids[:3]
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    assert failed.user_attrs["status"] == "interrupted"
    second = Recorder()
    search.run_search(study, plan, second)
    assert sorted(second.calls) == sorted(ids[2:])  # the interrupted one and the rest
    done = [t.user_attrs["display_id"] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert sorted(done) == sorted(ids)


@pytest.mark.parametrize("hook", ["on_start", "on_done"])
def test_ctrl_c_outside_evaluate_still_leaves_the_trial_retryable(tmp_path, space, hook) -> None:  # type: ignore[no-untyped-def]
    """A Ctrl-C between ask() and tell() but outside `evaluate` (here in the progress
    callbacks) fails the trial as interrupted instead of leaving it RUNNING for ever."""
    plan = search.plan_search(space)
    ids = [a.display_id for a, _ in plan.kept]
    study = new_study(tmp_path, space)

    def interrupt_on_second(arch, *_):  # type: ignore[no-untyped-def]
        if arch.display_id == ids[1]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search.run_search(study, plan, Recorder(), **{hook: interrupt_on_second})
    assert not study.get_trials(states=(TrialState.RUNNING,))
    second = Recorder()
    search.run_search(study, plan, second)
    done = [t.user_attrs["display_id"] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    if hook == "on_start":  # interrupted before its evaluation: retried
        assert sorted(second.calls) == sorted(ids[1:])
    else:  # interrupted after it was told: finished, not retried
        assert sorted(second.calls) == sorted(ids[2:])
    assert sorted(done) == sorted(ids)


KILLED_SEARCH = textwrap.dedent(
    """
    import os, signal, sys
    from mobisearch import search
    from mobisearch.cost import count_cost, format_count
    from mobisearch.space import load_space, resolve_space_path

    space = load_space(resolve_space_path("quick"))
    plan = search.plan_search(space)
    study = search.open_or_create_study(sys.argv[1], "s", search.study_fingerprint(space))
    calls = []

    def evaluate(arch):
        calls.append(arch.display_id)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # die mid-candidate, no clean-up
        macs = count_cost(arch).macs
        return {"status": "ok", "val_accuracy": macs / 1e8, "latency_ms": macs / 1e5}

    search.run_search(study, plan, evaluate, heartbeat_s=1)
    """
)


def test_killed_process_is_resumed(tmp_path, space) -> None:  # type: ignore[no-untyped-def]
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_SEARCH, storage], capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    study = optuna.load_study(study_name="s", storage=storage)
    running = study.get_trials(states=(TrialState.RUNNING,))
    assert len(running) == 1
    killed = running[0].user_attrs["display_id"]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    finished = {t.user_attrs["display_id"] for t in complete}
    assert len(finished) == 2
    plan = search.plan_search(space)
    resume = Recorder()
    t0 = time.monotonic()
    search.run_search(study, plan, resume, heartbeat_s=1)
    # The dead worker's claim went stale after 3 missed beats of 1 s.
    assert time.monotonic() - t0 < 20
    assert killed in resume.calls
    assert not finished & set(resume.calls)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    assert study.trials[running[0].number].user_attrs["status"] == "interrupted"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("arch.stem_ch=24", "arch.stem_ch"),
        ("axes.width=[0.25]", "axes.width"),
        ("train.steps=21", "train.steps"),
        ("data.split_seed=1", "data.split_seed"),
        ("latency.iters=11", "latency.iters"),
    ],
)
def test_changed_space_refuses_the_study_and_keeps_it(tmp_path, space, override, key) -> None:  # type: ignore[no-untyped-def]
    """Old trials are never returned as results of another architecture, recipe, ..."""
    study = new_study(tmp_path, space)
    search.run_search(study, search.plan_search(space), Recorder())
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    changed = apply_overrides(space, [override])
    with pytest.raises(ValueError, match="was made with other settings") as e:
        search.open_or_create_study(storage, "s", search.study_fingerprint(changed))
    assert key in str(e.value) and "--study-name" in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    reloaded = optuna.load_study(study_name="s", storage=storage)
    assert len(reloaded.get_trials(states=(TrialState.COMPLETE,))) == 4
    assert reloaded.user_attrs["fingerprint"] == search.study_fingerprint(space)


def test_fingerprint_covers_library_versions(space) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(search.study_fingerprint(space, {"latency_batch": 1}))
    assert set(search.NUMERIC_LIBRARIES) <= set(doc["versions"])
    assert doc["versions"]["jax"] and doc["versions"]["numpy"]
    assert doc["settings"] == {"latency_batch": 1}
    # The space's name and description do not change a result.
    renamed = dataclasses.replace(space, name="other", description="x")
    assert search.study_fingerprint(renamed) == search.study_fingerprint(space)


def test_job_key_tells_architectures_apart(space) -> None:  # type: ignore[no-untyped-def]
    a = space.candidates()[0]
    wider_stem = dataclasses.replace(a, stem_ch=a.stem_ch + 8)
    assert a.display_id == wider_stem.display_id
    assert search.job_key(a) != search.job_key(wider_stem)
    assert search.job_key(a) == search.job_key(ArchSpec.from_dict(a.to_dict()))
    # One job per network, however it is named.
    assert search.job_key(a) == search.job_key(dataclasses.replace(a, name="renamed"))


def test_default_study_name(space) -> None:  # type: ignore[no-untyped-def]
    assert search.default_study_name(space, 20_000_000, None) == "quick-macs20M"
    assert search.default_study_name(space, None, None) == "quick"
