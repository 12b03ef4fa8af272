"""The `mobisearch` command, end to end, on the real Fashion-MNIST files."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from mobisearch.cli import main
from mobisearch.cost import count_cost
from mobisearch.presets import mobilenet_v1
from mobisearch.space import load_space, resolve_space_path

ROOT = pathlib.Path(__file__).resolve().parents[1]
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(
    not FASHION.exists() and not os.environ.get("CI"),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)",
)


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "mobisearch.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


# --- cost --------------------------------------------------------------------------------


def test_cost_json_matches_the_cost_model(capsys) -> None:  # type: ignore[no-untyped-def]
    assert (
        main(["cost", "--width", "0.5", "--resolution", "160", "--kernel-size", "3", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    cost = count_cost(mobilenet_v1(0.5, 160, 3))
    assert out["macs"] == cost.macs and out["params"] == cost.params
    assert out["display_id"] == "mnv1_w050_r160_k3"


def test_cost_json_classes_and_channels(capsys) -> None:  # type: ignore[no-untyped-def]
    main(["cost", "--classes", "10", "--in-channels", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == count_cost(mobilenet_v1(num_classes=10, in_ch=1)).params
    assert out["params"] != count_cost(mobilenet_v1()).params


def test_cost_table(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["cost"]) == 0
    out = capsys.readouterr().out
    assert "blocks/12/pw" in out and "head" in out
    assert "568,740,352 MACs" in out and "4,253,864 params" in out


def test_cost_space_with_budget(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["cost", "--space", "mobilenet_v1_paper", "--budget", "150M", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    space = load_space(resolve_space_path("mobilenet_v1_paper"))
    expected = [a for a in space.candidates() if count_cost(a).macs <= 150_000_000]
    assert len(rows) == len(expected) > 0
    assert [r["macs"] for r in rows] == sorted(r["macs"] for r in rows)
    assert all(r["macs"] <= 150_000_000 for r in rows)
    assert {"params", "peak_activation_bytes"} <= set(rows[0])


def test_cost_per_stage_space(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = ["cost", "--space", "fashion_mnist_stages", "--budget", "3M", "--samples", "2K"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("fashion_mnist_stages.toml: 2.6e9 candidates (2,624,400,000)")
    assert lines[1].startswith("within 3M MACs: about ")
    assert "95% CI" in lines[1] and "of 2,000 sampled with seed 0" in lines[1]
    assert lines[2].startswith("MACs of the sampled ones: ") and "MACs histogram:" in lines
    plot = tmp_path / "fit.png"
    assert main([*args, "--max-params", "100K", "--json", "--plot", str(plot)]) == 0
    out = capsys.readouterr()
    record = json.loads(out.out)
    assert record["size"] == 2_624_400_000 and record["evaluated"] == 2000
    assert record["max_params"] == 100_000 and record["params_range"][1] <= 100_000
    assert record["ci95"][0] <= record["estimate"] <= record["ci95"][1]
    assert plot.read_bytes()[:4] == b"\x89PNG" and "wrote" in out.err


def test_cost_grid_space_text(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["cost", "--space", "quick", "--budget", "300K"]) == 0
    out = capsys.readouterr().out
    assert "3 of 4 candidates of" in out  # the table of every candidate, as before
    assert "within 300K MACs: 3 of 4 candidates (75.00%, exact)" in out


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("kernel = [3, 5, 7]", "kernel = [3, 4]", "axes.stages.kernel[1] = 4, expected an odd"),
        ("[axes.stages.4]", "[axes.stages.5]", "axes.stages.5: no such stage; expected a stage"),
        ("depth = 6 ", "depth = 0 ", "axes.stages.3.depth = 0, expected an integer"),
    ],
)
def test_bad_per_stage_value_exits_2(tmp_path, old, new, needle) -> None:  # type: ignore[no-untyped-def]
    text = (ROOT / "search_spaces" / "fashion_mnist_stages.toml").read_text()
    assert old in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(old, new, 1))
    proc = run_cli("cost", "--space", str(bad), timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"mobisearch cost: error: {bad}: {needle}"), line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["cost", "--space", "no/such/file.toml"], "no/such/file.toml"),
        (["cost", "--width", "-1"], "width"),
        (["cost", "--kernel-size", "4"], "kernel"),
        (["cost", "--budget", "abc"], "abc"),
        (["search", "--space", "mobilenet_v1_paper"], "only be costed"),
        (["search", "--space", "quick", "--budget", "1K"], "cheapest is quick_w025_r16_k3"),
        (["search", "--space", "quick", "--set", "train.stepz=3"], "train.stepz"),
        (["train", "--config", "missing.json"], "missing.json"),
        (["train", "--config", "x.json", "--epochs", "0"], "--epochs: '0': expected an integer"),
        (["train", "--config", "x.json", "--epochs", "-2"], "--epochs: '-2'"),
        (["search", "--space", "quick", "--latency-batch", "0"], "--latency-batch: '0'"),
        (["search", "--space", "quick", "--latency-batch", "-3"], "--latency-batch: '-3'"),
        (["search", "--space", "quick", "--heartbeat-s", "0"], "--heartbeat-s: '0'"),
        (["search", "--space", "quick", "--storage", "notaurl"], "'notaurl': expected a storage"),
        (["best", "--storage", "notaurl"], "'notaurl': expected a storage URL"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, needle) -> None:  # type: ignore[no-untyped-def]
    proc = run_cli(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _one_line_exit_2(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(
    ("command", "storage", "needle"),
    [
        ("search", "sqlite:///{d}/missing/study.db", "folder {d}/missing does not exist"),
        ("search", "sqlite:///{d}/notes.txt", "is not a SQLite database"),
        ("search", "journal:///{d}/missing/study.log", "does not exist"),
        ("best", "sqlite:///{d}/missing.db", "no such file (nothing was created)"),
        ("plot", "sqlite:///{d}/missing.db", "no such file (nothing was created)"),
        ("best", "journal:///{d}/missing.log", "no such file (nothing was created)"),
        ("best", "sqlite:///{d}/best.json", "is not a SQLite database"),
        ("best", "{d}/best.json", "expected a storage URL"),
        ("best", "sqlite:///{d}/plain.db", "not an optuna study database"),
    ],
)
def test_bad_storage_exits_2_and_changes_nothing(tmp_path, command, storage, needle) -> None:  # type: ignore[no-untyped-def]
    d = str(tmp_path)
    (tmp_path / "notes.txt").write_text("not a database\n")
    (tmp_path / "best.json").write_text('{"arch": {}}\n')
    with sqlite3.connect(tmp_path / "plain.db") as con:
        con.execute("create table t (x)")
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    out = ["--out-dir", str(tmp_path / "out")] if command == "search" else []
    proc = run_cli(
        command, "--space", "quick", "--storage", storage.format(d=d), *out, timeout=120
    )
    _one_line_exit_2(proc, needle.format(d=d))
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing created


def test_postgres_url_without_a_driver(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """As on a machine without the [postgres] extra: both drivers hidden from imports."""
    code = (
        "import sys; sys.modules['psycopg'] = sys.modules['psycopg2'] = None; "
        "from mobisearch.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "best", "--storage", "postgresql://u:pw@127.0.0.1:1/db"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    _one_line_exit_2(proc, "pip install 'mobisearch[postgres]'")
    assert "pw" not in proc.stderr


@needs_fashion
def test_read_only_and_full_storage_exit_2(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A read-only study and a full disk: one line, exit 2, the stored study intact."""
    import optuna

    from mobisearch import workers

    db = tmp_path / "study.db"
    storage = workers.open_storage(f"sqlite:///{db}")
    optuna.create_study(storage=storage, study_name="earlier").add_trial(
        optuna.trial.create_trial(value=1.0)
    )
    workers.close_storage(storage)
    size = db.stat().st_size

    def unchanged() -> None:
        # The earlier study is intact (a study the search managed to create may remain,
        # empty; a rerun with disk space resumes it).
        storage = workers.open_storage(f"sqlite:///{db}", create=False)
        (trial,) = optuna.load_study(study_name="earlier", storage=storage).trials
        assert trial.value == 1.0
        workers.close_storage(storage)

    read_only = f"sqlite:///file:{db}?mode=ro&uri=true"
    proc = run_cli("search", "--space", "quick", "--storage", read_only, "--out-dir",
                   str(tmp_path / "out"), "--quiet", timeout=300)  # fmt: skip
    _one_line_exit_2(proc, "readonly database")
    unchanged()

    # No file may grow, as a full disk does to SQLite. The limit is set in the child itself:
    # a `preexec_fn` would fork this process, which has JAX's threads running.
    full_disk = (
        "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size}, {size})); "
        "sys.argv = ['mobisearch', *sys.argv[1:]]; "
        "runpy.run_module('mobisearch.cli', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", full_disk, "search", "--space", "quick", "--storage",
         f"sqlite:///{db}", "--out-dir", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    _one_line_exit_2(proc, f"sqlite:///{db}")
    unchanged()


@needs_fashion
def test_data_dir_missing_its_test_files_is_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for f in FASHION.parent.glob("train-*"):
        (tmp_path / f.name).symlink_to(f)
    proc = run_cli("search", "--space", "quick", "--data-dir", str(tmp_path), "--out-dir",
                   str(tmp_path / "out"), timeout=120)  # fmt: skip
    _one_line_exit_2(proc, "but not t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte")
    assert not (tmp_path / "out").exists()


def test_a_search_where_every_candidate_failed_exits_1(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from mobisearch import cli, search

    space = load_space(resolve_space_path("quick"))
    plan = search.plan_search(space)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = search.open_or_create_study(url, "s", search.study_fingerprint(space))
    diverged = {"status": "diverged", "reason": "loss became nan at step 3"}
    search.run_search(study, plan, lambda arch: diverged)
    assert cli._check_some_finished(study, plan) == 1
    err = capsys.readouterr().err
    assert "no candidate finished (4 of 4 failed)" in err and "loss became nan" in err
    assert len(err.strip().splitlines()) == 1
    other = search.open_or_create_study(url, "t", search.study_fingerprint(space))
    search.run_search(other, plan, lambda a: {"status": "ok", "val_accuracy": 1, "latency_ms": 1})
    assert cli._check_some_finished(other, plan) == 0


def test_bad_toml_names_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.toml"
    bad.write_text("[axes\nwidth = [")
    proc = run_cli("cost", "--space", str(bad), timeout=60)
    assert proc.returncode == 2
    assert "bad.toml" in proc.stderr and "Traceback" not in proc.stderr


# --- search, plot, best, train on real data ----------------------------------------------


@pytest.fixture(scope="module")
def searched(tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("search")
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/search.py",
            "--space",
            "quick",
            "--out-dir",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


@needs_fashion
def test_search_end_to_end(searched) -> None:  # type: ignore[no-untyped-def]
    out, stdout = searched
    assert "4 candidates, 4 within the budget" in stdout
    with sqlite3.connect(out / "study.db") as db:
        states = [s for (s,) in db.execute("select state from trials")]
    assert states == ["COMPLETE"] * 4
    import csv

    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for r in rows:
        assert 0.0 <= float(r["val_accuracy"]) <= 1.0
        assert float(r["latency_ms"]) > 0 and float(r["latency_p90_ms"]) >= float(r["latency_ms"])
        assert float(r["compile_s"]) > 0 and float(r["train_s"]) > 0
        assert r["device"] == "cpu" and r["seed"] == "0"
    front = json.loads((out / "frontier.json").read_text())
    assert 1 <= len(front) <= 4
    assert all(0.0 <= f["test_accuracy"] <= 1.0 for f in front)
    # Only frontier members were evaluated on the test split.
    assert sum(1 for r in rows if r["test_accuracy"]) == len(front)
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    best = json.loads((out / "best.json").read_text())
    assert best["metrics"]["val_accuracy"] == max(float(r["val_accuracy"]) for r in rows)


@needs_fashion
def test_best_and_rebuild(searched, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import jax.numpy as jnp
    from flax import nnx

    import mobisearch
    from mobisearch.models import build_model, state_size

    out, _ = searched
    fastest = min(json.loads((out / "frontier.json").read_text()), key=lambda r: r["latency_ms"])
    proc = run_cli(
        "best", "--space", "quick", "--out-dir", str(out), "--json",
        "--max-latency-ms", str(fastest["latency_ms"]), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    arch = mobisearch.ArchSpec.from_dict(json.loads(proc.stdout))
    assert arch.display_id == fastest["display_id"]
    assert (
        mobisearch.load_best(f"sqlite:///{out / 'study.db'}", max_latency_ms=fastest["latency_ms"])
        == arch
    )
    assert (
        mobisearch.load_best(out / "best.json").display_id
        == json.loads((out / "best.json").read_text())["arch"]["display_id"]
    )
    model = build_model(arch, rngs=nnx.Rngs(0))
    assert state_size(model) == count_cost(arch).params
    model.eval()
    assert model(jnp.zeros((2, arch.resolution, arch.resolution, 1))).shape == (2, 10)


@needs_fashion
def test_plot_command(searched, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, _ = searched
    proc = run_cli(
        "plot", "--space", "quick", "--out-dir", str(out), "--output", str(tmp_path / "p.png")
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@needs_fashion
def test_train_command(searched) -> None:  # type: ignore[no-untyped-def]
    out, _ = searched
    proc = run_cli(
        "train", "--config", str(out / "best.json"), "--space", "quick", "--epochs", "1", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["steps"] == 2000 // 64
    assert 0.0 <= record["test_accuracy"] <= 1.0


@needs_fashion
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_interrupted_search_resumes_without_retraining(tmp_path, sig) -> None:  # type: ignore[no-untyped-def]
    """Kill (or Ctrl-C) a real search once a candidate has finished; the rerun completes
    the rest without training a finished candidate again."""
    args = [
        sys.executable,
        "scripts/search.py",
        "--space",
        "quick",
        "--out-dir",
        str(tmp_path),
        "--quiet",
        # 2-4 s of training per candidate, so the search is still running when the first
        # candidate's result appears (20 steps took well under a second once compiled).
        "--set",
        "train.steps=400",
        # A killed worker's candidate is taken over once it missed 3 beats of 1 s.
        "--heartbeat-s",
        "1",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    db = tmp_path / "study.db"

    def complete() -> list[str]:
        if not db.exists():
            return []
        with sqlite3.connect(db) as con:
            try:
                rows = con.execute(
                    "select a.value_json from trials t join trial_user_attributes a "
                    "on a.trial_id = t.trial_id "
                    "where t.state = 'COMPLETE' and a.key = 'display_id'"
                ).fetchall()
            except sqlite3.OperationalError as e:
                # The file exists before optuna has created its tables.
                if "no such table" in str(e):
                    return []
                raise
        return [v for (v,) in rows]

    try:
        deadline = time.monotonic() + 300
        while not complete() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # a failed wait must not leave the search running
            proc.kill()
            proc.wait()
    # Ctrl-C ends cleanly with status 130, the running trial marked "interrupted".
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    finished = complete()
    assert 1 <= len(finished) < 4, "the search finished before it could be killed"

    rerun = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    after = complete()
    assert sorted(set(after)) == sorted(after) and len(after) == 4  # each candidate once
    assert set(finished) <= set(after)


# --- many workers ------------------------------------------------------------------------


@needs_fashion
def test_workers_on_separate_machines_all_finish(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """3 real `mobisearch search` workers share one study but not their --out-dir (as on 3
    machines): each candidate is trained once, every worker finishes with complete exports,
    and each frontier member is evaluated on the test split by the worker holding its
    checkpoint; a later rerun (nothing to train) exports every test accuracy."""
    import csv

    storage = f"sqlite:///{tmp_path / 'shared.db'}"

    def worker(i: int) -> list[str]:
        return [sys.executable, "scripts/search.py", "--space", "quick", "--storage", storage,
                "--out-dir", str(tmp_path / f"m{i}"), "--quiet", "--heartbeat-s", "1"]  # fmt: skip

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            worker(i), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for i in range(3)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    with sqlite3.connect(tmp_path / "shared.db") as db:
        rows = db.execute(
            "select t.state, a.value_json from trials t join trial_user_attributes a "
            "on a.trial_id = t.trial_id where a.key = 'display_id'"
        ).fetchall()
    assert sorted(s for s, _ in rows) == ["COMPLETE"] * 4
    assert len({d for _, d in rows}) == 4  # each candidate once
    checkpoints = {p.name for p in tmp_path.glob("m*/checkpoints/*/*.msgpack")}
    assert len(checkpoints) == 4  # each written by the worker that trained it
    for i in range(3):
        out = tmp_path / f"m{i}"
        with (out / "trials.csv").open() as f:
            assert len(list(csv.DictReader(f))) == 4
        with (out / "failed_attempts.csv").open() as f:
            assert list(csv.DictReader(f)) == []
        assert (out / "best.json").exists() and (out / "pareto.png").exists()
        for r in json.loads((out / "frontier.json").read_text()):
            # Measured here or by another worker, or pending on the machine that holds it.
            mine = (out / "checkpoints" / "quick" / f"{r['display_id']}.msgpack").exists()
            assert r.get("test_accuracy") is not None or (not mine and r["checkpoint_host"])
    rerun = subprocess.run(worker(0), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    front = json.loads((tmp_path / "m0" / "frontier.json").read_text())
    assert front and all(0.0 <= r["test_accuracy"] <= 1.0 for r in front)
    with sqlite3.connect(tmp_path / "shared.db") as db:
        assert db.execute("select count(*) from trials").fetchone() == (4,)


# --- multi-fidelity searches -------------------------------------------------------------


def _multi_fidelity_search(
    out: pathlib.Path,
    args: list[str],
    *,
    rungs: list[int],
    noise: int,
    steps: list[int],
    resumed: list[int],
) -> None:
    """Run `mobisearch search ... --out-dir out` on the real files and check its study and
    exports: `rungs` candidates per rung trained to `steps`, each promoted one going on from
    step `resumed` (its stable-phase state of the rung below), `noise` re-runs with the
    next seed; then rerun it: the rerun trains nothing (no new trial)."""
    import csv

    from mobisearch import results

    command = ["search", *args, "--out-dir", str(out), "--quiet"]
    proc = run_cli(*command)
    assert proc.returncode == 0, proc.stderr[-3000:]
    storage = f"sqlite:///{out / 'study.db'}"
    study = results.load_study(storage)
    records = results.trial_records(study)
    done = [r for r in records if r["state"] == "COMPLETE"]
    per_rung = [
        sum(1 for r in done if r["rung"] == rung and r["role"] == "rung")
        for rung in range(len(rungs))
    ]
    assert per_rung == rungs
    reruns = [r for r in done if r["role"] == "noise"]
    assert len(reruns) == noise and all(r["seed"] == 1 for r in reruns)
    assert all((r["steps"], r["resumed_from"]) == (steps[r["rung"]], resumed[r["rung"]])
               for r in done)  # fmt: skip
    assert len(list((out / "checkpoints").glob("*/stable/*.run"))) >= rungs[0]

    # trials.csv: one row per candidate, its result at the highest rung it reached.
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == rungs[0]
    highest = {}
    for r in done:
        if r["role"] == "rung":
            highest[r["display_id"]] = max(highest.get(r["display_id"], 0), r["rung"])
    assert {row["display_id"]: int(row["rung"]) for row in rows} == highest
    assert sorted(int(row["rung"]) for row in rows).count(len(rungs) - 1) == rungs[-1]
    front = json.loads((out / "frontier.json").read_text())
    assert front and all(m["rung"] == highest[m["display_id"]] for m in front)
    assert all("distinct" in m for m in front)  # marked against the seeds' spread
    noise_json = json.loads((out / "noise.json").read_text())
    assert noise_json["validation_accuracy"]["n"] == noise
    assert (out / "best.json").exists() and (out / "pareto.png").exists()

    trials = len(study.trials)
    rerun = run_cli(*command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(results.load_study(storage).trials) == trials  # nothing trained again


@needs_fashion
def test_multi_fidelity_search_on_a_grid(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """quick.toml with rungs at 0.5, 1 and 2 epochs of 2,000 images at batch 64: 16, 31
    and 62 steps, decay branches of 3, 3 and 6; 4 candidates, 2, then 1; 3 noise re-runs."""
    args = ["--space", "quick", "--set", "fidelity.rungs=[0.5, 1, 2]"]
    _multi_fidelity_search(tmp_path, args, rungs=[4, 2, 1], noise=3, steps=[16, 31, 62],
                           resumed=[0, 16 - 3, 31 - 3])  # fmt: skip


@needs_fashion
@pytest.mark.slow
def test_multi_fidelity_search_on_a_per_stage_space(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """fashion_mnist_stages.toml on 1,000 images within 1M MACs: 4 candidates drawn by
    NSGA-II (population 2); rungs at 1/3, 1 and 3 epochs of batch 50: 7, 20 and 60 steps,
    decay branches of 1, 3 and 8."""
    args = [
        "--space", "fashion_mnist_stages", "--budget", "1M",
        "--set", "data.train_size=1000", "--set", "data.validation_size=500",
        "--set", "train.batch_size=50", "--set", "train.warmup_steps=2",
        "--set", "search.trials=4", "--set", "search.population=2",
        "--set", "fidelity.rungs=[0.3333, 1, 3]", "--set", "train.decay_fraction=0.2",
        "--set", "fidelity.eta=3", "--set", "fidelity.noise_candidates=2",
    ]  # fmt: skip
    _multi_fidelity_search(tmp_path, args, rungs=[4, 2, 1], noise=2, steps=[7, 20, 60],
                           resumed=[0, 7 - 1, 20 - 3])  # fmt: skip
