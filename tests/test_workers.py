"""Many workers on one study: claims, heartbeats, exactly-once trials, recovery of the dead.

Every test runs on real storages: a SQLite file, a journal file, and a PostgreSQL server
that the tests start themselves (tests/pgcluster.py; skipped, with the reason, where
PostgreSQL is not installed). Workers are separate processes running `run_search` with a
cost-only evaluator (`evaluate` is injected by design); tests/test_cli.py runs real
`mobisearch search` workers.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import optuna
import pgcluster
import pytest
from optuna.trial import TrialState

from mobisearch import search, workers
from mobisearch.space import apply_overrides, load_space, resolve_space_path

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = pathlib.Path(__file__).resolve().parents[1]
KINDS = ["sqlite", "journal", pytest.param("postgres", marks=pytest.mark.postgres)]
# 8 candidates: enough that three workers contend for most of them.
WIDER = ["axes.width=[0.25, 0.5, 0.75, 1.0]"]


@pytest.fixture(scope="session")
def pg() -> Any:
    why = pgcluster.unavailable()
    if why is not None:
        if os.environ.get("CI"):  # .ci/run installs PostgreSQL: a skip there would hide it
            pytest.fail(f"no PostgreSQL server can be started: {why}")
        pytest.skip(f"no PostgreSQL server can be started here: {why}")
    with pgcluster.cluster() as cluster:
        yield cluster


@pytest.fixture
def opened() -> Any:
    """`opened(url, **kwargs)`: `workers.open_storage`, closed after the test."""
    storages: list[optuna.storages.BaseStorage] = []

    def open_(url: str, **kwargs: Any) -> optuna.storages.BaseStorage:
        storages.append(workers.open_storage(url, **kwargs))
        return storages[-1]

    yield open_
    for storage in storages:
        workers.close_storage(storage)


@pytest.fixture
def new_url(tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> Any:
    """`new_url(kind)`: the URL of a fresh, empty storage of that kind."""
    count = iter(range(1000))

    def make(kind: str) -> str:
        i = next(count)
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / f'study{i}.db'}"
        if kind == "journal":
            return f"journal:///{tmp_path / f'study{i}.log'}"
        return str(request.getfixturevalue("pg").new_database())

    return make


def quick(overrides: list[str] | None = None) -> Any:
    space = load_space(resolve_space_path("quick"))
    return apply_overrides(space, overrides) if overrides else space


# --- claims --------------------------------------------------------------------------


@pytest.fixture
def claims_of(opened: Any) -> Any:
    """`claims_of(url, heartbeat_s)`: a worker's claim store of study "s" in `url`."""

    def make(url: str, heartbeat_s: float = 1.0) -> workers.Claims:
        fingerprint = search.study_fingerprint(quick())
        study = search.open_or_create_study(opened(url), "s", fingerprint)
        return workers.claims_for(study, heartbeat_s=heartbeat_s)

    return make


@pytest.mark.parametrize("kind", KINDS)
def test_a_claim_is_exclusive_until_released(kind: str, new_url: Any, claims_of: Any) -> None:
    url = new_url(kind)
    a, b = claims_of(url), claims_of(url)
    first = a.claim("job")
    assert first is not None and first.took_over is None
    assert b.claim("job") is None
    assert a.claim("job") is None  # not even by the same worker twice
    assert b.claim("other") is not None
    assert a.beat(first)
    assert set(b.held()) == {"job", "other"}
    a.release(first)
    again = b.claim("job")
    assert again is not None and again.took_over is None


@pytest.mark.parametrize("kind", KINDS)
def test_a_stale_claim_is_taken_over_by_exactly_one(
    kind: str, new_url: Any, claims_of: Any
) -> None:
    url = new_url(kind)
    others = [claims_of(url) for _ in range(6)]
    dead = claims_of(url, heartbeat_s=0.2)  # stale 0.6 s after its last beat
    old = dead.claim("job")
    assert old is not None
    assert all(c.claim("job") is None for c in others)  # still fresh
    time.sleep(1.0)
    won: list[workers.Claim] = []
    barrier = threading.Barrier(len(others))

    def take(c: workers.Claims) -> None:
        barrier.wait()
        claim = c.claim("job")
        if claim is not None:
            won.append(claim)

    threads = [threading.Thread(target=take, args=(c,)) for c in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert won[0].took_over == old.owner
    # The old holder learns it lost the job, and cannot release the new claim.
    assert not dead.beat(old)
    dead.release(old)
    assert others[0].claim("job") is None


@pytest.mark.parametrize("kind", KINDS)
def test_heartbeat_keeps_a_claim_alive(kind: str, new_url: Any, claims_of: Any) -> None:
    url = new_url(kind)
    holder = claims_of(url, heartbeat_s=0.3)
    claim = holder.claim("job")
    assert claim is not None
    with workers.Heartbeat(holder, claim, 0.3) as beat:
        time.sleep(2.0)  # more than twice the grace (0.9 s)
        assert claims_of(url).claim("job") is None
        assert not beat.lost.is_set()
    time.sleep(1.5)  # no more beats: stale
    assert claims_of(url).claim("job") is not None


# --- many worker processes -------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import os, random, signal, sys, time
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    from mobisearch import search, workers
    from mobisearch.cost import count_cost
    from mobisearch.space import apply_overrides, load_space, resolve_space_path

    url, log, start_at, overrides = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
    space = apply_overrides(load_space(resolve_space_path("quick")), overrides)
    plan = search.plan_search(space)
    kill_at = os.environ.get("KILL_AT")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def evaluate(arch):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {arch.display_id}\\n")
        time.sleep(random.uniform(0.02, 0.1))
        if kill_at == "evaluate":
            die()
        macs = count_cost(arch).macs
        return {"status": "ok", "val_accuracy": macs / 1e8, "latency_ms": macs / 1e5}

    def after(name, target):
        # Fault injection: die right after `target.name` returns (its effect is stored).
        original = getattr(target, name)
        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            if result is not None:
                die()
            return result
        setattr(target, name, wrapped)

    if kill_at == "claim":
        for cls in (workers.SqlClaims, workers.FileClaims):
            after("claim", cls)
    elif kill_at == "trial":
        after("_create_trial", search)
    time.sleep(max(0.0, start_at - time.time()))  # start together: creation races
    study = search.open_or_create_study(url, "s", search.study_fingerprint(space))
    search.run_search(study, plan, evaluate, heartbeat_s=1)
    """
)


def run_workers(
    url: str, n: int, log: pathlib.Path, *, kill_at: str | None = None, overrides: list[str]
) -> list[subprocess.CompletedProcess[str]]:
    """Start `n` workers at the same moment; with `kill_at`, the first one dies there.

    Each result's `args[0]` is replaced by the worker's pid.
    """
    start_at = time.time() + 2.0
    procs = []
    for i in range(n):
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        if kill_at is not None and i == 0:
            env["KILL_AT"] = kill_at
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, url, str(log), str(start_at), *overrides],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        )
    done = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        done.append(subprocess.CompletedProcess([str(p.pid)], p.returncode, out, err))
    return done


def check_exactly_once(
    study: optuna.Study, log: pathlib.Path, overrides: list[str]
) -> dict[str, int]:
    """Every candidate COMPLETE exactly once, nothing RUNNING; returns the evaluation counts."""
    expected = sorted(a.display_id for a, _ in search.plan_search(quick(overrides)).kept)
    complete = collections.Counter(
        t.user_attrs["display_id"] for t in study.get_trials(states=(TrialState.COMPLETE,))
    )
    assert sorted(complete.elements()) == expected, complete
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    return collections.Counter(line.split()[1] for line in log.read_text().splitlines())


def load(opened: Any, url: str) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=opened(url, create=False))


def race(kind: str, new_url: Any, opened: Any, tmp_path: pathlib.Path, runs: int, n: int) -> None:
    for run in range(runs):
        url, log = new_url(kind), tmp_path / f"calls{run}.log"
        procs = run_workers(url, n, log, overrides=WIDER)
        for p in procs:
            assert p.returncode == 0, p.stderr[-3000:]
        calls = check_exactly_once(load(opened, url), log, WIDER)
        assert set(calls.values()) == {1}, f"run {run}: trained twice: {calls}"


@pytest.mark.parametrize("kind", KINDS)
def test_workers_started_together_train_each_candidate_once(
    kind: str, new_url: Any, opened: Any, tmp_path: pathlib.Path
) -> None:
    """3 workers start at the same moment on a fresh storage: none crashes (table and study
    creation races), and each of the 8 candidates is trained once."""
    race(kind, new_url, opened, tmp_path, runs=1, n=3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_workers_exactly_once_stress(
    kind: str, new_url: Any, opened: Any, tmp_path: pathlib.Path
) -> None:
    race(kind, new_url, opened, tmp_path, runs=10, n=4)


PG, SLOW = pytest.mark.postgres, pytest.mark.slow
# Every moment on SQLite; one (the trial just created, nothing else written) on the others
# in the default run, the rest with -m slow.
KILLS = [
    ("sqlite", "claim"),
    ("sqlite", "trial"),
    ("sqlite", "evaluate"),
    ("journal", "trial"),
    pytest.param("postgres", "trial", marks=PG),
    pytest.param("journal", "claim", marks=SLOW),
    pytest.param("journal", "evaluate", marks=SLOW),
    pytest.param("postgres", "claim", marks=[PG, SLOW]),
    pytest.param("postgres", "evaluate", marks=[PG, SLOW]),
]


@pytest.mark.parametrize(("kind", "kill_at"), KILLS)
def test_a_killed_worker_is_recovered_by_live_workers(
    kind: str, kill_at: str, new_url: Any, opened: Any, tmp_path: pathlib.Path
) -> None:
    """SIGKILL one of 3 workers right after it claimed a job, right after it created the
    job's trial (before anything else is written), or mid-evaluation: the live workers take
    the job over once its claim goes stale (3 beats of 1 s) and every candidate ends
    COMPLETE exactly once, without a rerun."""
    url, log = new_url(kind), tmp_path / "calls.log"
    t0 = time.monotonic()
    procs = run_workers(url, 3, log, kill_at=kill_at, overrides=WIDER)
    assert procs[0].returncode == -signal.SIGKILL, procs[0].stderr[-3000:]
    for p in procs[1:]:
        assert p.returncode == 0, p.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    study = load(opened, url)
    check_exactly_once(study, log, WIDER)
    failed = study.get_trials(states=(TrialState.FAIL,))
    if kill_at == "claim":
        assert failed == []  # it died before creating a trial
    else:
        (dead,) = failed
        assert dead.user_attrs["status"] == "interrupted"
        assert dead.user_attrs["worker"].endswith(f":{procs[0].args[0]}")


# --- storages ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: "notaurl", "expected a storage URL"),
        (lambda d: f"{d}/study.db", "expected a storage URL"),
        (lambda d: f"sqlite:///{d}/missing-folder/study.db", "does not exist"),
        (lambda d: f"journal:///{d}/missing-folder/study.log", "does not exist"),
        (lambda d: f"sqlite:///{d}/best.json", "not a SQLite database"),
        (lambda d: f"sqlite:///{d}", "is a folder"),
        (lambda d: "mysql+nosuchdriver://u@localhost/x", "nosuchdriver"),
    ],
)
def test_bad_storage_is_one_clear_line(tmp_path: pathlib.Path, make: Any, needle: str) -> None:
    (tmp_path / "best.json").write_text(json.dumps({"arch": {}}))
    before = sorted(tmp_path.rglob("*"))
    url = make(tmp_path)
    with pytest.raises(ValueError, match=needle) as e:
        workers.open_storage(url)
    assert len(str(e.value).splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before  # nothing created
    assert (tmp_path / "best.json").read_text() == json.dumps({"arch": {}})


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_read_only_open_creates_nothing(tmp_path: pathlib.Path, kind: str) -> None:
    url = {"sqlite": "sqlite:///{}/x.db", "journal": "journal:///{}/x.log"}[kind]
    with pytest.raises(ValueError, match="no such file"):
        workers.open_storage(url.format(tmp_path), create=False)
    assert list(tmp_path.iterdir()) == []


def test_postgres_url_without_a_driver_names_the_extra(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hide both drivers from the import system, as on a machine without the extra.
    for module in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ValueError, match=r"mobisearch\[postgres\]") as e:
        workers.open_storage("postgresql://me:secret@127.0.0.1:1/db")
    assert "secret" not in str(e.value)


@pytest.mark.postgres
def test_plain_postgresql_url_works(pg: Any, opened: Any) -> None:
    url = pg.new_database()
    assert url.startswith("postgresql://")
    study = search.open_or_create_study(opened(url), "s", search.study_fingerprint(quick()))
    search.run_search(study, search.plan_search(quick()), lambda a: {"status": "diverged"})
    again = load(opened, url)
    assert len(again.get_trials(states=(TrialState.FAIL,))) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_studies_differing_in_settings_refuse_each_other(
    kind: str, new_url: Any, opened: Any
) -> None:
    url = new_url(kind)
    search.open_or_create_study(opened(url), "s", search.study_fingerprint(quick()))
    other = quick(["arch.stem_ch=24"])
    with pytest.raises(ValueError, match=r"arch\.stem_ch = 16 there, 24 now"):
        search.open_or_create_study(opened(url), "s", search.study_fingerprint(other))
