"""Many workers on one study: storages, exactly-once claims of jobs, heartbeats.

A *job* is one unit of work named by a string key: today an architecture key
(`mobisearch.search.job_key`), later `"<arch key>@rung<r>"` for a rung of successive
halving. The optuna study stays the only store of results: each attempt at a job is a
trial carrying the job's key in its `job_key` user attribute, and the study alone says
whether a job is done (a COMPLETE trial, or a failure that must not be retried).

What a study cannot say atomically is *who is working on a job now*: two workers that both
find a job undone would both train it. So a worker first takes a **claim** on the job, and
only the holder of the claim creates a trial for it. A claim is a row `(study, job key,
token, owner, last beat, grace)` with the job key unique, kept next to the study:

* RDB storages (SQLite, PostgreSQL, MySQL): a table `mobisearch_claims` in the storage's own
  database, on its SQLAlchemy engine. Taking a free job is an INSERT that the primary key
  makes atomic; taking over a stale claim is one UPDATE whose WHERE names the old token and
  the staleness, so of several workers that try, exactly one changes the row. Times come
  from the database server's clock, so hosts need not agree on the time.
* Journal files (`JournalStorage`): a JSON file `<journal>.claims.json` read and rewritten
  (temp file + rename) under an O_CREAT|O_EXCL lock file, optuna's `JournalFileOpenLock`.
  Times are the hosts' clocks: hosts sharing a journal must keep them within a few seconds.
* In-memory studies (one process): a dict under a thread lock.

The holder **beats** the claim every `heartbeat_s` seconds from a thread (`Heartbeat`); a
claim not beaten for `grace_s` (3 beats) is stale and any worker may take it over. A
worker's protocol for one job (`mobisearch.search.run_search`):

1. claim the job (skip it if another live worker holds it);
2. fail the job's RUNNING trials left by earlier holders (a worker killed anywhere, even
   between creating its trial and writing an attribute, leaves at most such a trial);
3. if the study says the job is done, release the claim and stop;
4. create the trial RUNNING with all its attributes in one write, evaluate, tell;
5. release the claim.

Exactly once: a trial is only created under a claim, only one worker holds a claim, and a
new holder re-reads the study after step 2, so it sees any result told before it took over
(a holder tells before it releases). Nothing lost: a job is undone until told; a dead
holder's claim goes stale within `grace_s` and the next worker that looks takes it. A
holder whose claim was taken over while it still ran (a pause longer than `grace_s`) finds
its trial failed by the new holder, and its result is discarded.

RDB storages also record optuna's own trial heartbeat (`RDBStorage(heartbeat_interval=...,
grace_period=...)`), so `optuna.storages.fail_stale_trials` fails a dead worker's trial
for optuna's tools too. optuna's `RetryFailedTrialCallback` is not used: it re-queues a
WAITING trial, and two workers on SQLite can pop the same waiting trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import optuna

if TYPE_CHECKING:
    import sqlalchemy

# Seconds between two beats of a claim; a claim is stale after GRACE_BEATS missed beats.
DEFAULT_HEARTBEAT_S = 10
GRACE_BEATS = 3

_SQLITE_MAGIC = b"SQLite format 3\x00"
_EXAMPLES = (
    "sqlite:///results/x/study.db, postgresql://user@host/db or journal:///shared/study.log"
)


def worker_id() -> str:
    """`host:pid` of this process, as stored in the trials it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


# --------------------------------------------------------------------------------------
# Storages


def open_storage(
    url: str, *, heartbeat_s: int | None = None, create: bool = True
) -> optuna.storages.BaseStorage:
    """Open an optuna storage from a URL, checking it first.

    Args:
      url: `sqlite:///path`, `postgresql://...` (psycopg 3 or psycopg2, whichever is
        installed), any other SQLAlchemy URL, or `journal:///path` for a journal file
        (three slashes and a relative path, four for an absolute one, as for SQLite).
      heartbeat_s: record optuna's trial heartbeat every so many seconds (RDB storages).
      create: False for read-only commands: a storage that does not exist yet is an error
        instead of being created, and no table is created in an existing database.

    Returns:
      An `RDBStorage` or a `JournalStorage`.

    Raises:
      ValueError: one line naming the URL and what was expected, when the URL is not a
        storage URL, its file or folder is missing, the file is not a database or journal,
        or the database driver is not installed.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"--storage {url!r}: expected a storage URL such as {_EXAMPLES}")
    scheme, _, rest = url.partition("://")
    if scheme == "journal":
        return _open_journal(url, _url_path(url, rest), create=create)
    if scheme == "sqlite":
        _check_sqlite(url, rest, create=create)
    elif scheme in ("postgresql", "postgres"):
        url = "postgresql+" + _postgres_driver(url) + "://" + rest
    return _open_rdb(url, heartbeat_s=heartbeat_s, create=create)


def _url_path(url: str, rest: str) -> pathlib.Path:
    if not rest.startswith("/") or rest == "/":
        raise ValueError(
            f"--storage {url!r}: expected three slashes and a file path, e.g. "
            "journal:///results/x/study.log (four for an absolute path)"
        )
    return pathlib.Path(rest[1:].split("?", 1)[0])


def _check_sqlite(url: str, rest: str, *, create: bool) -> None:
    if rest in ("", "/") or rest.startswith("/:memory:") or rest.startswith("/file:"):
        return  # in-memory and URI forms: nothing on disk to check
    path = _url_path(url, rest)
    if path.exists():
        if path.is_dir():
            raise ValueError(f"--storage {url!r}: {path} is a folder, expected a SQLite file")
        with path.open("rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
        if head and head != _SQLITE_MAGIC:
            raise ValueError(
                f"--storage {url!r}: {path} is not a SQLite database (it does not start "
                "with 'SQLite format 3')"
            )
        if not head and not create:
            raise ValueError(f"--storage {url!r}: {path} is empty; it holds no study")
    elif not create:
        raise ValueError(f"--storage {url!r}: {path}: no such file (nothing was created)")
    elif not path.parent.is_dir():
        raise ValueError(f"--storage {url!r}: folder {path.parent} does not exist")


def _postgres_driver(url: str) -> str:
    # SQLAlchemy maps a bare postgresql:// to one driver (psycopg2 in 2.0, psycopg in 2.1);
    # the [postgres] extra installs psycopg 3, so pick whichever is there.
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        try:
            __import__(module)
        except ImportError:
            continue
        return driver
    raise ValueError(
        f"--storage {_redact(url)}: no PostgreSQL driver is installed; expected psycopg "
        "(pip install 'mobisearch[postgres]')"
    )


def _redact(url: str) -> str:
    """The URL without its password."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{creds}{at}{host}"


def error_reason(e: BaseException) -> str:
    """The database's own message of a storage error, one line ("database or disk is full").

    optuna wraps some driver errors in `StorageInternalError`; the message is on the
    driver's exception (`orig`) somewhere down the chain of causes.
    """
    cause: BaseException | None = e
    while cause is not None:
        orig = getattr(cause, "orig", None)
        if orig is not None:
            return _first_line(orig)
        cause = cause.__cause__ or cause.__context__
    return _first_line(e)


def _is_creation_race(e: BaseException) -> bool:
    """Errors of two processes creating the same tables at once; a retry sees them made."""
    text = error_reason(e).lower()
    return any(
        s in text
        for s in ("already exists", "unique", "duplicate", "database is locked", "deadlock")
    )


def _open_rdb(url: str, *, heartbeat_s: int | None, create: bool) -> optuna.storages.RDBStorage:
    import sqlalchemy.exc

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Many processes write one file; wait for its lock instead of failing after 5 s.
        engine_kwargs["connect_args"] = {"timeout": 60}
    grace = None if heartbeat_s is None else GRACE_BEATS * heartbeat_s
    for attempt in range(20):
        try:
            with warnings.catch_warnings():
                # heartbeat_interval is "experimental" in optuna; the warning is noise here.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_s,
                    grace_period=grace,
                    skip_table_creation=not create,
                )
            if create:
                _claims_table().metadata.create_all(storage.engine)
            return storage
        except ImportError as e:
            cause = e.__cause__ or e
            raise ValueError(
                f"--storage {_redact(url)}: its database driver is not installed ({cause})"
            ) from None
        except sqlalchemy.exc.ArgumentError as e:
            raise ValueError(f"--storage {_redact(url)}: not a valid database URL ({e})") from None
        except (sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError) as e:
            if create and _is_creation_race(e) and attempt < 19:
                time.sleep(0.05 * (1 + attempt))
                continue
            reason = error_reason(e)
            if not create and ("no such table" in reason or "does not exist" in reason):
                reason = f"not an optuna study database ({reason})"
            raise ValueError(f"--storage {_redact(url)}: {reason}") from None
    raise AssertionError("unreachable")


def _first_line(e: object) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _open_journal(url: str, path: pathlib.Path, *, create: bool) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    if not path.exists():
        if not create:
            raise ValueError(f"--storage {url!r}: {path}: no such file (nothing was created)")
        if not path.parent.is_dir():
            raise ValueError(f"--storage {url!r}: folder {path.parent} does not exist")
    elif path.is_dir():
        raise ValueError(f"--storage {url!r}: {path} is a folder, expected a journal file")
    try:
        backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
        return JournalStorage(backend)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"--storage {url!r}: {path} is not an optuna journal ({_first_line(e)})"
        ) from None


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    """Close the database connections an RDB storage holds (a no-op for other storages)."""
    backend = _unwrap(storage)
    if isinstance(backend, optuna.storages.RDBStorage):
        backend.remove_session()
        backend.engine.dispose()


def storage_url(storage: str | optuna.storages.BaseStorage) -> str:
    """A printable name of a storage (its URL, or its journal file)."""
    if isinstance(storage, str):
        return _redact(storage)
    backend = _unwrap(storage)
    if isinstance(backend, optuna.storages.RDBStorage):
        return _redact(backend.url)
    path = _journal_path(backend)
    if path is not None:
        return f"journal:///{path}"
    return type(backend).__name__


def _unwrap(storage: optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    # optuna wraps an RDBStorage in a private cache; claims need the RDBStorage itself.
    from optuna.storages._cached_storage import _CachedStorage

    return storage._backend if isinstance(storage, _CachedStorage) else storage


def _journal_path(storage: optuna.storages.BaseStorage) -> pathlib.Path | None:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if isinstance(storage, JournalStorage):
        backend = getattr(storage, "_backend", None)
        if isinstance(backend, JournalFileBackend):
            return pathlib.Path(backend._file_path)
    return None


# --------------------------------------------------------------------------------------
# Claims


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """A job held by this worker.

    Attributes:
      key: the job key.
      token: unique to this claim; every later write names it (compare-and-set).
      owner: `host:pid` of the holder.
      took_over: the owner of the stale claim this one replaced, or None.
    """

    key: str
    token: str
    owner: str
    took_over: str | None = None


class Claims:
    """Exactly-once ownership of jobs of one study (see the module docstring).

    Args:
      grace_s: a claim not beaten for this long is stale and may be taken over.
    """

    def __init__(self, grace_s: float) -> None:
        if not grace_s > 0:
            raise ValueError(f"`grace_s` (={grace_s}) must be > 0")
        self.grace_s = float(grace_s)
        self.owner = worker_id()

    def claim(self, key: str) -> Claim | None:
        """Take `key` if no one holds it or its holder stopped beating; else None."""
        raise NotImplementedError

    def beat(self, claim: Claim) -> bool:
        """Renew `claim`; False if it was taken over (or released)."""
        raise NotImplementedError

    def release(self, claim: Claim) -> None:
        """Give `claim` up (a no-op if it was taken over)."""
        raise NotImplementedError

    def held(self) -> dict[str, tuple[str, float]]:
        """`{key: (owner, seconds since its last beat)}` of every claim, stale or not."""
        raise NotImplementedError

    def _new(self, key: str, took_over: str | None = None) -> Claim:
        return Claim(key=key, token=uuid.uuid4().hex, owner=self.owner, took_over=took_over)


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@functools.cache
def _claims_table() -> sqlalchemy.Table:
    import sqlalchemy as sa

    return sa.Table(
        "mobisearch_claims",
        sa.MetaData(),
        sa.Column("study_id", sa.Integer, primary_key=True),
        # Keys can be long (a whole architecture); the primary key is their hash.
        sa.Column("key_sha256", sa.String(64), primary_key=True),
        sa.Column("job_key", sa.Text, nullable=False),
        sa.Column("token", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("beat_s", sa.Float(precision=53), nullable=False),
        sa.Column("grace_s", sa.Float(precision=53), nullable=False),
    )


class SqlClaims(Claims):
    """Claims in the `mobisearch_claims` table of an RDB storage's own database."""

    def __init__(self, engine: sqlalchemy.engine.Engine, study_id: int, grace_s: float) -> None:
        super().__init__(grace_s)
        import sqlalchemy as sa

        self._sa = sa
        self._engine = engine
        self._study_id = study_id
        self._t = _claims_table()
        # The database's clock, in seconds since the epoch (server side: hosts may differ).
        now_sql = {
            "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
            "postgresql": "EXTRACT(EPOCH FROM clock_timestamp())",
            "mysql": "UNIX_TIMESTAMP(NOW(6))",
            "mariadb": "UNIX_TIMESTAMP(NOW(6))",
        }.get(engine.dialect.name)
        self._now: Any = sa.literal_column(now_sql) if now_sql else None

    def _now_expr(self) -> Any:
        return self._now if self._now is not None else self._sa.literal(time.time())

    def _where(self, key: str) -> Any:
        return self._sa.and_(
            self._t.c.study_id == self._study_id, self._t.c.key_sha256 == _sha256(key)
        )

    def claim(self, key: str) -> Claim | None:
        sa = self._sa
        for _ in range(3):
            new = self._new(key)
            try:
                with self._engine.begin() as con:
                    con.execute(
                        sa.insert(self._t).values(
                            study_id=self._study_id,
                            key_sha256=_sha256(key),
                            job_key=key,
                            token=new.token,
                            owner=new.owner,
                            beat_s=self._now_expr(),
                            grace_s=self.grace_s,
                        )
                    )
                return new
            except sa.exc.IntegrityError:
                pass  # held (maybe stale): try to take it over below
            with self._engine.begin() as con:
                row = con.execute(
                    sa.select(self._t.c.token, self._t.c.owner).where(self._where(key))
                ).first()
                if row is None:
                    continue  # released meanwhile: insert again
                took = self._new(key, took_over=row.owner)
                # One statement: of several workers taking over, exactly one matches.
                result = con.execute(
                    sa.update(self._t)
                    .where(
                        self._where(key),
                        self._t.c.token == row.token,
                        self._t.c.beat_s < self._now_expr() - self._t.c.grace_s,
                    )
                    .values(
                        token=took.token,
                        owner=took.owner,
                        beat_s=self._now_expr(),
                        grace_s=self.grace_s,
                    )
                )
                return took if result.rowcount == 1 else None
        return None

    def beat(self, claim: Claim) -> bool:
        sa = self._sa
        with self._engine.begin() as con:
            result = con.execute(
                sa.update(self._t)
                .where(self._where(claim.key), self._t.c.token == claim.token)
                .values(beat_s=self._now_expr())
            )
        return bool(result.rowcount == 1)

    def release(self, claim: Claim) -> None:
        sa = self._sa
        with self._engine.begin() as con:
            con.execute(
                sa.delete(self._t).where(self._where(claim.key), self._t.c.token == claim.token)
            )

    def held(self) -> dict[str, tuple[str, float]]:
        sa = self._sa
        with self._engine.begin() as con:
            rows = con.execute(
                sa.select(
                    self._t.c.job_key, self._t.c.owner, self._now_expr() - self._t.c.beat_s
                ).where(self._t.c.study_id == self._study_id)
            ).all()
        return {k: (o, float(age)) for k, o, age in rows}


class FileClaims(Claims):
    """Claims of a journal-file study: a JSON file rewritten under an O_EXCL lock file."""

    def __init__(self, journal: pathlib.Path, study_id: int, grace_s: float) -> None:
        super().__init__(grace_s)
        from optuna.storages.journal import JournalFileOpenLock

        self.path = pathlib.Path(f"{journal}.claims.json")
        self._lock = JournalFileOpenLock(str(self.path))
        self._study = str(study_id)

    @contextlib.contextmanager
    def _table(self) -> Iterator[dict[str, dict[str, Any]]]:
        self._lock.acquire()
        try:
            try:
                doc = json.loads(self.path.read_text())
            except FileNotFoundError:
                doc = {}
            table = doc.setdefault(self._study, {})
            before = json.dumps(table, sort_keys=True)
            yield table
            if json.dumps(table, sort_keys=True) != before:
                tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.tmp")
                tmp.write_text(json.dumps(doc))
                tmp.replace(self.path)
        finally:
            self._lock.release()

    def claim(self, key: str) -> Claim | None:
        with self._table() as table:
            row = table.get(key)
            now = time.time()
            if row is None:
                new = self._new(key)
            elif now - row["beat_s"] > row["grace_s"]:
                new = self._new(key, took_over=row["owner"])
            else:
                return None
            table[key] = {
                "token": new.token,
                "owner": new.owner,
                "beat_s": now,
                "grace_s": self.grace_s,
            }
            return new

    def beat(self, claim: Claim) -> bool:
        with self._table() as table:
            row = table.get(claim.key)
            if row is None or row["token"] != claim.token:
                return False
            row["beat_s"] = time.time()
            return True

    def release(self, claim: Claim) -> None:
        with self._table() as table:
            row = table.get(claim.key)
            if row is not None and row["token"] == claim.token:
                del table[claim.key]

    def held(self) -> dict[str, tuple[str, float]]:
        with self._table() as table:
            now = time.time()
            return {k: (r["owner"], now - r["beat_s"]) for k, r in table.items()}


class LocalClaims(Claims):
    """Claims of an in-memory study (one process): a dict under a lock."""

    def __init__(self, grace_s: float) -> None:
        super().__init__(grace_s)
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, Any]] = {}

    def claim(self, key: str) -> Claim | None:
        with self._lock:
            row = self._rows.get(key)
            now = time.monotonic()
            if row is not None and now - row["beat_s"] <= self.grace_s:
                return None
            new = self._new(key, took_over=None if row is None else row["owner"])
            self._rows[key] = {"token": new.token, "owner": new.owner, "beat_s": now}
            return new

    def beat(self, claim: Claim) -> bool:
        with self._lock:
            row = self._rows.get(claim.key)
            if row is None or row["token"] != claim.token:
                return False
            row["beat_s"] = time.monotonic()
            return True

    def release(self, claim: Claim) -> None:
        with self._lock:
            row = self._rows.get(claim.key)
            if row is not None and row["token"] == claim.token:
                del self._rows[claim.key]

    def held(self) -> dict[str, tuple[str, float]]:
        with self._lock:
            now = time.monotonic()
            return {k: (r["owner"], now - r["beat_s"]) for k, r in self._rows.items()}


_LOCAL: dict[int, LocalClaims] = {}


def claims_for(study: optuna.Study, *, heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> Claims:
    """The claim store of `study`'s storage, with a grace of `GRACE_BEATS * heartbeat_s`.

    Raises:
      ValueError: for a storage that cannot hold claims shared between processes (a
        journal on Redis or a gRPC proxy).
    """
    grace_s = GRACE_BEATS * heartbeat_s
    storage = _unwrap(study._storage)
    study_id = study._study_id
    if isinstance(storage, optuna.storages.RDBStorage):
        return SqlClaims(storage.engine, study_id, grace_s)
    journal = _journal_path(storage)
    if journal is not None:
        return FileClaims(journal, study_id, grace_s)
    if isinstance(storage, optuna.storages.InMemoryStorage):
        return _LOCAL.setdefault(id(storage), LocalClaims(grace_s))
    raise ValueError(
        f"{type(storage).__name__}: cannot share work between processes; use an RDB storage "
        f"or a journal file ({_EXAMPLES})"
    )


class Heartbeat:
    """Beat a claim every `interval_s` from a thread while the job runs.

    With `watch(trial_id)`, optuna's own trial heartbeat is recorded too (RDB storages
    created with `heartbeat_s`). `lost` is set once the claim was found taken over.

    Args:
      claims: the claim store.
      claim: the claim to beat.
      interval_s: seconds between beats.
      storage: the study's storage, for optuna's trial heartbeat.
    """

    def __init__(
        self,
        claims: Claims,
        claim: Claim,
        interval_s: float,
        storage: optuna.storages.BaseStorage | None = None,
    ) -> None:
        self.claims, self.claim, self.interval_s = claims, claim, interval_s
        self._storage = storage
        self._trial_id: int | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mobisearch-heartbeat", daemon=True)

    def watch(self, trial_id: int) -> None:
        """Also beat optuna's heartbeat of `trial_id` (now, then with every beat)."""
        self._trial_id = trial_id
        self._beat_trial()

    def _beat_trial(self) -> None:
        from optuna.storages._heartbeat import is_heartbeat_enabled

        storage = self._storage
        if self._trial_id is None or storage is None or not is_heartbeat_enabled(storage):
            return
        storage.record_heartbeat(self._trial_id)  # type: ignore[attr-defined]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.claims.beat(self.claim):
                    self.lost.set()
                    return
                self._beat_trial()
            except Exception:  # noqa: BLE001 (a database hiccup: try again next beat)
                continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def fail_stale_trials(study: optuna.Study) -> None:
    """optuna's `fail_stale_trials`: fail RUNNING trials whose heartbeat stopped (RDB)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
