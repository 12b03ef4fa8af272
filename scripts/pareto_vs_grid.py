"""Two searches' frontiers in one plot, and their hypervolumes: a per-stage search against the
uniform grid at the same budget and recipe.

Usage:
    python scripts/pareto_vs_grid.py \
        --searched sqlite:///results/fashion_mnist_stages/study.db \
        --grid sqlite:///results/fashion_mnist_grid/study.db \
        -o results/fashion_mnist_stages/pareto_vs_grid.png

Every finished candidate of both studies is drawn (validation accuracy at the highest rung
it reached, against its latency), each study's frontier as a step line. The hypervolume of
each frontier (area it dominates above a shared reference point: accuracy 0.5, the largest
latency of either study) is printed and written beside the plot as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mobisearch import results
from mobisearch.pareto import hypervolume_2d, pareto_mask


def points(storage: str) -> np.ndarray:
    study = results.load_study(storage)
    recs = [
        r
        for r in results.candidate_records(results.trial_records(study))
        if r["state"] == "COMPLETE"
    ]
    return np.array([[r["val_accuracy"], r["latency_ms"]] for r in recs])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--searched", required=True)
    parser.add_argument("--grid", required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = {"per-stage search": points(args.searched), "uniform grid": points(args.grid)}
    ref = (0.5, max(float(p[:, 1].max()) for p in runs.values()) * 1.01)
    ax = Figure(figsize=(7.0, 4.5)).add_subplot()
    summary = {"reference_point": ref}
    for (name, pts), color in zip(runs.items(), ("C0", "C1"), strict=True):
        ax.scatter(pts[:, 1], pts[:, 0], s=18, alpha=0.6, color=color, label=name)
        front = pts[pareto_mask(pts, ["maximize", "minimize"])]
        front = front[np.argsort(front[:, 1])]
        ax.step(front[:, 1], front[:, 0], where="post", color=color, linewidth=1.5)
        summary[name] = {
            "candidates": len(pts),
            "frontier": len(front),
            "hypervolume": hypervolume_2d(pts, ref),
            "best_val_accuracy": float(pts[:, 0].max()),
        }
    ax.set_xlabel("latency (ms, batch 1)")
    ax.set_ylabel("validation accuracy (highest rung reached)")
    ax.set_xscale("log")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Fashion-MNIST within 20M MACs: per-stage search vs uniform grid")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    ax.figure.savefig(args.output, dpi=150, bbox_inches="tight")
    args.output.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
