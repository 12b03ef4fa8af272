"""The search: budget filter → one optuna trial per surviving candidate → frontier.

`plan_search` enumerates a space's candidates, computes their exact cost and drops those over
the budget before anything is compiled. `run_search` evaluates the survivors as trials of an
optuna study (ask/tell), which is the only store: each trial's `user_attrs` hold the
architecture, its display id, cost, metrics, device fingerprint, timings and seed, and
everything downstream (frontier, plot, best, export) reads the study back
(`mobisearch.results`).

Each candidate is a *job* named by `job_key(arch)`; any number of workers (processes, on one
machine or many) can run `run_search` on one study, and each job is trained exactly once:
a worker claims a job before it creates its trial (`mobisearch.workers`). A finished
candidate (COMPLETE, or failed for a reason of its own such as a diverged loss) is never
trained again. A job whose worker died (Ctrl-C, kill, a lost machine) is failed with status
`"interrupted"` and retried by the next worker that looks, live or rerun, on any host,
once its claim has gone without a heartbeat for `GRACE_BEATS * heartbeat_s` seconds. A job
that failed with an error is retried by workers started after the failure, not by those
that saw it fail.

A study remembers what its trials depend on (`study_fingerprint`: the space's
architecture, axes, data, recipe and latency settings, and the versions of the libraries
that compute them); a run with anything else is refused.

This module imports optuna but not jax: the evaluator is injected, so the whole search can be
tested with a cost-only fake in well under a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import optuna
from optuna.trial import TrialState

from mobisearch.arch import ArchSpec
from mobisearch.cost import Cost, cost_record, count_cost, format_count
from mobisearch.space import SearchSpace
from mobisearch.workers import (
    DEFAULT_HEARTBEAT_S,
    Claim,
    Claims,
    Heartbeat,
    claims_for,
    fail_stale_trials,
    open_storage,
    storage_url,
    worker_id,
)

# Validation accuracy, latency.
DIRECTIONS: tuple[Literal["maximize", "minimize"], ...] = ("maximize", "minimize")
# Final statuses of a FAILED trial that mean "do not try this candidate again".
FINAL_FAILURES = frozenset({"diverged"})
# Libraries whose versions change a candidate's numbers (training, latency).
NUMERIC_LIBRARIES = ("mobisearch", "jax", "jaxlib", "flax", "optax", "numpy")

Evaluate = Callable[[ArchSpec], Mapping[str, Any]]


class BudgetError(ValueError):
    """No candidate of the space fits the budget."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Candidates of a space split by the budget, each with its exact cost.

    Attributes:
      kept: candidates within the budget, sorted by MACs.
      dropped: `(arch, cost, reason)` for each candidate over the budget.
    """

    kept: tuple[tuple[ArchSpec, Cost], ...]
    dropped: tuple[tuple[ArchSpec, Cost, str], ...]

    @property
    def total(self) -> int:
        return len(self.kept) + len(self.dropped)

    def summary(self) -> str:
        """Human-readable: how many candidates, how many survive, why the others went."""
        lines = [f"{self.total} candidates, {len(self.kept)} within the budget"]
        reasons: dict[str, int] = {}
        for _, _, why in self.dropped:
            # `why` is e.g. "MACs 23.9M > 20M; params 1.8M > 1M": count per limit.
            for part in why.split("; "):
                kind, _, limit = part.partition(" ")
                key = f"{kind} over {limit.split(' > ')[-1]}"
                reasons[key] = reasons.get(key, 0) + 1
        for key, n in sorted(reasons.items()):
            lines.append(f"  dropped {n}: {key}")
        return "\n".join(lines)


def plan_search(
    space: SearchSpace, *, max_macs: int | None = None, max_params: int | None = None
) -> Plan:
    """Enumerate `space` and drop candidates over `max_macs` / `max_params`.

    Raises:
      BudgetError: if no candidate fits; the message names the cheapest candidate and cost.
    """
    kept, dropped = [], []
    for arch in space.candidates():
        cost = count_cost(arch)
        reasons = []
        if max_macs is not None and cost.macs > max_macs:
            reasons.append(f"MACs {format_count(cost.macs)} > {format_count(max_macs)}")
        if max_params is not None and cost.params > max_params:
            reasons.append(f"params {format_count(cost.params)} > {format_count(max_params)}")
        if reasons:
            dropped.append((arch, cost, "; ".join(reasons)))
        else:
            kept.append((arch, cost))
    if not kept:
        by_macs = min(dropped, key=lambda d: d[1].macs)
        by_params = min(dropped, key=lambda d: d[1].params)
        cheapest = by_macs if max_macs is not None else by_params
        arch, cost = cheapest[0], cheapest[1]
        raise BudgetError(
            f"no candidate of {space.path} fits the budget "
            f"(max_macs={_fmt(max_macs)}, max_params={_fmt(max_params)}); the cheapest is "
            f"{arch.display_id} with {cost.macs:,} MACs ({format_count(cost.macs)}) and "
            f"{cost.params:,} params"
        )
    kept.sort(key=lambda kc: (kc[1].macs, kc[0].display_id))
    return Plan(kept=tuple(kept), dropped=tuple(dropped))


def _fmt(n: int | None) -> str:
    return "none" if n is None else format_count(n)


def default_study_name(space: SearchSpace, max_macs: int | None, max_params: int | None) -> str:
    """`<space>` plus the budget, e.g. `fashion_mnist-macs20M`: one study per search."""
    parts = [space.name]
    if max_macs is not None:
        parts.append(f"macs{format_count(max_macs)}")
    if max_params is not None:
        parts.append(f"params{format_count(max_params)}")
    return "-".join(parts)


def job_key(arch: ArchSpec) -> str:
    """The key of a candidate's job: `arch.arch_key()`, the canonical resolved network.

    Two candidates share a key (and are trained once) exactly when they resolve to the
    same layers, however they were proposed (grid, sampler) or named.
    """
    return arch.arch_key()


def library_versions() -> dict[str, str | None]:
    """Installed versions of `NUMERIC_LIBRARIES` (None when one is missing)."""
    versions: dict[str, str | None] = {}
    for name in NUMERIC_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def study_fingerprint(space: SearchSpace, extra: Mapping[str, Any] | None = None) -> str:
    """JSON of everything a candidate's result depends on; a study keeps the first.

    It holds the space's `[arch]`, `[axes]`, `[data]`, `[train]` and `[latency]` tables (not
    its name or description), `extra` (settings given on the command line) and
    `library_versions()`.
    """
    doc = space.to_dict()
    doc.pop("space", None)
    record = {**doc, "settings": dict(extra or {}), "versions": library_versions()}
    return json.dumps(record, sort_keys=True)


def _flatten(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict) and x:
        out: dict[str, Any] = {}
        for k, v in x.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: x}


def fingerprint_difference(stored: str, now: str) -> str:
    """`key: stored -> now` for the first differing keys of two fingerprints, one line."""
    try:
        a, b = _flatten(json.loads(stored)), _flatten(json.loads(now))
    except json.JSONDecodeError:
        return "an unreadable fingerprint"
    diffs = [
        f"{k} = {json.dumps(a.get(k))} there, {json.dumps(b.get(k))} now"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    return "; ".join(diffs[:3]) + more


FINGERPRINT_ATTR = "fingerprint"


def open_or_create_study(
    storage: str | optuna.storages.BaseStorage,
    study_name: str,
    fingerprint: str,
    *,
    wait_s: float = 30.0,
) -> optuna.Study:
    """Load or create the two-objective study; refuse one made with other settings.

    The worker that creates the study (the storage makes its name unique) writes the
    fingerprint; workers that start at the same moment wait up to `wait_s` for it. A URL
    is opened with `mobisearch.workers.open_storage` (which also makes the claims table).

    Raises:
      ValueError: one line naming the study and the first differing settings, if the
        study was made with another fingerprint (its trials would not be comparable);
        nothing in it is changed.
    """
    if isinstance(storage, str):
        storage = open_storage(storage)
    try:
        study = optuna.create_study(
            storage=storage, study_name=study_name, directions=list(DIRECTIONS)
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage)
    else:
        try:
            study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        except BaseException:
            # A study without its fingerprint would make the next worker wait for it.
            with contextlib.suppress(Exception):
                optuna.delete_study(study_name=study_name, storage=storage)
            raise
    where = f"study {study_name!r} in {storage_url(storage)}"
    deadline = time.monotonic() + wait_s
    while (stored := study.user_attrs.get(FINGERPRINT_ATTR)) is None:
        if "recipe" in study.user_attrs:
            raise ValueError(
                f"{where} was made by an older mobisearch that did not record its "
                "architecture and axes; pass another --study-name to start a separate search"
            )
        if time.monotonic() > deadline:  # its creator died before writing it
            study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        else:
            time.sleep(0.1)
    if stored != fingerprint:
        raise ValueError(
            f"{where} was made with other settings: {fingerprint_difference(stored, fingerprint)}"
            "; pass another --study-name (or --storage) to start a separate search"
        )
    return study


@dataclasses.dataclass(slots=True)
class _Job:
    """What the study says of one job: its attempts and whether it is done."""

    trials: list[optuna.trial.FrozenTrial] = dataclasses.field(default_factory=list)

    @property
    def done(self) -> bool:
        return any(
            t.state == TrialState.COMPLETE
            or (t.state == TrialState.FAIL and t.user_attrs.get("status") in FINAL_FAILURES)
            for t in self.trials
        )

    @property
    def errors(self) -> int:
        return sum(1 for t in self.trials if t.user_attrs.get("status") == "error")


def _jobs(study: optuna.Study) -> dict[str, _Job]:
    jobs: dict[str, _Job] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("job_key")
        if isinstance(key, str):
            jobs.setdefault(key, _Job()).trials.append(t)
    return jobs


def cost_attrs(arch: ArchSpec, cost: Cost) -> dict[str, Any]:
    """The user attributes every trial of a candidate starts with."""
    return {**cost_record(arch, cost), "arch": arch.to_dict(), "job_key": job_key(arch)}


def _fail(study: optuna.Study, trial_id: int, status: str, reason: str) -> bool:
    """Fail a RUNNING trial with `status` and `reason`; False if it had finished already."""
    trial = optuna.trial.Trial(study, trial_id)
    try:
        trial.set_user_attr("status", status)
        trial.set_user_attr("reason", reason)
        study.tell(trial, state=TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
        return False  # told by its worker (or failed by optuna) first: its result stands
    return True


def _fail_orphans(study: optuna.Study, claim: Claim, keep: int | None = None) -> None:
    """Fail the job's RUNNING trials (but `keep`): their workers no longer hold its claim."""
    job = _jobs(study).get(claim.key, _Job())
    for t in job.trials:
        if t.state == TrialState.RUNNING and t._trial_id != keep:
            who = t.user_attrs.get("worker", claim.took_over or "an earlier worker")
            _fail(study, t._trial_id, "interrupted", f"worker {who} stopped while running it")


def _create_trial(
    study: optuna.Study,
    attrs: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
    distributions: Mapping[str, optuna.distributions.BaseDistribution] | None = None,
) -> optuna.Trial:
    """A RUNNING trial with all of `attrs` (and `params`), in one write: no moment without
    them."""
    template = optuna.trial.create_trial(
        state=TrialState.RUNNING,
        user_attrs=dict(attrs),
        params=dict(params) if params else None,
        distributions=dict(distributions) if distributions else None,
    )
    # NOTE: optuna's public add_trial returns nothing; its storage call gives the id.
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    return optuna.trial.Trial(study, trial_id)


def run_claimed(
    study: optuna.Study,
    claims: Claims,
    claim: Claim,
    attrs: Mapping[str, Any],
    evaluate: Callable[[], Mapping[str, Any]],
    heartbeat_s: float,
    *,
    trial: optuna.Trial | None = None,
    params: Mapping[str, Any] | None = None,
    distributions: Mapping[str, optuna.distributions.BaseDistribution] | None = None,
) -> dict[str, Any] | None:
    """Run one claimed job: fail its orphans, then (unless done) evaluate and tell.

    Args:
      attrs: the trial's attributes (with `job_key`), written before the evaluation.
      evaluate: `() -> metrics` (`status`, and `val_accuracy` and `latency_ms` if ok).
      trial: a RUNNING trial to use (one a sampler proposed); by default a new trial is
        created with all of `attrs` in one write.
      params, distributions: the candidate's parameters of the space, for a new trial (a
        sampler's search space is the intersection of its finished trials' parameters, so
        a finished trial without them would leave it empty).

    Returns:
      The metrics, or None if the job was done already (then `trial` is failed as a
      duplicate) or the claim was taken over while it ran.
    """
    with Heartbeat(claims, claim, heartbeat_s, study._storage) as heartbeat:
        _fail_orphans(study, claim, keep=None if trial is None else trial._trial_id)
        job = _jobs(study).get(claim.key, _Job())
        if job.done:
            if trial is not None:
                _fail(study, trial._trial_id, "duplicate", "this network was trained already")
            return None
        full = {**attrs, "worker": worker_id(), "attempt": len(job.trials) + 1}
        if trial is None:
            trial = _create_trial(study, full, params, distributions)
        else:
            for key, value in full.items():
                study._storage.set_trial_user_attr(trial._trial_id, key, value)
        heartbeat.watch(trial._trial_id)
        try:
            try:
                metrics = dict(evaluate())
            except Exception as e:  # noqa: BLE001 (recorded, and the search goes on)
                metrics = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
            try:
                for key, value in metrics.items():
                    trial.set_user_attr(key, value)
                # skip_if_finished: a new holder may have failed it (see the except below).
                if metrics.get("status") == "ok":
                    values = [metrics["val_accuracy"], metrics["latency_ms"]]
                    study.tell(trial, values=values, skip_if_finished=True)
                else:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            except optuna.exceptions.UpdateFinishedTrialError:
                return None  # our claim went stale and the job was taken over
        except KeyboardInterrupt:
            _fail(study, trial._trial_id, "interrupted", "KeyboardInterrupt")
            raise
    return metrics


def _run_job(
    study: optuna.Study,
    claims: Claims,
    claim: Claim,
    arch: ArchSpec,
    cost: Cost,
    evaluate: Evaluate,
    heartbeat_s: float,
    progress: tuple[int, int],
    on_start: Callable[[ArchSpec, int, int], None] | None,
    on_done: Callable[[ArchSpec, Mapping[str, Any]], None] | None,
) -> None:
    """Run one claimed candidate of a plain search (see `run_claimed`)."""

    def run() -> Mapping[str, Any]:
        if on_start is not None:
            on_start(arch, *progress)
        return evaluate(arch)

    metrics = run_claimed(study, claims, claim, cost_attrs(arch, cost), run, heartbeat_s)
    if metrics is not None and on_done is not None:
        on_done(arch, metrics)


def run_search(
    study: optuna.Study,
    plan: Plan,
    evaluate: Evaluate,
    *,
    on_start: Callable[[ArchSpec, int, int], None] | None = None,
    on_done: Callable[[ArchSpec, Mapping[str, Any]], None] | None = None,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    claims: Claims | None = None,
) -> optuna.Study:
    """Evaluate every candidate of `plan` not yet finished in `study`, each exactly once.

    Any number of workers may run this on one study at once. A worker returns when every
    job is done, failed for good, or failed with an error since it started; while other
    workers hold the last jobs it waits for them, and takes over a job whose worker
    stopped beating (see `mobisearch.workers`).

    Args:
      study: from `open_or_create_study`.
      plan: from `plan_search`.
      evaluate: `arch -> metrics` with at least `status` (`"ok"` or a failure such as
        `"diverged"`), and for `"ok"`: `val_accuracy` and `latency_ms`. Any other keys are
        stored as user attributes (they must be JSON-serialisable).
      on_start: called with `(arch, done, total)` before each evaluation (progress display).
      on_done: called with `(arch, metrics)` after each evaluation.
      heartbeat_s: seconds between two heartbeats of this worker's claim; a claim is taken
        over after `GRACE_BEATS` missed beats.
      claims: the claim store (default: the one of the study's storage).

    Returns:
      The study. A KeyboardInterrupt marks the running trial failed with status
      `"interrupted"`, gives its job back (so another worker or the next run retries it)
      and is re-raised.
    """
    claims = claims or claims_for(study, heartbeat_s=heartbeat_s)
    jobs: dict[str, tuple[ArchSpec, Cost]] = {}
    for arch, cost in plan.kept:
        jobs.setdefault(job_key(arch), (arch, cost))  # equal networks: trained once
    fail_stale_trials(study)
    # Errors seen now are retried by this worker; errors that happen later are left to
    # workers started after them, so a failing candidate is not retried in a loop.
    errors_at_start = {k: j.errors for k, j in _jobs(study).items()}
    while True:
        state = _jobs(study)
        todo = [
            k
            for k in jobs
            if not (j := state.get(k, _Job())).done and j.errors <= errors_at_start.get(k, 0)
        ]
        if not todo:
            return study
        held = claims.held()
        claim = None
        for key in todo:
            owner_age = held.get(key)
            if owner_age is None or owner_age[1] > claims.grace_s:
                if (claim := claims.claim(key)) is not None:
                    break
        if claim is None:
            # Live workers hold every job left: wait for them, or for a claim to go stale.
            time.sleep(min(heartbeat_s, 1.0))
            fail_stale_trials(study)
            continue
        arch, cost = jobs[claim.key]
        done = len(jobs) - len(todo)
        try:
            _run_job(
                study,
                claims,
                claim,
                arch,
                cost,
                evaluate,
                heartbeat_s,
                (done, len(jobs)),
                on_start,
                on_done,
            )
        finally:
            claims.release(claim)
