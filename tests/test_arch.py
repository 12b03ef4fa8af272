"""Tests for `mobisearch.arch`: block strings, JSON records, validation, channel rounding,
spatial sizes, display ids and `with_kernel`."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobisearch.arch import ArchSpec, BlockSpec, round_channels, same_out
from mobisearch.presets import mobilenet_v1, tiny

PROPERTY = settings(max_examples=100, deadline=None)

odd_kernels = st.integers(0, 7).map(lambda i: 2 * i + 1)  # 1..15, the accepted range
blocks = st.builds(
    BlockSpec,
    kind=st.sampled_from(("dsa", "ds")),
    out_ch=st.integers(1, 4096),
    stride=st.sampled_from((1, 2)),
    kernel=odd_kernels,
    repeats=st.integers(1, 32),
)
stages = st.lists(st.lists(blocks, min_size=1, max_size=4).map(tuple), min_size=1, max_size=5)
archs = st.builds(
    ArchSpec,
    stages=stages.map(tuple),
    width=st.floats(0.0, 4.0, exclude_min=True),
    resolution=st.integers(1, 4096),
    stem_ch=st.integers(1, 512),
    stem_stride=st.sampled_from((1, 2)),
    stem_kernel=odd_kernels,
    num_classes=st.integers(1, 10_000),
    in_ch=st.integers(1, 4),
    rounding=st.sampled_from(("keras", "div8")),
    name=st.sampled_from(("mnv1", "tiny", "net_a")),
    id_style=st.sampled_from(("uniform", "stages")),
)
# Architectures that resolve: every base channel count >= 16 and width >= 1/16.
resolvable_archs = st.builds(
    ArchSpec,
    stages=st.lists(
        st.lists(
            st.builds(
                BlockSpec,
                out_ch=st.integers(16, 256),
                stride=st.sampled_from((1, 2)),
                kernel=odd_kernels,
                repeats=st.integers(1, 3),
            ),
            min_size=1,
            max_size=3,
        ).map(tuple),
        min_size=1,
        max_size=4,
    ).map(tuple),
    width=st.floats(0.0625, 2.0),
    resolution=st.integers(1, 512),
    stem_ch=st.integers(16, 64),
    stem_stride=st.sampled_from((1, 2)),
    rounding=st.sampled_from(("keras", "div8")),
)


# --- block strings ------------------------------------------------------------------------


@PROPERTY
@given(b=blocks)
def test_block_string_round_trip(b: BlockSpec) -> None:
    assert BlockSpec.from_string(b.to_string()) == b


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dsa_c64", BlockSpec(out_ch=64)),
        ("dsa_r2_k3_s2_c128", BlockSpec(out_ch=128, stride=2, repeats=2)),
        ("ds_c32_s2_k5_r3", BlockSpec(kind="ds", out_ch=32, stride=2, kernel=5, repeats=3)),
    ],
)
def test_block_string_options_in_any_order(text: str, expected: BlockSpec) -> None:
    assert BlockSpec.from_string(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "non-empty"),
        ("dsa", "c<n> is required"),
        ("mbconv_c64", "kind 'mbconv'"),
        ("DSA_c64", "kind 'DSA'"),
        ("dsa_c64_k", "option 'k'"),
        ("dsa_c64_x3", "option 'x3'"),
        ("dsa_c64_", "option ''"),
        ("dsa_c-4", "option 'c-4'"),
        ("dsa_c64_c32", "'c' given twice"),
        ("dsa_c64_s3", r"`stride` \(=3\)"),
        ("dsa_c64_k4", r"`kernel` \(=4\)"),
        ("dsa_c64_k0", r"`kernel` \(=0\)"),
        ("dsa_c0", r"`out_ch` \(=0\)"),
        ("dsa_c64_r0", r"`repeats` \(=0\)"),
    ],
)
def test_bad_block_strings(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        BlockSpec.from_string(text)
    assert repr(text) in str(info.value)


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel": 0}, r"`kernel` \(=0\)"),
        ({"kernel": 4}, r"`kernel` \(=4\) must be odd"),
        ({"kernel": 17}, r"`kernel` \(=17\)"),
        ({"stride": 3}, r"`stride` \(=3\) must be 1 or 2"),
        ({"stride": 0}, r"`stride` \(=0\)"),
        ({"out_ch": 0}, r"`out_ch` \(=0\)"),
        ({"out_ch": 8.0}, r"`out_ch` \(=8.0\) must be an integer"),
        ({"repeats": 0}, r"`repeats` \(=0\)"),
        ({"kind": "dsx"}, r"`kind` \(='dsx'\)"),
    ],
)
def test_invalid_block_spec(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BlockSpec(**{"out_ch": 8, **kwargs})


def test_float_stride_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"`stride` \(=2.0\)"):
        BlockSpec(out_ch=8, stride=2.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["dsa_c\u00b2", "dsa_c\u0666\u0664"])
def test_block_string_rejects_non_ascii_digits(text: str) -> None:
    with pytest.raises(ValueError, match="block string"):
        BlockSpec.from_string(text)


def test_display_id_rounds_half_up() -> None:
    assert mobilenet_v1(0.125, 32).display_id == "mnv1_w013_r32_k3"
    assert mobilenet_v1(0.375, 32).display_id == "mnv1_w038_r32_k3"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, r"`width` \(=0\)"),
        ({"width": -0.5}, r"`width` \(=-0.5\)"),
        ({"width": 4.5}, r"`width` \(=4.5\)"),
        ({"width": math.nan}, r"`width` \(=nan\)"),
        ({"width": math.inf}, r"`width` \(=inf\)"),
        ({"width": "0.5"}, r"`width` \(='0.5'\) must be a number"),
        ({"width": True}, r"`width` \(=True\)"),
        ({"resolution": 0}, r"`resolution` \(=0\)"),
        ({"resolution": 224.0}, r"`resolution` \(=224.0\) must be an integer"),
        ({"stem_ch": 0}, r"`stem_ch` \(=0\)"),
        ({"stem_stride": 3}, r"`stem_stride` \(=3\)"),
        ({"stem_kernel": 2}, r"`stem_kernel` \(=2\)"),
        ({"num_classes": 0}, r"`num_classes` \(=0\)"),
        ({"in_ch": 0}, r"`in_ch` \(=0\)"),
        ({"rounding": "floor"}, r"`rounding` \(='floor'\)"),
        ({"name": "mn v1"}, r"`name` \(='mn v1'\)"),
        ({"stages": ()}, r"`stages` \(=\(\)\)"),
        ({"stages": ((),)}, "`stages`"),
        ({"stages": [[BlockSpec(out_ch=8)]]}, "`stages`"),
    ],
)
def test_invalid_arch_spec(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(tiny(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stem_ch": 1, "width": 0.25}, r"`stem_ch` \(=1\) at width 0.25 rounds to 0"),
        (
            {"stages": ((BlockSpec(out_ch=3),),), "width": 0.25},
            r"`out_ch` \(=3\) at width 0.25 rounds to 0",
        ),
    ],
)
def test_channels_that_round_to_zero(kwargs: dict[str, Any], match: str) -> None:
    arch = dataclasses.replace(tiny(), **kwargs)  # a valid description ...
    with pytest.raises(ValueError, match=match):
        arch.resolve()  # ... that cannot be built
    # The div8 policy never goes below 8 channels, so the same description resolves.
    assert dataclasses.replace(arch, rounding="div8").resolve()


# --- JSON record --------------------------------------------------------------------------


@PROPERTY
@given(arch=archs)
def test_json_round_trip(arch: ArchSpec) -> None:
    record = json.loads(json.dumps(arch.to_dict()))
    assert ArchSpec.from_dict(record) == arch
    assert record["arch_def"] == [[b.to_string() for b in stage] for stage in arch.stages]
    assert record["display_id"] == arch.display_id


def _record(**changes: Any) -> dict[str, Any]:
    record = mobilenet_v1(0.5, 160).to_dict()
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (_record(depth=3), "unknown key 'depth'"),
        (_record(stages=[]), "unknown key 'stages'"),
        (_record(arch_def=None), "missing key 'arch_def'"),
        (_record(format=2), "format = 2"),
        (_record(arch_def="dsa_c64"), "arch_def = 'dsa_c64'"),
        (_record(arch_def=[[]]), r"arch_def\[0\] = \[\]"),
        (_record(arch_def=[["dsa_c64"], ["dsa_c64_s3"]]), r"arch_def\[1\].*`stride` \(=3\)"),
        (_record(width="0.5"), r"`width` \(='0.5'\)"),
        (_record(width=0), r"`width` \(=0\)"),
        (_record(resolution=0), r"`resolution` \(=0\)"),
        (_record(display_id="mnv1_w100_r224_k3"), "display_id = 'mnv1_w100_r224_k3'"),
    ],
)
def test_bad_json_records(record: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        ArchSpec.from_dict(record, source="best.json")
    assert str(info.value).startswith("best.json: ")


def test_from_dict_rejects_non_mappings() -> None:
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        ArchSpec.from_dict([1, 2])  # type: ignore[arg-type]


def test_from_dict_fills_defaults() -> None:
    arch = ArchSpec.from_dict({"arch_def": [["dsa_c64"], ["dsa_s2_c128"]]})
    assert arch == ArchSpec(stages=((BlockSpec(out_ch=64),), (BlockSpec(out_ch=128, stride=2),)))


# --- channel rounding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "width", "keras", "div8"),
    [
        (32, 1.0, 32, 32),
        (32, 0.75, 24, 24),
        (32, 0.5, 16, 16),
        (32, 0.25, 8, 8),
        (32, 0.35, 11, 16),  # 11.2: nearest multiple of 8 is 8, more than 10% below -> 16
        (1024, 0.25, 256, 256),
        (100, 1.0, 100, 104),  # 100 -> nearest multiple of 8 (half up) is 104
        (36, 1.0, 36, 40),
        (20, 1.0, 20, 24),
        (3, 0.5, 1, 8),  # div8 never goes below 8
        (1, 0.25, 0, 8),
    ],
)
def test_round_channels(base: int, width: float, keras: int, div8: int) -> None:
    assert round_channels(base, width) == keras  # "keras" is the default
    assert round_channels(base, width, "keras") == keras
    assert round_channels(base, width, "div8") == div8


@PROPERTY
@given(base=st.integers(1, 4096), width=st.floats(0.0, 4.0, exclude_min=True))
def test_round_channels_policies(base: int, width: float) -> None:
    v = base * width
    assert round_channels(base, width, "keras") == math.floor(v)
    c = round_channels(base, width, "div8")
    assert c % 8 == 0 and c >= 8
    assert c >= 0.9 * v  # never more than 10% below the exact value
    assert c <= max(8, v + 4 + 8)


@PROPERTY
@given(
    base=st.integers(1, 4096),
    w=st.tuples(st.floats(0.01, 4.0), st.floats(0.01, 4.0)).map(sorted),
    policy=st.sampled_from(("keras", "div8")),
)
def test_round_channels_is_monotone_in_width(base: int, w: list[float], policy: Any) -> None:
    assert round_channels(base, w[0], policy) <= round_channels(base, w[1], policy)


def test_round_channels_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match=r"`rounding` \(='floor'\)"):
        round_channels(32, 0.5, "floor")  # type: ignore[arg-type]


# --- spatial sizes and the resolved layer list --------------------------------------------


@PROPERTY
@given(size=st.integers(1, 4096), stride=st.sampled_from((1, 2)))
def test_same_out_is_ceil(size: int, stride: int) -> None:
    assert same_out(size, stride) == math.ceil(size / stride)


@pytest.mark.parametrize(("size", "out"), [(224, 112), (7, 4), (5, 3), (1, 1), (2, 1)])
def test_same_out_examples(size: int, out: int) -> None:
    assert same_out(size, 2) == out


@PROPERTY
@given(arch=resolvable_archs)
def test_resolved_layers_chain(arch: ArchSpec) -> None:
    layers = arch.resolve()
    assert layers[0].name == "stem" and layers[0].in_hw == arch.resolution
    assert layers[0].in_ch == arch.in_ch
    assert [layer.op for layer in layers[-2:]] == ["pool", "fc"]
    assert layers[-1].out_ch == arch.num_classes
    for prev, layer in zip(layers, layers[1:], strict=False):
        assert layer.in_ch == prev.out_ch and layer.in_hw == prev.out_hw, layer.name
    for layer in layers:
        if layer.op in ("conv", "dw", "pw"):
            assert layer.out_hw == math.ceil(layer.in_hw / layer.stride), layer.name
        assert layer.groups == (layer.in_ch if layer.op in ("dw", "pool") else 1)
    n_blocks = sum(b.repeats for b in arch.blocks)
    assert sum(layer.op == "dw" for layer in layers) == n_blocks
    assert sum(layer.op == "pw" for layer in layers) == n_blocks


def test_residual_only_where_shapes_allow() -> None:
    arch = ArchSpec(
        stages=((BlockSpec(kind="ds", out_ch=32, repeats=2), BlockSpec(kind="ds", out_ch=64)),),
    )
    pw = [layer for layer in arch.resolve() if layer.op == "pw"]
    assert [layer.residual for layer in pw] == [True, True, False]  # 32->32, 32->32, 32->64
    assert not any(layer.act for layer in pw)
    assert not any(layer.residual for layer in mobilenet_v1().resolve())


# --- display ids and with_kernel ----------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        (mobilenet_v1(0.5, 24, 5), "mnv1_w050_r24_k5"),
        (mobilenet_v1(0.75, 160), "mnv1_w075_r160_k3"),
        (mobilenet_v1(), "mnv1_w100_r224_k3"),
        (mobilenet_v1(0.25, 128, 7), "mnv1_w025_r128_k7"),
        (tiny(), "tiny_w025_r32_k3"),
        (
            ArchSpec(stages=((BlockSpec(out_ch=8), BlockSpec(out_ch=8, kernel=5)),)),
            "mnv1_w100_r224_kmix",
        ),
    ],
)
def test_display_id(arch: ArchSpec, expected: str) -> None:
    assert arch.display_id == expected


def test_with_kernel() -> None:
    mixed = ArchSpec(stages=((BlockSpec(out_ch=8), BlockSpec(out_ch=16, kernel=5, stride=2)),))
    assert mixed.kernel is None
    arch = mixed.with_kernel(7)
    assert arch.kernel == 7
    assert [b.kernel for b in arch.blocks] == [7, 7]
    # Only the depthwise kernels change: not the stem, channels or strides.
    assert arch.stem_kernel == mixed.stem_kernel
    assert [dataclasses.replace(b, kernel=3) for b in arch.blocks] == [
        dataclasses.replace(b, kernel=3) for b in mixed.blocks
    ]
    assert [(layer.op, layer.kernel) for layer in arch.resolve() if layer.op != "pool"] == [
        ("conv", 3),
        ("dw", 7),
        ("pw", 1),
        ("dw", 7),
        ("pw", 1),
        ("fc", 1),
    ]


@pytest.mark.parametrize("kernel", [0, 2, 17, -3])
def test_with_kernel_rejects_bad_kernel(kernel: int) -> None:
    with pytest.raises(ValueError, match=rf"`kernel` \(={kernel}\)"):
        tiny().with_kernel(kernel)


def test_specs_are_hashable_and_frozen() -> None:
    arch = tiny()
    assert hash(arch) == hash(tiny()) and arch == tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.width = 0.5  # type: ignore[misc]
