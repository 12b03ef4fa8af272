"""The `mobisearch` command: thin argument parsing over the library.

Each subcommand parses its arguments and calls library functions; bad input (an unknown
file, bad TOML, a bad value) ends with exit status 2 and a one-line message, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from mobisearch import workers
from mobisearch.arch import ArchSpec
from mobisearch.cost import Cost, cost_record, count_cost, format_count, parse_count
from mobisearch.presets import mobilenet_v1
from mobisearch.workers import DEFAULT_HEARTBEAT_S, GRACE_BEATS

if TYPE_CHECKING:
    import optuna

    from mobisearch.data import Dataset
    from mobisearch.space import SearchSpace


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus where to find help), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(text: str) -> int:
    try:
        return parse_count(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0")
    return value


def _layer_table(arch: ArchSpec, cost: Cost) -> str:
    head = f"{'layer':<14}{'op':<5}{'in->out ch':>14}{'k':>3}{'s':>3}{'in->out hw':>12}"
    head += f"{'MACs':>14}{'params':>11}"
    rows = [f"{arch.display_id}: {arch.in_ch}x{arch.resolution}x{arch.resolution} input", head]
    for layer, lc in zip(arch.resolve(), cost.by_layer, strict=True):
        rows.append(
            f"{layer.name:<14}{layer.op:<5}{f'{layer.in_ch}->{layer.out_ch}':>14}"
            f"{layer.kernel:>3}{layer.stride:>3}{f'{layer.in_hw}->{layer.out_hw}':>12}"
            f"{lc.macs:>14,}{lc.params:>11,}"
        )
    rows.append(
        f"total: {cost.macs:,} MACs ({format_count(cost.macs)}), {cost.params:,} params "
        f"(Keras convention; {cost.weights:,} conv+fc weights), peak activations "
        f"{cost.peak_activation_bytes:,} bytes"
    )
    return "\n".join(rows)


def cmd_cost(args: argparse.Namespace) -> int:
    """`mobisearch cost`: one architecture's cost, or how a space's candidates fit a budget."""
    if args.space is None:
        arch = mobilenet_v1(
            args.width,
            args.resolution,
            args.kernel_size,
            num_classes=args.classes,
            in_ch=args.in_channels,
        )
        cost = count_cost(arch)
        if args.json:
            print(json.dumps(cost_record(arch, cost) | {"arch": arch.to_dict()}))
        else:
            print(_layer_table(arch, cost))
        return 0
    from mobisearch.fit import fit_record, fit_report, format_fit_report, plot_fit_report
    from mobisearch.space import load_space, resolve_space_path

    space = load_space(resolve_space_path(args.space))
    budget = {"max_macs": args.budget, "max_params": args.max_params}
    report = fit_report(space, **budget, sample_size=args.samples, seed=args.seed)
    if space.is_grid:
        # A grid is small: every candidate is listed, as a table or a JSON list.
        _print_grid(space, args.budget, args.max_params, as_json=args.json)
    elif args.json:
        print(json.dumps({"space": space.path} | fit_record(report), indent=1))
    if not args.json:
        lines = format_fit_report(report)
        print("\n".join([f"{space.path}: {lines[0]}", *lines[1:]]))
    if args.plot:
        plot_fit_report(report, args.plot, title=f"{space.name}: {space.path}")
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _print_grid(
    space: SearchSpace, max_macs: int | None, max_params: int | None, *, as_json: bool
) -> None:
    rows = [(a, count_cost(a)) for a in space.candidates()]
    rows.sort(key=lambda r: (r[1].macs, r[0].display_id))
    kept = [
        r
        for r in rows
        if (max_macs is None or r[1].macs <= max_macs)
        and (max_params is None or r[1].params <= max_params)
    ]
    if as_json:
        print(json.dumps([cost_record(a, c) for a, c in kept], indent=1))
        return
    print(f"{'candidate':<22}{'MACs':>14}{'params':>12}{'peak act. bytes':>17}")
    for a, c in kept:
        print(f"{a.display_id:<22}{c.macs:>14,}{c.params:>12,}{c.peak_activation_bytes:>17,}")
    print(f"{len(kept)} of {len(rows)} candidates of {space.path}", end="")
    print(f" within {format_count(max_macs)} MACs" if max_macs is not None else "")


def _load_space(args: argparse.Namespace) -> SearchSpace:
    from mobisearch.space import DEFAULT_SPACE, apply_overrides, load_space, resolve_space_path

    space = load_space(resolve_space_path(args.space or DEFAULT_SPACE))
    return apply_overrides(space, args.set) if getattr(args, "set", None) else space


def _out_dir(args: argparse.Namespace, space: SearchSpace) -> pathlib.Path:
    return pathlib.Path(args.out_dir or pathlib.Path("results") / space.name)


def _storage(args: argparse.Namespace, space: SearchSpace) -> str:
    url = args.storage or f"sqlite:///{_out_dir(args, space) / 'study.db'}"
    args.storage_url = url  # named by storage errors (see `main`)
    return str(url)


def _load_data(space: SearchSpace, data_dir: str | None) -> Dataset:
    from mobisearch.data import load_dataset

    if space.data is None or space.train is None:
        raise UsageError(
            f"{space.path}: has no [data] and [train] sections, so it can only be costed "
            f"(mobisearch cost --space {space.path})"
        )
    d = space.data
    return load_dataset(
        d.dataset,
        data_dir=data_dir,
        validation_size=d.validation_size,
        split_seed=d.split_seed,
        train_size=d.train_size,
    )


def _duration(text: str) -> float:
    """`"15m"`, `"90s"`, `"1h"` or seconds (`"900"`) -> seconds (> 0)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1.0)
    try:
        value = float(number) * unit
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration such as 15m, 90s or 1h")
    return value


def _print_plan(space: SearchSpace, args: argparse.Namespace) -> Any:
    """Print what the budget leaves of the space; return the plan of a grid space (None for
    a per-stage space, whose candidates are drawn by its sampler)."""
    from mobisearch import search

    if space.is_grid:
        plan = search.plan_search(space, max_macs=args.budget, max_params=args.max_params)
        print(f"{space.path}: {plan.summary()}")
        for arch, _, why in plan.dropped:
            print(f"  dropped {arch.display_id}: {why}")
        return plan
    from mobisearch.fit import fit_report

    report = fit_report(space, max_macs=args.budget, max_params=args.max_params, seed=0)
    if report.fitting == 0:
        raise UsageError(
            f"{space.path}: none of {report.evaluated:,} sampled candidates fits the budget "
            f"(max_macs={args.budget}, max_params={args.max_params}); "
            f"see mobisearch cost --space {space.path} --budget ..."
        )
    low, high = (n / report.size for n in report.interval())
    trials = args.trials or space.search.trials
    print(
        f"{space.path}: {space.size():.3g} candidates, about {report.fraction:.1%} within the "
        f"budget (95% CI {low:.1%}-{high:.1%}, {report.evaluated:,} sampled); drawing "
        f"{trials} with the {space.search.sampler} sampler; over-budget draws are skipped"
    )
    return None


def _latency_budget(
    space: SearchSpace, plan: Any, args: argparse.Namespace, ranker: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """Apply `--max-latency-ms` before anything is trained: a grid's candidates are each
    measured (untrained: weights do not change latency) and those over it dropped; a
    per-stage space gets a latency model fitted to a seeded sample of measured candidates,
    whose predictions screen the sampler's draws. Returns `(plan, predict, report)`."""
    import random

    from mobisearch.cost import count_cost
    from mobisearch.latency import measure_candidates
    from mobisearch.latency_model import LatencyModel, error_report

    limit, lat = args.max_latency_ms, space.latency

    def measure(archs: list[ArchSpec]) -> list[float]:
        runs = measure_candidates(
            archs,
            backend=lat.backend,
            threads=lat.threads,
            batch_size=ranker.latency_batch,
            rounds=10,
            iters_per_round=5,
            warmup=3,
            model_backend=ranker.backend if lat.backend == "jax" else None,
        )
        return [m.latency_ms for m in runs]

    if plan is not None:
        archs = [a for a, _ in plan.kept]
        measured = measure(archs)
        keep = [kc for kc, ms in zip(plan.kept, measured, strict=True) if ms <= limit]
        over = [
            (a, c, f"latency {ms:.3g} ms > {limit:g} ms")
            for (a, c), ms in zip(plan.kept, measured, strict=True)
            if ms > limit
        ]
        print(
            f"latency ({lat.backend}, measured before training): dropped {len(over)} of "
            f"{len(archs)} candidates over {limit:g} ms"
        )
        for a, _, why in over:
            print(f"  dropped {a.display_id}: {why}")
        if not keep:
            raise UsageError(
                f"--max-latency-ms {limit:g}: every candidate within the budget measured "
                f"slower (fastest {min(measured):.3g} ms)"
            )
        new_plan = dataclasses.replace(plan, kept=tuple(keep), dropped=plan.dropped + tuple(over))
        ids = [a.display_id for a in archs]
        return new_plan, None, {"measured": dict(zip(ids, measured, strict=True))}
    rng, sample = random.Random(0), list[ArchSpec]()
    for _ in range(100 * lat.sample):
        if len(sample) == lat.sample:
            break
        arch = space.sample(rng)
        cost = count_cost(arch)
        if (args.budget is None or cost.macs <= args.budget) and (
            args.max_params is None or cost.params <= args.max_params
        ):
            sample.append(arch)
    measured = measure(sample)
    model = LatencyModel.fit(sample, measured)
    report = {"model": model.to_dict(), "fit": error_report(sample, measured)}
    print(
        f"latency model ({lat.backend}) fitted to {len(sample)} measured candidates: "
        f"{report['fit']['within']:.0%} predicted within 10% (leave-one-out); draws predicted "
        f"over {limit:g} ms are skipped"
    )
    return None, model.predict, report


def cmd_search(args: argparse.Namespace) -> int:
    """`mobisearch search`: filter by budget, rank the survivors, write the frontier."""
    from mobisearch import search, workers

    for key, value in (("backend", args.latency_backend), ("threads", args.latency_threads)):
        if value is not None:
            args.set = [*args.set, f"latency.{key}={json.dumps(value)}"]
    space = _load_space(args)
    plan = _print_plan(space, args)
    data = _load_data(space, args.data_dir)  # fail on bad data before touching the study
    out_dir = _out_dir(args, space)
    if not args.storage:  # the default storage lives in it
        out_dir.mkdir(parents=True, exist_ok=True)
    storage = _storage(args, space)
    name = args.study_name or search.default_study_name(space, args.budget, args.max_params)
    latency_batch = args.latency_batch or space.latency.batch_size
    extra = {"latency_batch": latency_batch, "backend": args.backend}
    fingerprint = search.study_fingerprint(space, extra)
    opened = workers.open_storage(storage, heartbeat_s=args.heartbeat_s)
    study = search.open_or_create_study(opened, name, fingerprint)
    for key, value in {
        "space": space.name,
        "space_path": space.path,
        "max_macs": args.budget,
        "max_params": args.max_params,
        "dataset": data.name,
    }.items():
        study.set_user_attr(key, value)
    print(f"study {name!r} in {workers.storage_url(storage)} (worker {workers.worker_id()})")
    out_dir.mkdir(parents=True, exist_ok=True)

    from mobisearch.compile import enable_compilation_cache
    from mobisearch.rank import Ranker
    from mobisearch.runtime import inline_cpu_dispatch, prepare_process

    inline_cpu_dispatch()  # before the first JAX computation
    if not args.no_compile_cache:
        print(f"compilation cache: {enable_compilation_cache(args.compile_cache)}")

    ranker = Ranker(
        space,
        data,
        checkpoint_dir=out_dir / "checkpoints" / name,
        latency_batch=latency_batch,
        backend=args.backend,
    )
    if ranker.rungs is not None:
        fid, steps = ranker.rungs.fidelity, ranker.rungs.plan.steps
        print(
            f"rungs: {', '.join(f'{e:g}' for e in fid.rungs)} epochs = "
            f"{', '.join(map(str, steps))} steps of batch {ranker.rungs.cfg.batch_size}, "
            f"eta {fid.eta}, promotion: {fid.promotion}"
        )
    predict: Any = None
    latency_report: dict[str, Any] = {}
    if args.max_latency_ms is not None:
        plan, predict, latency_report = _latency_budget(space, plan, args, ranker)
        study.set_user_attr("max_latency_ms", args.max_latency_ms)
    prepare_process()
    evaluate = _WithCheckpoint(ranker)
    with _Progress(enabled=not args.quiet, time_budget_s=args.time_budget) as progress:
        if space.is_grid and space.fidelity is None:
            search.run_search(
                study,
                plan,
                evaluate,
                on_start=progress.start,
                on_done=progress.done,
                heartbeat_s=args.heartbeat_s,
            )
        else:
            from mobisearch.halving import run_halving

            rung_plan = ranker.rungs.plan if ranker.rungs is not None else None
            run_halving(
                study,
                space,
                evaluate.run_job,
                max_macs=args.budget,
                max_params=args.max_params,
                plan=plan,
                predict_latency=predict,
                max_latency_ms=args.max_latency_ms,
                trials=args.trials,
                time_budget_s=args.time_budget,
                rung_steps=rung_plan.steps if rung_plan else (),
                rung_decay=rung_plan.decay if rung_plan else (),
                heartbeat_s=args.heartbeat_s,
                on_start=progress.start_job,
                on_done=progress.done_job,
            )
    front = finish_search(study, ranker, out_dir, latency_report=latency_report)
    print(_frontier_table(front))
    print(f"wrote {out_dir}/trials.csv, failed_attempts.csv, frontier.json, best.json, pareto.png")
    return _check_some_finished(study, plan)


class _WithCheckpoint:
    """The ranker, with where its checkpoint went in each trial (`checkpoint_host`)."""

    def __init__(self, ranker: Any) -> None:
        self.ranker = ranker

    def _where(self, arch: ArchSpec, metrics: dict[str, Any]) -> dict[str, Any]:
        import socket

        if metrics.get("status") == "ok":
            metrics["checkpoint_host"] = socket.gethostname()
            metrics["checkpoint"] = str(self.ranker.checkpoint_path(arch))
        return metrics

    def __call__(self, arch: ArchSpec) -> dict[str, Any]:
        return self._where(arch, dict(self.ranker(arch)))

    def run_job(self, job: Any) -> dict[str, Any]:
        return self._where(job.arch, dict(self.ranker.run_job(job)))


def _check_some_finished(study: optuna.Study, plan: Any) -> int:
    """0 if a candidate (of `plan`, if given) finished; else 1, with the failures in one
    line."""
    from mobisearch import results, search

    keys = None if plan is None else {search.job_key(a) for a, _ in plan.kept}
    mine = [
        r
        for r in results.candidate_records(results.trial_records(study))
        if keys is None or results.candidate_key(r) in keys
    ]
    if any(r["state"] == "COMPLETE" for r in mine):
        return 0
    first = next((r for r in mine if r.get("reason")), None)
    detail = f"; {first['display_id']}: {first.get('status')}: {first['reason']}" if first else ""
    total = len(keys) if keys is not None else len(mine)
    print(
        f"mobisearch search: error: no candidate finished ({len(mine)} of {total} failed){detail}",
        file=sys.stderr,
    )
    return 1


def finish_search(
    study: optuna.Study,
    ranker: Any,
    out_dir: pathlib.Path,
    *,
    latency_report: dict[str, Any] | None = None,
) -> list[dict]:
    """Evaluate the frontier on the test split, then write the exports and the plot.

    A frontier member is evaluated by a machine that can read its checkpoint (the one that
    trained it, or any machine sharing the out-dir); its accuracy is stored on the study,
    so it is measured once. A member whose checkpoint is elsewhere is exported without a
    test accuracy, naming `checkpoint_host`: rerunning the same `mobisearch search` there
    adds it.
    """
    from mobisearch import results

    records = results.trial_records(study)
    candidates = results.candidate_records(records)
    limit = study.user_attrs.get("max_latency_ms")
    if limit is not None:
        # Measured over the latency budget after training (its prediction was under it):
        # kept in trials.csv, left out of the frontier and the best config.
        over = [r for r in candidates if r.get("latency_ms", 0) > limit]
        for r in over:
            r["over_latency_budget"] = True
        if latency_report and "model" in latency_report:
            latency_report["trained"] = _latency_model_check(candidates, latency_report)
            print(
                f"latency model on the {latency_report['trained']['n']} trained candidates: "
                f"{latency_report['trained']['within']:.0%} predicted within 10%"
            )
        if latency_report:
            results.write_atomic(
                out_dir / "latency_budget.json", json.dumps(latency_report, indent=2) + "\n"
            )
    front = results.frontier([r for r in candidates if not r.get("over_latency_budget")])
    for r in front:
        if "test_accuracy" in r:
            continue
        arch = ArchSpec.from_dict(r["arch"], source=f"trial {r['number']}")
        if ranker.checkpoint_path(arch).exists():
            r["test_accuracy"] = ranker.test_accuracy(arch)
            results.record_test_accuracy(study, r, r["test_accuracy"])
        else:
            host = r.get("checkpoint_host") or str(r.get("worker", "?")).rpartition(":")[0]
            print(
                f"{r['display_id']}: no test accuracy yet; its checkpoint is on {host} "
                "(rerun this search there to add it)"
            )
    noise: dict[str, Any] = {}
    seeds = results.seed_spread(records)
    if seeds is not None:
        noise["validation_accuracy"] = seeds
        front = results.mark_indistinct(front, seeds["spread"])
        print(
            f"seed-to-seed spread of the first rung's validation accuracy: "
            f"{seeds['spread']:.4f} ({seeds['n']} candidates trained with two seeds)"
        )
    if len(front) >= 2:
        noise["latency"] = _latency_noise(front, ranker)
        lat = noise["latency"]
        print(
            f"latency of the frontier measured twice more, interleaved: median spread "
            f"{lat['median_spread']:.1%}, Kendall tau between the two {lat['kendall_tau']:.2f}, "
            f"against the search's {lat['kendall_tau_vs_search']:.2f}"
        )
    by_key = {results.candidate_key(r): r for r in front}
    candidates = [by_key.get(results.candidate_key(r), r) for r in candidates]
    results.write_trials_csv(candidates, out_dir / "trials.csv")
    results.write_failed_csv(records, out_dir / "failed_attempts.csv")
    results.write_frontier_json(front, out_dir / "frontier.json")
    if noise:
        results.write_atomic(out_dir / "noise.json", json.dumps(noise, indent=2) + "\n")
    if front:
        within = [r for r in candidates if not r.get("over_latency_budget")]
        results.export_best(results.best_record(within), out_dir / "best.json")
    _plot(study, candidates, out_dir / "pareto.png")
    return front


def _latency_model_check(candidates: list[dict], report: dict[str, Any]) -> dict[str, Any]:
    """The fitted latency model's error on the candidates the search trained and measured."""
    import numpy as np

    from mobisearch.latency_model import features

    m = report["model"]
    ok = [r for r in candidates if isinstance(r.get("latency_ms"), int | float)]
    errors = [
        abs(
            m["intercept"]
            + float(np.dot(m["weights"], features(ArchSpec.from_dict(r["arch"]))))
            - r["latency_ms"]
        )
        / r["latency_ms"]
        for r in ok
    ]
    return {
        "n": len(errors),
        "within": float(np.mean(np.array(errors) <= 0.10)) if errors else float("nan"),
        "median_abs_error": float(np.median(errors)) if errors else float("nan"),
    }


def _latency_noise(front: list[dict], ranker: Any) -> dict[str, Any]:
    """Measure the frontier's latency twice more, each time all members interleaved
    (`mobisearch.latency.measure_candidates`, other visiting orders): the spread of each
    member's repeated calls, and whether the order holds between the two measurements and
    against the search's own."""
    from mobisearch.latency import kendall_tau, measure_candidates

    archs = [ArchSpec.from_dict(r["arch"], source=r["display_id"]) for r in front]
    runs = [
        measure_candidates(
            archs,
            backend="jax",
            batch_size=ranker.latency_batch,
            rounds=10,
            iters_per_round=5,
            warmup=5,
            seed=seed,
            model_backend=ranker.backend,
        )
        for seed in (1, 2)
    ]
    a, b = ([m.latency_ms for m in run] for run in runs)
    search = [r["latency_ms"] for r in front]

    def tau(x: list[float], y: list[float]) -> float:
        try:
            return kendall_tau(x, y)
        except ValueError:  # all equal: no order to compare
            return math.nan

    return {
        "members": [
            {
                "display_id": r["display_id"],
                "search_ms": r["latency_ms"],
                "again_ms": [x, y],
                "spread": m.spread,
            }  # fmt: skip
            for r, x, y, m in zip(front, a, b, runs[0], strict=True)
        ],
        "median_spread": float(sorted(m.spread for m in runs[0])[len(front) // 2]),
        "kendall_tau": tau(a, b),
        "kendall_tau_vs_search": tau(search, a),
    }


def _plot(study: optuna.Study, records: list[dict], path: pathlib.Path) -> pathlib.Path:
    import os
    import uuid

    from mobisearch.plotting import frontier_info, plot_frontier

    attrs = study.user_attrs
    devices = {_device_name(r["device"]) for r in records if isinstance(r.get("device"), dict)}
    budget = attrs.get("max_macs")
    budget_text = f"{format_count(budget)} MACs" if budget else "none"
    title = (
        f"{attrs.get('dataset', '?')}: {study.study_name}, budget {budget_text}, "
        f"device {', '.join(sorted(devices))}"
    )
    batch = next((r["latency_batch"] for r in records if "latency_batch" in r), 1)
    info = frontier_info(records, title=title)
    info = info._replace(xlabel=f"latency (ms, batch {batch}, median)")
    # Drawn under a temporary name (ending .png: matplotlib picks the format from it), then
    # renamed, so a kill never leaves a truncated image.
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        plot_frontier(info, path=str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _device_name(fp: dict[str, Any]) -> str:
    """`device_kind`, or the processor model on a CPU (where device_kind is just "cpu")."""
    kind = str(fp.get("device_kind", "?"))
    if kind.lower() == "cpu" and fp.get("processor"):
        return f"{fp['processor']} ({fp.get('cpu_count', '?')} cores)"
    return kind


def _frontier_table(front: list[dict]) -> str:
    w = max([22, *(len(r["display_id"]) + 2 for r in front)])
    rows = [f"{'frontier':<{w}}{'MACs':>12}{'val acc':>9}{'test acc':>9}{'latency ms':>12}"]
    for r in front:
        rows.append(
            f"{r['display_id']:<{w}}{format_count(r['macs']):>12}{r['val_accuracy']:>9.4f}"
            f"{r.get('test_accuracy') or float('nan'):>9.4f}{r['latency_ms']:>12.3f}"
        )
    return "\n".join(rows)


class _Progress:
    """tqdm progress bar: jobs done / total, the current candidate (and rung), elapsed, time
    left, best validation accuracy so far."""

    def __init__(self, *, enabled: bool, time_budget_s: float | None = None) -> None:
        self.enabled, self.best = enabled, float("nan")
        self.time_budget_s = time_budget_s
        self.bar: Any = None

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def start(self, arch: ArchSpec, done: int, total: int, label: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="job", dynamic_ncols=True)
        elif total > self.bar.total:
            self.bar.total = total
            self.bar.refresh()
        self.bar.set_description(f"{arch.display_id}{label}")

    def done(self, arch: ArchSpec, metrics: Any) -> None:
        if metrics.get("status") != "ok":
            message = f"{arch.display_id}: {metrics.get('status')}: {metrics.get('reason')}"
            if self.bar is not None:
                self.bar.write(message)
            else:
                print(message, file=sys.stderr)
        acc = metrics.get("val_accuracy", float("nan"))
        if acc == acc and not (self.best >= acc):
            self.best = acc
        if self.bar is not None:
            postfix = {"best_val_acc": f"{self.best:.4f}", "last": metrics.get("status")}
            if self.time_budget_s is not None:
                left = self.time_budget_s - self.bar.format_dict["elapsed"]
                postfix["time_left"] = f"{max(left, 0) / 60:.1f}m"
            self.bar.set_postfix(postfix)
            self.bar.update(1)

    def start_job(self, job: Any, done: int, total: int) -> None:
        rung = f" rung {job.rung}" + (" (another seed)" if job.role == "noise" else "")
        base = self.bar.n if self.bar is not None else 0
        self.start(job.arch, base, base + max(total - done, 1), rung)

    def done_job(self, job: Any, metrics: Any) -> None:
        self.done(job.arch, metrics)


def cmd_plot(args: argparse.Namespace) -> int:
    """`mobisearch plot`: the accuracy/latency frontier of a study as a PNG."""
    from mobisearch import results

    space = _load_space(args)
    study = results.load_study(_storage(args, space), args.study_name)
    path = pathlib.Path(args.output or _out_dir(args, space) / "pareto.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    print(_plot(study, results.candidate_records(results.trial_records(study)), path))
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    """`mobisearch best`: the most accurate finished candidate within the constraints."""
    from mobisearch import results

    space = _load_space(args)
    study = results.load_study(_storage(args, space), args.study_name)
    record = results.best_record(
        results.candidate_records(results.trial_records(study)),
        max_macs=args.max_macs,
        max_latency_ms=args.max_latency_ms,
        max_params=args.max_params,
    )
    if args.output:
        results.export_best(record, args.output)
    if args.json:
        print(json.dumps(record["arch"]))
    else:
        print(
            f"{record['display_id']}: val acc {record['val_accuracy']:.4f}, "
            f"{record['latency_ms']:.3f} ms, {record['macs']:,} MACs, {record['params']:,} params"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`mobisearch train`: train one config fully and report its test accuracy."""
    from mobisearch.results import read_arch_json

    arch = read_arch_json(args.config)
    space = _load_space(args)
    if args.export:
        _require_onnx()  # before training, not after it
    data = _load_data(space, args.data_dir)
    assert space.train is not None
    from mobisearch.data import image_mean_std
    from mobisearch.runtime import inline_cpu_dispatch
    from mobisearch.train import evaluate, train_and_evaluate

    inline_cpu_dispatch()  # before the first JAX computation

    from mobisearch.train import full_recipe

    cfg = full_recipe(space.train, epochs=args.epochs, n_train=len(data.x_train))
    steps = cfg.steps
    print(
        f"training {arch.display_id} for {args.epochs} epochs ({steps} steps of batch "
        f"{cfg.batch_size}, {cfg.optimizer} at {cfg.learning_rate:g}, warmup {cfg.warmup_steps}, "
        f"cosine decay, augmentation {args.augment}) on {data.name}"
    )
    result = train_and_evaluate(arch, cfg, data, seed=args.seed, augment=args.augment)
    if result.status != "ok":
        raise UsageError(f"training {arch.display_id} failed: {result.reason}")
    test_acc, _ = evaluate(
        arch, result.state, data.x_test, data.y_test, cfg=cfg, stats=image_mean_std(data.x_train)
    )
    cost = count_cost(arch)
    record = {
        "display_id": arch.display_id,
        "macs": cost.macs,
        "params": cost.params,
        "seed": args.seed,
        "epochs": args.epochs,
        "augment": args.augment,
        "steps": steps,
        "val_accuracy": result.val_accuracy,
        "test_accuracy": test_acc,
        "train_s": result.train_s,
        "compile_s": result.compile_s,
    }
    print(json.dumps(record) if args.json else "\n".join(f"{k}: {v}" for k, v in record.items()))
    if args.export:
        return _export_onnx(arch, result.state, data, args.export, args)
    return 0


def _require_onnx() -> None:
    from mobisearch.export import MissingExtraError, require_onnx

    try:
        require_onnx()
    except MissingExtraError as e:
        raise UsageError(str(e)) from None


def _export_onnx(
    arch: ArchSpec, state: Any, data: Dataset, output: str, args: argparse.Namespace
) -> int:
    """Export and check a trained state on the test split; 1 when the check fails."""
    from mobisearch import export
    from mobisearch.data import image_mean_std

    input_dtype = getattr(args, "input_dtype", "uint8")
    try:
        result = export.export_onnx(
            arch,
            state,
            output,
            stats=image_mean_std(data.x_train),
            images=data.x_test,
            labels=data.y_test,
            input_dtype=input_dtype,
        )
    except export.ExportCheckError as e:
        print(f"mobisearch {args.command}: error: export check failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_dict()) if args.json else result.summary())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`mobisearch export`: a trained network as an ONNX file, checked in onnxruntime."""
    from mobisearch.checkpoint import load_state
    from mobisearch.export import checkpoint_of
    from mobisearch.results import read_arch_json
    from mobisearch.runtime import inline_cpu_dispatch

    arch = read_arch_json(args.config)
    checkpoint = args.checkpoint or checkpoint_of(args.config)
    if checkpoint is None:
        raise UsageError(f"{args.config}: names no checkpoint; pass --checkpoint FILE")
    _require_onnx()
    data = _load_data(_load_space(args), args.data_dir)
    inline_cpu_dispatch()  # before the first JAX computation
    return _export_onnx(arch, load_state(arch, checkpoint), data, args.output, args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `mobisearch` command."""
    parser = _Parser(
        prog="mobisearch",
        description="Find the most accurate MobileNet-style network for a compute budget.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("cost", help="exact MACs, parameters and peak activation memory")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier alpha")
    p.add_argument("--resolution", type=int, default=224, help="input resolution (pixels)")
    p.add_argument("--kernel-size", type=int, default=3, help="depthwise kernel size")
    p.add_argument("--classes", type=int, default=1000, help="classifier outputs")
    p.add_argument("--in-channels", type=int, default=3, help="input image channels")
    p.add_argument("--space", help="a search-space TOML file (or a shipped space's name)")
    p.add_argument("--budget", type=_count, help="keep candidates within this many MACs")
    p.add_argument("--max-params", type=_count, help="keep candidates within this many params")
    p.add_argument(
        "--samples",
        type=_count,
        default=10_000,
        help="candidates costed when a space is too large to cost them all (default 10K)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of that sample (default 0)")
    p.add_argument("--plot", metavar="PNG", help="also draw the MACs/params histograms here")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON (a grid's candidates as a list; a per-stage space's fit report)",
    )
    p.set_defaults(func=cmd_cost)

    def study_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--space", help="space TOML file or shipped name (fashion_mnist_stages)")
        p.add_argument("--storage", help="optuna storage URL (default: results/<space>/study.db)")
        p.add_argument("--study-name", help="study in the storage (default: from the budget)")
        p.add_argument("--out-dir", help="results folder (default: results/<space>)")

    p = sub.add_parser("search", help="rank the candidates within a budget")
    study_args(p)
    p.add_argument("--budget", type=_count, help="max MACs per candidate (e.g. 20M)")
    p.add_argument("--max-params", type=_count, help="max parameters per candidate")
    p.add_argument("--data-dir", help="folder with the dataset's IDX files")
    p.add_argument(
        "--latency-batch", type=_positive_int, help="batch size of the latency measurement"
    )
    p.add_argument(
        "--backend",
        choices=("xla", "native"),
        help="how the model's operations run: native C++ kernels on the CPU, or plain XLA "
        "(default: native on a CPU where the kernels build, else xla)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a space value, e.g. train.steps=100 (repeatable)",
    )
    p.add_argument(
        "--compile-cache",
        help="JAX compilation cache folder "
        "(default: $MOBISEARCH_CACHE_DIR or ~/.cache/mobisearch/jax)",
    )
    p.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh")
    p.add_argument(
        "--heartbeat-s",
        type=_positive_int,
        default=DEFAULT_HEARTBEAT_S,
        help="seconds between this worker's heartbeats; a worker silent for "
        f"{GRACE_BEATS} beats is taken for dead and its candidate retried "
        f"(default {DEFAULT_HEARTBEAT_S})",
    )
    p.add_argument(
        "--max-latency-ms",
        type=_positive_float,
        help="latency budget: candidates measured (grid) or predicted (per-stage space) "
        "slower are dropped before any training",
    )
    p.add_argument(
        "--latency-backend",
        choices=("jax", "onnxruntime"),
        help="where latency is measured: this machine's JAX forward, or the exported ONNX "
        "graph in onnxruntime (needs mobisearch[onnx]); default: the space's [latency] backend",
    )
    p.add_argument(
        "--latency-threads",
        type=_positive_int,
        help="onnxruntime's intra-op threads (default 1: one phone core)",
    )
    p.add_argument(
        "--trials",
        type=_positive_int,
        help="candidates drawn at the first rung of a per-stage space (default: its "
        "[search] trials); a grid space trains all of its candidates",
    )
    p.add_argument(
        "--time-budget",
        type=_duration,
        help="wall-clock limit of this worker, e.g. 15m: the rungs share it in proportion "
        "to their compute, and the first rung stops drawing candidates when its share is spent",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("plot", help="plot a study's accuracy/latency frontier (PNG)")
    study_args(p)
    p.add_argument("--output", help="PNG path (default: <out-dir>/pareto.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("best", help="the best finished candidate within constraints")
    study_args(p)
    p.add_argument("--max-macs", type=_count)
    p.add_argument("--max-latency-ms", type=float)
    p.add_argument("--max-params", type=_count)
    p.add_argument("--output", help="also write the best-config JSON here")
    p.add_argument("--json", action="store_true", help="print the architecture as JSON")
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("train", help="train one config fully; report its test accuracy")
    p.add_argument("--config", required=True, help="best-config or architecture JSON file")
    p.add_argument("--space", help="space whose dataset and recipe to use")
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--augment",
        choices=("none", "flip", "flip+shift"),  # train.AUGMENTATIONS, without importing jax
        default="none",
        help="training-image augmentation: none, random horizontal flips, or flips and "
        "random 2-pixel translations",
    )
    p.add_argument("--data-dir", help="folder with the dataset's IDX files")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--export", metavar="ONNX", help="then export it to this ONNX file (mobisearch export)"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "export", help="export a trained network to ONNX, checked in onnxruntime on test images"
    )
    p.add_argument("--config", required=True, help="best-config or architecture JSON file")
    p.add_argument(
        "--checkpoint", help="trained weights (.msgpack; default: the one the config names)"
    )
    p.add_argument("--format", choices=("onnx",), default="onnx", help="file format (onnx)")
    p.add_argument("-o", "--output", required=True, help="the file to write")
    p.add_argument(
        "--space", help="space whose dataset gives the normalization and the test images"
    )
    p.add_argument("--data-dir", help="folder with the dataset's IDX files")
    p.add_argument(
        "--input-dtype",
        choices=("uint8", "float32"),
        default="uint8",
        help="what the graph takes: uint8 pixels 0..255 (default) or float32 in [0, 1]",
    )
    p.add_argument("--json", action="store_true", help="print the export record as JSON")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mobisearch` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import optuna

    # optuna logs every study creation and trial at INFO; the progress bar says enough.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return int(args.func(args))
    except (UsageError, ValueError, OSError) as e:
        # ValueError covers SpaceError, invalid architectures and bad data files; each
        # message already names the file, key and value.
        print(f"mobisearch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (optuna.exceptions.StorageInternalError, _sqlalchemy_error()) as e:
        # A full disk, a read-only file, a lost database connection: one line, not the
        # driver's traceback; the failed write was rolled back.
        where = getattr(args, "storage_url", None) or "the study's storage"
        reason = workers.error_reason(e)
        print(f"mobisearch {args.command}: error: {where}: {reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mobisearch {args.command}: interrupted", file=sys.stderr)
        return 130


def _sqlalchemy_error() -> type[Exception]:
    import sqlalchemy.exc

    return sqlalchemy.exc.SQLAlchemyError


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The command line's entry point: `main`, then exit with its status.

    After Ctrl-C it exits at once, without joining the compile pool's thread: a compile
    still running there would hold the exit for as long as it takes, and everything the
    search stores is committed as it goes.
    """
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 130:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
