"""Reading a search back from its optuna study: records, frontier, best config, exports.

A *record* is a plain dict per trial: `number`, `state` and the trial's user attributes
(`display_id`, `arch`, `macs`, `params`, `val_accuracy`, `latency_ms`, ...). The frontier is
the set of finished candidates that no other beats on both validation accuracy (maximize)
and latency (minimize).
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
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
    "seed",
    "reason",
)


def list_studies(storage: str) -> list[str]:
    """Names of the studies in an optuna storage."""
    return [s.study_name for s in optuna.get_all_study_summaries(storage)]


def load_study(storage: str, study_name: str | None = None) -> optuna.Study:
    """Open an existing study; without a name, the storage's only study.

    Raises:
      ValueError: naming the storage and the studies it holds, when the study is missing
        or the name is ambiguous.
    """
    names = list_studies(storage)
    if study_name is None:
        if len(names) != 1:
            raise ValueError(
                f"{storage} holds {len(names)} studies {names}; pass --study-name to pick one"
            )
        study_name = names[0]
    if study_name not in names:
        raise ValueError(f"{storage}: no study named {study_name!r}; it holds {names}")
    return optuna.load_study(study_name=study_name, storage=storage)


# Study attribute holding `{display_id: accuracy}` on the test split for frontier members.
# (A finished optuna trial cannot be changed, so it lives on the study.)
TEST_ACCURACY_ATTR = "test_accuracy"


def trial_records(study: optuna.Study) -> list[Record]:
    """One record per candidate trial (COMPLETE or FAIL), in trial order.

    Frontier members evaluated on the test split carry `test_accuracy`.
    """
    test = study.user_attrs.get(TEST_ACCURACY_ATTR, {})
    records = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        did = t.user_attrs.get("display_id")
        if did is None:
            continue
        record = {"number": t.number, "state": t.state.name, **t.user_attrs}
        if t.state == TrialState.COMPLETE and did in test:
            record["test_accuracy"] = test[did]
        records.append(record)
    return records


def record_test_accuracy(study: optuna.Study, display_id: str, accuracy: float) -> None:
    """Store a frontier member's test-split accuracy on the study."""
    test = dict(study.user_attrs.get(TEST_ACCURACY_ATTR, {}))
    test[display_id] = accuracy
    study.set_user_attr(TEST_ACCURACY_ATTR, test)


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


def export_best(record: Mapping[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """Write a best-config JSON: `{"arch": ..., "metrics": ...}`; `load_best` reads it."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in record.items() if k != "arch"}
    path.write_text(json.dumps({"arch": record["arch"], "metrics": metrics}, indent=2) + "\n")
    return path


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
        trial_records(study),
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


def write_trials_csv(records: Sequence[Mapping[str, Any]], path: str | pathlib.Path) -> None:
    """Write the records as CSV with `CSV_COLUMNS` (missing values left empty)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in records:
            row = dict(r)
            device = row.get("device")
            if isinstance(device, Mapping):
                row["device"] = device.get("device_kind", "")
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in CSV_COLUMNS])


def write_frontier_json(records: Sequence[Mapping[str, Any]], path: str | pathlib.Path) -> None:
    """Write the frontier records (with their full `arch`) as a JSON list."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(records), indent=2, default=str) + "\n")
