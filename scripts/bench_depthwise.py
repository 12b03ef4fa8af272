"""Time the depthwise-conv formulations side by side (forward and forward+backward).

Implementations (`--impls`): `grouped` (XLA's grouped convolution, `ops.depthwise_grouped`:
the XLA backend off the CPU), `shift` (shift-and-add, `ops.depthwise_shift`: the XLA
backend on a CPU) and `native` (the C++ kernels, `ops.depthwise_conv(backend="native")`).
For `model28` they name the whole model's backend: `grouped` and `shift` run the `xla`
backend (with that depthwise formulation), `native` the `native` one.

Usage:
    python scripts/bench_depthwise.py                     # all workloads, all impls
    python scripts/bench_depthwise.py --repeats 50 --workloads train28 infer224

Workloads (the depthwise layers of a real network, each fed its own random input):

* `train28`: the 13 dw layers of MobileNet-V1-small at 28×28, width 0.5, batch 128 (the
  search's training shape).
* `infer224`: the 13 dw layers of MobileNet-V1 at 224×224, width 1.0, batch 1 (inference).
* `model28`: the whole MobileNet-V1-small (28×28, width 0.5, batch 128) in training mode:
  logits, and the gradient of the cross-entropy loss w.r.t. the params.

Rounds interleave the implementations (one call of each per round), so a change in machine
load hits them all alike. Every timed result is `block_until_ready`-ed, after `--warmup`
untimed calls. Writes `results/benchmarks/bench-depthwise-<backend>-jax<version>.csv` and
prints a table headed by the command and the machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mobisearch import ops
from mobisearch.arch import ArchSpec
from mobisearch.models import build_model
from mobisearch.presets import mobilenet_v1, mobilenet_v1_small

IMPLS = ("grouped", "shift", "native")


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, stride: int, impl: str) -> jax.Array:
    if impl == "native":
        return ops.depthwise_conv(x, kernel, stride=stride, backend="native")
    formulation = ops.depthwise_grouped if impl == "grouped" else ops.depthwise_shift
    return formulation(x, kernel, stride)


WORKLOADS: dict[str, tuple[str, ArchSpec, int]] = {
    "train28": ("dw layers, mnv1-small 28x28 w0.5", mobilenet_v1_small(0.5, 28), 128),
    "infer224": ("dw layers, mnv1 224x224 w1.0", mobilenet_v1(1.0, 224), 1),
    "model28": ("whole model, mnv1-small 28x28 w0.5", mobilenet_v1_small(0.5, 28), 128),
}


def cpu_name() -> str:
    """The CPU model: `platform.processor()`, else `/proc/cpuinfo`'s model name."""
    name = platform.processor()
    if name and name not in ("x86_64", "aarch64", "arm", "i386"):
        return name
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name or platform.machine()


def dw_functions(arch: ArchSpec, batch: int, impl: str, key: jax.Array) -> tuple[Any, ...]:
    """Jitted forward and forward+backward over all dw layers of `arch`, and their args."""
    layers = [layer for layer in arch.resolve() if layer.op == "dw"]
    keys = jax.random.split(key, 3 * len(layers))
    xs, ks, cts = [], [], []
    for n, layer in enumerate(layers):
        xs.append(jax.random.normal(keys[3 * n], (batch, layer.in_hw, layer.in_hw, layer.in_ch)))
        ks.append(jax.random.normal(keys[3 * n + 1], (layer.kernel, layer.kernel, 1, layer.in_ch)))
        shape = (batch, layer.out_hw, layer.out_hw, layer.in_ch)
        cts.append(jax.random.normal(keys[3 * n + 2], shape))
    strides = [layer.stride for layer in layers]

    def forward(xs: list[jax.Array], ks: list[jax.Array]) -> list[jax.Array]:
        return [
            depthwise_conv(x, k, stride=s, impl=impl)
            for x, k, s in zip(xs, ks, strides, strict=True)
        ]

    def loss(xs: list[jax.Array], ks: list[jax.Array], cts: list[jax.Array]) -> jax.Array:
        # A random cotangent, so XLA cannot simplify the backward pass of a plain sum.
        ys = forward(xs, ks)
        return sum((jnp.vdot(y, ct) for y, ct in zip(ys, cts, strict=True)), jnp.float32(0))

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return (fwd, (xs, ks)), (fwd_bwd, (xs, ks, cts))


def model_functions(arch: ArchSpec, batch: int, impl: str, key: jax.Array) -> tuple[Any, ...]:
    """Jitted whole-model forward (train mode) and loss gradient, and their args."""
    model = build_model(arch, rngs=nnx.Rngs(0), backend="native" if impl == "native" else "xla")
    # NOTE: merge(..., copy=True): without it, under jax.grad BatchNorm may not update the
    # running stats of Variables that came from the outer trace (flax 0.12 TraceContextError).
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (batch, arch.resolution, arch.resolution, arch.in_ch))
    y = jax.random.randint(ky, (batch,), 0, arch.num_classes)

    def loss(params: Any, rest: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params, rest, copy=True)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def forward(params: Any, rest: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params, rest, copy=True)(x)

    fwd = jax.jit(_formulation(impl, forward))
    fwd_bwd = jax.jit(_formulation(impl, jax.grad(loss)))
    return (fwd, (params, rest, x)), (fwd_bwd, (params, rest, x, y))


def _formulation(impl: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, traced with the XLA backend's depthwise formulation set to `impl`."""

    def traced(*args: Any) -> Any:
        saved = ops.depthwise_shift
        if impl == "grouped":
            ops.depthwise_shift = ops.depthwise_grouped  # type: ignore[assignment]
        try:
            return fn(*args)
        finally:
            ops.depthwise_shift = saved  # type: ignore[assignment]

    return traced


def time_call(fn: Callable[..., Any], args: tuple[Any, ...]) -> float:
    """Seconds for one call, including waiting for the result."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument(
        "--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"]
    )
    parser.add_argument("--kernel", type=int, default=3, help="depthwise kernel size")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    parser.add_argument("--out-dir", type=Path, default=Path("results/benchmarks"))
    args = parser.parse_args(argv)

    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    backend = jax.default_backend()
    device = jax.devices()[0]
    header = [
        f"command: {command}",
        f"machine: {cpu_name()} | cpu_count {os.cpu_count()} | {platform.platform()}",
        f"jax {jax.__version__} | backend {backend} | devices {jax.devices()}",
        f"load average at start: {os.getloadavg()}",
    ]
    print("\n".join(header), flush=True)

    rows: list[dict[str, Any]] = []
    key = jax.random.key(0)
    for workload in args.workloads:
        desc, arch, batch = WORKLOADS[workload]
        arch = arch.with_kernel(args.kernel)
        make = model_functions if workload == "model28" else dw_functions
        dw = [layer for layer in arch.resolve() if layer.op == "dw"]
        dw_macs = sum(lay.out_hw**2 * lay.in_ch * lay.kernel**2 for lay in dw) * batch
        for mode in args.modes:
            calls: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {}
            compile_s: dict[str, float] = {}
            for impl in args.impls:
                fwd, fwd_bwd = make(arch, batch, impl, key)
                fn, fn_args = fwd if mode == "fwd" else fwd_bwd
                compile_s[impl] = time_call(fn, fn_args)  # first call: trace + compile + run
                for _ in range(args.warmup):
                    time_call(fn, fn_args)
                calls[impl] = (fn, fn_args)
            times: dict[str, list[float]] = {impl: [] for impl in args.impls}
            for _ in range(args.repeats):
                for impl, (fn, fn_args) in calls.items():
                    times[impl].append(time_call(fn, fn_args) * 1e3)
            ref = statistics.median(times["grouped"]) if "grouped" in times else None
            for impl, ts in times.items():
                median = statistics.median(ts)
                rows.append(
                    {
                        "workload": workload,
                        "description": desc,
                        "mode": mode,
                        "impl": impl,
                        "batch": batch,
                        "resolution": arch.resolution,
                        "width": arch.width,
                        "kernel": args.kernel,
                        "dw_layers": len(dw),
                        "dw_macs": dw_macs,
                        "median_ms": round(median, 3),
                        "min_ms": round(min(ts), 3),
                        "max_ms": round(max(ts), 3),
                        "repeats": args.repeats,
                        "compile_s": round(compile_s[impl], 2),
                        "speedup_vs_grouped": round(ref / median, 2) if ref else "",
                        "backend": backend,
                        "device_kind": device.device_kind,
                        "cpu": cpu_name(),
                        "cpu_count": os.cpu_count(),
                        "jax_version": jax.__version__,
                        "command": command,
                    }
                )
            print(f"  done {workload} {mode}", flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.kernel == 3 else f"-k{args.kernel}"
    path = args.out_dir / f"bench-depthwise-{backend}-jax{jax.__version__}{suffix}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    print()
    print("\n".join(header))
    cols = [
        "workload",
        "mode",
        "impl",
        "median_ms",
        "min_ms",
        "max_ms",
        "speedup_vs_grouped",
        "compile_s",
    ]
    print(f"{cols[0]:<10}{cols[1]:<9}{cols[2]:<11}" + "".join(f"{c:>20}" for c in cols[3:]))
    for row in rows:
        print(
            f"{row['workload']:<10}{row['mode']:<9}{row['impl']:<11}"
            + "".join(f"{row[c]!s:>20}" for c in cols[3:])
        )
    print(f"load average at end: {os.getloadavg()}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
