"""Short, JIT-compiled training runs that rank candidates: `train_and_evaluate`.

The recipe (`mobisearch.space.TrainConfig`) is identical for every candidate of a search, so
the rankings are comparable. The loop is NNX's *functional* one: the model is split once
into a static graph and array state, and a plain `jax.jit` step merges them inside
(the NNX performance guide shows `nnx.jit` graph traversal dominating small models).

* Compile once per architecture: the train step and the eval-mode forward passes are
  lowered and compiled ahead of time (`jit(...).lower(...).compile()`), so compile time
  and train time are measured separately, and the compiled executables are cached by the
  hashable (`ArchSpec`, `TrainConfig`, implementation) key.
* The training set lives on the device; each step receives only its batch indices.
* A loss that turns NaN or infinite ends the run as `status="diverged"` with the reason;
  the search records it and goes on.

Images are resized to the candidate's resolution (`mobisearch.data.resize_images`) and
normalised with the training split's mean and standard deviation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import gc
import math
import os
import pathlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mobisearch import kernels
from mobisearch.arch import ArchSpec
from mobisearch.data import cache_dir, image_mean_std, normalize_images, resize_images
from mobisearch.models import (
    abstract_split,
    build_model,
    default_depthwise_impl,
    inference_apply,
    inference_shapes,
    inference_state,
    native_loss_and_grads,
    split_model,
)

if TYPE_CHECKING:
    from mobisearch.data import Dataset
    from mobisearch.space import TrainConfig

# How often (in steps) the host reads the loss back to check for divergence. Reading it every
# step would force a device sync per step.
_CHECK_EVERY = 25


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    """Outcome of one short training run.

    Attributes:
      status: `"ok"` or `"diverged"` (a NaN or infinite loss).
      reason: why it failed, or `""`.
      val_accuracy: top-1 accuracy on the validation split (NaN if diverged).
      val_loss: mean cross-entropy on the validation split.
      loss_curve: training loss per step (up to the failure).
      steps: optimizer steps taken.
      compile_s: wall seconds spent compiling the train step and the eval forward, which
        compile side by side (0 when cached).
      train_s: seconds of training, compile excluded.
      eval_s: seconds of validation.
      state: the trained model state (`nnx.State`), for latency, test evaluation, export.
    """

    status: str
    reason: str = ""
    val_accuracy: float
    val_loss: float
    loss_curve: tuple[float, ...]
    steps: int
    compile_s: float
    train_s: float
    eval_s: float
    state: Any = dataclasses.field(default=None, repr=False, compare=False)


CACHE_ENV_VAR = "MOBISEARCH_CACHE_DIR"


def enable_compilation_cache(
    path: str | os.PathLike[str] | None = None, *, min_compile_time_s: float = 0.05
) -> pathlib.Path:
    """Turn on JAX's persistent compilation cache, so a rerun compiles nothing again.

    Compiled train steps and forward passes are stored on disk, keyed by the program and
    the backend; re-running a search, or a later search over the same architectures and
    recipe, loads them instead of compiling.

    Args:
      path: the cache folder; default `$MOBISEARCH_CACHE_DIR`, else
        `$XDG_CACHE_HOME/mobisearch/jax` (`~/.cache/mobisearch/jax`).
      min_compile_time_s: programs that compile faster are not cached (JAX's own
        threshold is 1 s). A candidate's eval-mode forward passes compile in 0.10-0.25 s
        on 2 cores, so the default of 0.05 s caches them with the train step, while eager
        JAX's small per-shape programs (~0.03 s) stay out of the cache.

    Returns:
      The folder used.
    """
    if path is None:
        path = os.environ.get(CACHE_ENV_VAR) or cache_dir("jax")
    folder = pathlib.Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


# NOTE: XLA:CPU mallocs a train step's temporaries on every call (264 MB for
# mnv1_w050_r28_k3 at batch 128). glibc serves a block that large with a fresh mmap and unmaps
# it when freed, so each step faulted in ~64k zeroed 4-KiB pages: 28% of a step's CPU samples
# were in the kernel. Inside `keep_freed_memory` glibc takes large blocks from its heap and
# keeps what is freed, so every step reuses the same pages. Only the main heap can do that,
# i.e. only when the step runs on the calling thread: with async dispatch XLA allocates on a
# worker thread, whose glibc arena mmaps every block over 64 MB. Hence `inline_cpu_dispatch`.
# Both together: 185 -> 130 ms per step (2-core Xeon, jax 0.10.2, mnv1_w050_r28_k3, batch
# 128); either alone: no change. (Huge pages for the mmaps, `GLIBC_TUNABLES=
# glibc.malloc.hugetlb=1`, gave 155 ms but must be set before the process starts.)
# In about 1 process in 10 (3 of 10, 1 of 20 and 1 of 16 runs of the page-fault test's
# script), steps still faulted in ~16k fresh pages each: some temporaries came from an XLA
# pool thread's arena. With one arena for all threads (`M_ARENA_MAX` 1, set by
# `inline_cpu_dispatch` before XLA starts its threads) that script faulted in no page in
# 20 of 20 runs, and train steps took as long (mnv1_w050_r28_k3 89-91 vs 91-96 ms,
# mnv1_w025_r20_k3 24-26 vs 25-26 ms, 2 runs each, 2-core AMD EPYC).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # <malloc.h>
_GLIBC_DEFAULTS = ((_M_TRIM_THRESHOLD, 128 * 1024), (_M_MMAP_MAX, 65536))


def inline_cpu_dispatch() -> None:
    """Run XLA:CPU computations on the calling thread instead of dispatching them to a worker.

    The training loop is then ~30% faster on CPU (see `keep_freed_memory`). JAX reads the
    setting when its CPU backend starts, so call this before the process's first JAX
    computation; the `mobisearch` command and the benchmark scripts do. Later calls change
    nothing. `JAX_CPU_ENABLE_ASYNC_DISPATCH=1` in the environment overrides it. Under
    glibc it also makes threads started from now on allocate from the main heap
    (`M_ARENA_MAX` 1), so that `keep_freed_memory` covers what XLA's pool threads allocate.
    """
    if os.environ.get("JAX_CPU_ENABLE_ASYNC_DISPATCH") is None:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    mallopt = _mallopt()
    if mallopt is not None:
        mallopt(_M_ARENA_MAX, 1)  # every thread allocates from the main heap: see the note


# NOTE: Python's full (generation 2) garbage collections walk every tracked object, and
# after importing jax, flax and optuna those are ~10^6: each took ~0.14 s, 15 of them in the
# default search (2.1 s, in tracing and compiles mostly). With the heap alive at the start
# frozen, the search's collections took 1.4 s (25 of them, over fewer objects), and a
# candidate's three compiles 0.61 -> 0.50 s (median of 12, one after the other, 2-core AMD
# EPYC, jax 0.10.2, ad hoc). Raising the generation-2 threshold during compiles instead, as
# PyTorch's compiler does, only moved each collection into the training that followed.
def prepare_process() -> None:
    """Once per process, before the first candidate: load the native kernels (building them
    if needed), ask XLA which compile options it knows, and exempt every object alive now
    (imported modules, the dataset) from Python's cyclic garbage collector (`gc.freeze`).

    The first two are one-time costs the first candidate's compile would pay otherwise
    (~0.1 s); the last keeps each later full collection from walking them again. A
    long-running program that calls this more than once only freezes what it made since.
    """
    kernels.available()
    train_compiler_options()
    inference_compiler_options("native")
    gc.collect()
    gc.freeze()


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's `mallopt`, or None under another C library or system."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
        mallopt: Callable[[int, int], int] = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return None
    return mallopt if libc.startswith("glibc") else None


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Inside: glibc serves large blocks from its heap and does not hand freed memory back to
    the system, so repeated train steps reuse their temporaries' pages (with
    `inline_cpu_dispatch`; see the note above). On exit, glibc's default thresholds.

    `train_and_evaluate` trains inside it; it does nothing off glibc or off the CPU backend.
    """
    mallopt = _mallopt()
    if mallopt is None or jax.default_backend() != "cpu":
        yield
        return
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        for param, value in _GLIBC_DEFAULTS:
            mallopt(param, value)


def make_schedule(cfg: TrainConfig) -> optax.ScalarOrSchedule:
    """The learning-rate schedule of a training recipe (optax's)."""
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=cfg.learning_rate,
            warmup_steps=min(cfg.warmup_steps, max(cfg.steps - 1, 0)),
            decay_steps=max(cfg.steps, 1),
            end_value=cfg.learning_rate * 0.01,
        )
    return cfg.learning_rate


# optax.adamw's default decay rates and epsilon, and the SGD momentum of `make_optimizer`.
_ADAM_B1, _ADAM_B2, _ADAM_EPS, _SGD_MOMENTUM = 0.9, 0.999, 1e-8, 0.9


def _decays(param: Any) -> bool:
    """Whether weight decay applies: to kernels (rank > 1), not to BatchNorm or biases."""
    return bool(param.ndim > 1)


def _host_zeros(shapes: Any) -> Any:
    """Device arrays of zeros shaped like the `jax.ShapeDtypeStruct` leaves of `shapes`,
    filled on the host (one transfer per leaf, nothing compiled)."""
    return jax.device_put(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optax optimizer and learning-rate schedule of a training recipe.

    Weight decay applies to kernels only (arrays of rank > 1), not to BatchNorm or biases.
    """
    lr = make_schedule(cfg)

    def decay_mask(params: Any) -> Any:
        return jax.tree.map(_decays, params)

    if cfg.optimizer == "adamw":
        return optax.adamw(
            lr, _ADAM_B1, _ADAM_B2, _ADAM_EPS, weight_decay=cfg.weight_decay, mask=decay_mask
        )
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.sgd(lr, momentum=_SGD_MOMENTUM, nesterov=True),
    )


@dataclasses.dataclass(frozen=True)
class OptaxStep:
    """`make_optimizer(cfg)` as a train step applies it: `step(grads, state, params) ->
    (params, state)`, `init(params)` (host zeros, `init_optimizer`) and `shapes(params)`."""

    cfg: TrainConfig

    @functools.cached_property
    def tx(self) -> optax.GradientTransformation:
        return make_optimizer(self.cfg)

    def init(self, params: Any) -> Any:
        return init_optimizer(self.tx, params)

    def shapes(self, params: Any) -> Any:
        return jax.eval_shape(self.tx.init, params)

    def step(self, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        updates, state = self.tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state


# NOTE: through optax, XLA:CPU compiles each parameter array's update as its own kernel:
# ~80 of the ~100 kernels of a MobileNet train step. The train step of mnv1_w050_r28_k5
# compiled in 1.14-1.24 s with them and 0.37-0.41 s with the update as one opaque call
# (2-core Xeon, jax 0.10.2, ad hoc), hence `NativeStep`.
@dataclasses.dataclass(frozen=True)
class NativeStep:
    """`OptaxStep` as one native call per step (`mobisearch.kernels.optimizer_update`, CPU,
    float32): the same float32 operations in the same order, optax's schedule. The state is
    `{"count": int32, "moments": [m, v] (AdamW) or [m] (SGD)}`, each moment ONE flat array:
    those of `jax.tree.leaves(params)`, raveled one after the other."""

    cfg: TrainConfig

    def _moments(self) -> int:
        return 2 if self.cfg.optimizer == "adamw" else 1

    def shapes(self, params: Any) -> Any:
        flat = jax.ShapeDtypeStruct((kernels.flat_size(jax.tree.leaves(params)),), jnp.float32)
        count = jax.ShapeDtypeStruct((), jnp.int32)
        return {"count": count, "moments": [flat] * self._moments()}

    def init(self, params: Any) -> Any:
        return _host_zeros(self.shapes(params))

    def step(self, grads: Any, state: Any, params: Any) -> tuple[Any, Any]:
        leaves, treedef = jax.tree.flatten(params)
        adam = self.cfg.optimizer == "adamw"
        new, moments, count = kernels.optimizer_update(
            leaves,
            jax.tree.leaves(grads),
            state["moments"],
            coefficient_table(self.cfg),
            state["count"],
            b1=_ADAM_B1 if adam else _SGD_MOMENTUM,
            b2=_ADAM_B2 if adam else 0.0,
            eps=_ADAM_EPS if adam else 0.0,
            weight_decay=self.cfg.weight_decay,
            decay=[_decays(p) for p in leaves],
        )
        return jax.tree.unflatten(treedef, new), {"count": count, "moments": moments}


def _coefficients(cfg: TrainConfig, count: jax.Array) -> jax.Array:
    """`[lr, bc1, bc2]` of the step after `count` steps: optax's schedule, and Adam's bias
    corrections (which count this step, as optax's do)."""
    lr = make_schedule(cfg)
    inc = count + 1
    return jnp.stack(
        [
            jnp.asarray(lr(count) if callable(lr) else lr, jnp.float32),
            jnp.asarray(1 - _ADAM_B1**inc, jnp.float32),
            jnp.asarray(1 - _ADAM_B2**inc, jnp.float32),
        ]
    )


def prepare_recipe(cfg: TrainConfig, depthwise: str | None = None) -> None:
    """Once per search, before the first candidate: what every candidate's train step of
    the recipe `cfg` shares, computed now rather than in the first candidate's compile (the
    native optimizer's `coefficient_table`, ~0.1 s: a small program of its own)."""
    if _runs_native(depthwise or default_depthwise_impl()):
        coefficient_table(cfg)


# NOTE: computed in every train step, the schedule and bias corrections were a dozen scalar
# operations to trace and lower, and two LLVM-compiled XLA kernels, in every candidate's
# program; as a table computed once per recipe, the same values bit for bit (one program
# compiled once per process and recipe).
@functools.lru_cache(maxsize=8)
def coefficient_table(cfg: TrainConfig) -> np.ndarray:
    """`[cfg.steps, 3]` float32: row `t` the `[lr, bc1, bc2]` of step `t` of the recipe
    (`NativeStep`'s `kernels.optimizer_update` reads row `count`). Cached per recipe."""
    with jax.ensure_compile_time_eval():  # computed now, also when asked for in a trace
        steps = jnp.arange(max(cfg.steps, 1), dtype=jnp.int32)
        table = jax.jit(jax.vmap(functools.partial(_coefficients, cfg)))(steps)
        out = np.asarray(table, np.float32)
    out.flags.writeable = False
    return out


def _runs_native(depthwise: str) -> bool:
    """Whether a model built with `depthwise` runs native kernels (CPU, kernels available)."""
    return depthwise == "native" and jax.default_backend() == "cpu" and kernels.available()


def optimizer_step(cfg: TrainConfig, depthwise: str) -> OptaxStep | NativeStep:
    """The optimizer of a model built with `depthwise`: `NativeStep` where that build runs
    native kernels (CPU, kernels available), optax's otherwise."""
    return NativeStep(cfg) if _runs_native(depthwise) else OptaxStep(cfg)


def init_optimizer(tx: optax.GradientTransformation, params: Any) -> Any:
    """`tx.init(params)` for the optimizers of `make_optimizer`, built on the host.

    Every leaf of their state starts at zero (step counts, first and second moments,
    momentum), so the state is made from `jax.eval_shape(tx.init, params)` with numpy
    zeros. Eager `tx.init` dispatched one zero-fill per leaf and compiled one per new shape:
    0.2-0.9 s per candidate on 2 cores.

    Raises:
      ValueError: if `tx`'s state has a leaf that does not start at zero (checked on a
        one-element stand-in of `params`), i.e. `tx` is not one of those optimizers.
    """
    probe = tx.init(jax.tree.map(lambda p: jnp.zeros((1,) * p.ndim, p.dtype), params))
    if any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(probe)):
        raise ValueError("init_optimizer: the optimizer's state does not start at zero")
    return _host_zeros(jax.eval_shape(tx.init, params))


# NOTE: optax's loss and its autodiff left XLA:CPU a dozen small fusions (log-softmax,
# take_along_axis and its scatter-add transpose); as one native call (in double), the train
# step's XLA compile went 0.23 -> 0.14 s (median of 8 candidates, 2-core AMD EPYC, jax
# 0.10.2, with the elemental emitters; ad hoc). So the native train step takes its loss and
# gradient from `kernels.softmax_cross_entropy` (in `models.native_loss_and_grads`).
def _loss(logits: jax.Array, labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """Mean softmax cross-entropy with optax's label smoothing (optax's)."""
    if smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# Counts how often each step function is traced: the no-recompilation test reads it.
TRACE_COUNTS: dict[str, int] = {"train_step": 0, "forward": 0}


def fresh_split(
    arch: ArchSpec, depthwise: str | None = None, *, training: bool, seed: int = 0
) -> tuple[Any, Any, Any]:
    """`(graphdef, params, rest)` of a freshly built model in train or eval mode.

    The graph of a train-mode model uses batch statistics in BatchNorm, that of an eval-mode
    model the running averages; `params` and `rest` have the same structure either way.
    """
    model = build_model(arch, rngs=nnx.Rngs(seed), depthwise=depthwise)
    if training:
        model.train()
    else:
        model.eval()
    return split_model(model)


@dataclasses.dataclass(frozen=True)
class _Graphs:
    """The static graph of one architecture in training mode, and its abstract state."""

    train: Any
    params: Any  # ShapeDtypeStruct leaves
    rest: Any


@functools.lru_cache(maxsize=64)
def _graphs(arch: ArchSpec, depthwise: str) -> _Graphs:
    """`split_model` of the abstract model (`mobisearch.models.abstract_split`, which
    `build_model` shares), for what needs only the graph and shapes: compiling the train
    step, restoring a checkpoint."""
    graph_train, state = abstract_split(arch, depthwise=depthwise)
    params, rest = nnx.split_state(state, nnx.Param, ...)  # = split_model's, without a merge
    return _Graphs(graph_train, params, rest)


def abstract_state(arch: ArchSpec, depthwise: str | None = None) -> tuple[Any, Any]:
    """`(params, rest)` of `arch` with `jax.ShapeDtypeStruct` leaves: its structure and
    shapes without building it (cached; do not modify them)."""
    graphs = _graphs(arch, depthwise or default_depthwise_impl())
    return graphs.params, graphs.rest


@dataclasses.dataclass(frozen=True, slots=True)
class CompileTimes:
    """Where the compile of one program went, in wall seconds.

    Attributes:
      graphs_s: building the architecture's abstract model (`abstract_state`); cached, so
        only the first program of an architecture pays it.
      trace_s: tracing the step to a jaxpr: Python running NNX's merge, the model and optax.
      lower_s: lowering the jaxpr to StableHLO.
      xla_s: XLA's compile, or the load from the persistent compilation cache.
    """

    graphs_s: float
    trace_s: float
    lower_s: float
    xla_s: float

    @property
    def total_s(self) -> float:
        return self.graphs_s + self.trace_s + self.lower_s + self.xla_s


@dataclasses.dataclass(frozen=True)
class _Compiled:
    step: Any
    times: CompileTimes

    @property
    def compile_s(self) -> float:
        return self.times.total_s


@dataclasses.dataclass(frozen=True)
class _CompiledTrain(_Compiled):
    optimizer: OptaxStep | NativeStep


def _timed_graphs(arch: ArchSpec, depthwise: str) -> tuple[_Graphs, float]:
    t0 = time.perf_counter()
    graphs = _graphs(arch, depthwise)
    return graphs, time.perf_counter() - t0


def _aot_compile(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    start: float,
    graphs_s: float,
    compiler_options: dict[str, str | bool],
    donate_argnums: tuple[int, ...] = (),
) -> tuple[Any, CompileTimes]:
    """`jax.jit(fn).trace(*args).lower().compile(...)`, timing each stage; `start` is when
    the caller began preparing the trace (building the optimizer, abstract arguments)."""
    traced = jax.jit(fn, donate_argnums=donate_argnums).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options)
    return compiled, CompileTimes(graphs_s, t1 - start, t2 - t1, time.perf_counter() - t2)


# NOTE: XLA:CPU hands dots, reductions and elementwise fusions to YNNPACK by default.
# Keeping it to dots and reductions made a training step 15-20% faster with the native
# depthwise kernel (jax 0.10.2, 2-core Xeon, median of 20 steps at batch 128:
# mnv1_w050_r28_k3 234 -> 190 ms, mnv1_w075_r28_k5 383 -> 318 ms) but made inference with
# the shift-and-add forward 1.4-2.7x slower, so it is a per-program compile option of the
# train step only, not a process-wide XLA_FLAGS setting.
# XLA:CPU's older elemental IR emitters (`xla_cpu_use_fusion_emitters` off) compile the
# train step's remaining loop fusions (loss, batch gather) faster than its MLIR fusion
# emitters: XLA 0.34 -> 0.23 s, median of 8 candidates, with the same losses and parameters
# bit for bit after 12 steps and no slower steps (2-core AMD EPYC, jax 0.10.2, ad hoc).
_CPU_TRAIN_COMPILER_OPTIONS: dict[str, str | bool] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "xla_cpu_use_fusion_emitters": False,
}


# One probe at a time: the train step's and the eval programs' options are looked up on
# two threads, and the same option probed on both at once compiled the same probe twice
# (the second a hit in a persistent cache that was empty when the process started).
_PROBE_LOCK = threading.Lock()


def _xla_accepts(name: str, value: str | bool) -> bool:
    """Whether this jaxlib's XLA knows the compile option `name` (options come and go
    between XLA versions; an unknown one fails the compile). Probed once per process."""
    with _PROBE_LOCK:
        return _probe_option(name, value)


@functools.cache
def _probe_option(name: str, value: str | bool) -> bool:
    probe = jax.jit(lambda x: x + 1).lower(jax.ShapeDtypeStruct((1,), jnp.float32))
    try:
        probe.compile(compiler_options={name: value})
    except jax.errors.JaxRuntimeError:
        return False
    return True


def _known(options: dict[str, str | bool]) -> dict[str, str | bool]:
    return {name: value for name, value in options.items() if _xla_accepts(name, value)}


def train_compiler_options(backend: str | None = None) -> dict[str, str | bool]:
    """XLA compiler options for the train step on `backend` (default: JAX's); options
    this jaxlib's XLA does not know are left out."""
    if (backend or jax.default_backend()) == "cpu":
        return _known(_CPU_TRAIN_COMPILER_OPTIONS)
    return {}


# NOTE: with the native eval-mode depthwise pass (no shift-and-add slices left to fuse),
# XLA:CPU's own emitters beat YNNPACK's fusions in the eval-mode programs: YNNPACK off
# made them faster in every case measured and compile ~15% faster (2-core Xeon, jax
# 0.10.2, median ms, ad hoc: mnv1 α1/224 b1 8.41 -> 7.53, b32 259 -> 223, α0.5/128 b1
# 1.80 -> 1.69, b32 30.7 -> 29.4; mnv1_w050_r28_k3 b1 0.62 -> 0.58, b1000 189 -> 175).
# Keeping only dots and reductions on YNNPACK, as the train step does, was the slowest.
# With shift-and-add (no native kernels) YNNPACK's fusions stay: turning them off made
# batch 1 slower there.
# The two loop fusions left (the pool's division, the head's bias) compile faster with the
# older elemental emitters, as in the train step: XLA 0.053 -> 0.039-0.047 s at the eval
# batch and 0.075 -> 0.056-0.064 s at batch 1 (median of 8 candidates, three rounds), with
# forward times level (w025_r20_k3 b1000 88.3 vs 81.4 ms, b1 0.32 vs 0.32 ms) and logits
# equal to float32 rounding (2-core AMD EPYC, jax 0.10.2, ad hoc).
_CPU_NATIVE_INFERENCE_COMPILER_OPTIONS: dict[str, str | bool] = {
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_use_fusion_emitters": False,
}


def inference_compiler_options(
    depthwise: str, backend: str | None = None
) -> dict[str, str | bool]:
    """XLA compiler options for the eval-mode programs (forward passes) of a
    model built with `depthwise`, on `backend` (default: JAX's); options this jaxlib's XLA
    does not know are left out."""
    if (backend or jax.default_backend()) == "cpu" and depthwise == "native":
        return _known(_CPU_NATIVE_INFERENCE_COMPILER_OPTIONS)
    return {}


@functools.lru_cache(maxsize=32)
def _compile_train(
    arch: ArchSpec, cfg: TrainConfig, depthwise: str, n_train: int
) -> _CompiledTrain:
    """Trace and compile the train step of one architecture + recipe, once."""
    graphs, graphs_s = _timed_graphs(arch, depthwise)
    start = time.perf_counter()
    graphdef, params, rest = graphs.train, graphs.params, graphs.rest
    optimizer = optimizer_step(cfg, depthwise)
    native = _runs_native(depthwise)
    layers, smoothing = arch.resolve(), cfg.label_smoothing

    def train_step(params, rest, opt_state, x_all, y_all, idx):  # type: ignore[no-untyped-def]
        TRACE_COUNTS["train_step"] += 1
        x, y = kernels.take_rows(x_all, y_all, idx) if native else (x_all[idx], y_all[idx])

        # copy=True makes fresh Variables inside this trace: NNX refuses to mutate (the
        # BatchNorm statistics) a Variable made at the outer jit level.
        def loss_fn(params, rest):  # type: ignore[no-untyped-def]
            model = nnx.merge(graphdef, params, rest, copy=True)
            loss = _loss(model(x), y, arch.num_classes, smoothing)
            return loss, nnx.state(model, nnx.Not(nnx.Param))

        if native:  # the same numbers, without tracing NNX or JAX's autodiff
            loss, grads, rest = native_loss_and_grads(layers, params, rest, x, y, smoothing)
        else:
            (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        params, opt_state = optimizer.step(grads, opt_state, params)
        return params, rest, opt_state, loss

    r, c = arch.resolution, arch.in_ch
    args = (
        params,
        rest,
        optimizer.shapes(params),
        jax.ShapeDtypeStruct((n_train, r, r, c), jnp.float32),
        jax.ShapeDtypeStruct((n_train,), jnp.int32),
        jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32),
    )
    options = train_compiler_options()
    step, times = _aot_compile(train_step, args, start, graphs_s, options, (0, 1, 2))
    return _CompiledTrain(step, times, optimizer)


def _inference_args(arch: ArchSpec, batch: int) -> tuple[Any, jax.ShapeDtypeStruct]:
    """The abstract `(inference state, images)` an eval-mode program of `arch` compiles for."""
    r, c = arch.resolution, arch.in_ch
    x = jax.ShapeDtypeStruct((batch, r, r, c), jnp.float32)
    return inference_shapes(arch.resolve()), x


@functools.lru_cache(maxsize=32)
def _compile_forward(arch: ArchSpec, depthwise: str, batch: int) -> _Compiled:
    """Trace and compile the eval-mode forward pass `(inference_state, x) -> logits`, once
    per batch size: at the latency batch for `mobisearch.rank`, and at the eval batch for
    `evaluate` (which counts the correct answers and the loss on the host).

    It takes `mobisearch.models.inference_state` of a trained state, so compiling needs the
    layers only, no model."""
    start = time.perf_counter()
    layers = arch.resolve()

    def forward(state, x):  # type: ignore[no-untyped-def]
        TRACE_COUNTS["forward"] += 1
        return inference_apply(layers, state, x, depthwise=depthwise)

    options = inference_compiler_options(depthwise)
    step, times = _aot_compile(forward, _inference_args(arch, batch), start, 0.0, options)
    return _Compiled(step, times)


# NOTE: XLA releases the GIL while it compiles, so a candidate's eval-mode programs compile
# on this one background thread while the calling thread compiles its train step (2-core
# Xeon, jax 0.10.2: train+eval compile 5.2-5.7 s -> 4.2-4.5 s with flax's BatchNorm; since
# the native BatchNorm halved the train step's compile, within noise: 4.1-5.2 s one after
# the other vs 4.0-5.1 s side by side, train+eval+latency forward). In a search, forward
# passes compile only here: one thread, so a program asked for while it is compiling waits
# for that compile instead of starting a second one.
_COMPILE_POOL = concurrent.futures.ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="mobisearch-compile"
)


def precompile_forward(
    arch: ArchSpec, depthwise: str | None = None, *, batch: int
) -> concurrent.futures.Future[Any]:
    """Start compiling `compiled_forward(arch, depthwise, batch=batch)` in the background.

    `train_and_evaluate` waits for it (with its own eval forward) before training starts, so
    the compile overlaps the train step's and not the training. The future's value has the
    executable as `.step` and its `CompileTimes` as `.times`.
    """
    depthwise = depthwise or default_depthwise_impl()
    return _COMPILE_POOL.submit(_compile_forward, arch, depthwise, batch)


def compiled_forward(arch: ArchSpec, depthwise: str | None = None, *, batch: int) -> Any:
    """The compiled eval-mode forward pass of `arch` at a fixed batch size:
    `fn(state, x) -> logits`, with `state = mobisearch.models.inference_state(
    arch.resolve(), params, rest)` of a trained model and `x` float32 `[batch, r, r, in_ch]`.

    Compiled once per architecture, implementation and batch (or by `precompile_forward`).
    """
    return precompile_forward(arch, depthwise, batch=batch).result().step


def _cached_call(fn: Any, *args: Any) -> tuple[Any, float]:
    """Call an lru-cached compile function; return its value and the compile seconds spent
    now (0.0 when it came from the cache)."""
    before = fn.cache_info().misses
    value = fn(*args)
    return value, value.compile_s if fn.cache_info().misses > before else 0.0


# Prepared splits of the current search, by (source array, resolution, stats): the
# candidates share a few resolutions, and resizing 55,000 images took ~1.2 s each time.
# The source array is kept with its entry, so its id() cannot be reused while cached.
_PREPARED: collections.OrderedDict[tuple[int, int, bytes], tuple[np.ndarray, np.ndarray]] = (
    collections.OrderedDict()
)
_PREPARED_MAX = 8


def prepare_images(x: np.ndarray, resolution: int, stats: tuple[Any, Any]) -> np.ndarray:
    """Resize uint8 NHWC images to `resolution` and normalise with the training split's
    per-channel `(mean, std)` (`mobisearch.data.image_mean_std`): float32 `[n, r, r, c]`.

    The result is read-only and cached for the same array, resolution and stats (the last
    few), so the candidates of a search resize each split once per resolution.
    """
    key = (id(x), resolution, np.asarray(stats, np.float64).tobytes())
    hit = _PREPARED.get(key)
    if hit is not None and hit[0] is x:
        _PREPARED.move_to_end(key)
        return hit[1]
    out = normalize_images(resize_images(x, resolution), *stats)
    out.flags.writeable = False
    _PREPARED[key] = (x, out)
    while len(_PREPARED) > _PREPARED_MAX:
        _PREPARED.popitem(last=False)
    return out


def evaluate(
    arch: ArchSpec,
    state: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    cfg: TrainConfig,
    depthwise: str | None = None,
    stats: tuple[Any, Any],
) -> tuple[float, float]:
    """Accuracy and mean loss of a trained state on uint8 images `x` (any split).

    Returns:
      `(accuracy, loss)`.
    """
    depthwise = depthwise or default_depthwise_impl()
    n = min(cfg.eval_batch_size, len(x))
    compiled = _compile_forward(arch, depthwise, n)
    return _evaluate(compiled, n, arch, state, prepare_images(x, arch.resolution, stats), y)


def _evaluate(
    compiled: _Compiled, n: int, arch: ArchSpec, state: Any, x: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `state` on prepared images `x`, by the compiled
    forward at batch `n`; the last batch is padded to `n` instead of compiling another."""
    inference = inference_state(arch.resolve(), *state)
    correct, loss_sum = 0, 0.0
    for start in range(0, len(x), n):
        xb, yb = x[start : start + n], y[start : start + n]
        if len(xb) < n:
            xb = np.concatenate([xb, np.zeros((n - len(xb), *xb.shape[1:]), xb.dtype)])
        logits = np.asarray(compiled.step(inference, xb), np.float64)[: len(yb)]
        top = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        correct += int(np.sum(np.argmax(logits, axis=1) == yb))
        loss_sum += float(np.sum(log_z - logits[np.arange(len(yb)), yb]))
    return correct / len(x), loss_sum / len(x)


def train_and_evaluate(
    arch: ArchSpec,
    cfg: TrainConfig,
    data: Dataset,
    *,
    seed: int,
    depthwise: str | None = None,
    stats: tuple[Any, Any] | None = None,
) -> TrainResult:
    """Train `arch` briefly with the recipe `cfg` and measure validation accuracy.

    Args:
      arch: the candidate; its `resolution` sets the image size.
      cfg: the training recipe (steps, batch size, optimizer, schedule, ...).
      data: the dataset; only its train and validation splits are used.
      seed: initialisation and batch-order seed (`jax.random.key(seed)`-style, no global RNG).
      depthwise: depthwise-conv implementation (default: the backend's fastest).
      stats: the training split's `image_mean_std`, if the caller has it (a search
        computes it once for all candidates); computed here otherwise.

    Returns:
      A `TrainResult`; `status == "diverged"` when the loss became NaN or infinite.
    """
    depthwise = depthwise or default_depthwise_impl()
    if stats is None:
        stats = image_mean_std(data.x_train)
    x_train = prepare_images(data.x_train, arch.resolution, stats)
    x_val = prepare_images(data.x_val, arch.resolution, stats)
    t0 = time.perf_counter()
    eval_batch = min(cfg.eval_batch_size, len(x_val))
    eval_job = _COMPILE_POOL.submit(_cached_call, _compile_forward, arch, depthwise, eval_batch)
    train, compile_train_s = _cached_call(_compile_train, arch, cfg, depthwise, len(x_train))
    ev, compile_eval_s = eval_job.result()
    # Wall time of the two compiles together (0.0 when both were cached); it includes any
    # `precompile_forward` queued before the eval forward.
    compile_s = time.perf_counter() - t0 if compile_train_s or compile_eval_s else 0.0

    _, params, rest = fresh_split(arch, depthwise, training=True, seed=seed)
    opt_state = train.optimizer.init(params)
    rng = np.random.default_rng(seed)
    x_dev = jax.device_put(x_train)
    y_dev = jax.device_put(data.y_train.astype(np.int32))
    order = _batch_indices(rng, len(x_train), cfg.batch_size, cfg.steps)

    t0 = time.perf_counter()
    losses: list[jax.Array] = []
    status, reason = "ok", ""
    with keep_freed_memory():
        for step in range(cfg.steps):
            params, rest, opt_state, loss = train.step(
                params, rest, opt_state, x_dev, y_dev, order[step]
            )
            losses.append(loss)
            if (step + 1) % _CHECK_EVERY == 0 or step + 1 == cfg.steps:
                last = float(loss)
                if not math.isfinite(last):
                    status, reason = "diverged", f"loss became {last} at step {step + 1}"
                    break
    curve = tuple(float(v) for v in jax.device_get(losses))
    train_s = time.perf_counter() - t0
    if status != "ok":
        return TrainResult(
            status=status,
            reason=reason,
            val_accuracy=math.nan,
            val_loss=math.nan,
            loss_curve=curve,
            steps=len(curve),
            compile_s=compile_s,
            train_s=train_s,
            eval_s=0.0,
        )
    t0 = time.perf_counter()
    acc, val_loss = _evaluate(ev, eval_batch, arch, (params, rest), x_val, data.y_val)
    return TrainResult(
        status="ok",
        val_accuracy=acc,
        val_loss=val_loss,
        loss_curve=curve,
        steps=len(curve),
        compile_s=compile_s,
        train_s=train_s,
        eval_s=time.perf_counter() - t0,
        state=(params, rest),
    )


def _batch_indices(rng: np.random.Generator, n: int, batch: int, steps: int) -> np.ndarray:
    """`[steps, batch]` int32 indices: epochs of seeded permutations, concatenated."""
    epochs = -(-steps * batch // n)
    perm = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return perm[: steps * batch].reshape(steps, batch).astype(np.int32)
