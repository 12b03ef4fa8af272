"""Time mobisearch's Flax NNX MobileNet against PyTorch and Keras, side by side in one run.

Usage:
    python scripts/bench_models.py                        # every case and framework
    python scripts/bench_models.py --quick                # smoke run: few repeats
    python scripts/bench_models.py --cases 'infer-*' --repeats 50 --threads 1

Cases (`--cases` takes names or shell patterns):

* `infer-w100-r224-b1`, `infer-w100-r224-b32`, `infer-w050-r128-b1`, `infer-w050-r128-b32`:
  inference latency of MobileNet v1 (`mobilenet_v1`, 3 channels, 1000 classes) in eval mode.
* `train-w050-k3`, `train-w050-k5`, `train-w100-k3`, `train-w100-k5`: training throughput of
  the Fashion-MNIST candidates (`mobilenet_v1_small`, 28×28×1, 10 classes) at batch 128,
  one step = forward + backward + AdamW update (lr 1e-3, weight decay 1e-4 on kernels
  only), cross-entropy on random labels.

Frameworks (`--frameworks`), each building the same `ArchSpec.resolve()` layer list:

* `mobisearch`: `build_model` on the default backend (`native` on a CPU), NNX's
  functional form under `jax.jit`, compiled ahead of time: the search's own programs,
  `mobisearch.compile.compile_forward` (the eval-mode forward that latency is measured
  on) and `compile_train` (the train step, constant learning rate).
* `mobisearch-xla`: the same on the `xla` backend (plain JAX: shift-and-add depthwise
  convolutions on a CPU, flax's BatchNorm, optax's AdamW).
* `keras`: `keras.applications.MobileNet(weights=None, ...)` on Keras 3's JAX backend, its
  `stateless_call` under `jax.jit`. Inference only: it refuses inputs under 32×32 and
  cannot express a stride-1 stem or a 5×5 depthwise kernel (each skip records why).
* `torch-nchw`, `torch-cl`: a plain `torch.nn` MobileNet (conv-BN-ReLU, `groups=C`
  depthwise convs, global average pool, Linear), PyTorch eager on the CPU, NCHW and
  `torch.channels_last`. Fused AdamW. Symmetric padding `k // 2` gives the same output
  sizes as the SAME padding of the Flax model (checked layer by layer).
* `torch-compile-nchw`, `torch-compile-cl`: the same after `torch.compile(dynamic=False)`
  (default inductor mode; the optimizer stays eager). A failure is recorded with its reason.

Threads: every framework runs in this one process with the same `--threads n` (default
`os.cpu_count()`): the process's CPU affinity is cut to `n` CPUs (XLA:CPU sizes its thread
pool from the affinity mask), `XLA_FLAGS` gets `--xla_cpu_multi_thread_eigen` and
`intra_op_parallelism_threads=n`, and `torch.set_num_threads(n)`. All are recorded.

Timing: the first call (compile, or eager first-touch) is timed on its own, then `--warmup`
untimed calls. Rounds then interleave the frameworks (one timed call each, in an order that
rotates every round) so a change in machine load hits them all alike. A call shorter than
100 ms is preceded by one untimed call in each round, so the previous framework's spinning
thread pool has gone idle and the caches hold this framework's weights. JAX results are
`block_until_ready`-ed; torch inference runs under `torch.no_grad()`. Compiles are cold
unless `--keep-compile-caches`: JAX's persistent cache is off and inductor gets an empty
cache folder, removed at the end.

Reported per case and framework: median, min and max ms per call (training: images/s of the
median), speedup against PyTorch eager NCHW and channels-last (their median / this median,
>1 = faster than PyTorch), compile seconds (JAX: trace + lower + compile; torch.compile: the
first call), and GFLOP/s (inference 2·MACs per image, training 6·MACs per image, MACs from
`mobisearch.cost.count_cost`) against the float32 matmul peak measured in this run (best of
several jitted 2048×2048 matmuls in JAX, 8192×8192 on an accelerator, on each device used).

On a GPU machine JAX and Keras run on the default (GPU) backend while the CPU-only torch
build runs on the CPU; the table says so, and each row names its device.

Writes `results/benchmarks/bench-models-<backend>-jax<version>[-<tag>].csv` and `.md` (with
a `-quick` suffix for `--quick` runs) and prints the markdown table. Two frameworks' thread
pools in one process can slow either: `scripts/bench_separate.py` runs each framework in a
process of its own and puts the ratios side by side.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import gc
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from mobisearch import ops
from mobisearch.arch import ArchSpec, LayerSpec
from mobisearch.compile import compile_forward, compile_train
from mobisearch.cost import count_cost
from mobisearch.latency import device_fingerprint
from mobisearch.optim import init_optimizer, recipe_rates
from mobisearch.presets import mobilenet_v1, mobilenet_v1_small
from mobisearch.runtime import inline_cpu_dispatch, keep_freed_memory
from mobisearch.space import TrainConfig
from mobisearch.train import fresh_split

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as e:
    raise SystemExit(f"{e}: this benchmark needs PyTorch: pip install -e '.[bench]'") from e

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
BN_MOMENTUM_TORCH = 0.1  # = mobisearch's BN_MOMENTUM 0.9 in PyTorch's convention
BN_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark: `kind` "infer" (latency, eval mode) or "train" (one optimizer step)."""

    name: str
    kind: str
    arch: ArchSpec
    batch: int


def _cases() -> dict[str, Case]:
    cases = [
        Case(f"infer-w{round(w * 100):03d}-r{r}-b{b}", "infer", mobilenet_v1(w, r), b)
        for w, r in ((1.0, 224), (0.5, 128))
        for b in (1, 32)
    ]
    cases += [
        Case(f"train-w{round(w * 100):03d}-k{k}", "train", mobilenet_v1_small(w, 28, k), 128)
        for w in (0.5, 1.0)
        for k in (3, 5)
    ]
    return {case.name: case for case in cases}


CASES = _cases()
FRAMEWORKS = (
    "mobisearch",
    "mobisearch-xla",
    "keras",
    "torch-nchw",
    "torch-cl",
    "torch-compile-nchw",
    "torch-compile-cl",
)
REFERENCES = {"nchw": "torch-nchw", "cl": "torch-cl"}


# --- machine and threads ---------------------------------------------------------------


def configure_threads(n: int) -> dict[str, Any]:
    """Give every framework `n` threads. Must run before JAX's backend starts.

    Cuts the CPU affinity of every thread of this process to the first `n` allowed CPUs
    (threads started later inherit it), adds XLA's CPU threading flags to `XLA_FLAGS` and
    calls `torch.set_num_threads(n)` and `torch.set_num_interop_threads(n)`.

    Returns:
      What was set, for the CSV.
    """
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if allowed and n < len(allowed):
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), allowed[:n])
            except OSError:  # a thread that has just ended
                pass
    flags = os.environ.get("XLA_FLAGS", "").split()
    for flag in (
        f"--xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'}",
        f"intra_op_parallelism_threads={n}",
    ):
        if not any(f.split("=")[0] == flag.split("=")[0] for f in flags):
            flags.append(flag)
    os.environ["XLA_FLAGS"] = " ".join(flags)
    inline_cpu_dispatch()  # as the `mobisearch` command runs
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only possible before torch's first inter-op parallel work
        pass
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return {
        "threads": n,
        "cpu_affinity": f"{len(cpus)} cpus ({_ranges(cpus)})" if cpus else "",
        "xla_flags": os.environ["XLA_FLAGS"],
        "jax_cpu_async_dispatch": jax.config.read("jax_cpu_enable_async_dispatch"),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }


def _ranges(values: list[int]) -> str:
    """`[0, 1, 2, 5]` -> `"0-2,5"`."""
    spans: list[list[int]] = []
    for v in values:
        if spans and spans[-1][1] == v - 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def matmul_peak(device: jax.Device, repeats: int) -> float:
    """Best float32 GFLOP/s of a jitted n×n @ n×n matmul on `device` (n = 2048 on CPU,
    8192 on an accelerator), at JAX's default matmul precision like the models (on a recent
    NVIDIA GPU that may mean TF32)."""
    n = 2048 if device.platform == "cpu" else 8192
    a = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.float32), device)
    b = jax.device_put(jax.random.normal(jax.random.key(2), (n, n), jnp.float32), device)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# --- frameworks --------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
    """One framework ready to time on one case: `call()` runs a step and waits for it."""

    call: Callable[[], Any]
    device: str
    first_call_s: float
    compile_s: float | None = None
    note: str = ""


class Skip(Exception):
    """This framework does not run this case, for a recorded reason."""


def _first_call(call: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def _jax_inputs(case: Case) -> tuple[jax.Array, jax.Array]:
    arch = case.arch
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (case.batch, arch.resolution, arch.resolution, arch.in_ch))
    y = jax.random.randint(ky, (case.batch,), 0, arch.num_classes, jnp.int32)
    return x, y


def mobisearch_runner(case: Case, backend: str | None = None) -> Runner:
    """mobisearch's NNX model, functional form, AOT-compiled with `jax.jit`, on `backend`
    (default: this machine's)."""
    backend = backend or ops.default_backend()
    x, y = _jax_inputs(case)
    device = str(jax.devices()[0].device_kind)
    if case.kind == "infer":
        # The search's own latency program (what `mobisearch.rank` times).
        forward = compile_forward(case.arch, backend, case.batch)
        _, params, rest = fresh_split(case.arch, backend, training=False)

        bound = forward.bind(params, rest)

        def call() -> Any:
            return jax.block_until_ready(bound(x))

        note = f"backend={backend}; mobisearch.compile.compile_forward's program"
        return Runner(call, device, _first_call(call), forward.compile_s, note)

    cfg = TrainConfig(
        steps=1000,  # rows of the optimizer's coefficient table: more than the calls timed
        batch_size=case.batch,
        optimizer="adamw",
        learning_rate=LEARNING_RATE,
        schedule="constant",
        weight_decay=WEIGHT_DECAY,
    )
    # The search's own step (arch, recipe, backend, training-set size): the "training set"
    # is one batch and every step takes all of it.
    train = compile_train(case.arch, cfg, backend, case.batch)
    _, params, rest = fresh_split(case.arch, backend, training=True)
    state = [tuple(jax.tree.leaves((params, rest, init_optimizer(train.tx, params))))]
    idx = jnp.arange(case.batch, dtype=jnp.int32)
    rates = recipe_rates(cfg)

    def step() -> Any:
        # The step donates its state arguments: keep only the new ones.
        leaves, loss = train.executable(state[0], x, y, idx, rates)
        state[:] = [leaves]
        return jax.block_until_ready((state, loss))

    note = f"backend={backend}; mobisearch.compile.compile_train's step, constant lr"
    return Runner(step, device, _first_call(step), train.compile_s, note)


def _keras() -> Any:
    if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax":
        raise Skip(f"KERAS_BACKEND={os.environ['KERAS_BACKEND']!r}; this script needs 'jax'")
    try:
        import keras
    except ImportError as e:
        raise Skip(f"keras is not installed ({e}); pip install -e '.[bench]'") from e
    if keras.backend.backend() != "jax":
        raise Skip(f"keras was imported with the {keras.backend.backend()!r} backend")
    return keras


def keras_runner(case: Case) -> Runner:
    """`keras.applications.MobileNet` on the JAX backend, `stateless_call` under `jax.jit`."""
    keras = _keras()
    arch = case.arch
    shape = (arch.resolution, arch.resolution, arch.in_ch)
    mismatch = []
    if arch.stem_stride != 2:
        mismatch.append(f"its stem has stride 2, this arch {arch.stem_stride}")
    if {layer.kernel for layer in arch.resolve() if layer.op == "dw"} != {3}:
        mismatch.append("its depthwise kernels are 3x3 only")
    try:
        model = keras.applications.MobileNet(
            weights=None, alpha=arch.width, input_shape=shape, classes=arch.num_classes
        )
    except Exception as e:  # noqa: BLE001 - Keras' own refusal is the recorded reason
        raise Skip("; ".join([f"keras.applications.MobileNet refuses it ({e})", *mismatch])) from e
    if mismatch:
        raise Skip("not the same architecture: " + "; ".join(mismatch))
    if case.kind == "train":
        raise Skip("Keras is timed for inference only")
    params = model.count_params()
    if params != count_cost(arch).params:
        raise Skip(f"Keras model has {params} params, count_cost {count_cost(arch).params}")
    x, _ = _jax_inputs(case)
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def forward(trainable: Any, fixed: Any, x: jax.Array) -> jax.Array:
        return model.stateless_call(trainable, fixed, x, training=False)[0]

    t0 = time.perf_counter()
    compiled = jax.jit(forward).lower(trainable, fixed, x).compile()
    compile_s = time.perf_counter() - t0

    def call() -> Any:
        return jax.block_until_ready(compiled(trainable, fixed, x))

    note = "stateless_call; ReLU6, BN eps 1e-3, softmax output (as Keras builds it)"
    return Runner(call, str(jax.devices()[0].device_kind), _first_call(call), compile_s, note)


class TorchMobileNet(nn.Module):
    """MobileNet v1 in `torch.nn`, built from `ArchSpec.resolve()` like the Flax model.

    Every conv/dw/pw layer is `Conv2d(bias=False, padding=k // 2, groups=layer.groups)` →
    `BatchNorm2d` → ReLU (if `layer.act`); then global average pool and `Linear`.
    """

    def __init__(self, layers: tuple[LayerSpec, ...]) -> None:
        super().__init__()
        convs = [layer for layer in layers if layer.op in ("conv", "dw", "pw")]
        if any(layer.residual for layer in layers):
            raise ValueError("residual blocks are not supported (MobileNet v1 has none)")
        if [layer.op for layer in layers[len(convs) :]] != ["pool", "fc"]:
            raise ValueError("`layers` must be convs, then pool and fc")
        self.features = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(
                        layer.in_ch,
                        layer.out_ch,
                        layer.kernel,
                        stride=layer.stride,
                        padding=layer.kernel // 2,
                        groups=layer.groups,
                        bias=False,
                    ),
                    nn.BatchNorm2d(layer.out_ch, eps=BN_EPSILON, momentum=BN_MOMENTUM_TORCH),
                    *([nn.ReLU(inplace=True)] if layer.act else []),
                )
                for layer in convs
            )
        )
        self.head = nn.Linear(layers[-1].in_ch, layers[-1].out_ch)
        self.out_hw = [layer.out_hw for layer in convs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def build_torch_model(arch: ArchSpec) -> TorchMobileNet:
    """`TorchMobileNet` for `arch`, checked against `count_cost` and the layer list's sizes."""
    model = TorchMobileNet(arch.resolve())
    count = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers() if not name.endswith("num_batches_tracked")
    )
    expected = count_cost(arch).params
    if count != expected:
        raise AssertionError(f"torch model has {count} params + buffers, count_cost {expected}")
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for m in model.features
    ]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, arch.in_ch, arch.resolution, arch.resolution))
    for h in hooks:
        h.remove()
    if sizes != model.out_hw:
        raise AssertionError(f"torch layer sizes {sizes} != resolve()'s {model.out_hw}")
    return model


def torch_runner(case: Case, *, channels_last: bool, compile_: bool) -> Runner:
    """PyTorch on the CPU, eager or `torch.compile`d, NCHW or channels-last."""
    arch = case.arch
    torch.manual_seed(0)
    model = build_torch_model(arch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(case.batch, arch.in_ch, arch.resolution, arch.resolution)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, arch.num_classes, (case.batch,))
    fn: Callable[[torch.Tensor], torch.Tensor] = model
    note = "eager"
    if compile_:
        fn = torch.compile(model, dynamic=False)
        note = "torch.compile(dynamic=False), inductor default mode"
    if case.kind == "infer":
        model.eval()

        def call() -> Any:
            with torch.no_grad():
                return fn(x)

    else:
        model.train()
        decay = [p for p in model.parameters() if p.ndim > 1]
        rest = [p for p in model.parameters() if p.ndim <= 1]
        groups = [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": rest, "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=LEARNING_RATE, fused=True)
        note += "; fused AdamW (eager)"

        def call() -> Any:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(fn(x), y)
            loss.backward()
            opt.step()
            return loss

    first = _first_call(call)
    return Runner(call, "cpu", first, first if compile_ else None, note)


def make_runner(framework: str, case: Case) -> Runner:
    if framework == "mobisearch":
        return mobisearch_runner(case)
    if framework == "mobisearch-xla":
        return mobisearch_runner(case, "xla")
    if framework == "keras":
        return keras_runner(case)
    return torch_runner(
        case, channels_last=framework.endswith("-cl"), compile_="compile" in framework
    )


# --- timing ------------------------------------------------------------------------------


# Calls shorter than this get one untimed call before each timed one (see the docstring).
SETTLE_BELOW_MS = 100.0


def time_case(
    runners: dict[str, Runner], *, repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """`warmup` untimed calls each, then interleaved rounds: per round, each runner (in an
    order that rotates) makes one timed call, preceded by one untimed call if its last
    warm-up call took under `SETTLE_BELOW_MS`. Returns ms per runner and the failures."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    failed: dict[str, str] = {}
    settle: dict[str, int] = {}
    for name, runner in runners.items():
        last_ms = runner.first_call_s * 1e3
        try:
            for _ in range(warmup):
                t0 = time.perf_counter()
                runner.call()
                last_ms = (time.perf_counter() - t0) * 1e3
        except Exception as e:  # noqa: BLE001 - recorded in the row
            failed[name] = _reason(e)
        settle[name] = 1 if last_ms < SETTLE_BELOW_MS else 0
    names = list(runners)
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                if name in failed:
                    continue
                call = runners[name].call
                try:
                    for _ in range(settle[name]):
                        call()
                    t0 = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - t0) * 1e3)
                except Exception as e:  # noqa: BLE001 - recorded in the row
                    failed[name] = _reason(e)
    finally:
        gc.enable()
    return times, failed


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


# --- report ------------------------------------------------------------------------------


def _fmt(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float | int) else ""


def markdown(rows: list[dict[str, Any]], header: list[str]) -> str:
    """The results as a markdown page: machine and settings, one table, notes."""
    lines = [
        "# MobileNet v1: mobisearch (Flax NNX) vs PyTorch vs Keras 3 (JAX backend)",
        "",
        *(f"- {line}" for line in header),
        "",
        "Inference: ms per call at batch b (eval mode). Training: ms per step at batch 128"
        " (forward, backward, AdamW update). Median (min–max) over the timed rounds; img/s from"
        ' the median; "vs torch" = PyTorch eager\'s median / this median (>1: faster than'
        " PyTorch eager); GFLOP/s from 2·MACs (inference) or 6·MACs (training) per image;"
        " % peak of the float32 matmul peak of the row's device; compile s = JAX trace + lower"
        " + compile, or torch.compile's first call.",
        "",
        "| case | framework | device | median ms (min–max) | img/s | vs torch NCHW |"
        " vs torch CL | GFLOP/s | % peak | compile s |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if row["status"] != "ok":
            lines.append(
                f"| {row['case']} | {row['framework']} | {row['device']} |"
                f" {row['status']}: {row['reason']} | | | | | | |"
            )
            continue
        lines.append(
            f"| {row['case']} | {row['framework']} | {row['device']} |"
            f" {_fmt(row['median_ms'], 2)} ({_fmt(row['min_ms'], 2)}–{_fmt(row['max_ms'], 2)}) |"
            f" {_fmt(row['images_per_s'], 0)} | {_fmt(row['speedup_vs_torch_nchw'], 2)} |"
            f" {_fmt(row['speedup_vs_torch_cl'], 2)} | {_fmt(row['gflops'], 1)} |"
            f" {_fmt(row['pct_of_peak'], 1)} | {_fmt(row['compile_s'], 1)} |"
        )
    notes = {(row["framework"], row["kind"], row["notes"]) for row in rows if row["notes"]}
    lines += ["", "Notes:", ""]
    lines += [
        f"- {fw} ({kind}): {note}"
        for fw in FRAMEWORKS
        for f, kind, note in sorted(notes)
        if f == fw
    ]
    return "\n".join(lines) + "\n"


def run_case(
    case: Case, frameworks: list[str], *, repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, Runner], dict[str, tuple[str, str]]]:
    """Build every framework's runner for `case` and time them side by side.

    Returns:
      `(times_ms, runners, status)`, status being `(ok|skipped|failed, reason)`.
    """
    if any("compile" in fw for fw in frameworks):
        torch._dynamo.reset()  # fresh compiles per case, so no dynamic-shape recompiles
    runners: dict[str, Runner] = {}
    status: dict[str, tuple[str, str]] = {}
    for fw in frameworks:
        try:
            runners[fw] = make_runner(fw, case)
            status[fw] = ("ok", "")
        except Skip as e:
            status[fw] = ("skipped", str(e))
        except Exception as e:  # noqa: BLE001 - recorded in the row
            status[fw] = ("failed", _reason(e))
        first = f"first call {runners[fw].first_call_s:.1f} s" if fw in runners else ""
        print(f"  {case.name} {fw}: {status[fw][0]} {status[fw][1]}{first}", flush=True)
    times, failed = time_case(runners, repeats=repeats, warmup=warmup)
    for fw, reason in failed.items():
        status[fw] = ("failed", reason)
        times.pop(fw, None)
    return times, runners, status


def case_rows(
    case: Case,
    frameworks: list[str],
    times: dict[str, list[float]],
    runners: dict[str, Runner],
    status: dict[str, tuple[str, str]],
    *,
    peaks: dict[str, float],
    common: dict[str, Any],
) -> list[dict[str, Any]]:
    """One CSV row per framework of `case`."""
    cost = count_cost(case.arch)
    flops = (2 if case.kind == "infer" else 6) * cost.macs
    medians = {fw: statistics.median(ts) for fw, ts in times.items() if ts}
    rows = []
    for fw in frameworks:
        runner, median = runners.get(fw), medians.get(fw)
        device = runner.device if runner else "cpu" if fw.startswith("torch") else ""
        device = device or common["jax_device"]
        peak = peaks.get(device, 0.0)
        gflops = flops * case.batch / (median / 1e3) / 1e9 if median else None
        rows.append(
            {
                "case": case.name,
                "kind": case.kind,
                "arch": case.arch.display_id,
                "width": case.arch.width,
                "resolution": case.arch.resolution,
                "kernel": case.arch.resolve()[1].kernel,
                "batch": case.batch,
                "framework": fw,
                "device": device,
                "status": status[fw][0],
                "reason": status[fw][1],
                "notes": runner.note if runner else "",
                "median_ms": round(median, 3) if median else "",
                "min_ms": round(min(times[fw]), 3) if median else "",
                "max_ms": round(max(times[fw]), 3) if median else "",
                "repeats": len(times.get(fw, [])),
                "images_per_s": round(case.batch / (median / 1e3), 1) if median else "",
                **{
                    f"speedup_vs_torch_{key}": round(medians[ref] / median, 3)
                    if median and ref in medians
                    else ""
                    for key, ref in REFERENCES.items()
                },
                "macs_per_image": cost.macs,
                "flops_per_image": flops,
                "gflops": round(gflops, 2) if gflops else "",
                "peak_gflops": round(peak, 1) if peak else "",
                "pct_of_peak": round(100 * gflops / peak, 2) if gflops and peak else "",
                "compile_s": round(runner.compile_s, 3) if runner and runner.compile_s else "",
                "first_call_s": round(runner.first_call_s, 3) if runner else "",
                **common,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", nargs="+", default=["*"], help=f"names or patterns of {list(CASES)}"
    )
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds (default: infer 30, train 10)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 warm-up")
    parser.add_argument(
        "--keep-compile-caches",
        action="store_true",
        help="use JAX's and inductor's on-disk caches (compile_s is then not a cold compile)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("results/benchmarks"))
    parser.add_argument("--tag", default="", help="suffix of the output files' names")
    args = parser.parse_args(argv)
    cases = [c for n, c in CASES.items() if any(fnmatch.fnmatchcase(n, p) for p in args.cases)]
    if not cases:
        parser.error(f"--cases {args.cases} matches none of {list(CASES)}")
    if args.repeats is not None and args.repeats < 1 or args.threads < 1 or args.warmup < 0:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if args.quick:
        args.warmup = min(args.warmup, 1)

    start = time.perf_counter()
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    settings = configure_threads(args.threads)  # before anything starts JAX's backend
    with tempfile.TemporaryDirectory(prefix="bench-models-inductor-") as inductor_dir:
        if not args.keep_compile_caches:
            # Cold compiles on both sides: no persistent JAX cache, an empty inductor cache.
            jax.config.update("jax_enable_compilation_cache", False)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir
        # glibc keeps freed memory for reuse, for every framework (as the search trains).
        with keep_freed_memory():
            rows, header = _run(args, cases, command, settings)
    header.append(f"wall time {time.perf_counter() - start:.0f} s")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-models-{rows[0]['backend']}-jax{jax.__version__}"
    stem += f"-{args.tag}" if args.tag else ""
    stem += "-quick" if args.quick else ""
    csv_path, md_path = args.out_dir / f"{stem}.csv", args.out_dir / f"{stem}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, header)
    md_path.write_text(table)
    print()
    print(table)
    print(f"wrote {csv_path} and {md_path}")
    return 0


def _run(
    args: argparse.Namespace, cases: list[Case], command: str, settings: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Measure the peaks, run every case; return the CSV rows and the page's header lines."""
    fp = device_fingerprint(1)
    backend = jax.default_backend()
    device = jax.devices()[0]
    peak_repeats = 3 if args.quick else 10
    # Keyed by device kind ("cpu" on a CPU); the torch rows use the CPU's.
    peaks = {str(device.device_kind): matmul_peak(device, peak_repeats)}
    if device.platform != "cpu":
        cpu = jax.devices("cpu")[0]
        peaks[str(cpu.device_kind)] = matmul_peak(cpu, peak_repeats)
    versions = {
        "jax_version": jax.__version__,
        "flax_version": _version("flax"),
        "torch_version": torch.__version__,
        "keras_version": _version("keras"),
    }
    header = [
        f"command: `{command}`",
        f"machine: {fp['processor']} | cpu_count {os.cpu_count()} | {fp['platform']}",
        f"threads: {args.threads} for every framework | CPU affinity"
        f" {settings['cpu_affinity']} | XLA_FLAGS `{settings['xla_flags']}` |"
        f" torch.get_num_threads() {settings['torch_threads']}"
        f" (interop {settings['torch_interop_threads']}) | JAX CPU async dispatch"
        f" {settings['jax_cpu_async_dispatch']} | glibc keeps freed memory for every framework"
        " (`mobisearch.runtime.keep_freed_memory`)",
        f"jax {jax.__version__} (backend {backend}: {device.device_kind}) | flax"
        f" {versions['flax_version']} | torch {torch.__version__} | keras"
        f" {versions['keras_version']} | python {platform.python_version()}",
        f"float32 matmul peak (jitted JAX n×n matmul, best of {peak_repeats}): "
        + ", ".join(f"{kind} {gf:.0f} GFLOP/s" for kind, gf in peaks.items()),
        "compiles: "
        + ("on-disk caches allowed" if args.keep_compile_caches else "cold (no on-disk caches)"),
        f"load average at start: {os.getloadavg()}",
    ]
    if backend != "cpu":
        header.insert(
            4,
            f"**JAX and Keras ran on {device.device_kind} ({backend}); the torch rows ran on"
            " the CPU (CPU-only torch build), so their ratios compare different devices**",
        )
    print("\n".join(header), flush=True)
    common = {
        "command": command,
        "processor": fp["processor"],
        "cpu_count": os.cpu_count(),
        **settings,
        "backend": backend,
        "jax_device": str(device.device_kind),
        **versions,
    }
    rows: list[dict[str, Any]] = []
    for case in cases:
        repeats = args.repeats or (3 if args.quick else 30 if case.kind == "infer" else 10)
        times, runners, status = run_case(
            case, args.frameworks, repeats=repeats, warmup=args.warmup
        )
        rows += case_rows(
            case, args.frameworks, times, runners, status, peaks=peaks, common=common
        )
        print(f"done {case.name} ({time.strftime('%H:%M:%S')})", flush=True)
    header.append(f"load average at end: {os.getloadavg()}")
    return rows, header


if __name__ == "__main__":
    raise SystemExit(main())
