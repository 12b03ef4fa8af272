"""Reading a study back: records, frontier, best, export and load_best."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest

from mobisearch import results, search
from mobisearch.arch import ArchSpec
from mobisearch.cost import count_cost
from mobisearch.space import load_space, resolve_space_path

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Hand-picked metrics per candidate index (sorted by MACs): index 1 is dominated by index 0
# (slower and less accurate), the others form the frontier.
METRICS = [(0.80, 1.0), (0.78, 2.0), (0.85, 3.0), (0.90, 4.0)]


@pytest.fixture
def study(tmp_path):  # type: ignore[no-untyped-def]
    space = load_space(resolve_space_path("quick"))
    plan = search.plan_search(space)
    by_id = {a.display_id: i for i, (a, _) in enumerate(plan.kept)}

    def evaluate(arch: ArchSpec) -> dict[str, object]:
        acc, lat = METRICS[by_id[arch.display_id]]
        return {"status": "ok", "val_accuracy": acc, "latency_ms": lat, "latency_batch": 1}

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    s = search.open_or_create_study(storage, "quick", search.study_fingerprint(space))
    search.run_search(s, plan, evaluate)
    return s


def test_records_and_frontier(study) -> None:  # type: ignore[no-untyped-def]
    records = results.trial_records(study)
    assert len(records) == 4
    front = results.frontier(records)
    assert [(r["val_accuracy"], r["latency_ms"]) for r in front] == [
        (0.80, 1.0),
        (0.85, 3.0),
        (0.90, 4.0),
    ]


def test_best_under_constraints(study) -> None:  # type: ignore[no-untyped-def]
    records = results.trial_records(study)
    assert results.best_record(records)["val_accuracy"] == 0.90
    assert results.best_record(records, max_latency_ms=3.5)["val_accuracy"] == 0.85
    macs = sorted(r["macs"] for r in records)
    best = results.best_record(records, max_macs=macs[1])
    assert best["macs"] <= macs[1]
    assert best["val_accuracy"] == 0.80
    with pytest.raises(ValueError, match="no finished candidate meets") as e:
        results.best_record(records, max_latency_ms=0.5)
    assert "fastest finished candidate" in str(e.value)


def test_load_best_from_study_storage_and_json(tmp_path, study) -> None:  # type: ignore[no-untyped-def]
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    arch = results.load_best(study, max_latency_ms=3.5)
    assert results.load_best(storage, max_latency_ms=3.5) == arch
    assert (
        count_cost(arch).macs
        == results.best_record(results.trial_records(study), max_latency_ms=3.5)["macs"]
    )
    best = results.best_record(results.trial_records(study))
    path = results.export_best(best, tmp_path / "b.json")
    loaded = results.load_best(path)
    assert loaded.display_id == best["display_id"]
    # A bare architecture JSON reads too.
    bare = tmp_path / "arch.json"
    bare.write_text(json.dumps(loaded.to_dict()))
    assert results.load_best(bare) == loaded


def test_bad_json_names_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        results.read_arch_json(bad)
    with pytest.raises(ValueError, match="missing.json: no such file"):
        results.read_arch_json(tmp_path / "missing.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"arch_def": [["dsa_c0"]]}))
    with pytest.raises(ValueError, match="wrong.json"):
        results.read_arch_json(wrong)


def test_load_study_errors(tmp_path, study) -> None:  # type: ignore[no-untyped-def]
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert results.load_study(storage).study_name == "quick"
    with pytest.raises(ValueError, match="no study named 'nope'"):
        results.load_study(storage, "nope")
    optuna.create_study(storage=storage, study_name="other")
    with pytest.raises(ValueError, match="holds 2 studies"):
        results.load_study(storage)


def test_csv_and_frontier_json(tmp_path, study) -> None:  # type: ignore[no-untyped-def]
    records = results.trial_records(study)
    results.write_trials_csv(records, tmp_path / "t.csv")
    with (tmp_path / "t.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["display_id"] for r in rows] == [r["display_id"] for r in records]
    assert {float(r["val_accuracy"]) for r in rows} == {m[0] for m in METRICS}
    results.write_frontier_json(results.frontier(records), tmp_path / "f.json")
    front = json.loads((tmp_path / "f.json").read_text())
    assert len(front) == 3
    assert ArchSpec.from_dict(front[0]["arch"]).display_id == front[0]["display_id"]


def test_one_row_per_candidate_and_failed_attempts_apart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A candidate that failed once and was retried is one row of trials.csv (its COMPLETE
    attempt, `attempts` = 2); the failed attempt is a row of failed_attempts.csv."""
    space = load_space(resolve_space_path("quick"))
    plan = search.plan_search(space)
    flaky = plan.kept[1][0].display_id
    calls: list[str] = []

    def evaluate(arch: ArchSpec) -> dict[str, object]:
        calls.append(arch.display_id)
        if arch.display_id == flaky and calls.count(flaky) == 1:
            raise RuntimeError("out of memory")
        return {"status": "ok", "val_accuracy": 0.5, "latency_ms": count_cost(arch).macs / 1e5}

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = search.open_or_create_study(storage, "q", search.study_fingerprint(space))
    search.run_search(study, plan, evaluate)
    search.run_search(study, plan, evaluate)  # a later run retries the error
    records = results.trial_records(study)
    assert len(records) == 5
    candidates = results.candidate_records(records)
    assert sorted(r["display_id"] for r in candidates) == sorted(
        a.display_id for a, _ in plan.kept
    )
    assert all(r["state"] == "COMPLETE" for r in candidates)
    assert {r["display_id"]: r["attempts"] for r in candidates}[flaky] == 2
    results.write_trials_csv(candidates, tmp_path / "trials.csv")
    results.write_failed_csv(records, tmp_path / "failed.csv")
    with (tmp_path / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["attempts"] for r in rows} == {"1", "2"}
    with (tmp_path / "failed.csv").open() as f:
        (failed,) = list(csv.DictReader(f))
    assert failed["display_id"] == flaky and failed["status"] == "error"
    assert failed["attempt"] == "1" and "out of memory" in failed["reason"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files


WRITER = textwrap.dedent(
    """
    import sys
    from mobisearch.results import write_atomic
    path, i = sys.argv[1], 0
    print("ready", flush=True)
    while True:  # alternate two complete contents until killed
        i += 1
        write_atomic(path, (f"version {i % 2}\\n" * 500_000))
    """
)


def test_an_export_killed_midway_leaves_the_old_or_the_new_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "trials.csv"
    path.write_text("version 1\n" * 500_000)
    complete = {f"version {v}\n" * 500_000 for v in (0, 1)}
    for delay in (0.0, 0.005, 0.01, 0.02, 0.04):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert path.read_text() in complete  # never empty, never half-written


def test_read_only_load_creates_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="no such file"):
        results.load_study(f"sqlite:///{tmp_path / 'missing.db'}")
    with pytest.raises(ValueError, match="no such file"):
        results.load_best(f"sqlite:///{tmp_path / 'missing.db'}")
    assert list(tmp_path.iterdir()) == []


# --- multi-fidelity records: the highest rung, the seeds' spread, indistinct members ------


def _record(number: int, key: str, state: str = "COMPLETE", **attrs: object) -> dict:
    return {"number": number, "state": state, "candidate_key": key, "display_id": key.upper(),
            "rung": 0, "role": "rung", **attrs}  # fmt: skip


def test_candidate_records_keep_the_highest_rung() -> None:
    records = [
        _record(0, "x", val_accuracy=0.70),
        _record(1, "y", val_accuracy=0.60),
        _record(2, "z", "FAIL", status="diverged"),
        _record(5, "x", role="noise", seed=1, val_accuracy=0.99),  # not a row of its own
        _record(6, "y", "FAIL", rung=1, status="error"),
        _record(7, "x", rung=1, val_accuracy=0.80),
        _record(8, "x", "FAIL", rung=2, status="interrupted"),
        _record(9, "x", rung=2, val_accuracy=0.85),
    ]
    rows = results.candidate_records(records)
    assert [(r["candidate_key"], r["number"], r["rung"]) for r in rows] == [
        ("x", 9, 2),  # its result at rung 2, the noise re-run left out
        ("y", 1, 0),  # rung 1 failed: its rung-0 result stands
        ("z", 2, 0),  # never finished: its latest attempt
    ]
    assert [r["rungs"] for r in rows] == [[0, 1, 2], [0], []]
    assert [r["attempts"] for r in rows] == [4, 2, 1]
    assert rows[0]["val_accuracy"] == 0.85


def test_seed_spread_by_hand() -> None:
    records = [
        _record(0, "a", val_accuracy=0.80),
        _record(1, "b", val_accuracy=0.70),
        _record(2, "c", val_accuracy=0.90),
        _record(3, "a", rung=1, val_accuracy=0.95),  # a later rung is not a first run
        _record(4, "a", role="noise", seed=1, val_accuracy=0.82),
        _record(5, "b", role="noise", seed=1, val_accuracy=0.66),
        _record(6, "c", "FAIL", role="noise", seed=1, status="diverged"),  # no score
        _record(7, "d", role="noise", seed=1, val_accuracy=0.5),  # no first run
    ]
    noise = results.seed_spread(records)
    assert noise is not None
    # Differences 0.02 and -0.04: sqrt(mean(0.0004, 0.0016) / 2) = sqrt(0.0005).
    assert noise["n"] == 2
    assert noise["spread"] == pytest.approx(0.0005**0.5, rel=1e-12)
    assert noise["max_abs_difference"] == pytest.approx(0.04, rel=1e-12)
    assert noise["pairs"] == [
        {"display_id": "A", "seed_a": 0.80, "seed_b": 0.82},
        {"display_id": "B", "seed_a": 0.70, "seed_b": 0.66},
    ]
    # Equal scores: no spread. No re-run with another seed: none measured.
    same = [_record(0, "a", val_accuracy=0.5), _record(1, "a", role="noise", val_accuracy=0.5)]
    assert results.seed_spread(same) == {
        "n": 1,
        "spread": 0.0,
        "max_abs_difference": 0.0,
        "pairs": [{"display_id": "A", "seed_a": 0.5, "seed_b": 0.5}],
    }
    assert results.seed_spread(records[:4]) is None
    assert results.seed_spread([]) is None


def test_mark_indistinct_by_hand() -> None:
    front = [
        {"display_id": "A", "val_accuracy": 0.5, "latency_ms": 1.0},
        {"display_id": "B", "val_accuracy": 0.625, "latency_ms": 2.0},
        {"display_id": "C", "val_accuracy": 0.75, "latency_ms": 3.0},
        {"display_id": "D", "val_accuracy": 1.0, "latency_ms": 4.0},
    ]
    marked = results.mark_indistinct(front, 0.125)  # gaps 0.125, 0.125, 0.25
    assert [r["distinct"] for r in marked] == [True, False, False, True]
    assert [r.get("indistinct_from") for r in marked] == [None, "A", "B", None]
    assert [{k: r[k] for k in front[0]} for r in marked] == front  # the rest as it was
    assert "distinct" not in front[0]  # the input is not changed
    assert all(r["distinct"] for r in results.mark_indistinct(front, 0.1))
    assert [r["distinct"] for r in results.mark_indistinct(front, 0.25)] == [True] + [False] * 3
    assert results.mark_indistinct([], 0.1) == []
