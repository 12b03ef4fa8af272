"""A candidate's compiled programs: its train step and its eval-mode forward passes.

Every program runs the one model (`mobisearch.models.MobileNet`) on its split state:

* the train step: `jax.value_and_grad` of the model's own loss (`MobileNet.loss`) on a
  minibatch gathered on the device, then the optimizer (`mobisearch.optim`);
* the forward pass: the model in eval mode, at a fixed batch size (the validation batch,
  and the latency batch).

Each is compiled ahead of time (`jit(...).trace(...).lower().compile()`), once per
architecture, recipe, backend and shape (cached in this process; JAX's persistent
compilation cache, `enable_compilation_cache`, keeps them across processes), so compile
time is measured apart from training and reported per stage (`CompileTimes`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import pathlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from mobisearch import ops, optim
from mobisearch.data import cache_dir
from mobisearch.models import abstract_split

if TYPE_CHECKING:
    import optax

    from mobisearch.arch import ArchSpec
    from mobisearch.space import TrainConfig

__all__ = [
    "CACHE_ENV_VAR",
    "TRACE_COUNTS",
    "CompileTimes",
    "CompiledForward",
    "CompiledTrain",
    "abstract_state",
    "compile_forward",
    "compile_train",
    "compiled_forward",
    "enable_compilation_cache",
    "inference_compiler_options",
    "precompile_forward",
    "train_compiler_options",
]

CACHE_ENV_VAR = "MOBISEARCH_CACHE_DIR"

# Counts how often each program is traced: the no-recompilation test reads it.
TRACE_COUNTS: dict[str, int] = {"train_step": 0, "forward": 0}


def enable_compilation_cache(
    path: str | os.PathLike[str] | None = None, *, min_compile_time_s: float = 0.05
) -> pathlib.Path:
    """Turn on JAX's persistent compilation cache, so a rerun compiles nothing again.

    Args:
      path: the cache folder; default `$MOBISEARCH_CACHE_DIR`, else
        `$XDG_CACHE_HOME/mobisearch/jax` (`~/.cache/mobisearch/jax`).
      min_compile_time_s: programs that compile faster are not cached. JAX's own threshold
        (1 s) would leave out a candidate's forward passes; eager JAX's small per-shape
        programs stay out with 0.05 s.

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


# --- XLA compile options -------------------------------------------------------------------

# NOTE: XLA:CPU hands dots, reductions and elementwise fusions to YNNPACK by default. In the
# train step, keeping it to dots and reductions is faster; the older elemental emitters
# compile the step's few remaining loop fusions faster than the MLIR fusion emitters.
_CPU_TRAIN_COMPILER_OPTIONS: dict[str, str | bool] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "xla_cpu_use_fusion_emitters": False,
}
# NOTE: with the native kernels an eval-mode program has no elementwise work left to fuse
# but the pool's division: XLA's own emitters beat YNNPACK's fusions there, and compile
# faster. With the XLA backend (shift-and-add), YNNPACK's fusions stay.
_CPU_NATIVE_INFERENCE_COMPILER_OPTIONS: dict[str, str | bool] = {
    "xla_cpu_experimental_ynn_fusion_type": "",
    "xla_cpu_use_fusion_emitters": False,
}
# One probe at a time: the train step's and the eval programs' options are looked up on two
# threads, and the same option probed on both at once would compile the probe twice.
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


def train_compiler_options(platform: str | None = None) -> dict[str, str | bool]:
    """XLA compile options of the train step on `platform` (default: JAX's); those this
    jaxlib's XLA does not know are left out."""
    if (platform or jax.default_backend()) == "cpu":
        return _known(_CPU_TRAIN_COMPILER_OPTIONS)
    return {}


def inference_compiler_options(backend: str, platform: str | None = None) -> dict[str, str | bool]:
    """XLA compile options of the eval-mode programs of a model on `backend`, on
    `platform` (default: JAX's); those this jaxlib's XLA does not know are left out."""
    if (platform or jax.default_backend()) == "cpu" and backend == "native":
        return _known(_CPU_NATIVE_INFERENCE_COMPILER_OPTIONS)
    return {}


# --- compiling -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class CompileTimes:
    """Where the compile of one program went, in wall seconds.

    Attributes:
      graphs_s: building the architecture's abstract model (`abstract_state`); cached, so
        only the first program of an architecture pays it.
      trace_s: tracing the program to a jaxpr (NNX's merge, the model, autodiff and the
        optimizer, in Python).
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


# NOTE: the compiled programs take the model's state as one flat tuple of arrays: handing
# them `nnx.State`s would flatten those (Python pytree nodes) on every call, which at batch
# 1 costs more than the forward pass itself.


@dataclasses.dataclass(frozen=True)
class CompiledForward:
    """An eval-mode forward pass and its compile: `executable(leaves, x) -> logits`, with
    `leaves` the arrays of `(params, rest)` in `jax.tree.leaves` order.

    `bind(params, rest)` flattens a state once and gives `x -> logits`; `step(params, rest,
    x)` flattens it on every call.
    """

    executable: Any
    times: CompileTimes

    @property
    def compile_s(self) -> float:
        return self.times.total_s

    def bind(self, params: Any, rest: Any) -> Callable[[Any], Any]:
        leaves = tuple(jax.tree.leaves((params, rest)))
        return lambda x: self.executable(leaves, x)

    def step(self, params: Any, rest: Any, x: Any) -> Any:
        return self.bind(params, rest)(x)


@dataclasses.dataclass(frozen=True)
class CompiledTrain:
    """A train step and its compile: `executable(leaves, x_all, y_all, idx, rates) ->
    (leaves, loss)`, with `leaves` the arrays of `(params, rest, opt_state)` in
    `jax.tree.leaves` order (donated) and `treedef` their structure; `tx` is the optimizer
    (with the recipe's own rates, for `init`).

    `step(params, rest, opt_state, x_all, y_all, idx, rates) -> (params, rest, opt_state,
    loss)` flattens and unflattens around one call.
    """

    executable: Any
    times: CompileTimes
    tx: optax.GradientTransformation
    treedef: Any

    @property
    def compile_s(self) -> float:
        return self.times.total_s

    def step(self, *args: Any) -> tuple[Any, Any, Any, Any]:
        leaves = tuple(jax.tree.leaves(args[:3]))
        new, loss = self.executable(leaves, *args[3:])
        params, rest, opt_state = jax.tree.unflatten(self.treedef, new)
        return params, rest, opt_state, loss


@dataclasses.dataclass(frozen=True)
class _Graphs:
    """An architecture's static graphs (train and eval mode) and abstract state."""

    train: Any
    eval: Any
    params: Any  # ShapeDtypeStruct leaves
    rest: Any


@functools.lru_cache(maxsize=64)
def _graphs(arch: ArchSpec, backend: str) -> _Graphs:
    graph_train, state = abstract_split(arch, backend=backend)
    model = nnx.merge(graph_train, state)
    model.eval()
    graph_eval, _ = nnx.split(model)
    params, rest = nnx.split_state(state, nnx.Param, ...)
    return _Graphs(graph_train, graph_eval, params, rest)


def _timed_graphs(arch: ArchSpec, backend: str) -> tuple[_Graphs, float]:
    t0 = time.perf_counter()
    graphs = _graphs(arch, backend)
    return graphs, time.perf_counter() - t0


def abstract_state(arch: ArchSpec, backend: str | None = None) -> tuple[Any, Any]:
    """`(params, rest)` of `arch` with `jax.ShapeDtypeStruct` leaves: its structure and
    shapes without building it (cached; do not modify them)."""
    graphs = _graphs(arch, backend or ops.default_backend())
    return graphs.params, graphs.rest


def _aot_compile(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    start: float,
    graphs_s: float,
    compiler_options: dict[str, str | bool],
    donate_argnums: tuple[int, ...] = (),
) -> tuple[Any, CompileTimes]:
    """`jax.jit(fn).trace(*args).lower().compile(...)`, timing each stage; `start` is when
    the caller began preparing the trace (the optimizer, abstract arguments)."""
    traced = jax.jit(fn, donate_argnums=donate_argnums).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options)
    return compiled, CompileTimes(graphs_s, t1 - start, t2 - t1, time.perf_counter() - t2)


@functools.lru_cache(maxsize=32)
def compile_train(arch: ArchSpec, cfg: TrainConfig, backend: str, n_train: int) -> CompiledTrain:
    """The train step of one architecture, recipe and backend, for a training set of
    `n_train` images on the device; traced and compiled once (cached).

    The step takes the learning rate of every step of the recipe as an argument (`rates`,
    float32 `[cfg.steps]`, indexed by the optimizer's step count), so every schedule of
    that length runs on the same program.
    """
    graphs, graphs_s = _timed_graphs(arch, backend)
    start = time.perf_counter()
    graphdef, smoothing = graphs.train, cfg.label_smoothing

    def train_step(leaves, x_all, y_all, idx, rates):  # type: ignore[no-untyped-def]
        TRACE_COUNTS["train_step"] += 1
        params, rest, opt_state = jax.tree.unflatten(treedef, leaves)
        x, y = ops.take_rows(x_all, y_all, idx, backend=backend)

        # copy=True makes fresh Variables inside this trace: NNX refuses to mutate (the
        # BatchNorm statistics) a Variable made at the outer jit level.
        def loss_fn(params, rest):  # type: ignore[no-untyped-def]
            model = nnx.merge(graphdef, params, rest, copy=True)
            loss = model.loss(x, y, smoothing=smoothing)
            return loss, nnx.state(model, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        tx = optim.make_optimizer(cfg, backend=backend, rates=rates)
        params, opt_state = optim.apply_updates(tx, grads, opt_state, params)
        return tuple(jax.tree.leaves((params, rest, opt_state))), loss

    tx = optim.make_optimizer(cfg, backend=backend)
    leaves, treedef = jax.tree.flatten(
        (graphs.params, graphs.rest, jax.eval_shape(tx.init, graphs.params))
    )
    r, c = arch.resolution, arch.in_ch
    args = (
        tuple(leaves),
        jax.ShapeDtypeStruct((n_train, r, r, c), jnp.float32),
        jax.ShapeDtypeStruct((n_train,), jnp.int32),
        jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32),
        jax.ShapeDtypeStruct((cfg.steps,), jnp.float32),
    )
    options = train_compiler_options()
    step, times = _aot_compile(train_step, args, start, graphs_s, options, (0,))
    return CompiledTrain(step, times, tx, treedef)


@functools.lru_cache(maxsize=32)
def compile_forward(arch: ArchSpec, backend: str, batch: int) -> CompiledForward:
    """The eval-mode forward pass of `arch` at a fixed batch size (`CompiledForward`),
    traced and compiled once (cached), for a model trained on `backend` (run on
    `mobisearch.ops.inference_backend(backend)`)."""
    backend = ops.inference_backend(backend)
    graphs, graphs_s = _timed_graphs(arch, backend)
    start = time.perf_counter()
    graphdef = graphs.eval
    leaves, treedef = jax.tree.flatten((graphs.params, graphs.rest))

    def forward(leaves, x):  # type: ignore[no-untyped-def]
        TRACE_COUNTS["forward"] += 1
        params, rest = jax.tree.unflatten(treedef, leaves)
        return nnx.merge(graphdef, params, rest)(x)

    r, c = arch.resolution, arch.in_ch
    x = jax.ShapeDtypeStruct((batch, r, r, c), jnp.float32)
    options = inference_compiler_options(backend)
    step, times = _aot_compile(forward, (tuple(leaves), x), start, graphs_s, options)
    return CompiledForward(step, times)


# NOTE: XLA releases the GIL while it compiles, so a candidate's eval-mode programs compile
# on this background thread while the calling thread compiles its train step. One thread:
# a program asked for while it is compiling waits for that compile instead of starting a
# second one.
_COMPILE_POOL = concurrent.futures.ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="mobisearch-compile"
)


def submit_compile(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
    """Run `fn(*args)` (a compile) on the background compile thread."""
    return _COMPILE_POOL.submit(fn, *args)


def precompile_forward(
    arch: ArchSpec, backend: str | None = None, *, batch: int
) -> concurrent.futures.Future[CompiledForward]:
    """Start compiling `compiled_forward(arch, backend, batch=batch)` in the background."""
    return submit_compile(compile_forward, arch, backend or ops.default_backend(), batch)


def compiled_forward(arch: ArchSpec, backend: str | None = None, *, batch: int) -> CompiledForward:
    """The compiled eval-mode forward pass of `arch` for float32 images `[batch, r, r,
    in_ch]` (compiled once per architecture, backend and batch): `.bind(params, rest)` gives
    `x -> logits`."""
    return precompile_forward(arch, backend, batch=batch).result()
