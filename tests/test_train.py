"""Short JIT training: compile once, divergence, evaluation, checkpoints (real JAX, tiny)."""

from __future__ import annotations

import dataclasses
import gc

import jax
import numpy as np
import optax
import pytest

from mobisearch import kernels, train
from mobisearch.arch import ArchSpec, BlockSpec
from mobisearch.data import image_mean_std, load_dataset
from mobisearch.space import TrainConfig


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    return load_dataset("synthetic", validation_size=300, train_size=600)


def small_arch(width: float = 0.25, resolution: int = 16) -> ArchSpec:
    return ArchSpec(
        stages=((BlockSpec(out_ch=32),), (BlockSpec(out_ch=64, stride=2),)),
        width=width,
        resolution=resolution,
        stem_ch=16,
        stem_stride=1,
        num_classes=10,
        in_ch=1,
        name="t",
    )


CFG = TrainConfig(steps=12, batch_size=32, learning_rate=0.01, warmup_steps=2, eval_batch_size=128)


def test_compiles_once_per_architecture(data) -> None:  # type: ignore[no-untyped-def]
    arch = small_arch()
    before = dict(train.TRACE_COUNTS)
    first = train.train_and_evaluate(arch, CFG, data, seed=0)
    traced = {k: train.TRACE_COUNTS[k] - before[k] for k in before}
    # 12 steps and 3 eval batches, yet each program was traced exactly once.
    assert traced == {"train_step": 1, "forward": 1}
    assert first.compile_s > 0
    second = train.train_and_evaluate(arch, CFG, data, seed=1)
    assert {k: train.TRACE_COUNTS[k] - before[k] for k in before} == traced
    assert second.compile_s == 0.0
    assert first.steps == second.steps == CFG.steps
    assert len(first.loss_curve) == CFG.steps


def test_compile_times_split_each_compile() -> None:
    """Each program's compile is split into its stages. The train step builds the abstract
    model (once per architecture); the eval-mode programs need only the layers."""
    arch = small_arch(0.5, resolution=10)
    first = train._compile_forward(arch, "shift", 3)
    times = first.times
    assert min(times.trace_s, times.lower_s, times.xla_s) > 0 and times.graphs_s == 0.0
    assert first.compile_s == pytest.approx(times.trace_s + times.lower_s + times.xla_s)
    step = train._compile_train(arch, CFG, "shift", 40)
    assert step.times.graphs_s > 0 and step.times.xla_s > 0
    assert step.compile_s == pytest.approx(
        step.times.graphs_s + step.times.trace_s + step.times.lower_s + step.times.xla_s
    )


def test_same_seed_same_result(data) -> None:  # type: ignore[no-untyped-def]
    a = train.train_and_evaluate(small_arch(), CFG, data, seed=3)
    b = train.train_and_evaluate(small_arch(), CFG, data, seed=3)
    assert a.loss_curve == b.loss_curve
    assert a.val_accuracy == b.val_accuracy


def test_divergence_is_reported(data) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(
        CFG, optimizer="sgd", learning_rate=1e12, schedule="constant", steps=30, warmup_steps=0
    )
    result = train.train_and_evaluate(small_arch(), cfg, data, seed=0)
    assert result.status == "diverged"
    assert "loss became" in result.reason
    assert np.isnan(result.val_accuracy)
    assert result.state is None


def test_evaluate_matches_a_direct_count(data) -> None:  # type: ignore[no-untyped-def]
    """The padded eval batches give exactly the unpadded accuracy, and optax's mean
    cross-entropy of the eval-mode model's logits."""
    import jax.numpy as jnp
    from flax import nnx

    from mobisearch.models import build_model

    arch = small_arch()
    cfg = dataclasses.replace(CFG, eval_batch_size=128)  # 300 = 2 full batches + 44
    result = train.train_and_evaluate(arch, cfg, data, seed=0)
    stats = image_mean_std(data.x_train)
    acc, loss = train.evaluate(arch, result.state, data.x_val, data.y_val, cfg=cfg, stats=stats)
    assert (acc, loss) == (result.val_accuracy, result.val_loss)
    model = build_model(arch, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    trained = nnx.merge(graphdef, *result.state)
    x = train.prepare_images(data.x_val, arch.resolution, stats)
    logits = trained(jnp.asarray(x))
    direct = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == data.y_val))
    assert acc == pytest.approx(direct, abs=1e-9)
    labels = jnp.asarray(data.y_val, jnp.int32)
    want = float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
    assert loss == pytest.approx(want, rel=1e-5)


def test_compiled_forward_is_the_eval_mode_model(data) -> None:  # type: ignore[no-untyped-def]
    """The background-compiled forward (what latency is measured on) computes what the
    trained model computes in eval mode, and is compiled once per batch size."""
    import jax.numpy as jnp
    from flax import nnx

    from mobisearch.models import build_model, inference_state

    arch = small_arch(0.5, resolution=12)
    result = train.train_and_evaluate(arch, CFG, data, seed=0)
    job = train.precompile_forward(arch, batch=8)
    forward = train.compiled_forward(arch, batch=8)
    assert job.result().step is forward  # the same cached executable, not a second compile
    model = build_model(arch, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    x = jnp.asarray(train.prepare_images(data.x_val[:8], 12, image_mean_std(data.x_train)))
    expected = nnx.merge(graphdef, *result.state)(x)
    state = inference_state(arch.resolve(), *result.state)
    np.testing.assert_allclose(forward(state, x), expected, rtol=1e-5, atol=1e-5)
    # Eval mode: the output does not depend on the rest of the batch.
    np.testing.assert_allclose(
        forward(state, jnp.concatenate([x[:4], x[:4]]))[:4], expected[:4], atol=1e-5
    )
    assert train.compiled_forward(arch, batch=4) is not forward


def test_checkpoint_round_trip(tmp_path, data) -> None:  # type: ignore[no-untyped-def]
    from mobisearch.rank import load_state, save_state

    arch = small_arch()
    result = train.train_and_evaluate(arch, CFG, data, seed=0)
    save_state(result.state, tmp_path / "c.msgpack")
    restored = load_state(arch, tmp_path / "c.msgpack")
    stats = image_mean_std(data.x_train)
    a = train.evaluate(arch, result.state, data.x_test, data.y_test, cfg=CFG, stats=stats)
    b = train.evaluate(arch, restored, data.x_test, data.y_test, cfg=CFG, stats=stats)
    assert a == b
    # Restored into the cached abstract structure, which stays abstract for the next load.
    leaves = jax.tree.leaves(train.abstract_state(arch))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)
    wider = dataclasses.replace(arch, width=arch.width * 2)
    with pytest.raises(ValueError, match=r"c\.msgpack: a parameter array of shape .* expected"):
        load_state(wider, tmp_path / "c.msgpack")


def test_prepared_images_are_cached_per_array_and_resolution(data) -> None:  # type: ignore[no-untyped-def]
    from mobisearch.data import normalize_images, resize_images

    stats = image_mean_std(data.x_train)
    a = train.prepare_images(data.x_train, 12, stats)
    np.testing.assert_array_equal(a, normalize_images(resize_images(data.x_train, 12), *stats))
    assert not a.flags.writeable  # shared between candidates: nobody may change it
    assert train.prepare_images(data.x_train, 12, stats) is a
    assert train.prepare_images(data.x_train, 10, stats).shape[1:3] == (10, 10)
    # Same values in a different array, or other stats: not the cached entry.
    assert train.prepare_images(data.x_train.copy(), 12, stats) is not a
    other = (stats[0] + 1, stats[1])
    assert not np.array_equal(train.prepare_images(data.x_train, 12, other), a)


def test_batches_cover_each_epoch() -> None:
    rng = np.random.default_rng(0)
    idx = train._batch_indices(rng, n=10, batch=4, steps=5)
    assert idx.shape == (5, 4)
    flat = idx.reshape(-1)
    assert sorted(flat[:10]) == list(range(10))  # the first epoch is a permutation


@pytest.mark.slow
def test_loss_falls_on_synthetic(data) -> None:  # type: ignore[no-untyped-def]
    cfg = dataclasses.replace(CFG, steps=100, learning_rate=0.02, warmup_steps=5)
    result = train.train_and_evaluate(small_arch(0.5), cfg, data, seed=0)
    curve = np.array(result.loss_curve)
    # Seen here: 2.29 -> 0.49 mean loss over the first/last 10 steps, 0.95 val accuracy.
    assert curve[-10:].mean() < 0.5 * curve[:10].mean()
    assert result.val_accuracy > 0.5


CACHED_COMPILE = """
import sys
from mobisearch import train
from mobisearch.data import load_dataset
from mobisearch.space import TrainConfig
from tests.test_train import small_arch

import jax

events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
train.enable_compilation_cache(sys.argv[1], min_compile_time_s=0)
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


STEP_PAGE_FAULTS = """
import resource, sys
import jax, jax.numpy as jnp
from mobisearch import train
from mobisearch.presets import mobilenet_v1_small
from mobisearch.space import TrainConfig

if sys.argv[1] == "inline":
    train.inline_cpu_dispatch()
arch = mobilenet_v1_small(0.25, 28, 3)  # ~130 MB of temporaries per step at batch 128
cfg = TrainConfig(steps=10, batch_size=128, eval_batch_size=128)
compiled = train._compile_train(arch, cfg, "shift", 128)
_, params, rest = train.fresh_split(arch, "shift", training=True)
state = (params, rest, compiled.optimizer.init(params))
x, y = jnp.zeros((128, 28, 28, 1)), jnp.zeros(128, jnp.int32)
idx = jnp.arange(128, dtype=jnp.int32)

def steps(n):
    global state
    for _ in range(n):
        *new, loss = compiled.step(*state, x, y, idx)
        state = tuple(new)
    jax.block_until_ready(loss)

with train.keep_freed_memory():
    steps(2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    steps(4)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


@pytest.mark.skipif(train._mallopt() is None, reason="the allocator settings are glibc's")
def test_inline_steps_reuse_their_memory() -> None:
    """With inline dispatch, repeated train steps reuse their temporaries' pages instead of
    faulting in fresh ones (~64k 4-KiB page faults per step here with async dispatch)."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "JAX_CPU_ENABLE_ASYNC_DISPATCH"}
    env["JAX_PLATFORMS"] = "cpu"
    faults = {}
    for mode in ("inline", "async"):
        proc = subprocess.run(
            [sys.executable, "-c", STEP_PAGE_FAULTS, mode],
            capture_output=True, text=True, timeout=300, cwd=root, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        faults[mode] = float(proc.stdout.split()[-1])
    # 130 MB of temporaries are 33k pages: the inline steps touch almost no new page.
    assert faults["inline"] < 2000, faults
    assert 10 * faults["inline"] < faults["async"], faults


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_init_optimizer_equals_optax_init(optimizer: str) -> None:
    _, params, _ = train.fresh_split(small_arch(), training=True)
    tx = train.make_optimizer(dataclasses.replace(CFG, optimizer=optimizer))
    got, want = train.init_optimizer(tx, params), tx.init(params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert isinstance(a, jax.Array) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # A state that does not start at zero is refused, not silently zeroed.
    with pytest.raises(ValueError, match="does not start at zero"):
        train.init_optimizer(optax.adagrad(0.1, initial_accumulator_value=0.1), params)


def test_compile_options_this_xla_does_not_know_are_left_out() -> None:
    known = {"xla_dump_hlo_as_text": False}
    options = {**known, "xla_mobisearch_no_such_option": True}
    assert train._known(options) == known
    # On CPU the train step compiles with those of its options that this XLA knows.
    got = train.train_compiler_options("cpu")
    assert set(got) <= set(train._CPU_TRAIN_COMPILER_OPTIONS)
    assert train.train_compiler_options("gpu") == {}


def test_prepare_process_exempts_the_heap_alive_then_from_the_collector() -> None:
    """Objects alive at `prepare_process` are frozen out of the cyclic collector's walks;
    those made later are not; the probes it runs are cached for the compiles after it."""

    class Marker:
        pass

    before = Marker()
    try:
        train.prepare_process()
        after = Marker()
        tracked = {id(o) for o in gc.get_objects()}
        assert gc.get_freeze_count() > 0
        assert id(before) not in tracked and id(after) in tracked
        assert train._probe_option.cache_info().currsize >= 1
    finally:
        gc.unfreeze()  # leave the test process's collector as it was


def test_eval_programs_of_native_models_compile_without_ynnpack_fusions() -> None:
    off = {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_fusion_emitters": False}
    assert train.inference_compiler_options("native", "cpu") == off
    assert train.inference_compiler_options("shift", "cpu") == {}
    assert train.inference_compiler_options("native", "gpu") == {}
    if jax.default_backend() != "cpu" or not kernels.available():
        pytest.skip("needs the CPU backend and the native kernels")
    arch = small_arch()
    text = train.compiled_forward(arch, "native", batch=2).as_text()
    assert "ynn_fusion" not in text
    # Every BatchNorm affine, ReLU and residual add is a native call: the only fusions
    # left are the head's (global mean, bias), however deep the network.
    assert text.count(" fusion(") <= 2, text.count(" fusion(")
    # The shift-and-add build keeps XLA's default, which hands fusions to YNNPACK.
    assert "ynn_fusion" in train.compiled_forward(arch, "shift", batch=2).as_text()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_native_optimizer_step_matches_optax(optimizer: str) -> None:
    """One native call per step does what optax's AdamW / SGD do: same schedule, same
    weight-decay mask, same moments, to float32 rounding, over steps of the warm-up and
    the cosine decay."""
    if jax.default_backend() != "cpu" or not kernels.available():
        pytest.skip("needs the CPU backend and the native kernels")
    cfg = dataclasses.replace(CFG, optimizer=optimizer, weight_decay=0.05)
    native, reference = train.optimizer_step(cfg, "native"), train.optimizer_step(cfg, "shift")
    assert isinstance(native, train.NativeStep) and not isinstance(reference, train.NativeStep)
    _, params, _ = train.fresh_split(small_arch(), "native", training=True)
    state_n, state_r = native.init(params), reference.init(params)
    p_n = p_r = params
    step_n, step_r = jax.jit(native.step), jax.jit(reference.step)
    rng = np.random.default_rng(0)
    for _ in range(cfg.steps):  # the whole recipe: warm-up, then the cosine decay
        grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
        p_n, state_n = step_n(grads, state_n, p_n)
        p_r, state_r = step_r(grads, state_r, p_r)
    moved = 0.0
    leaves = zip(jax.tree.leaves(p_n), jax.tree.leaves(p_r), jax.tree.leaves(params), strict=True)
    for a, b, p0 in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        moved = max(moved, float(np.max(np.abs(np.asarray(b) - np.asarray(p0)))))
    assert moved > 1e-3  # the steps did move the parameters
    assert int(state_n["count"]) == cfg.steps
    # The step's coefficients come from a table of the recipe: one step more is refused.
    with pytest.raises(ValueError, match="step 12 is past the recipe.s 12 steps"):
        step_n(grads, state_n, p_n)


def test_coefficient_table_is_the_schedule_computed_in_a_step() -> None:
    """Row t of the table is bit for bit what a train step computed from its count: optax's
    learning rate and Adam's bias corrections for step t; computed once per recipe."""
    cfg = dataclasses.replace(CFG, steps=30, warmup_steps=5)
    table = train.coefficient_table(cfg)
    assert table.shape == (30, 3) and table.dtype == np.float32
    assert train.coefficient_table(cfg) is table
    one = jax.jit(lambda t: train._coefficients(cfg, t))
    for t in (0, 4, 5, 17, 29):
        assert np.array_equal(table[t], np.asarray(one(np.int32(t)))), t
    schedule = train.make_schedule(cfg)
    assert callable(schedule)
    np.testing.assert_allclose(table[:, 0], [schedule(t) for t in range(30)], rtol=1e-5)
    assert table[0, 0] == 0.0 and table[5, 0] == np.float32(cfg.learning_rate)


def test_native_train_step_updates_every_parameter_in_one_call() -> None:
    if jax.default_backend() != "cpu" or not kernels.available():
        pytest.skip("needs the CPU backend and the native kernels")
    arch = small_arch(0.5, resolution=14)
    hlo = train._compile_train(arch, CFG, "native", 64).step.as_text()
    assert hlo.count('custom_call_target="mobisearch_optimizer_update"') == 1
    shift = train._compile_train(arch, CFG, "shift", 64).step.as_text()
    assert "mobisearch_optimizer_update" not in shift


def test_prepare_recipe_computes_the_native_step_s_table_once() -> None:
    """A search computes the recipe's coefficient table before its first candidate (and
    only for the native step, which reads it)."""
    train.coefficient_table.cache_clear()
    train.prepare_recipe(CFG, "shift")
    assert train.coefficient_table.cache_info().currsize == 0
    if jax.default_backend() != "cpu" or not kernels.available():
        pytest.skip("needs the CPU backend and the native kernels")
    train.prepare_recipe(CFG, "native")
    assert train.coefficient_table.cache_info().currsize == 1
    hits = train.coefficient_table.cache_info().hits
    train._compile_train(small_arch(0.5, resolution=12), CFG, "native", 64)
    assert train.coefficient_table.cache_info().hits == hits + 1
