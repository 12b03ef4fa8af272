"""Reading a search back from its optuna study: records, frontier, best config, exports.

A *record* is a plain dict per trial: `number`, `state` and the trial's user attributes
(`display_id`, `arch`, `macs`, `params`, `val_accuracy`, `latency_ms`, ...). A candidate
may have several attempts (trials); `candidate_records` keeps one per candidate, its
COMPLETE attempt or else its latest. The frontier is the set of finished candidates that
no other beats on both validation accuracy (maximize) and latency (minimize).

Every export is written to a temporary file in its folder and renamed into place, so a
reader (or a kill) never sees a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from mobisearch.arch import ArchSpec
from mobisearch.pareto import pareto_mask

Record = dict[str, Any]

# Columns of the trials CSV, in order; `arch` (nested) is written as its display id only.
CSV_COLUMNS = (
    "number",
    "state",
    "status",
    "display_id",
    "width",
    "resolution",
    "kernel",
    "macs",
    "params",
    "peak_activation_bytes",
    "val_accuracy",
    "val_loss",
    "test_accuracy",
    "latency_ms",
    "latency_p10_ms",
    "latency_p90_ms",
    "latency_std_ms",
    "latency_batch",
    "device",
    "compile_s",
    "train_s",
    "steps",
    "rung",
    "seed",
    "attempts",
    "worker",
    "reason",
)
# Columns of the failed-attempts CSV: one row per FAIL trial, retried or not.
FAILED_COLUMNS = ("number", "display_id", "attempt", "status", "reason", "worker")


def list_studies(storage: str | optuna.storages.BaseStorage) -> list[str]:
    """Names of the studies in an optuna storage (a URL is opened read-only).

    Raises:
      ValueError: naming the storage when it does not exist or holds no optuna tables.
    """
    import sqlalchemy.exc

    from mobisearch.workers import open_storage, storage_url

    if isinstance(storage, str):
        storage = open_storage(storage, create=False)
    try:
        return [s.study_name for s in optuna.get_all_study_summaries(storage)]
    except sqlalchemy.exc.OperationalError as e:
        raise ValueError(
            f"{storage_url(storage)}: not an optuna study database ({str(e.orig).strip()})"
        ) from None


def load_study(
    storage: str | optuna.storages.BaseStorage, study_name: str | None = None
) -> optuna.Study:
    """Open an existing study; without a name, the storage's only study.

    A storage URL is opened read-only: a missing database is an error, not created.

    Raises:
      ValueError: naming the storage and the studies it holds, when the study is missing
        or the name is ambiguous, or when the storage does not exist.
    """
    from mobisearch.workers import open_storage, storage_url

    if isinstance(storage, str):
        storage = open_storage(storage, create=False)
    names = list_studies(storage)
    where = storage_url(storage)
    if study_name is None:
        if len(names) != 1:
            raise ValueError(
                f"{where} holds {len(names)} studies {names}; pass --study-name to pick one"
            )
        study_name = names[0]
    if study_name not in names:
        raise ValueError(f"{where}: no study named {study_name!r}; it holds {names}")
    return optuna.load_study(study_name=study_name, storage=storage)


# Study attributes `test_accuracy/<job key>`: a frontier member's accuracy on the test split.
# (A finished optuna trial cannot be changed, so it lives on the study; one attribute per
# candidate, so workers that record at once do not overwrite each other.)
TEST_ACCURACY_PREFIX = "test_accuracy/"


def candidate_key(record: Mapping[str, Any]) -> str:
    """A record's candidate: its network's key (`candidate_key`, in searches with rungs),
    else its job key, else its display id (studies from before job keys)."""
    return str(record.get("candidate_key") or record.get("job_key") or record.get("display_id"))


def trial_records(study: optuna.Study) -> list[Record]:
    """One record per finished attempt (COMPLETE or FAIL trial), in trial order.

    Frontier members evaluated on the test split carry `test_accuracy`. A trial failed by
    optuna's heartbeat check (its worker died) has status `"interrupted"`.
    """
    attrs = study.user_attrs
    test = {
        k[len(TEST_ACCURACY_PREFIX) :]: v
        for k, v in attrs.items()
        if k.startswith(TEST_ACCURACY_PREFIX)
    }
    # Studies written before one attribute per candidate kept a dict by display id.
    old = attrs.get("test_accuracy", {})
    records = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        did = t.user_attrs.get("display_id")
        if did is None:
            continue
        record = {"number": t.number, "state": t.state.name, **t.user_attrs}
        if t.state == TrialState.FAIL and "status" not in record:
            record["status"] = "interrupted"
            record["reason"] = "its worker stopped sending heartbeats"
        key = candidate_key(record)
        if t.state == TrialState.COMPLETE and (key in test or did in old):
            record["test_accuracy"] = test[key] if key in test else old[did]
        records.append(record)
    return records


def candidate_records(records: Sequence[Mapping[str, Any]]) -> list[Record]:
    """One record per candidate: its COMPLETE attempt at the highest rung it reached, else
    its latest attempt; with `attempts` (every trial of it) and `rungs` (the rungs it
    finished). Re-runs with another seed (`role = "noise"`) are left out.

    Ordered by the first trial of each candidate.
    """
    by_key: dict[str, list[Mapping[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["number"]):
        if r.get("role", "rung") == "rung":
            by_key.setdefault(candidate_key(r), []).append(r)
    out = []
    for attempts in by_key.values():
        complete = [r for r in attempts if r.get("state") == "COMPLETE"]
        best = max(complete, key=lambda r: (r.get("rung", 0), -r["number"]), default=None)
        chosen = dict(best if best is not None else attempts[-1])
        chosen["attempts"] = len(attempts)
        chosen["rungs"] = sorted({r.get("rung", 0) for r in complete})
        out.append(chosen)
    return out


def seed_spread(records: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The seed-to-seed spread of the first rung's validation accuracy, from the re-runs
    with another seed (`role = "noise"`) and their first runs: the standard deviation of a
    single run's score, `sqrt(mean(d²) / 2)` over the pairs' differences `d`. None
    without a pair.

    Examples:
      >>> base = {"state": "COMPLETE", "rung": 0, "candidate_key": "a", "val_accuracy": 0.80}
      >>> again = dict(base, role="noise", val_accuracy=0.82)
      >>> round(seed_spread([base, again])["spread"], 4)
      0.0141
    """
    first = {
        candidate_key(r): r
        for r in records
        if r.get("state") == "COMPLETE"
        and r.get("rung", 0) == 0
        and r.get("role", "rung") == "rung"
    }
    pairs = []
    for r in records:
        base = first.get(candidate_key(r))
        if r.get("role") == "noise" and r.get("state") == "COMPLETE" and base is not None:
            pairs.append((base["display_id"] if "display_id" in base else candidate_key(r),
                          float(base["val_accuracy"]), float(r["val_accuracy"])))  # fmt: skip
    if not pairs:
        return None
    d = np.array([b - a for _, a, b in pairs])
    return {
        "n": len(pairs),
        "spread": float(np.sqrt(np.mean(d**2) / 2)),
        "max_abs_difference": float(np.max(np.abs(d))),
        "pairs": [{"display_id": i, "seed_a": a, "seed_b": b} for i, a, b in pairs],
    }


def mark_indistinct(front: Sequence[Mapping[str, Any]], spread: float) -> list[Record]:
    """The frontier (sorted by latency), each member marked `distinct = False` (and
    `indistinct_from`, the faster neighbour) when its validation accuracy is within
    `spread` of the next faster member's: the seeds' noise alone could swap them."""
    out = []
    for i, r in enumerate(front):
        r = dict(r)
        if i > 0 and abs(r["val_accuracy"] - front[i - 1]["val_accuracy"]) <= spread:
            r["distinct"] = False
            r["indistinct_from"] = front[i - 1]["display_id"]
        else:
            r["distinct"] = True
        out.append(r)
    return out


def failed_attempts(records: Sequence[Mapping[str, Any]]) -> list[Record]:
    """The FAIL records (retried or not), in trial order."""
    return [dict(r) for r in records if r.get("state") == "FAIL"]


def record_test_accuracy(study: optuna.Study, record: Mapping[str, Any], accuracy: float) -> None:
    """Store a frontier member's test-split accuracy on the study."""
    study.set_user_attr(TEST_ACCURACY_PREFIX + candidate_key(record), accuracy)


def _ok(record: Mapping[str, Any]) -> bool:
    return (
        record.get("state") == "COMPLETE"
        and isinstance(record.get("val_accuracy"), int | float)
        and isinstance(record.get("latency_ms"), int | float)
        and math.isfinite(record["val_accuracy"])
        and math.isfinite(record["latency_ms"])
    )


def frontier(records: Sequence[Mapping[str, Any]]) -> list[Record]:
    """The Pareto frontier (max `val_accuracy`, min `latency_ms`), sorted by latency."""
    ok = [dict(r) for r in records if _ok(r)]
    if not ok:
        return []
    values = np.array([[r["val_accuracy"], r["latency_ms"]] for r in ok], dtype=float)
    mask = pareto_mask(values, ["maximize", "minimize"])
    front = [r for r, m in zip(ok, mask, strict=True) if m]
    return sorted(front, key=lambda r: (r["latency_ms"], -r["val_accuracy"]))


def best_record(
    records: Sequence[Mapping[str, Any]],
    *,
    max_macs: int | None = None,
    max_latency_ms: float | None = None,
    max_params: int | None = None,
) -> Record:
    """The most accurate finished candidate within the constraints (ties: lower latency).

    Raises:
      ValueError: if no finished candidate meets the constraints; names the constraints
        and the closest candidate.
    """
    ok = [dict(r) for r in records if _ok(r)]
    fits = [
        r
        for r in ok
        if (max_macs is None or r["macs"] <= max_macs)
        and (max_latency_ms is None or r["latency_ms"] <= max_latency_ms)
        and (max_params is None or r["params"] <= max_params)
    ]
    if not fits:
        detail = ""
        if ok:
            cheapest = min(ok, key=lambda r: (r["latency_ms"], r["macs"]))
            detail = (
                f"; the fastest finished candidate is {cheapest['display_id']} with "
                f"{cheapest['macs']:,} MACs, {cheapest['latency_ms']:.3f} ms, "
                f"{cheapest['params']:,} params"
            )
        raise ValueError(
            f"no finished candidate meets max_macs={max_macs}, max_latency_ms={max_latency_ms}, "
            f"max_params={max_params} ({len(ok)} finished){detail}"
        )
    return max(fits, key=lambda r: (r["val_accuracy"], -r["latency_ms"], -r["macs"]))


def write_atomic(path: str | pathlib.Path, data: str | bytes) -> pathlib.Path:
    """Write `data` to a temporary file next to `path`, then rename it into place."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_best(record: Mapping[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """Write a best-config JSON: `{"arch": ..., "metrics": ...}`; `load_best` reads it."""
    metrics = {k: v for k, v in record.items() if k != "arch"}
    text = json.dumps({"arch": record["arch"], "metrics": metrics}, indent=2) + "\n"
    return write_atomic(path, text)


def load_best(
    source: str | pathlib.Path | optuna.Study,
    *,
    study_name: str | None = None,
    max_macs: int | None = None,
    max_latency_ms: float | None = None,
    max_params: int | None = None,
) -> ArchSpec:
    """The chosen architecture, from a study or an exported JSON file.

    Args:
      source: an `optuna.Study`, an optuna storage URL (`sqlite:///results/x/study.db`),
        or a JSON file written by `export_best` (or a bare `ArchSpec.to_dict()` JSON).
      study_name: which study of the storage (default: its only one).
      max_macs, max_latency_ms, max_params: constraints (ignored for a JSON file).

    Returns:
      The `ArchSpec`; rebuild it with `mobisearch.models.build_model(arch, rngs=...)`.
    """
    if isinstance(source, optuna.Study):
        study = source
    elif "://" in str(source):
        study = load_study(str(source), study_name)
    else:
        return read_arch_json(source)
    record = best_record(
        candidate_records(trial_records(study)),
        max_macs=max_macs,
        max_latency_ms=max_latency_ms,
        max_params=max_params,
    )
    return ArchSpec.from_dict(record["arch"], source=f"trial {record['number']}")


def read_arch_json(path: str | pathlib.Path) -> ArchSpec:
    """Read an architecture from an exported best-config JSON or a bare arch JSON.

    Raises:
      ValueError: naming the file when it is missing, not JSON, or not an architecture.
    """
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "arch" in data:
        data = data["arch"]
    return ArchSpec.from_dict(data, source=str(path))


def _csv(records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    f = io.StringIO(newline="")
    writer = csv.writer(f)
    writer.writerow(columns)
    for r in records:
        row = dict(r)
        device = row.get("device")
        if isinstance(device, Mapping):
            row["device"] = device.get("device_kind", "")
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
    return f.getvalue()


def write_trials_csv(records: Sequence[Mapping[str, Any]], path: str | pathlib.Path) -> None:
    """Write the records (one per candidate) as CSV with `CSV_COLUMNS`, missing values empty."""
    write_atomic(path, _csv(records, CSV_COLUMNS))


def write_failed_csv(records: Sequence[Mapping[str, Any]], path: str | pathlib.Path) -> None:
    """Write failed attempts as CSV with `FAILED_COLUMNS` (a header only when none failed)."""
    write_atomic(path, _csv(failed_attempts(records), FAILED_COLUMNS))


def write_frontier_json(records: Sequence[Mapping[str, Any]], path: str | pathlib.Path) -> None:
    """Write the frontier records (with their full `arch`) as a JSON list."""
    write_atomic(path, json.dumps(list(records), indent=2, default=str) + "\n")
