"""Compiled programs: once per architecture, timed per stage, cached across processes,
compile options, and what XLA is left to compile (real JAX, tiny)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mobisearch import compile as compile_
from mobisearch import kernels, ops, train
from mobisearch.data import image_mean_std
from mobisearch.models import build_model
from tests.test_train import CFG, small_arch


def test_compiles_once_per_architecture(data) -> None:  # type: ignore[no-untyped-def]
    # An architecture and recipe no other test compiles: the programs are cached per process.
    arch, cfg = small_arch(resolution=14), dataclasses.replace(CFG, steps=11)
    before = dict(compile_.TRACE_COUNTS)
    first = train.train_and_evaluate(arch, cfg, data, seed=0)
    traced = {k: compile_.TRACE_COUNTS[k] - before[k] for k in before}
    # 11 steps and 3 eval batches, yet each program was traced exactly once.
    assert traced == {"train_step": 1, "forward": 1}
    assert first.compile_s > 0
    second = train.train_and_evaluate(arch, cfg, data, seed=1)
    assert {k: compile_.TRACE_COUNTS[k] - before[k] for k in before} == traced
    assert second.compile_s == 0.0
    assert first.steps == second.steps == cfg.steps
    assert len(first.loss_curve) == cfg.steps


def test_compile_times_split_each_compile() -> None:
    """Each program's compile is split into its stages; the first program of an
    architecture builds its abstract model, the next ones reuse it."""
    arch = small_arch(0.5, resolution=10)
    first = compile_.compile_forward(arch, "xla", 3)
    times = first.times
    assert min(times.graphs_s, times.trace_s, times.lower_s, times.xla_s) > 0
    assert first.compile_s == pytest.approx(
        times.graphs_s + times.trace_s + times.lower_s + times.xla_s
    )
    step = compile_.compile_train(arch, CFG, "xla", 40)
    assert step.times.graphs_s < times.graphs_s and step.times.xla_s > 0
    assert step.compile_s == pytest.approx(
        step.times.graphs_s + step.times.trace_s + step.times.lower_s + step.times.xla_s
    )


def test_compiled_forward_is_the_eval_mode_model(data) -> None:  # type: ignore[no-untyped-def]
    """The background-compiled forward (what latency is measured on) computes what the
    trained model computes in eval mode, and is compiled once per batch size."""
    arch = small_arch(0.5, resolution=12)
    result = train.train_and_evaluate(arch, CFG, data, seed=0)
    job = compile_.precompile_forward(arch, batch=8)
    compiled = compile_.compiled_forward(arch, batch=8)
    assert job.result() is compiled  # the same cached executable, not a second compile
    forward = compiled.bind(*result.state)
    model = build_model(arch, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    x = jnp.asarray(train.prepare_images(data.x_val[:8], 12, image_mean_std(data.x_train)))
    expected = nnx.merge(graphdef, *result.state)(x)
    np.testing.assert_allclose(forward(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(compiled.step(*result.state, x), expected, rtol=1e-5, atol=1e-5)
    # Eval mode: the output does not depend on the rest of the batch.
    np.testing.assert_allclose(
        forward(jnp.concatenate([x[:4], x[:4]]))[:4], expected[:4], atol=1e-5
    )
    assert compile_.compiled_forward(arch, batch=4) is not compiled


CACHED_COMPILE = """
import sys
from mobisearch import compile, train
from mobisearch.data import load_dataset
from mobisearch.space import TrainConfig
from tests.test_train import small_arch

import jax

events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
compile.enable_compilation_cache(sys.argv[1], min_compile_time_s=0)
cfg = TrainConfig(steps=2, batch_size=16, warmup_steps=1, eval_batch_size=64)
data = load_dataset("synthetic", validation_size=64, train_size=128)
status = train.train_and_evaluate(small_arch(), cfg, data, seed=0).status
print(status, events.count("/jax/compilation_cache/cache_hits"))
"""


def test_compilation_cache_is_reused_by_a_second_process(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cache = tmp_path / "cache"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", CACHED_COMPILE, str(cache)],
            capture_output=True, text=True, timeout=300, cwd=root,
            env=env,
        )  # fmt: skip

    first = run()
    assert first.returncode == 0, first.stderr
    status, hits = first.stdout.split()
    assert status == "ok" and int(hits) == 0
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first run wrote nothing to the compilation cache"
    second = run()
    assert second.returncode == 0, second.stderr
    # The second process loaded the train and eval steps (at least) from the cache and
    # wrote no new entry.
    status, hits = second.stdout.split()
    assert status == "ok" and int(hits) >= 2
    assert sorted(p.name for p in cache.iterdir()) == entries


def test_compile_options_this_xla_does_not_know_are_left_out() -> None:
    known = {"xla_dump_hlo_as_text": False}
    options = {**known, "xla_mobisearch_no_such_option": True}
    assert compile_._known(options) == known
    # On CPU the train step compiles with those of its options that this XLA knows.
    got = compile_.train_compiler_options("cpu")
    assert set(got) <= set(compile_._CPU_TRAIN_COMPILER_OPTIONS)
    assert compile_.train_compiler_options("gpu") == {}


def test_eval_programs_of_native_models_compile_without_ynnpack_fusions() -> None:
    off = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_fusion_emitters": False}
    assert compile_.inference_compiler_options("native", "cpu") == off
    assert compile_.inference_compiler_options("xla", "cpu") == {}
    assert compile_.inference_compiler_options("native", "gpu") == {}
    if jax.default_backend() != "cpu" or not kernels.available():
        pytest.skip("needs the CPU backend and the native kernels")
    if ops.inference_backend("native") != "native":
        pytest.skip("this CPU runs eval-mode programs on the xla backend (no AVX-512)")
    arch = small_arch()
    text = compile_.compiled_forward(arch, "native", batch=2).executable.as_text()
    assert "ynn_fusion" not in text
    # Every BatchNorm (folded inside the kernels), ReLU and residual add is a native call:
    # XLA is left no fusion, however deep the network.
    assert text.count(" fusion(") == 0, text.count(" fusion(")
    # The XLA backend (shift-and-add) keeps XLA's default, which hands fusions to YNNPACK.
    assert "ynn_fusion" in compile_.compiled_forward(arch, "xla", batch=2).executable.as_text()


def test_eval_programs_run_the_inference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model trained on the native backend is evaluated on the xla backend on a CPU
    without AVX-512 (its eval-mode kernels lose to XLA's fusions there), natively with it;
    the xla backend stays xla."""
    monkeypatch.setattr(ops, "_cpu_has_avx512", lambda: False)
    assert ops.inference_backend("native") == "xla"
    assert ops.inference_backend("xla") == "xla"
    monkeypatch.setattr(ops, "_cpu_has_avx512", lambda: True)
    assert ops.inference_backend("native") == "native"


def test_native_train_step_updates_every_parameter_in_one_call() -> None:
    if jax.default_backend() != "cpu" or not kernels.available():
        pytest.skip("needs the CPU backend and the native kernels")
    arch = small_arch(0.5, resolution=14)
    hlo = compile_.compile_train(arch, CFG, "native", 64).executable.as_text()
    assert hlo.count('custom_call_target="mobisearch_optimizer_update"') == 1
    xla = compile_.compile_train(arch, CFG, "xla", 64).executable.as_text()
    assert "mobisearch_optimizer_update" not in xla


def test_native_train_step_is_the_model_s_autodiff_through_native_calls() -> None:
    """The train step differentiates the model's own loss; on the native backend every
    layer's forward and backward pass is a native call, and XLA has little left to fuse."""
    if jax.default_backend() != "cpu" or not kernels.available():
        pytest.skip("needs the CPU backend and the native kernels")
    arch = small_arch(0.5, resolution=14)  # 2 blocks: 1 stem, 2 dw, 2 pw BatchNorms
    hlo = compile_.compile_train(arch, CFG, "native", 64).executable.as_text()
    for target, n in [
        ("mobisearch_depthwise_fwd", 2),
        ("mobisearch_depthwise_bwd", 2),
        ("mobisearch_batch_norm_fwd", 5),
        ("mobisearch_batch_norm_bwd", 5),
        ("mobisearch_pointwise_kernel_grad", 2),
        ("mobisearch_conv_kernel_grad", 1),
        ("mobisearch_head_fwd", 1),
        ("mobisearch_head_bwd", 1),
        ("mobisearch_softmax_cross_entropy", 1),
        ("mobisearch_take_rows", 1),
    ]:
        assert hlo.count(f'custom_call_target="{target}"') == n, target
