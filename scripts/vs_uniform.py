"""The per-stage search's best network against the best uniformly scaled one, fully trained.

Usage:
    python scripts/vs_uniform.py \
        --searched sqlite:///results/small/search/study.db \
                   sqlite:///results/fashion_mnist_stages/study.db \
        --uniform sqlite:///results/fashion_mnist_grid/study.db \
        --budgets 3M 15M --seeds 0 1 2 --epochs 10

At each budget (MACs), the most accurate finished candidate within it of each study (the
per-stage search given for that budget, or the one given for all budgets, and the uniform
width × resolution × kernel grid searched with the same recipe) is trained fully with
`mobisearch train` (the documented full-training recipe), once per seed, and their test
accuracies compared: mean ± standard deviation over the seeds, with MACs, parameters and the
search's latency.

Writes `<out>/vs_uniform.csv` (a row per budget, network and seed) and
`<out>/vs_uniform.json` (per budget: both networks, their mean and std test accuracy, and
the difference in points).
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

from mobisearch import results
from mobisearch.cost import format_count, parse_count
from mobisearch.latency import device_fingerprint


def train_fully(arch: dict[str, Any], space: str, epochs: int, seed: int) -> dict[str, Any]:
    """`mobisearch train --json` of one architecture dict, in a subprocess."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"arch": arch}, f)
    command = [
        sys.executable, "-m", "mobisearch.cli", "train", "--config", f.name, "--space",
        space, "--epochs", str(epochs), "--seed", str(seed), "--json",
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--searched",
        nargs="+",
        required=True,
        help="storage of the per-stage search: one for all budgets, or one per budget",
    )
    parser.add_argument("--uniform", required=True, help="storage of the uniform grid search")
    parser.add_argument("--space", default="fashion_mnist_stages", help="recipe and data")
    parser.add_argument("--budgets", nargs="+", type=parse_count, default=[3_000_000, 15_000_000])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out-dir", type=Path, default=Path("results/vs_uniform"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    if len(args.searched) not in (1, len(args.budgets)):
        parser.error("--searched takes one storage, or one per budget")
    searched = args.searched * len(args.budgets) if len(args.searched) == 1 else args.searched

    def candidates(storage: str) -> list[dict[str, Any]]:
        return results.candidate_records(results.trial_records(results.load_study(storage)))

    rows, summary = [], {"command": command, "epochs": args.epochs, "seeds": args.seeds}
    summary["machine"] = device_fingerprint(1)["processor"]
    # A network that is the best at two budgets trains once per seed.
    trained: dict[tuple[str, int], dict[str, Any]] = {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for budget, storage in zip(args.budgets, searched, strict=True):
        entry: dict[str, Any] = {"searched_storage": storage}
        pair = (("searched", candidates(storage)), ("uniform", candidates(args.uniform)))
        for kind, records in pair:
            best = results.best_record(records, max_macs=budget)
            accs = []
            for seed in args.seeds:
                key = (best["display_id"], seed)
                if key not in trained:
                    trained[key] = train_fully(best["arch"], args.space, args.epochs, seed)
                full = trained[key]
                accs.append(full["test_accuracy"])
                row = {
                    "budget_macs": budget,
                    "network": kind,
                    "display_id": best["display_id"],
                    "macs": best["macs"],
                    "params": best["params"],
                    "latency_ms": best["latency_ms"],
                    "search_score": best["val_accuracy"],
                    "seed": seed,
                    "test_accuracy": full["test_accuracy"],
                    "train_s": full["train_s"],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                with (args.out_dir / "vs_uniform.csv").open("w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)
            entry[kind] = {
                "display_id": best["display_id"],
                "arch": best["arch"],
                "macs": best["macs"],
                "params": best["params"],
                "latency_ms": best["latency_ms"],
                "test_accuracy_mean": float(np.mean(accs)),
                "test_accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
            }
        s, u = entry["searched"], entry["uniform"]
        entry["difference_points"] = 100 * (s["test_accuracy_mean"] - u["test_accuracy_mean"])
        entry["macs_ratio"] = s["macs"] / u["macs"]
        entry["latency_ratio"] = s["latency_ms"] / u["latency_ms"]
        summary[format_count(budget)] = entry
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    (args.out_dir / "vs_uniform.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "command"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
