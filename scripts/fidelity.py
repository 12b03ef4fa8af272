"""How well a search's scores rank candidates against full training: Kendall τ and Spearman.

Usage:
    python scripts/fidelity.py --storage sqlite:///results/fashion_mnist_stages/study.db \
        --candidates 12 --epochs 10

Takes the `--candidates` best candidates of a finished multi-fidelity search (by
non-dominated sorting of the scores and latencies the search ranked them by: the frontier
first, then the fronts behind it), and for each of them:

1. trains it fully with `mobisearch train --config <arch> --epochs E` (a subprocess, the
   documented full-training recipe) and reads its test accuracy: the ground truth;
2. scores it with every proxy on the same data: the old 100-step recipe of
   `search_spaces/fashion_mnist.toml` (cosine decay within 100 steps), each rung of the
   search's multi-fidelity run with the learning rate decayed (rungs on one run, as
   promotion `continue` trains them), and each rung's stable-phase state before its decay
   branch (the same run, not decayed);
3. and records the search's own final score (its highest rung).

Writes `<out>/fidelity.csv` (a row per candidate) and `<out>/fidelity.json` (`n`,
`kendall_tau` and `spearman` of the search's final score against the full-training test
accuracy, the same for every proxy with the seconds each proxy cost, and two references:
the full training's own validation accuracy, and MACs alone). `--resummarize` recomputes
the JSON from an existing CSV without training.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from mobisearch.runtime import inline_cpu_dispatch

inline_cpu_dispatch()

from mobisearch import results  # noqa: E402
from mobisearch.arch import ArchSpec  # noqa: E402
from mobisearch.cli import _load_data  # noqa: E402
from mobisearch.compile import compile_forward  # noqa: E402
from mobisearch.fidelity import RungTrainer  # noqa: E402
from mobisearch.latency import device_fingerprint  # noqa: E402
from mobisearch.pareto import rank_points  # noqa: E402
from mobisearch.space import load_space, resolve_space_path  # noqa: E402
from mobisearch.train import _evaluate, prepare_images, train_and_evaluate  # noqa: E402


def pick(study_records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The `n` best candidates: the frontier, then the fronts behind it."""
    ok = [r for r in results.candidate_records(study_records) if r["state"] == "COMPLETE"]
    values = np.array([[r["val_accuracy"], r["latency_ms"]] for r in ok])
    order = rank_points(values, ["maximize", "minimize"])
    return [ok[i] for i in order[:n]]


def full_training(arch: ArchSpec, space_path: str, epochs: int, seed: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"arch": arch.to_dict()}, f)
    command = [
        sys.executable, "-m", "mobisearch.cli", "train", "--config", f.name, "--space",
        space_path, "--epochs", str(epochs), "--seed", str(seed), "--json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    os.unlink(f.name)
    return json.loads(done.stdout.strip().splitlines()[-1])


def correlation(score: list[float], truth: list[float]) -> dict[str, float]:
    tau = stats.kendalltau(score, truth)
    rho = stats.spearmanr(score, truth)
    return {
        "kendall_tau": round(float(tau.statistic), 4),
        "kendall_p": float(tau.pvalue),
        "spearman": round(float(rho.statistic), 4),
    }


def calibrated_scores(rows: list[dict[str, Any]]) -> list[float]:
    """Each candidate's highest-rung score lifted to the top rung by the mean gain per rung.

    The gain from rung r to r+1 is averaged over the candidates the search promoted past r
    (their scores at both rungs), so scores of different rungs become comparable.
    """
    scores = []
    for r in rows:
        top = int(r["search_rung"])
        by_rung = {q: r[f"rung{q}_score"] for q in range(top) if f"rung{q}_score" in r}
        scores.append({**by_rung, top: r["search_score"]})
    top_rung = max(max(s) for s in scores)
    gain = {
        q: float(np.mean([s[q + 1] - s[q] for s in scores if q in s and q + 1 in s] or [0.0]))
        for q in range(top_rung)
    }
    return [s[max(s)] + sum(gain[q] for q in range(max(s), top_rung)) for s in scores]


def summarize(
    rows: list[dict[str, Any]], *, command: str, epochs: int, start: float
) -> dict[str, Any]:
    """τ and Spearman of the search's score and of every proxy against the full training."""
    truth = [r["full_test_accuracy"] for r in rows]
    summary: dict[str, Any] = {
        "command": command,
        "n": len(rows),
        "epochs": epochs,
        "candidates": [r["display_id"] for r in rows],
        "machine": device_fingerprint(1)["processor"],
        **correlation([r["search_score"] for r in rows], truth),
        "proxies": {},
    }
    for key in rows[0]:
        if key.endswith("_score") and key != "search_score":
            name = key.removesuffix("_score")
            cost = np.mean([r.get(f"{name}_s", np.nan) for r in rows])
            summary["proxies"][name] = {
                **correlation([r[key] for r in rows], truth),
                "mean_seconds": None if np.isnan(cost) else round(float(cost), 1),
            }
    # What no proxy can be expected to beat: the full training's own validation accuracy
    # against its test accuracy (the noise of a 5,000-image split at these small gaps), and
    # what a proxy must beat to be worth its seconds: ranking by MACs alone.
    summary["references"] = {
        "search_calibrated": correlation(calibrated_scores(rows), truth),
        "full_val": correlation([r["full_val_accuracy"] for r in rows], truth),
        "macs": correlation([r["macs"] for r in rows], truth),
    }
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    return summary


def resummarize(out_dir: Path) -> dict[str, Any]:
    """The summary of an earlier run recomputed from its `fidelity.csv`, without training."""
    with (out_dir / "fidelity.csv").open() as f:
        rows = [
            {k: v if k == "display_id" else float(v) for k, v in r.items()}
            for r in csv.DictReader(f)
        ]
    old = json.loads((out_dir / "fidelity.json").read_text())
    summary = summarize(rows, command=old["command"], epochs=old["epochs"], start=0.0)
    summary["wall_s"] = old["wall_s"]
    return summary


def write(rows: list[dict[str, Any]], summary: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "fidelity.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "fidelity.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="the finished search (required unless --resummarize)")
    parser.add_argument("--study-name")
    parser.add_argument("--space", default="fashion_mnist_stages")
    parser.add_argument("--proxy-space", default="fashion_mnist")
    parser.add_argument("--candidates", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rungs", type=int, help="re-score only the first N rungs (default: all)")
    parser.add_argument("--out-dir", type=Path, default=Path("results/fidelity"))
    parser.add_argument(
        "--resummarize", action="store_true", help="recompute <out>/fidelity.json from its CSV"
    )
    args = parser.parse_args(argv)
    if args.resummarize:
        redone = resummarize(args.out_dir)
        (args.out_dir / "fidelity.json").write_text(json.dumps(redone, indent=2) + "\n")
        print(json.dumps(redone, indent=2))
        return 0
    if not args.storage:
        parser.error("--storage is required")
    start = time.perf_counter()
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    study = results.load_study(args.storage, args.study_name)
    picked = pick(results.trial_records(study), args.candidates)
    space = load_space(resolve_space_path(args.space))
    proxy_space = load_space(resolve_space_path(args.proxy_space))
    assert space.train is not None and space.fidelity is not None and proxy_space.train
    data = _load_data(space, None)
    stats_ = None
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for i, rec in enumerate(picked):
        arch = ArchSpec.from_dict(rec["arch"], source=f"trial {rec['number']}")
        print(f"[{i + 1}/{len(picked)}] {arch.display_id}", flush=True)
        row: dict[str, Any] = {
            "display_id": arch.display_id,
            "macs": rec["macs"],
            "params": rec["params"],
            "latency_ms": rec["latency_ms"],
            "search_rung": rec.get("rung", 0),
            "search_score": rec["val_accuracy"],
        }
        t0 = time.perf_counter()
        proxy = train_and_evaluate(arch, proxy_space.train, data, seed=0)
        row["proxy100_score"], row["proxy100_s"] = proxy.val_accuracy, time.perf_counter() - t0
        # Promoted candidates go on from their stable-phase state ("continue"). Training
        # again from step 0 ("restart") reaches the same state bit for bit (the stable phase
        # is deterministic: tests/test_fidelity.py), so it ranks identically and costs more:
        # its seconds are estimated from the continued run's steps.
        with tempfile.TemporaryDirectory() as ckpt:
            trainer = RungTrainer(space.fidelity, space.train, data, checkpoint_dir=ckpt)
            stats_ = trainer.stats
            plan, spent = trainer.plan, 0.0
            for r in range(min(args.rungs or len(plan.steps), len(plan.steps))):
                t0 = time.perf_counter()
                res = trainer.train_rung(arch, r, seed=0)
                spent += time.perf_counter() - t0
                row[f"rung{r}_score"] = res.val_accuracy
                row[f"rung{r}_s"] = spent
                row[f"restart_rung{r}_s"] = (
                    spent
                    / sum(
                        s - (plan.stable_end(q - 1) if q else 0)
                        for q, s in enumerate(plan.steps[: r + 1])
                    )
                    * plan.steps[r]
                )
                # The stable-phase state this rung branched from, scored without the decay.
                stable = trainer._stable_state(arch, 0, r)
                assert stable is not None
                x_val = prepare_images(data.x_val, arch.resolution, stats_)
                n = min(space.train.eval_batch_size, len(x_val))
                fwd = compile_forward(arch, trainer.backend, n)
                row[f"stable_rung{r}_score"] = _evaluate(
                    fwd, n, (stable.params, stable.rest), x_val, data.y_val
                )[0]
        full = full_training(arch, space.path, args.epochs, seed=0)
        row["full_test_accuracy"], row["full_val_accuracy"] = (
            full["test_accuracy"],
            full["val_accuracy"],
        )
        row["full_train_s"] = full["train_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        # Written after every candidate: a run stopped early keeps what it measured.
        summary = summarize(rows, command=command, epochs=args.epochs, start=start)
        write(rows, summary, args.out_dir)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
