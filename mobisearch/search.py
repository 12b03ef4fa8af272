"""The search: budget filter → one optuna trial per surviving candidate → frontier.

`plan_search` enumerates a space's candidates, computes their exact cost and drops those over
the budget before anything is compiled. `run_search` evaluates the survivors as trials of an
optuna study (ask/tell), which is the only store: each trial's `user_attrs` hold the
architecture, its display id, cost, metrics, device fingerprint, timings and seed, and
everything downstream (frontier, plot, best, export) reads the study back
(`mobisearch.results`).

Resuming: candidates are queued as WAITING trials (`Study.enqueue_trial`) and popped by
`Study.ask`, so a second run (or a second machine on a shared storage) picks up what is
left. A finished candidate (COMPLETE, or failed for a reason of its own such as a diverged
loss) is never trained again. A trial left RUNNING by a process that died (Ctrl-C, kill) on
this host is marked failed with status `"interrupted"` and its candidate is queued again.

This module imports optuna but not jax: the evaluator is injected, so the whole search can be
tested with a cost-only fake in well under a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import optuna
from optuna.trial import TrialState

from mobisearch.arch import ArchSpec
from mobisearch.cost import Cost, cost_record, count_cost, format_count
from mobisearch.space import SearchSpace

# Validation accuracy, latency.
DIRECTIONS: tuple[Literal["maximize", "minimize"], ...] = ("maximize", "minimize")
# Final statuses of a FAILED trial that mean "do not try this candidate again".
FINAL_FAILURES = frozenset({"diverged"})

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


def recipe_fingerprint(space: SearchSpace, extra: Mapping[str, Any] | None = None) -> str:
    """JSON of what makes trials comparable (data, recipe, latency settings, ...)."""

    def asdict(x: Any) -> Any:
        return None if x is None else dataclasses.asdict(x)

    record = {
        "data": asdict(space.data),
        "train": asdict(space.train),
        "latency": asdict(space.latency),
        **(extra or {}),
    }
    return json.dumps(record, sort_keys=True)


def open_or_create_study(
    storage: str | optuna.storages.BaseStorage, study_name: str, recipe: str
) -> optuna.Study:
    """Load or create the two-objective study; refuse one made with another recipe.

    Raises:
      ValueError: if the study exists with a different recipe (its trials would not be
        comparable); nothing in it is changed.
    """
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=list(DIRECTIONS),
        load_if_exists=True,
    )
    stored = study.user_attrs.get("recipe")
    if stored is None:
        study.set_user_attr("recipe", recipe)
    elif stored != recipe:
        raise ValueError(
            f"study {study_name!r} in {storage} was made with another recipe:\n"
            f"  stored: {stored}\n  now:    {recipe}\n"
            "pass another --study-name (or --storage) to start a separate search"
        )
    return study


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[list[int]]:
    """Hold Ctrl-C (SIGINT) off inside; the yielded list then holds it if one came."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous)


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail(study: optuna.Study, trial: optuna.Trial, status: str, reason: str) -> None:
    """Mark `trial` failed with `status` and `reason`, unless it has finished already."""
    try:
        trial.set_user_attr("status", status)
        trial.set_user_attr("reason", reason)
    except optuna.exceptions.UpdateFinishedTrialError:
        return  # told before the interruption: its result stands
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def recover_interrupted(study: optuna.Study) -> list[str]:
    """Fail RUNNING trials whose process on this host is gone; return their display ids."""
    host = socket.gethostname()
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(t.user_attrs.get("worker", ""))
        w_host, _, w_pid = worker.rpartition(":")
        if w_host == host and w_pid.isdigit() and not _pid_alive(int(w_pid)):
            handle = optuna.trial.Trial(study, t._trial_id)
            _fail(study, handle, "interrupted", f"worker {worker} stopped while running it")
            recovered.append(str(t.user_attrs.get("display_id")))
    return recovered


def pending(study: optuna.Study, plan: Plan) -> list[tuple[ArchSpec, Cost]]:
    """Candidates of `plan` that have no finished, running or queued trial yet."""
    taken = set()
    for t in study.get_trials(deepcopy=False):
        did = t.user_attrs.get("display_id")
        if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING):
            taken.add(did)
        elif t.state == TrialState.FAIL and t.user_attrs.get("status") in FINAL_FAILURES:
            taken.add(did)
    return [(a, c) for a, c in plan.kept if a.display_id not in taken]


def cost_attrs(arch: ArchSpec, cost: Cost) -> dict[str, Any]:
    """The user attributes every trial of a candidate starts with."""
    return {**cost_record(arch, cost), "arch": arch.to_dict()}


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    by_id: Mapping[str, ArchSpec],
    total: int,
    evaluate: Evaluate,
    on_start: Callable[[ArchSpec, int, int], None] | None,
    on_done: Callable[[ArchSpec, Mapping[str, Any]], None] | None,
) -> bool:
    """Evaluate and tell one asked trial; False if it was not one of ours (stop)."""
    did = trial.user_attrs.get("display_id")
    if not isinstance(did, str) or did not in by_id:
        # Another worker popped the last queued trial between our check and ask(), and
        # optuna made a fresh, empty trial instead; discard it.
        study.tell(trial, state=TrialState.FAIL)
        return False
    arch = by_id[did]
    trial.set_user_attr("worker", _worker())
    if on_start is not None:
        queued = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        on_start(arch, total - queued - 1, total)
    try:
        metrics = dict(evaluate(arch))
    except Exception as e:  # noqa: BLE001 (recorded, and the search goes on)
        metrics = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    for key, value in metrics.items():
        trial.set_user_attr(key, value)
    if metrics.get("status") == "ok":
        study.tell(trial, values=[metrics["val_accuracy"], metrics["latency_ms"]])
    else:
        study.tell(trial, state=TrialState.FAIL)
    if on_done is not None:
        on_done(arch, metrics)
    return True


def run_search(
    study: optuna.Study,
    plan: Plan,
    evaluate: Evaluate,
    *,
    on_start: Callable[[ArchSpec, int, int], None] | None = None,
    on_done: Callable[[ArchSpec, Mapping[str, Any]], None] | None = None,
) -> optuna.Study:
    """Evaluate every candidate of `plan` not yet finished in `study`.

    Args:
      study: from `open_or_create_study`.
      plan: from `plan_search`.
      evaluate: `arch -> metrics` with at least `status` (`"ok"` or a failure such as
        `"diverged"`), and for `"ok"`: `val_accuracy` and `latency_ms`. Any other keys are
        stored as user attributes (they must be JSON-serialisable).
      on_start: called with `(arch, done, total)` before each evaluation (progress display).
      on_done: called with `(arch, metrics)` after each evaluation.

    Returns:
      The study. A KeyboardInterrupt marks the running trial failed with status
      `"interrupted"` (so the next run retries it) and is re-raised.
    """
    recover_interrupted(study)
    for arch, cost in pending(study, plan):
        study.enqueue_trial({}, user_attrs=cost_attrs(arch, cost))
    by_id = {a.display_id: a for a, _ in plan.kept}
    total = len(plan.kept)
    while True:
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            break
        with _deferred_sigint() as interrupted:
            trial = study.ask()
        # From here until it is told, a Ctrl-C anywhere (not only during `evaluate`) must
        # leave the trial failed as "interrupted": a RUNNING trial without its worker
        # attribute could not be recovered, and the rerun would never retry it. A Ctrl-C
        # during `ask` (which turns a queued trial RUNNING) is held until it returns.
        try:
            if interrupted:
                raise KeyboardInterrupt
            if not _run_trial(study, trial, by_id, total, evaluate, on_start, on_done):
                break
        except KeyboardInterrupt:
            _fail(study, trial, "interrupted", "KeyboardInterrupt")
            raise
    return study
