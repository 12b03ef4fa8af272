"""Is latency stable enough to rank candidates, on JAX and in onnxruntime?

Usage:
    python scripts/bench_latency.py                     # the uniform grid's 24 candidates
    python scripts/bench_latency.py --rounds 30 --threads 2 --out-dir /tmp/latency

Measures every candidate of a grid space (default `search_spaces/fashion_mnist.toml`,
untrained networks: weights do not change latency) with `mobisearch.latency.
measure_candidates` on each latency backend, twice, each run in a fresh process, the runs
alternating (jax, onnxruntime, jax, onnxruntime):

* ``jax``: the compiled eval-mode forward the search measures (model backend: this
  machine's default, native kernels on a CPU), inline CPU dispatch as in `mobisearch`;
* ``onnxruntime``: the exported graph (uint8 images at the candidate's resolution in,
  normalization inside), `--threads` intra-op threads (default 1).

Then writes to `--out-dir` (default `results/latency/`):

* `<space>-<processor>-jax<v>-ort<v>.csv`: per candidate (by MACs), for each backend and
  run, the latency (median of per-round medians, ms, batch 1) and its spread (quartiles of
  the per-round medians);
* `<same>.json`: every record (per-round medians, fingerprints) and the load averages;
* `README.md`: the command, the machine, the Kendall τ between the two runs of each backend
  and between the backends, the spreads, and how to read them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "onnxruntime")
RUNS = (1, 2)


def worker(args: argparse.Namespace) -> None:
    """One run of one backend, in this process; writes its records as JSON."""
    from mobisearch.runtime import inline_cpu_dispatch

    inline_cpu_dispatch()  # before the first JAX computation, as the mobisearch command does
    from mobisearch.latency import measure_candidates
    from mobisearch.space import load_space, resolve_space_path

    space = load_space(resolve_space_path(args.space))
    archs = list(space.candidates())
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    recs = measure_candidates(
        archs,
        backend=args.backend,
        threads=args.threads if args.backend == "onnxruntime" else None,
        batch_size=1,
        rounds=args.rounds,
        iters_per_round=args.iters_per_round,
        warmup=args.warmup,
        seed=args.seed,
    )
    out = {
        "backend": args.backend,
        "wall_s": time.perf_counter() - t0,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "records": [r.to_dict() for r in recs],
    }
    Path(args.worker_out).write_text(json.dumps(out))


def run_worker(args: argparse.Namespace, backend: str, run: int, path: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--space",
        args.space,
        "--rounds",
        str(args.rounds),
        "--iters-per-round",
        str(args.iters_per_round),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed + run),
        "--backend",
        backend,
        "--worker-out",
        str(path),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    result: dict[str, Any] = json.loads(path.read_text())
    path.unlink()
    result["process_s"] = time.perf_counter() - t0
    print(
        f"{backend} run {run}: {result['process_s']:.1f} s (measuring {result['wall_s']:.1f} s), "
        f"load {result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}",
        flush=True,
    )
    return result


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="fashion_mnist", help="a grid space (name or file)")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--iters-per-round", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(ROOT / "results" / "latency"))
    parser.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        worker(args)
        return

    from mobisearch.cost import count_cost
    from mobisearch.latency import kendall_tau
    from mobisearch.space import load_space, resolve_space_path

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    space = load_space(resolve_space_path(args.space))
    archs = list(space.candidates())
    t0 = time.perf_counter()
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for run in RUNS:
        for backend in BACKENDS:
            runs[backend, run] = run_worker(args, backend, run, out_dir / f".{backend}{run}.json")
    total_s = time.perf_counter() - t0

    by_id = {key: {r["display_id"]: r for r in result["records"]} for key, result in runs.items()}
    archs.sort(key=lambda a: (count_cost(a).macs, a.display_id))
    ids = [a.display_id for a in archs]
    med = {key: [by_id[key][i]["latency_ms"] for i in ids] for key in runs}
    tau = {
        "jax run 1 vs run 2": kendall_tau(med["jax", 1], med["jax", 2]),
        "onnxruntime run 1 vs run 2": kendall_tau(med["onnxruntime", 1], med["onnxruntime", 2]),
        "jax vs onnxruntime, run 1": kendall_tau(med["jax", 1], med["onnxruntime", 1]),
        "jax vs onnxruntime, run 2": kendall_tau(med["jax", 2], med["onnxruntime", 2]),
    }
    # The same pairs ranked by the median call instead: what the quantile buys under load.
    typical = {key: [by_id[key][i]["median_ms"] for i in ids] for key in runs}
    for backend in BACKENDS:
        tau[f"{backend} run 1 vs run 2, by the median call"] = kendall_tau(
            typical[backend, 1], typical[backend, 2]
        )
    macs = [count_cost(a).macs for a in archs]
    for backend in BACKENDS:
        tau[f"MACs vs {backend}, run 1"] = kendall_tau(macs, med[backend, 1])

    first = runs["onnxruntime", 1]["records"][0]
    jax_first = runs["jax", 1]["records"][0]
    fp = first["device"]
    stem = _slug(
        f"{space.name}-{fp['processor']}-{fp['cpu_count']}cpu-jax{jax_first['latency_backend_version']}"
        f"-ort{first['latency_backend_version']}"
    )
    rows = []
    for arch, m in zip(archs, macs, strict=True):
        row: dict[str, Any] = {"display_id": arch.display_id, "macs": m}
        for (backend, run), recs in by_id.items():
            r = recs[arch.display_id]
            tag = f"{'ort' if backend == 'onnxruntime' else 'jax'}{run}"
            row[f"{tag}_ms"] = round(r["latency_ms"], 5)
            row[f"{tag}_round_p25_ms"] = round(r["round_p25_ms"], 5)
            row[f"{tag}_round_p75_ms"] = round(r["round_p75_ms"], 5)
            row[f"{tag}_median_ms"] = round(r["median_ms"], 5)
            row[f"{tag}_spread"] = round(r["spread"], 4)
        rows.append(row)
    columns = ["display_id", "macs"] + [
        f"{tag}{run}_{what}"
        for tag in ("jax", "ort")
        for run in RUNS
        for what in ("ms", "round_p25_ms", "round_p75_ms", "spread", "median_ms")
    ]
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    command = "python scripts/bench_latency.py" + "".join(
        f" --{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k in ("space", "rounds", "iters_per_round", "warmup", "threads", "seed")
        and v != parser.get_default(k)
    )
    summary = {
        "command": command,
        "total_s": total_s,
        "kendall_tau": tau,
        "runs": {f"{b}{r}": v for (b, r), v in runs.items()},
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "README.md").write_text(readme(args, command, stem, runs, rows, tau, total_s))
    print(f"wrote {out_dir}/{stem}.csv, {stem}.json, README.md")
    for name, value in tau.items():
        print(f"Kendall tau {name}: {value:.3f}")


def readme(
    args: argparse.Namespace,
    command: str,
    stem: str,
    runs: dict[tuple[str, int], dict[str, Any]],
    rows: list[dict[str, Any]],
    tau: dict[str, float],
    total_s: float,
) -> str:
    ort, jx = runs["onnxruntime", 1]["records"][0], runs["jax", 1]["records"][0]
    fp = ort["device"]
    spreads = {
        f"{tag}{run}": statistics.median(r[f"{tag}{run}_spread"] for r in rows)
        for tag in ("jax", "ort")
        for run in RUNS
    }
    worst = {
        f"{tag}{run}": max(r[f"{tag}{run}_spread"] for r in rows)
        for tag in ("jax", "ort")
        for run in RUNS
    }
    ratios = [r[f"jax{run}_ms"] / r[f"ort{run}_ms"] for r in rows for run in RUNS]
    loads = ", ".join(
        f"{b} run {r}: {v['load_before'][0]:.2f} -> {v['load_after'][0]:.2f}"
        for (b, r), v in runs.items()
    )
    lines = [
        "# Latency on the uniform grid (fashion_mnist): JAX and onnxruntime, run twice",
        "",
        f"Command: `{command}` ({total_s / 60:.1f} min in all).",
        "",
        f"Machine: {fp['processor']}, {fp['cpu_count']} cores, {fp['platform']}; Python "
        f"{fp['python_version']}, jax {jx['latency_backend_version']} (model backend "
        f"`{jx['model_backend']}`), onnxruntime {ort['latency_backend_version']} with "
        f"{ort['threads']} intra-op thread(s). Batch 1, untrained networks (weights do not "
        "change latency).",
        "",
        f"Method: `mobisearch.latency.measure_candidates`: {args.warmup} warm-up calls per "
        f"candidate, then {args.rounds} rounds; each round visits all {len(rows)} "
        f"candidates in a fresh seeded order and times {args.iters_per_round} calls of each "
        "after one untimed call. A candidate's latency is the lower quartile of its "
        f"{args.rounds * args.iters_per_round} timed calls; its spread is the interquartile "
        "range of the per-round lower quartiles over that latency. Each run is a fresh "
        "process; the four ran in the order jax 1, onnxruntime 1, jax 2, onnxruntime 2.",
        "",
        f"Load average (1 min) before -> after each run: {loads}. The machine has "
        f"{fp['cpu_count']} cores and is shared; a load above the core count means other "
        "processes competed for them during the measurement.",
        "",
        f"At batch 1, onnxruntime on {ort['threads']} thread(s) is {min(ratios):.1f}x to "
        f"{max(ratios):.1f}x faster than jax here. The jax figure is the compiled forward "
        "called as the search calls it: JAX flattens the model state's arrays on every call, "
        "and the native kernels split their work over XLA's thread pool (all cores), which "
        "waits on threads that other processes hold on a busy machine; onnxruntime with one "
        "intra-op thread runs in the calling thread.",
        "",
        "## Kendall τ of the latency order of the candidates",
        "",
        "| pair | τ |",
        "| --- | ---: |",
        *[f"| {name} | {value:.3f} |" for name, value in tau.items()],
        "",
        "τ = 1: the same order; the target for two runs of one backend is ≥ 0.9. "
        "Between the backends, τ says how much the choice of runtime reorders the "
        "candidates; against MACs, how well the MAC count predicts that backend's order. "
        "The rows 'by the median call' rank the same runs by each candidate's median call "
        "instead of its lower quartile.",
        "",
        "## Spread",
        "",
        "| backend, run | median spread | largest spread |",
        "| --- | ---: | ---: |",
        *[
            f"| {name} | {spreads[name] * 100:.1f}% | {worst[name] * 100:.1f}% |"
            for name in spreads
        ],
        "",
        "## Files",
        "",
        f"* `{stem}.csv`: one row per candidate, by MACs. `jax1_ms` is run 1's JAX latency "
        "(ms per batch-1 call, the lower quartile of its calls), `jax1_round_p25_ms` and "
        "`jax1_round_p75_ms` the quartiles of its per-round lower quartiles, `jax1_spread` "
        "their distance over the latency, `jax1_median_ms` its median call; `jax2_*` run 2; "
        "`ort1_*`, `ort2_*` onnxruntime.",
        f"* `{stem}.json`: every record (per-round medians, device fingerprint with backend, "
        "version and threads), the load averages and the wall times.",
        "",
        "Latencies compare only within one machine, one backend and one fingerprint.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
