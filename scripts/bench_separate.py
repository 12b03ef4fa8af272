"""Run `scripts/bench_models.py` once per framework, each in a process of its own, and put
the speed ratios side by side.

In one process, PyTorch's and XLA's thread pools both stay alive, and either can slow the
other; here each framework has the machine to itself (the runs follow one another, so a
change in machine load between them is not cancelled out as the interleaved rounds of one
process cancel it: compare with the one-process figures).

Usage:
    python scripts/bench_separate.py                         # mobisearch vs torch-cl
    python scripts/bench_separate.py --frameworks mobisearch torch-cl torch-nchw

Writes `results/benchmarks/bench-separate-<backend>-jax<version>.csv` and `.md`: per case,
each framework's median ms and images/s, and the ratio of the reference's median to each
framework's (> 1: faster than the reference).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", nargs="+", default=["mobisearch", "torch-cl"])
    parser.add_argument("--reference", default="torch-cl", help="the ratios' denominator")
    parser.add_argument("--cases", nargs="+", default=["*"])
    parser.add_argument("--out-dir", type=Path, default=Path("results/benchmarks"))
    parser.add_argument("extra", nargs="*", help="more bench_models.py arguments (after --)")
    args = parser.parse_args(argv)
    if args.reference not in args.frameworks:
        parser.error(f"--reference {args.reference} must be one of --frameworks")
    rows: dict[str, list[dict[str, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-separate-") as tmp:
        for fw in args.frameworks:
            command = [
                sys.executable, str(HERE / "bench_models.py"), "--frameworks", fw,
                "--cases", *args.cases, "--out-dir", tmp, "--tag", fw, *args.extra,
            ]  # fmt: skip
            print("$", " ".join(command), flush=True)
            subprocess.run(command, check=True)
            (csv_path,) = Path(tmp).glob(f"bench-models-*-{fw}*.csv")
            with csv_path.open() as f:
                rows[fw] = list(csv.DictReader(f))
    by_case: dict[str, dict[str, dict[str, str]]] = {}
    for fw, fw_rows in rows.items():
        for row in fw_rows:
            by_case.setdefault(row["case"], {})[fw] = row
    out = []
    for case, per_fw in by_case.items():
        ref = per_fw.get(args.reference, {}).get("median_ms", "")
        for fw, row in per_fw.items():
            median = row["median_ms"]
            ratio = float(ref) / float(median) if ref and median else ""
            out.append(
                {
                    "case": case,
                    "framework": fw,
                    "status": row["status"],
                    "median_ms": median,
                    "min_ms": row["min_ms"],
                    "max_ms": row["max_ms"],
                    "images_per_s": row["images_per_s"],
                    f"speedup_vs_{args.reference}": round(ratio, 3) if ratio else "",
                    "processor": row["processor"],
                    "jax_version": row["jax_version"],
                    "torch_version": row["torch_version"],
                }
            )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-separate-{jax.default_backend()}-jax{jax.__version__}"
    with (args.out_dir / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)
    lines = [
        f"command: `python {' '.join(sys.argv)}`",
        f"machine: {out[0]['processor']}; each framework in a process of its own",
        "",
        f"| case | framework | median ms | images/s | × {args.reference} |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in out:
        lines.append(
            f"| {r['case']} | {r['framework']} | {r['median_ms']} | {r['images_per_s']} | "
            f"{r[f'speedup_vs_{args.reference}']} |"
        )
    (args.out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
