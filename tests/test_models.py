"""Tests for `mobisearch.models`: shapes, modes, state vs `cost`, XLA flops, and the one
network on both backends (same loss, gradients, running averages and eval logits)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from mobisearch import kernels, ops
from mobisearch.arch import ArchSpec, BlockSpec
from mobisearch.cost import count_cost, layer_cost
from mobisearch.models import (
    BN_MOMENTUM,
    MobileNet,
    abstract_split,
    build_model,
    state_size,
)
from mobisearch.ops import same_pads
from mobisearch.presets import mobilenet_v1_small, tiny

needs_native = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")


pytestmark = pytest.mark.usefixtures("fast_compile")


def _images(arch: ArchSpec, batch: int, seed: int = 0) -> jax.Array:
    shape = (batch, arch.resolution, arch.resolution, arch.in_ch)
    return jax.random.normal(jax.random.key(seed), shape)


def _flat_state(model: nnx.Module) -> dict[str, jax.Array]:
    """`{"blocks/0/dw/conv/kernel": array, ...}` for params and batch stats."""
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return {"/".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(state)}


# Eager NNX runs op by op and compiles each new (op, shape) on first use, which for the k²
# slices of shift-and-add is slower than compiling the whole forward once. `nnx.jit` carries
# the BatchNorm running-average updates back into the module.
_forward = nnx.jit(lambda model, x: model(x))


def _assert_close(actual: jax.Array, desired: jax.Array, what: str, rtol: float = 1e-5) -> None:
    """float32 agreement, with an absolute floor scaled to the size of the values compared."""
    desired = np.asarray(desired)
    atol = rtol * (1.0 + float(np.max(np.abs(desired), initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual), desired, rtol=rtol, atol=atol, err_msg=what)


# A small arch with every feature: stride-2 and stride-1 blocks, both kinds, a `ds` residual
# (second repeat), kernels 3/5/1, an odd resolution and 2 input channels. (No 7×7 here only
# to keep compile times down; the depthwise tests cover it.)
MIXED = ArchSpec(
    stages=(
        (BlockSpec(kind="dsa", out_ch=16, stride=2, kernel=3),),
        (BlockSpec(kind="ds", out_ch=24, stride=1, kernel=5, repeats=2),),
        (BlockSpec(kind="dsa", out_ch=32, stride=2, kernel=1),),
    ),
    width=0.5,
    resolution=11,
    stem_ch=8,
    stem_stride=1,
    num_classes=5,
    in_ch=2,
    name="mixed",
)


# --- forward, modes, structure -----------------------------------------------------------


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize(
    "arch", [tiny(), mobilenet_v1_small(0.25, 28), MIXED], ids=lambda a: a.display_id
)
def test_output_shape_and_finite_in_both_modes(arch: ArchSpec, backend: str) -> None:
    model = build_model(arch, rngs=nnx.Rngs(0), backend=backend)
    x = _images(arch, 3)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        logits = _forward(model, x)
        assert logits.shape == (3, arch.num_classes), mode
        assert logits.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(logits))), mode


def test_train_mode_uses_batch_stats_and_eval_mode_running_averages(tiny_arch: ArchSpec) -> None:
    model = build_model(tiny_arch, rngs=nnx.Rngs(0))
    x = _images(tiny_arch, 8)
    before = _flat_state(model)
    assert float(jnp.abs(before["stem/bn/mean"]).max()) == 0.0  # fresh running mean is 0

    # A fresh model is in training mode: BN normalises with the batch's statistics and
    # updates its running averages by `momentum`.
    train_logits = _forward(model, x)
    after = _flat_state(model)
    batch_mean = jnp.mean(model.stem.conv(x), axis=(0, 1, 2))
    _assert_close(after["stem/bn/mean"], (1 - BN_MOMENTUM) * batch_mean, "stem running mean")
    for name, value in after.items():
        if name.endswith(("/mean", "/var")):
            assert not np.array_equal(value, before[name]), f"{name} was not updated"
        else:
            assert np.array_equal(value, before[name]), f"param {name} changed in a forward pass"
    # In training mode each example's logits depend on the rest of the batch ...
    assert not np.allclose(_forward(nnx.clone(model), x[:1])[0], train_logits[0], atol=1e-4)

    # ... in eval mode they do not (running averages), eval differs from train on the same
    # state, and eval leaves the state alone.
    model.eval()
    eval_logits = _forward(model, x)
    assert not np.allclose(eval_logits, train_logits, atol=1e-4)
    _assert_close(_forward(model, x[:1])[0], eval_logits[0], "eval logits of one example", 1e-4)
    for name, value in _flat_state(model).items():
        assert np.array_equal(value, after[name]), f"{name} changed in eval mode"

    model.train()
    assert model.blocks[0].dw.bn.use_running_average is False


def test_state_paths_shapes_and_per_layer_counts_match_resolved_layers() -> None:
    model = build_model(MIXED, rngs=nnx.Rngs(0))
    assert isinstance(model, MobileNet)
    assert isinstance(model.blocks, nnx.List)
    flat = _flat_state(model)
    expected: dict[str, tuple[int, ...]] = {}
    for layer in MIXED.resolve():
        if layer.op == "pool":
            continue
        if layer.op == "fc":
            expected[f"{layer.name}/kernel"] = (layer.in_ch, layer.out_ch)
            expected[f"{layer.name}/bias"] = (layer.out_ch,)
        else:
            in_per_group = layer.in_ch // layer.groups
            kernel = (layer.kernel, layer.kernel, in_per_group, layer.out_ch)
            expected[f"{layer.name}/conv/kernel"] = kernel
            for field in ("scale", "bias", "mean", "var"):
                expected[f"{layer.name}/bn/{field}"] = (layer.out_ch,)
        # Each layer's state, found by its `LayerSpec.name`, is exactly its cost-model params.
        size = sum(v.size for k, v in flat.items() if k.startswith(f"{layer.name}/"))
        assert size == layer_cost(layer).params, layer.name
    assert {k: tuple(v.shape) for k, v in flat.items()} == expected
    assert [b.residual for b in model.blocks] == [False, False, True, False]


def test_build_model_init_is_seeded_and_lecun_scaled() -> None:
    arch = mobilenet_v1_small(0.5, 28)
    a = _flat_state(build_model(arch, rngs=nnx.Rngs(0)))
    b = _flat_state(build_model(arch, rngs=nnx.Rngs(0)))
    c = _flat_state(build_model(arch, rngs=nnx.Rngs(1)))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for name, value in a.items():
        if name.endswith("kernel"):
            assert not np.array_equal(value, c[name]), name
            fan_in = math.prod(value.shape[:-1])
            if value.size >= 4096:  # enough samples for a 5% check of the std
                assert abs(float(np.std(value)) * math.sqrt(fan_in) - 1) < 0.05, name
            assert float(np.abs(value).max()) <= 2 / 0.8796 / math.sqrt(fan_in) + 1e-6, name
        else:
            expected = 1.0 if name.endswith(("/scale", "/var")) else 0.0
            assert np.all(value == expected), name


# --- state size vs the cost model (property) ---------------------------------------------

_blocks = st.builds(
    BlockSpec,
    kind=st.sampled_from(["dsa", "ds"]),
    out_ch=st.integers(4, 48),  # >= 4 so that width >= 0.25 never rounds to 0 channels
    stride=st.sampled_from([1, 2]),
    kernel=st.sampled_from([1, 3, 5, 7]),
    repeats=st.integers(1, 3),
)
_archs = st.builds(
    ArchSpec,
    stages=st.lists(
        st.lists(_blocks, min_size=1, max_size=2).map(tuple), min_size=1, max_size=3
    ).map(tuple),
    width=st.sampled_from([0.25, 0.5, 0.75, 1.0, 1.4]),
    resolution=st.integers(8, 40),
    stem_ch=st.integers(4, 32),
    stem_stride=st.sampled_from([1, 2]),
    stem_kernel=st.sampled_from([1, 3, 5]),
    num_classes=st.integers(1, 12),
    in_ch=st.integers(1, 4),
    rounding=st.sampled_from(["keras", "div8"]),
)


@settings(max_examples=40, deadline=None)
@given(arch=_archs)
def test_state_size_equals_cost_params(arch: ArchSpec) -> None:
    # No jit: building is cheap. Tracing the forward (eval_shape, nothing compiled or run)
    # also checks that every stride and residual of the random arch fits together.
    model = build_model(arch, rngs=nnx.Rngs(0), backend="xla")
    assert state_size(model) == count_cost(arch).params
    assert state_size(model) == sum(v.size for v in _flat_state(model).values())
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, arch.resolution, arch.resolution, arch.in_ch), jnp.float32)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s, copy=True)(x), state, x)
    assert out.shape == (2, arch.num_classes)


# --- XLA cost analysis cross-check -------------------------------------------------------


def _xla_flops(arch: ArchSpec) -> float | None:
    model = build_model(arch, rngs=nnx.Rngs(0), backend="xla")
    model.eval()
    graphdef, state = nnx.split(model)

    def forward(state: nnx.State, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state, copy=True)(x)

    x = jax.ShapeDtypeStruct((1, arch.resolution, arch.resolution, arch.in_ch), jnp.float32)
    analysis = jax.jit(forward).lower(state, x).compile().cost_analysis()
    if isinstance(analysis, list):  # older jax returned one dict per device
        analysis = analysis[0] if analysis else None
    return None if not analysis or "flops" not in analysis else float(analysis["flops"])


def _valid_tap_macs(arch: ArchSpec) -> int:
    """MACs counting only kernel taps that land inside the unpadded input.

    XLA's HLO cost analysis counts a convolution's flops this way, while `count_cost` (like
    the paper) counts all k² taps of every output. Only differs for k > 1.
    """
    total = 0
    for layer in arch.resolve():
        if layer.op in ("conv", "dw"):
            out, lo, _ = same_pads(layer.in_hw, layer.kernel, layer.stride)
            taps = sum(
                0 <= o * layer.stride + i - lo < layer.in_hw
                for o in range(out)
                for i in range(layer.kernel)
            )
            total += taps * taps * (layer.in_ch // layer.groups) * layer.out_ch
        else:
            total += layer_cost(layer).macs
    return total


@pytest.mark.xla
@pytest.mark.parametrize("impl", ["grouped", "shift"])
@pytest.mark.parametrize(
    "arch",
    [mobilenet_v1_small(1.0, 32), mobilenet_v1_small(0.25, 28), tiny(kernel=7)],
    ids=lambda a: a.display_id,
)
def test_xla_flops_close_to_twice_macs(
    arch: ArchSpec, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XLA flops ≈ 2·MACs, eval mode, batch 1 (cost analysis is best-effort: bounds only).

    XLA's counts on the CPU, flops / (2·MACs):

    ==================  =======  =====
    arch                grouped  shift
    ==================  =======  =====
    mnv1_w100_r32_k3     1.013   1.023
    mnv1_w025_r28_k3     1.041   1.072
    tiny_w025_r32_k7     0.966   1.088
    ==================  =======  =====

    The gaps: (1) BN (eval: subtract, multiply, add), ReLU, the residual add and the pool
    are not MACs; they cost ~4 flops per element of each conv output A (grouped measures
    4.04-4.20 per element once (2) is taken out), which is a large share when channels are
    few (tiny, width 0.25). (2) XLA counts a grouped conv's taps only where they fall inside
    the unpadded input, so a 7×7 depthwise conv on an 8×8 map is counted at well under k²
    taps per output (hence < 1 for tiny k7). (3) shift-and-add multiplies the zero padding
    too (all k² taps counted), but does k²-1 adds per output, not k², and XLA counts a few
    more elementwise flops in its fusions (~5.0-5.6 per element of A).

    Hence the bounds: at least 2·(valid-tap MACs) minus one per depthwise output, at most
    2·MACs + 6·A; and within 5% of 2·MACs for a width-1.0 model, where extras are small.
    """
    if impl == "grouped":  # the XLA backend's depthwise formulation off the CPU
        monkeypatch.setattr(ops, "depthwise_shift", ops.depthwise_grouped)
    flops = _xla_flops(arch)
    if flops is None:
        pytest.skip("XLA returned no cost analysis on this backend")
    layers = arch.resolve()
    macs = count_cost(arch).macs
    act = sum(lay.out_hw**2 * lay.out_ch for lay in layers if lay.op in ("conv", "dw", "pw"))
    dw_out = sum(lay.out_hw**2 * lay.out_ch for lay in layers if lay.op == "dw")
    ratio = flops / (2 * macs)
    lower, upper = 2 * _valid_tap_macs(arch) - dw_out, 2 * macs + 6 * act
    assert lower <= flops <= upper, f"flops {flops:.0f}, 2·MACs {2 * macs}, ratio {ratio:.3f}"
    if arch.width >= 1.0:
        assert abs(ratio - 1) < 0.05, f"ratio {ratio:.3f}"


# --- the one network on both backends --------------------------------------------------


def _train_step_results(arch: ArchSpec, backend: str, x: jax.Array, labels: jax.Array):  # type: ignore[no-untyped-def]
    """Loss, gradients (params and images) and new running averages of one training-mode
    pass of `build_model(arch, backend=backend)` (seed 0), by `jax.value_and_grad` of the
    model's own loss."""
    model = build_model(arch, rngs=nnx.Rngs(0), backend=backend)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, x):  # type: ignore[no-untyped-def]
        m = nnx.merge(graphdef, params, rest, copy=True)
        return m.loss(x, labels, smoothing=0.1), nnx.state(m, nnx.Not(nnx.Param))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))
    (value, new_rest), (d_params, d_x) = fn(params, rest, x)
    return value, nnx.to_flat_state(d_params), d_x, nnx.to_flat_state(new_rest), rest


@needs_native
def test_backends_train_the_same_network() -> None:
    """The native backend's training pass is the XLA backend's: loss, every parameter's
    gradient, the images' gradient and the running-average updates, on a net with stride-1
    and stride-2 blocks, `ds` residuals and kernels 1/3/5."""
    x = _images(MIXED, 6, seed=2)
    labels = jnp.arange(6, dtype=jnp.int32) % MIXED.num_classes
    native = _train_step_results(MIXED, "native", x, labels)
    xla = _train_step_results(MIXED, "xla", x, labels)
    _assert_close(native[0], xla[0], "loss", rtol=1e-6)
    for (path, a), (path_b, b) in zip(native[1], xla[1], strict=True):
        assert path == path_b
        # BN in training mode divides by the batch std: a little more than one conv's error.
        _assert_close(a[...], b[...], f"d loss / d {'/'.join(map(str, path))}", rtol=1e-4)
    _assert_close(native[2], xla[2], "d loss / d images", rtol=1e-4)
    old = dict(nnx.to_flat_state(native[4]))
    for (path, a), (_, b) in zip(native[3], xla[3], strict=True):
        _assert_close(a[...], b[...], f"new {'/'.join(map(str, path))}", rtol=1e-5)
        assert not np.array_equal(a[...], old[path][...]), path  # the averages moved


@needs_native
def test_backends_evaluate_the_same_network() -> None:
    """In eval mode too (running averages away from their initial values), and the native
    eval pass fuses each depthwise conv with its BatchNorm and ReLU."""
    x = _images(MIXED, 3, seed=1)
    native = build_model(MIXED, rngs=nnx.Rngs(0), backend="native")
    _forward(native, x)  # running averages away from (0, 1)
    native.eval()
    xla = build_model(MIXED, rngs=nnx.Rngs(1), backend="xla")
    xla.eval()
    nnx.update(xla, nnx.state(native))
    _assert_close(_forward(native, x), _forward(xla, x), "eval logits", rtol=1e-5)
    hlo = jax.jit(lambda x: native(x)).lower(x).as_text()
    n_dw = sum(layer.op == "dw" for layer in MIXED.resolve())
    assert hlo.count("mobisearch_depthwise_fwd_bn") == n_dw > 0
    # Differentiating the eval-mode network works too (through the unfused operations).
    grads = [jax.grad(lambda x, m=m: m(x).sum())(x) for m in (native, xla)]
    _assert_close(grads[0], grads[1], "eval d logits / d x", rtol=1e-4)


def test_model_loss_is_optax_cross_entropy_of_its_logits(tiny_arch: ArchSpec) -> None:
    model = build_model(tiny_arch, rngs=nnx.Rngs(0))
    model.eval()
    x, labels = _images(tiny_arch, 4), jnp.array([0, 3, 9, 3], jnp.int32)
    want = optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()
    _assert_close(model.loss(x, labels), want, "loss", rtol=1e-6)


def test_abstract_split_is_the_model_without_values() -> None:
    """The cached abstract model (built with a shape-only RNG stand-in) has the graph and
    state of a model built under `nnx.eval_shape` with real RNG streams, and building
    models from it leaves it abstract."""
    graphdef, state = abstract_split(MIXED, backend="xla")
    ref = nnx.eval_shape(lambda: MobileNet(MIXED.resolve(), backend="xla", rngs=nnx.Rngs(0)))
    ref_graphdef, ref_state = nnx.split(ref)
    assert graphdef == ref_graphdef
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == [
        (x.shape, x.dtype) for x in jax.tree.leaves(ref_state)
    ]
    a = build_model(MIXED, rngs=nnx.Rngs(0), backend="xla")
    b = build_model(MIXED, rngs=nnx.Rngs(1), backend="xla")
    assert abstract_split(MIXED, backend="xla")[1] is state
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    assert not np.array_equal(a.stem.conv.kernel[...], b.stem.conv.kernel[...])


def test_state_does_not_depend_on_the_backend() -> None:
    """A state saved from one backend loads into the other: the same paths and shapes."""
    a = jax.tree.leaves(abstract_split(MIXED, backend="xla")[1])
    b = jax.tree.leaves(abstract_split(MIXED, backend="native")[1])
    assert [x.shape for x in a] == [x.shape for x in b]


def test_errors_name_the_bad_value(tiny_arch: ArchSpec) -> None:
    with pytest.raises(ValueError, match=r"`backend` \(='winograd'\)"):
        build_model(tiny_arch, rngs=nnx.Rngs(0), backend="winograd")
    model = build_model(tiny_arch, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[b, h, w, 3\], got shape \(2, 32, 32, 1\)"):
        model(jnp.zeros((2, 32, 32, 1)))
    with pytest.raises(ValueError, match=r"conv, \(dw, pw\)\*, pool, fc"):
        MobileNet(tiny_arch.resolve()[:-1], backend="xla", rngs=nnx.Rngs(0))
