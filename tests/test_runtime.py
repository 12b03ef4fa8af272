"""Process settings: inline dispatch and the allocator, the frozen heap (real JAX)."""

from __future__ import annotations

import gc

import pytest

from mobisearch import compile as compile_
from mobisearch import runtime

STEP_PAGE_FAULTS = """
import resource, sys
import jax, jax.numpy as jnp
from mobisearch import compile, optim, runtime, train
from mobisearch.presets import mobilenet_v1_small
from mobisearch.space import TrainConfig

if sys.argv[1] == "inline":
    runtime.inline_cpu_dispatch()
arch = mobilenet_v1_small(0.25, 28, 3)  # ~130 MB of temporaries per step at batch 128
cfg = TrainConfig(steps=10, batch_size=128, eval_batch_size=128)
compiled = compile.compile_train(arch, cfg, "xla", 128)
_, params, rest = train.fresh_split(arch, "xla", training=True)
state = (params, rest, optim.init_optimizer(compiled.tx, params))
x, y = jnp.zeros((128, 28, 28, 1)), jnp.zeros(128, jnp.int32)
idx = jnp.arange(128, dtype=jnp.int32)
rates = optim.recipe_rates(cfg)

def steps(n):
    global state
    for _ in range(n):
        *new, loss = compiled.step(*state, x, y, idx, rates)
        state = tuple(new)
    jax.block_until_ready(loss)

with runtime.keep_freed_memory():
    steps(2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    steps(4)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


@pytest.mark.skipif(runtime._mallopt() is None, reason="the allocator settings are glibc's")
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


def test_prepare_process_exempts_the_heap_alive_then_from_the_collector() -> None:
    """Objects alive at `prepare_process` are frozen out of the cyclic collector's walks;
    those made later are not; the probes it runs are cached for the compiles after it."""

    class Marker:
        pass

    before = Marker()
    try:
        runtime.prepare_process()
        after = Marker()
        tracked = {id(o) for o in gc.get_objects()}
        assert gc.get_freeze_count() > 0
        assert id(before) not in tracked and id(after) in tracked
        assert compile_._probe_option.cache_info().currsize >= 1
    finally:
        gc.unfreeze()  # leave the test process's collector as it was
