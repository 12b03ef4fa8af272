"""Where a search's compile time goes, candidate by candidate, against its training time.

Usage:
    python scripts/bench_compile.py                  # the default search: fashion_mnist, 20M
    python scripts/bench_compile.py --budget 5M --space fashion_mnist --set train.steps=300

For each candidate within the budget, in the search's order, in one process:

1. Its three programs compile one after the other (the search compiles the eval-mode
   forward at the eval batch and at the latency batch beside the train step, on a second
   thread; here they take turns so each one's time is its own), against a persistent
   compilation cache that starts empty. Each reports `mobisearch.compile.CompileTimes`: the
   abstract model (the first program of an architecture), tracing, lowering and XLA, and
   the number of XLA fusions.
2. It trains with the space's recipe on the real dataset (`train_and_evaluate`, which
   finds its programs compiled): `train_s`, the figure the compile is held against.

`compile / train` is the sum of the three compiles over `train_s`. Then every program
compiles again with the in-memory caches cleared, as a rerun of the search would, and the
table says how long that took and how many new entries it wrote to the persistent cache
(none: nothing was compiled again).

Writes `results/benchmarks/bench-compile-<backend>-jax<version>.csv` and `.md`.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax

from mobisearch import compile as compile_
from mobisearch import ops, runtime, train
from mobisearch.cli import _load_data
from mobisearch.cost import parse_count
from mobisearch.latency import device_fingerprint
from mobisearch.search import plan_search
from mobisearch.space import apply_overrides, load_space, resolve_space_path

PROGRAMS = ("train", "eval", "forward")


def _fusions(compiled: Any) -> int:
    return len(re.findall(r"= \S+ fusion\(", compiled.as_text()))


def compile_programs(arch: Any, cfg: Any, backend: str, n_train: int, n_val: int, batch: int):  # type: ignore[no-untyped-def]
    """Compile the train step, eval forward and latency forward of `arch` one after the other;
    return `{program: compiled}` (each with `.step` and `.times`)."""
    return {
        "train": compile_.compile_train(arch, cfg, backend, n_train),
        "eval": compile_.compile_forward(arch, backend, min(cfg.eval_batch_size, n_val)),
        "forward": compile_.compile_forward(arch, backend, batch),
    }


def clear_in_memory_caches() -> None:
    """Forget every compiled program in this process, as a new process would."""
    for fn in (compile_.compile_train, compile_.compile_forward, compile_._graphs):
        fn.cache_clear()
    jax.clear_caches()


def _entries(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="fashion_mnist")
    parser.add_argument("--budget", type=parse_count, default=parse_count("20M"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args(argv)
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    runtime.inline_cpu_dispatch()  # as the search runs
    space = load_space(resolve_space_path(args.space))
    space = apply_overrides(space, args.set) if args.set else space
    plan = plan_search(space, max_macs=args.budget)
    data = _load_data(space, args.data_dir)
    cfg, batch, backend = space.train, space.latency.batch_size, ops.default_backend()
    assert cfg is not None  # _load_data refuses a space without [train]
    runtime.prepare_process()  # as the search does
    train.prepare_recipe(cfg, backend)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-compile-cache-") as cache:
        compile_.enable_compilation_cache(cache)  # the search's default threshold
        for arch, cost in plan.kept:
            n_train, n_val = len(data.x_train), len(data.x_val)
            progs = compile_programs(arch, cfg, backend, n_train, n_val, batch)
            result = train.train_and_evaluate(arch, cfg, data, seed=cfg.seed, backend=backend)
            assert result.compile_s == 0.0, "train_and_evaluate compiled again"
            row: dict[str, Any] = {"candidate": arch.display_id, "macs": cost.macs}
            for name, prog in progs.items():
                t = prog.times
                row |= {
                    f"{name}_graphs_s": round(t.graphs_s, 3),
                    f"{name}_trace_s": round(t.trace_s, 3),
                    f"{name}_lower_s": round(t.lower_s, 3),
                    f"{name}_xla_s": round(t.xla_s, 3),
                    f"{name}_fusions": _fusions(prog.step),
                    f"{name}_compile_s": round(t.total_s, 3),
                }
            compile_s = sum(p.compile_s for p in progs.values())
            row |= {
                "compile_s": round(compile_s, 3),
                "train_s": round(result.train_s, 3),
                "compile_over_train": round(compile_s / result.train_s, 3),
                "val_accuracy": result.val_accuracy,
            }
            rows.append(row)
            print(
                f"{arch.display_id}: compile {compile_s:.2f} s, train {result.train_s:.2f} s,"
                f" {compile_s / result.train_s:.0%}",
                flush=True,
            )
        folder = Path(cache)
        before = _entries(folder)
        clear_in_memory_caches()
        for arch, row in zip((a for a, _ in plan.kept), rows, strict=True):
            progs = compile_programs(arch, cfg, backend, len(data.x_train), len(data.x_val), batch)
            row["rerun_compile_s"] = round(sum(p.compile_s for p in progs.values()), 3)
            row["rerun_xla_s"] = round(sum(p.times.xla_s for p in progs.values()), 3)
        new_entries = _entries(folder) - before

    fp = device_fingerprint(batch)
    header = [
        f"command: `{command}`",
        f"machine: {fp['processor']} | cpu_count {os.cpu_count()} | {fp['platform']}",
        f"jax {jax.__version__} ({jax.default_backend()}) | python {platform.python_version()}"
        f" | backend {backend} | recipe: {cfg.steps} steps of batch {cfg.batch_size}",
        f"{len(rows)} candidates within {args.budget:,} MACs of {space.path}",
        f"rerun (in-memory caches cleared, persistent cache kept): {new_entries} new cache"
        " entries",
        f"wall time {time.perf_counter() - start:.0f} s",
    ]
    table = markdown(rows, header)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-compile-{jax.default_backend()}-jax{jax.__version__}"
    csv_path, md_path = args.out_dir / f"{stem}.csv", args.out_dir / f"{stem}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(table)
    print()
    print(table)
    print(f"wrote {csv_path} and {md_path}")
    return 0


def markdown(rows: list[dict[str, Any]], header: list[str]) -> str:
    """Header lines, then one row per candidate and a median row."""
    cols = [
        ("candidate", "candidate"),
        ("train: model", "train_graphs_s"),
        ("train: trace", "train_trace_s"),
        ("train: lower", "train_lower_s"),
        ("train: XLA", "train_xla_s"),
        ("train: fusions", "train_fusions"),
        ("eval", "eval_compile_s"),
        ("forward", "forward_compile_s"),
        ("compile s", "compile_s"),
        ("train s", "train_s"),
        ("compile / train", "compile_over_train"),
        ("rerun compile s", "rerun_compile_s"),
    ]

    def cell(row: dict[str, Any], key: str) -> str:
        value = row[key]
        if key == "compile_over_train":
            return f"{value:.0%}"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = [*(f"- {h}" for h in header), ""]
    lines.append("| " + " | ".join(title for title, _ in cols) + " |")
    lines.append("| --- |" + " ---: |" * (len(cols) - 1))
    for row in rows:
        lines.append("| " + " | ".join(cell(row, key) for _, key in cols) + " |")
    median = {
        k: (statistics.median_low if isinstance(rows[0][k], int) else statistics.median)(
            r[k] for r in rows
        )
        for k in rows[0]
        if k != "candidate"
    }
    median["candidate"] = "**median**"
    lines.append("| " + " | ".join(cell(median, key) for _, key in cols) + " |")
    total_c, total_t = sum(r["compile_s"] for r in rows), sum(r["train_s"] for r in rows)
    lines += [
        "",
        f"All candidates: compile {total_c:.1f} s, train {total_t:.1f} s, "
        f"{total_c / total_t:.0%}. Seconds, wall; programs compiled one after the other.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
