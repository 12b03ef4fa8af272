"""Tests for `mobisearch.models`: shapes, modes, state vs `cost`, XLA flops, depthwise variants."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from mobisearch import kernels
from mobisearch.arch import ArchSpec, BlockSpec
from mobisearch.cost import count_cost, layer_cost
from mobisearch.models import (
    BN_MOMENTUM,
    DEPTHWISE_ENV_VAR,
    DEPTHWISE_IMPLS,
    DepthwiseConv,
    MobileNet,
    PointwiseConv,
    abstract_split,
    build_model,
    default_depthwise_impl,
    depthwise_conv,
    inference_apply,
    inference_shapes,
    inference_state,
    native_loss_and_grads,
    same_pads,
    state_size,
)
from mobisearch.presets import mobilenet_v1_small, tiny

VARIANTS = tuple(impl for impl in DEPTHWISE_IMPLS if impl != "grouped")


@pytest.fixture(autouse=True)
def _fast_compile(request: pytest.FixtureRequest) -> Iterator[None]:
    """Compile with most XLA optimizations off, as flax's example tests do (~2x faster here).

    Not for the `xla` tests: their flop counts are those of the optimized program.
    """
    if request.node.get_closest_marker("xla"):
        yield
        return
    flag = "jax_disable_most_optimizations"
    old = jax.config.read(flag)
    jax.config.update(flag, True)
    try:
        yield
    finally:
        jax.config.update(flag, old)


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


@pytest.mark.parametrize(
    "arch", [tiny(), mobilenet_v1_small(0.25, 28), MIXED], ids=lambda a: a.display_id
)
def test_output_shape_and_finite_in_both_modes(arch: ArchSpec) -> None:
    model = build_model(arch, rngs=nnx.Rngs(0))
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
    model = build_model(arch, rngs=nnx.Rngs(0), depthwise="grouped")
    assert state_size(model) == count_cost(arch).params
    assert state_size(model) == sum(v.size for v in _flat_state(model).values())
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, arch.resolution, arch.resolution, arch.in_ch), jnp.float32)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s, copy=True)(x), state, x)
    assert out.shape == (2, arch.num_classes)


# --- XLA cost analysis cross-check -------------------------------------------------------


def _xla_flops(arch: ArchSpec, impl: str) -> float | None:
    model = build_model(arch, rngs=nnx.Rngs(0), depthwise=impl)
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
def test_xla_flops_close_to_twice_macs(arch: ArchSpec, impl: str) -> None:
    """XLA flops ≈ 2·MACs, eval mode, batch 1 (cost analysis is best-effort: bounds only).

    Measured (jax 0.10.2, CPU), flops / (2·MACs):

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
    flops = _xla_flops(arch, impl)
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


# --- depthwise implementations -----------------------------------------------------------


def _dw_case(
    b: int, h: int, w: int, c: int, k: int, s: int, seed: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    kx, kk, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (b, h, w, c))
    kernel = jax.random.normal(kk, (k, k, 1, c))
    out_h, out_w = same_pads(h, k, s)[0], same_pads(w, k, s)[0]
    cotangent = jax.random.normal(kg, (b, out_h, out_w, c))
    return x, kernel, cotangent


@functools.partial(jax.jit, static_argnames=("stride",))
def _dw_all_impls(
    x: jax.Array, kernel: jax.Array, ct: jax.Array, *, stride: int
) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
    """`{impl: (output, d<output, ct>/dx, d<output, ct>/dkernel)}`, one compile for all."""

    def loss(x: jax.Array, kernel: jax.Array, impl: str) -> tuple[jax.Array, jax.Array]:
        y = depthwise_conv(x, kernel, stride=stride, impl=impl)
        return jnp.vdot(y, ct), y

    results = {}
    for impl in DEPTHWISE_IMPLS:
        grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        (_, y), (dx, dk) = grad_fn(x, kernel, impl)
        results[impl] = (y, dx, dk)
    return results


def _check_variants(b: int, h: int, w: int, c: int, k: int, s: int) -> None:
    x, kernel, ct = _dw_case(b, h, w, c, k, s, seed=h + 16 * w)
    results = _dw_all_impls(x, kernel, ct, stride=s)
    ref = results["grouped"]
    assert ref[0].shape == (b, -(-h // s), -(-w // s), c)
    case = f"x {tuple(x.shape)}, k {k}, stride {s}"
    for impl in VARIANTS:
        names = ("forward", "d/dx", "d/dkernel")
        for what, actual, desired in zip(names, results[impl], ref, strict=True):
            assert actual.shape == desired.shape, f"{impl} {what}, {case}"
            _assert_close(actual, desired, f"{impl} {what}, {case}")


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_depthwise_variants_match_grouped(kernel: int, stride: int) -> None:
    # Even and odd heights and widths, non-square, and (for k >= 5) smaller than the kernel.
    for h, w in [(6, 5), (3, 4)]:
        _check_variants(2, h, w, 3, kernel, stride)


@settings(max_examples=6, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    c=st.integers(1, 5),
    k=st.sampled_from([1, 3, 5]),  # 7 is in the test above; it compiles slowest
    s=st.sampled_from([1, 2]),
)
def test_depthwise_variants_match_grouped_property(
    b: int, h: int, w: int, c: int, k: int, s: int
) -> None:
    _check_variants(b, h, w, c, k, s)


@pytest.mark.parametrize("impl", DEPTHWISE_IMPLS)
def test_depthwise_conv_matches_flax_grouped_conv(impl: str) -> None:
    """Same numbers as `nnx.Conv(..., feature_group_count=C, padding="SAME")`, same kernel."""
    for stride, (h, w) in [(1, (6, 5)), (2, (7, 6))]:
        conv = nnx.Conv(
            4,
            4,
            (3, 3),
            strides=stride,
            padding="SAME",
            feature_group_count=4,
            use_bias=False,
            rngs=nnx.Rngs(1),
        )
        x = jax.random.normal(jax.random.key(2), (2, h, w, 4))
        y = depthwise_conv(x, conv.kernel[...], stride=stride, impl=impl)
        _assert_close(y, conv(x), f"{impl}, stride {stride}")


def test_pointwise_conv_matches_flax_conv() -> None:
    pw = PointwiseConv(3, 5, rngs=nnx.Rngs(0))
    conv = nnx.Conv(3, 5, (1, 1), use_bias=False, rngs=nnx.Rngs(0))
    assert pw.kernel.shape == conv.kernel.shape
    conv.kernel[...] = pw.kernel[...]
    x = jax.random.normal(jax.random.key(1), (2, 4, 3, 3))
    _assert_close(pw(x), conv(x), "pointwise")


@functools.cache
def _loss_grads(arch: ArchSpec, impl: str) -> tuple[dict[str, jax.Array], jax.Array]:
    model = build_model(arch, rngs=nnx.Rngs(0), depthwise=impl)  # same seed: same params
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = _images(arch, 4, seed=3)
    labels = jnp.arange(4) % arch.num_classes

    def loss(params: nnx.State, x: jax.Array) -> jax.Array:
        # NOTE: copy=True, else under jax.grad BatchNorm may not update the running stats of
        # Variables that came in from outside (flax 0.12 TraceContextError).
        logits = nnx.merge(graphdef, params, rest, copy=True)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    d_params, d_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    flat = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(d_params)}
    return flat, d_x


@pytest.mark.parametrize("impl", VARIANTS)
def test_model_loss_gradients_match_grouped(impl: str) -> None:
    """Training-mode loss gradients (params and input) agree across depthwise impls."""
    ref_params, ref_x = _loss_grads(MIXED, "grouped")
    params, d_x = _loss_grads(MIXED, impl)
    assert params.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        # BN in training mode divides by batch std, so allow a little more than one conv.
        _assert_close(params[name], ref, f"{impl}: d loss / d {name}", rtol=1e-4)
    _assert_close(d_x, ref_x, f"{impl}: d loss / d x", rtol=1e-4)


def _layer_by_layer(model: MobileNet, x: jax.Array) -> jax.Array:
    """`MobileNet.__call__` without its native whole-network path: every layer's own
    (native) custom VJP."""
    y = model.stem(x)
    for block in model.blocks:
        y = block(y)
    return model.head(jnp.mean(y, axis=(1, 2)))


@pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("wrt_x", [False, True])
def test_native_training_network_is_the_layer_by_layer_model(wrt_x: bool) -> None:
    """In training mode with the native impl, the model runs as one custom VJP
    (`_native_network`); its loss, gradients (params, and the images when they are
    differentiated) and running-average updates are the layer-by-layer model's."""
    model = build_model(MIXED, rngs=nnx.Rngs(0), depthwise="native")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = _images(MIXED, 6, seed=2)
    labels = jnp.arange(6) % MIXED.num_classes

    def loss(call, params, x):  # type: ignore[no-untyped-def]
        m = nnx.merge(graphdef, params, rest, copy=True)
        logits = call(m, x)
        value = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return value, nnx.state(m, nnx.BatchStat)

    results = []
    for call in (MobileNet.__call__, _layer_by_layer):
        argnums = (0, 1) if wrt_x else 0
        fn = jax.value_and_grad(functools.partial(loss, call), argnums=argnums, has_aux=True)
        (value, stats), grads = jax.jit(fn)(params, x)
        results.append((value, jax.tree.leaves(stats), jax.tree.leaves(grads)))
    (value, stats, grads), (ref_value, ref_stats, ref_grads) = results
    _assert_close(value, ref_value, "loss", rtol=1e-6)
    assert len(stats) == len(ref_stats) == 2 * 9 and len(grads) == len(ref_grads)
    for got, want in zip(stats + grads, ref_stats + ref_grads, strict=True):
        _assert_close(got, want, "running averages and gradients", rtol=1e-5)
    # One custom VJP for the whole network, against one per BatchNorm and depthwise conv.
    counts = [
        str(jax.make_jaxpr(lambda p, c=call: loss(c, p, x)[0])(params)).count("custom_vjp_call")
        for call in (MobileNet.__call__, _layer_by_layer)
    ]
    assert counts == [1, 9 + 4]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _native_xent(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    return kernels.softmax_cross_entropy(logits, labels, smoothing=smoothing)[0]


_native_xent.defvjp(
    lambda logits, labels, smoothing: kernels.softmax_cross_entropy(
        logits, labels, smoothing=smoothing
    ),
    lambda smoothing, dlogits, g: (g * dlogits, None),
)


@pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_native_loss_and_grads_is_autodiff_of_the_model_bit_for_bit(smoothing: float) -> None:
    """The train step's forward and backward pass without autodiff or NNX gives the loss,
    gradients and running averages of `jax.value_and_grad` through the model (its custom
    VJP, the native loss) exactly, on a net with residual blocks."""
    model = build_model(MIXED, rngs=nnx.Rngs(0), depthwise="native")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = _images(MIXED, 6, seed=3)
    labels = jnp.arange(6, dtype=jnp.int32) % MIXED.num_classes

    def by_autodiff(params, rest):  # type: ignore[no-untyped-def]
        m = nnx.merge(graphdef, params, rest, copy=True)
        return _native_xent(m(x), labels, smoothing), nnx.state(m, nnx.Not(nnx.Param))

    (want_loss, want_rest), want_grads = jax.jit(jax.value_and_grad(by_autodiff, has_aux=True))(
        params, rest
    )
    layers = MIXED.resolve()
    loss, grads, new_rest = jax.jit(
        lambda p, r: native_loss_and_grads(layers, p, r, x, labels, smoothing)
    )(params, rest)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert jax.tree.structure(new_rest) == jax.tree.structure(rest)
    assert jnp.array_equal(loss, want_loss)
    for got, want in zip(
        jax.tree.leaves((grads, new_rest)), jax.tree.leaves((want_grads, want_rest)), strict=True
    ):
        assert jnp.array_equal(got, want)
    # The running averages moved (they are outputs, not the inputs passed through).
    moved = zip(jax.tree.leaves(new_rest), jax.tree.leaves(rest), strict=True)
    assert not all(jnp.array_equal(a, b) for a, b in moved)


def test_native_loss_and_grads_names_a_missing_array() -> None:
    _, params, rest = nnx.split(build_model(MIXED, rngs=nnx.Rngs(0)), nnx.Param, ...)
    flat = dict(nnx.to_flat_state(rest))
    del flat[("stem", "bn", "var")]
    partial = nnx.from_flat_state(list(flat.items()))
    x = _images(MIXED, 2)
    labels = jnp.zeros(2, jnp.int32)
    with pytest.raises(ValueError, match="stem/bn/var"):
        native_loss_and_grads(MIXED.resolve(), params, partial, x, labels, 0.0)


@pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")
def test_native_eval_mode_fuses_batch_norm_and_matches_shift() -> None:
    """Eval mode with the native impl runs each depthwise conv, its BatchNorm (running
    averages) and ReLU as one native call; outputs and gradients equal the shift-and-add
    model's with flax's BatchNorm, on the same state."""
    x = jax.random.normal(jax.random.key(1), (3, MIXED.resolution, MIXED.resolution, MIXED.in_ch))
    native = build_model(MIXED, rngs=nnx.Rngs(0), depthwise="native")
    native.train()
    native(x)  # running averages away from (0, 1)
    native.eval()
    shift = build_model(MIXED, rngs=nnx.Rngs(1), depthwise="shift")
    shift.eval()
    nnx.update(shift, nnx.state(native))

    hlo = jax.jit(lambda x: native(x)).lower(x).as_text()
    n_dw = sum(isinstance(m, DepthwiseConv) for _, m in nnx.iter_graph(native))
    assert hlo.count("mobisearch_depthwise_fwd_affine") == n_dw > 0
    _assert_close(native(x), shift(x), "eval logits", rtol=1e-5)
    grads = [jax.grad(lambda x, m=m: m(x).sum())(x) for m in (native, shift)]
    _assert_close(grads[0], grads[1], "eval d logits / d x", rtol=1e-4)


def test_abstract_split_is_the_model_without_values() -> None:
    """The cached abstract model (built with a shape-only RNG stand-in) has the graph and
    state of a model built under `nnx.eval_shape` with real RNG streams, and building
    models from it leaves it abstract."""
    graphdef, state = abstract_split(MIXED, depthwise="shift")
    ref = nnx.eval_shape(lambda: MobileNet(MIXED.resolve(), depthwise="shift", rngs=nnx.Rngs(0)))
    ref_graphdef, ref_state = nnx.split(ref)
    assert graphdef == ref_graphdef
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == [
        (x.shape, x.dtype) for x in jax.tree.leaves(ref_state)
    ]
    a = build_model(MIXED, rngs=nnx.Rngs(0), depthwise="shift")
    b = build_model(MIXED, rngs=nnx.Rngs(1), depthwise="shift")
    assert abstract_split(MIXED, depthwise="shift")[1] is state
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    assert not np.array_equal(a.stem.conv.kernel[...], b.stem.conv.kernel[...])


@pytest.mark.parametrize("impl", ["native", "shift", "grouped"])
def test_inference_apply_is_the_eval_mode_model(impl: str) -> None:
    """The pure eval-mode forward on the host-folded BatchNorm affines computes what the
    NNX model computes in eval mode (stride 1 and 2, `ds` residuals, kernels 1/3/5), and
    `inference_shapes` gives the structure and shapes of `inference_state`."""
    if impl == "native" and not kernels.available():
        pytest.skip("native kernels unavailable")
    x = _images(MIXED, 3, seed=2)
    model = build_model(MIXED, rngs=nnx.Rngs(0), depthwise=impl)
    _forward(model, x)  # running averages away from (0, 1)
    model.eval()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    layers = MIXED.resolve()
    state = inference_state(layers, params, rest)
    shapes = inference_shapes(layers)
    assert jax.tree.structure(state) == jax.tree.structure(shapes)
    assert [a.shape for a in jax.tree.leaves(state)] == [s.shape for s in jax.tree.leaves(shapes)]
    apply = jax.jit(functools.partial(inference_apply, layers, depthwise=impl))
    _assert_close(apply(state, x), _forward(model, x), f"{impl}: eval logits", rtol=1e-5)
    if impl == "native":
        n_dw = sum(layer.op == "dw" for layer in layers)
        hlo = apply.lower(shapes, x).as_text()
        assert hlo.count("mobisearch_depthwise_fwd_affine") == n_dw > 0


# --- choosing an implementation, errors --------------------------------------------------


def test_default_depthwise_impl_per_backend_and_env_override(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(DEPTHWISE_ENV_VAR, raising=False)
    # The native kernels where they build (a C++ compiler is there), else shift-and-add;
    # tests/test_kernels.py checks the fallback in a process without a compiler.
    assert default_depthwise_impl("cpu") == ("native" if kernels.available() else "shift")
    assert default_depthwise_impl("gpu") == "grouped"
    assert default_depthwise_impl() in DEPTHWISE_IMPLS
    monkeypatch.setenv(DEPTHWISE_ENV_VAR, "patches")
    assert default_depthwise_impl("cpu") == "patches"
    model = build_model(tiny(), rngs=nnx.Rngs(0))
    assert model.blocks[0].dw.conv.impl == "patches"
    monkeypatch.setenv(DEPTHWISE_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"{DEPTHWISE_ENV_VAR}.*'fast'"):
        default_depthwise_impl()


def test_errors_name_the_bad_value(tiny_arch: ArchSpec) -> None:
    with pytest.raises(ValueError, match=r"`depthwise` \(='winograd'\)"):
        build_model(tiny_arch, rngs=nnx.Rngs(0), depthwise="winograd")
    model = build_model(tiny_arch, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[b, h, w, 3\], got shape \(2, 32, 32, 1\)"):
        model(jnp.zeros((2, 32, 32, 1)))
    x, k = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 1, 2))
    with pytest.raises(ValueError, match=r"`stride` \(=3\)"):
        depthwise_conv(x, k, stride=3, impl="shift")
    with pytest.raises(ValueError, match="3 channels but `x` has 2"):
        depthwise_conv(x, jnp.zeros((3, 3, 1, 3)), stride=1, impl="shift")
    with pytest.raises(ValueError, match=r"`impl` \(='fft'\)"):
        depthwise_conv(x, k, stride=1, impl="fft")
    with pytest.raises(ValueError, match=r"conv, \(dw, pw\)\*, pool, fc"):
        MobileNet(tiny_arch.resolve()[:-1], depthwise="grouped", rngs=nnx.Rngs(0))
