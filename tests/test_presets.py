"""Tests for `mobisearch.presets`: MobileNet v1 against the paper's Table 1, the small-image
variant and `tiny()`."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from mobisearch.arch import ArchSpec, round_channels
from mobisearch.presets import mobilenet_v1, mobilenet_v1_small, tiny

# Paper Table 1 (arXiv 1704.04861), one row per layer: (op, stride, input size, in, out).
# NOTE: the paper prints the last depthwise conv as "s2" on a 7x7 input with a 7x7 output;
# every implementation (Keras, timm, TF-Slim) uses stride 1 there, and so do we.
PAPER_TABLE_1 = [
    ("conv", 2, 224, 3, 32),
    ("dw", 1, 112, 32, 32),
    ("pw", 1, 112, 32, 64),
    ("dw", 2, 112, 64, 64),
    ("pw", 1, 56, 64, 128),
    ("dw", 1, 56, 128, 128),
    ("pw", 1, 56, 128, 128),
    ("dw", 2, 56, 128, 128),
    ("pw", 1, 28, 128, 256),
    ("dw", 1, 28, 256, 256),
    ("pw", 1, 28, 256, 256),
    ("dw", 2, 28, 256, 256),
    ("pw", 1, 14, 256, 512),
    *[("dw", 1, 14, 512, 512), ("pw", 1, 14, 512, 512)] * 5,
    ("dw", 2, 14, 512, 512),
    ("pw", 1, 7, 512, 1024),
    ("dw", 1, 7, 1024, 1024),  # "s2" in the paper
    ("pw", 1, 7, 1024, 1024),
    ("pool", 1, 7, 1024, 1024),
    ("fc", 1, 1, 1024, 1000),
]


def test_mobilenet_v1_matches_paper_table_1() -> None:
    layers = mobilenet_v1().resolve()
    got = [(x.op, x.stride, x.in_hw, x.in_ch, x.out_ch) for x in layers]
    assert got == PAPER_TABLE_1
    kernels = [x.kernel for x in layers if x.op in ("conv", "dw", "pw")]
    assert kernels == [3] + [3, 1] * 13


@pytest.mark.parametrize("width", [1.0, 0.75, 0.5, 0.25])
@pytest.mark.parametrize("resolution", [224, 192, 160, 128])
def test_mobilenet_v1_layer_counts(width: float, resolution: int) -> None:
    ops = [layer.op for layer in mobilenet_v1(width, resolution).resolve()]
    # 1 stem + 13 depthwise + 13 pointwise + pool + fc.
    assert len(ops) == 29
    assert ops == ["conv"] + ["dw", "pw"] * 13 + ["pool", "fc"]


@pytest.mark.parametrize("width", [0.75, 0.5, 0.25])
def test_width_scales_every_channel_count(width: float) -> None:
    full, scaled = mobilenet_v1().resolve(), mobilenet_v1(width).resolve()
    for a, b in zip(full[:-1], scaled[:-1], strict=True):  # the classifier's outputs stay 1000
        assert b.out_ch == round_channels(a.out_ch, width), a.name
    assert scaled[-1].out_ch == 1000


def test_layer_names_are_stable_paths() -> None:
    names = [layer.name for layer in mobilenet_v1().resolve()]
    assert names[0] == "stem" and names[-2:] == ["pool", "head"]
    assert names[1:5] == ["blocks/0/dw", "blocks/0/pw", "blocks/1/dw", "blocks/1/pw"]
    assert names[-3] == "blocks/12/pw"


def test_small_variant_does_not_collapse_at_28() -> None:
    layers = mobilenet_v1_small().resolve()
    assert len(layers) == 29
    assert layers[0].stride == 1 and layers[0].in_ch == 1 and layers[-1].out_ch == 10
    assert [x.out_hw for x in layers if x.op == "pw"][::2] == [28, 14, 7, 4, 4, 4, 2]
    assert layers[-2].in_hw == 2  # the global pool still sees 2x2
    # The paper's network (stem stride 2) on the same input ends at 1x1.
    assert mobilenet_v1(resolution=28).resolve()[-2].in_hw == 1


def test_small_variant_at_32() -> None:
    layers = mobilenet_v1_small(resolution=32, in_ch=3).resolve()
    assert layers[0].in_ch == 3
    assert layers[-2].in_hw == 2  # 32 -> 32 -> 16 -> 8 -> 4 -> 2


@pytest.mark.parametrize("preset", [mobilenet_v1, mobilenet_v1_small])
@pytest.mark.parametrize("kernel", [1, 5, 7])
def test_kernel_argument(preset: Callable[..., ArchSpec], kernel: int) -> None:
    arch = preset(kernel=kernel)
    assert arch == preset().with_kernel(kernel)
    assert arch.kernel == kernel
    assert arch.stem_kernel == 3  # the stem conv keeps its 3x3 kernel
    assert arch.display_id.endswith(f"_k{kernel}")
    assert {x.kernel for x in arch.resolve() if x.op == "dw"} == {kernel}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, r"`width` \(=0\)"),
        ({"resolution": 0}, r"`resolution` \(=0\)"),
        ({"kernel": 4}, r"`kernel` \(=4\)"),
        ({"num_classes": 0}, r"`num_classes` \(=0\)"),
    ],
)
def test_invalid_preset_arguments(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mobilenet_v1(**kwargs)  # type: ignore[arg-type]


def test_tiny() -> None:
    arch = tiny()
    assert (arch.width, arch.resolution, arch.num_classes, len(arch.blocks)) == (0.25, 32, 10, 2)
    layers = arch.resolve()
    assert [x.out_ch for x in layers] == [8, 8, 16, 16, 32, 32, 10]
    assert [x.out_hw for x in layers] == [16, 16, 16, 8, 8, 1, 1]
    assert tiny(kernel=5).kernel == 5


@pytest.mark.parametrize(
    "arch", [mobilenet_v1(), mobilenet_v1(0.25, 128, 5), mobilenet_v1_small(), tiny()]
)
def test_presets_survive_json(arch: ArchSpec) -> None:
    assert ArchSpec.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
