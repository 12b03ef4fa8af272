"""Which optuna sampler finds the better frontier for the same number of candidates.

Usage:
    python scripts/compare_samplers.py --samplers nsga2 tpe random --seeds 0 1 --trials 30

For each sampler and seed, runs `mobisearch search` on a per-stage space (default
`fashion_mnist_stages`, budget 20M MACs) with only the first rung of its recipe (every
drawn candidate trained 1/3 epoch and scored after its decay branch: no promotion, so the
samplers are compared on what they draw), then measures the frontier each found: the
hypervolume of (validation accuracy, latency) above a reference point shared by all runs
(accuracy 0.5; latency the largest measured in any run), and the best validation accuracy.

Writes `<out>/samplers.csv` (a row per run) and `<out>/samplers.json` (mean and std per
sampler).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mobisearch import results
from mobisearch.pareto import hypervolume_2d, pareto_mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="fashion_mnist_stages")
    parser.add_argument("--budget", default="20M")
    parser.add_argument("--max-params", help="parameter limit of every candidate")
    parser.add_argument("--samplers", nargs="+", default=["nsga2", "tpe", "random"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mobisearch-samplers"))
    parser.add_argument("--out-dir", type=Path, default=Path("results/samplers"))
    args = parser.parse_args(argv)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for sampler in args.samplers:
            out = args.work_dir / f"{sampler}-{seed}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh study, not a resumed one
            limit = ["--max-params", args.max_params] if args.max_params else []
            t0 = time.perf_counter()
            subprocess.run(
                [
                    sys.executable, "-m", "mobisearch.cli", "search", "--space", args.space,
                    "--budget", args.budget, "--out-dir", str(out), "--quiet",
                    "--trials", str(args.trials), *limit,
                    "--set", "fidelity.rungs=[0.3333]", "--set", "fidelity.noise_candidates=0",
                    "--set", f"search.sampler={sampler}", "--set", f"search.seed={seed}",
                ],
                check=True,
            )  # fmt: skip
            study = results.load_study(f"sqlite:///{out / 'study.db'}")
            recs = [r for r in results.candidate_records(results.trial_records(study))]
            ok = [r for r in recs if r["state"] == "COMPLETE"]
            runs.append(
                {
                    "sampler": sampler,
                    "seed": seed,
                    "candidates": len(ok),
                    "points": [[r["val_accuracy"], r["latency_ms"]] for r in ok],
                    "best_val_accuracy": max(r["val_accuracy"] for r in ok),
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
            )
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "points"}), flush=True)
    ref = (0.5, max(p[1] for r in runs for p in r["points"]) * 1.01)
    for r in runs:
        r["hypervolume"] = hypervolume_2d(np.array(r["points"]), ref)
        r["front_size"] = int(pareto_mask(np.array(r["points"]), ["maximize", "minimize"]).sum())
    summary: dict[str, Any] = {"command": command, "reference_point": ref, "samplers": {}}
    for sampler in args.samplers:
        mine = [r for r in runs if r["sampler"] == sampler]
        hv = [r["hypervolume"] for r in mine]
        best = [r["best_val_accuracy"] for r in mine]
        summary["samplers"][sampler] = {
            "hypervolume_mean": float(np.mean(hv)),
            "hypervolume_std": float(np.std(hv, ddof=1)) if len(hv) > 1 else 0.0,
            "best_val_accuracy_mean": float(np.mean(best)),
            "runs": len(mine),
        }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fields = [
        "sampler",
        "seed",
        "candidates",
        "front_size",
        "hypervolume",
        "best_val_accuracy",
        "wall_s",
    ]
    with (args.out_dir / "samplers.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)
    (args.out_dir / "samplers.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
