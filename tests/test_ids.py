"""Tests for `mobisearch.ids`: both display-id styles, their parser, block strings and the
canonical architecture key."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobisearch.arch import ArchSpec, BlockSpec, expand_blocks, merge_blocks
from mobisearch.ids import parse_display_id
from mobisearch.presets import mobilenet_v1, mobilenet_v1_small, tiny

PROPERTY = settings(max_examples=100, deadline=None)

groups = st.builds(
    BlockSpec,
    kind=st.sampled_from(("dsa", "ds")),
    out_ch=st.integers(8, 512),
    stride=st.sampled_from((1, 2)),
    kernel=st.sampled_from((1, 3, 5, 7, 15)),
    repeats=st.integers(1, 4),
)
archs = st.builds(
    ArchSpec,
    stages=st.lists(
        st.lists(groups, min_size=1, max_size=3).map(tuple), min_size=1, max_size=5
    ).map(tuple),
    width=st.sampled_from((0.25, 0.5, 1.0, 1.5)),
    resolution=st.integers(8, 512),
    stem_ch=st.integers(8, 64),
    stem_stride=st.sampled_from((1, 2)),
    num_classes=st.integers(1, 100),
    in_ch=st.integers(1, 3),
    rounding=st.sampled_from(("keras", "div8")),
    name=st.sampled_from(("mnv1", "tiny", "net_a")),
    id_style=st.sampled_from(("uniform", "stages")),
)


def test_uniform_ids_are_unchanged() -> None:
    assert mobilenet_v1(0.75, 160, 5).display_id == "mnv1_w075_r160_k5"
    assert mobilenet_v1_small(0.25, 20).display_id == "mnv1_w025_r20_k3"
    mixed = dataclasses.replace(
        tiny(), stages=(tiny().stages[0], (BlockSpec(out_ch=8, kernel=5),))
    )
    assert mixed.display_id == "tiny_w025_r32_kmix"


def test_stages_id() -> None:
    arch = ArchSpec(
        stages=(
            (BlockSpec(out_ch=32),),
            (BlockSpec(out_ch=64, stride=2, kernel=5, repeats=2),),
            (BlockSpec(out_ch=128, stride=2), BlockSpec(out_ch=96, kernel=7)),
        ),
        resolution=24,
        stem_ch=16,
        id_style="stages",
    )
    assert arch.display_id == "mnv1_r24_s16_c32-64-128.96_k3-5-3.7_d1-2-2"
    # Channels are the resolved ones: the width multiplier applies.
    half = dataclasses.replace(arch, width=0.5)
    assert half.display_id == "mnv1_r24_s8_c16-32-64.48_k3-5-3.7_d1-2-2"


@PROPERTY
@given(arch=archs)
def test_parse_reads_back_what_the_id_says(arch: ArchSpec) -> None:
    parsed = parse_display_id(arch.display_id)
    assert parsed.style == arch.id_style and parsed.name == arch.name
    assert parsed.resolution == arch.resolution
    if arch.id_style == "uniform":
        assert parsed.width == int(arch.width * 100 + 0.5) and parsed.kernel == arch.kernel
        return
    assert parsed.stem_ch == arch.channels(arch.stem_ch)
    blocks = [expand_blocks(s) for s in arch.stages]
    assert parsed.depths == tuple(len(s) for s in blocks)
    assert parsed.out_chs == tuple(tuple(arch.channels(b.out_ch) for b in s) for s in blocks)
    assert parsed.kernels == tuple(tuple(b.kernel for b in s) for s in blocks)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("mnv1", "expected <name>_w<width>"),
        ("mnv1_w75_r20_k3", "expected <name>_w<width>"),
        ("mnv1_r24_s16_c32-64_k3_d1-2", "c, k and d list 2, 1 and 2 stages"),
        ("mnv1_r24_s16_c32.48.64_k3_d2", "stage 0 channels '32.48.64' lists 3 blocks"),
        ("mnv1_r24_s16_c32..64_k3_d2", "stage 0 channels entry '32..64'"),
        ("mnv1_r24_s16_c32_k3_d0", "stage 0 depth entry '0'"),
        ("mnv1_r24_s16_c32_k03_d1", "stage 0 kernel entry '03'"),
    ],
)
def test_parse_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_display_id(text)


def test_id_style_in_json() -> None:
    uniform = mobilenet_v1_small(0.5, 24).to_dict()
    assert "id_style" not in uniform  # so uniform records read everywhere format 1 is read
    staged = dataclasses.replace(mobilenet_v1_small(0.5, 24), id_style="stages")
    record = json.loads(json.dumps(staged.to_dict()))
    assert record["id_style"] == "stages"
    assert ArchSpec.from_dict(record) == staged
    record["display_id"] = uniform["display_id"]
    with pytest.raises(ValueError, match="does not match the architecture"):
        ArchSpec.from_dict(record)
    with pytest.raises(ValueError, match="`id_style`"):
        ArchSpec.from_dict(uniform | {"id_style": "short"})


# --- block strings and the canonical key ---------------------------------------------------


def test_block_strings() -> None:
    assert mobilenet_v1(0.25).block_strings() == (
        ("dsa_r1_k3_s1_c16",),
        ("dsa_r2_k3_s2_c32",),
        ("dsa_r2_k3_s2_c64",),
        ("dsa_r6_k3_s2_c128",),
        ("dsa_r2_k3_s2_c256",),
    )


@PROPERTY
@given(arch=archs)
def test_block_strings_rebuild_the_same_network(arch: ArchSpec) -> None:
    # timm's reading of the export: channels as written, multiplier 1.0.
    stages = tuple(tuple(map(BlockSpec.from_string, s)) for s in arch.block_strings())
    stem = arch.channels(arch.stem_ch)
    rebuilt = dataclasses.replace(arch, stages=stages, width=1.0, stem_ch=stem, rounding="keras")
    assert rebuilt.resolve() == arch.resolve()
    assert rebuilt.arch_key() == arch.arch_key()


@PROPERTY
@given(arch=archs, data=st.data())
def test_key_ignores_what_does_not_change_the_network(arch: ArchSpec, data: st.DataObject) -> None:
    flat = tuple(expand_blocks(arch.blocks))
    cut = data.draw(st.integers(1, len(flat)))
    split = (flat[:cut], flat[cut:]) if cut < len(flat) else (flat,)
    same = dataclasses.replace(
        arch,
        stages=split,
        name="other",
        id_style="stages" if arch.id_style == "uniform" else "uniform",
    )
    assert same.resolve() == arch.resolve()
    assert same.arch_key() == arch.arch_key()


@PROPERTY
@given(arch=archs, data=st.data())
def test_key_changes_with_the_network(arch: ArchSpec, data: st.DataObject) -> None:
    blocks = list(expand_blocks(arch.blocks))
    i = data.draw(st.integers(0, len(blocks) - 1))
    field = data.draw(st.sampled_from(("kernel", "out_ch", "stride", "kind")))
    b = blocks[i]
    new = {
        "kernel": b.kernel + 2 if b.kernel < 15 else 1,
        "out_ch": b.out_ch * 4,
        "stride": 3 - b.stride,
        "kind": "ds" if b.kind == "dsa" else "dsa",
    }[field]
    blocks[i] = dataclasses.replace(b, **{field: new})
    other = dataclasses.replace(arch, stages=(tuple(blocks),))
    assert (other.arch_key() == arch.arch_key()) == (other.resolve() == arch.resolve())
    for change in ({"resolution": arch.resolution + 1}, {"num_classes": arch.num_classes + 1}):
        assert dataclasses.replace(arch, **change).arch_key() != arch.arch_key()


def test_key_of_a_width_and_of_explicit_channels() -> None:
    scaled = mobilenet_v1_small(0.5, 24)
    stages = tuple(
        tuple(dataclasses.replace(b, out_ch=b.out_ch // 2) for b in s) for s in scaled.stages
    )
    explicit = dataclasses.replace(scaled, stages=stages, width=1.0, stem_ch=16)
    assert explicit.arch_key() == scaled.arch_key()
    assert explicit.display_id != scaled.display_id  # different ids, same network
    assert explicit.arch_key() == (
        "1x24 conv_k3_s1_c16 dsa_r1_k3_s1_c32 dsa_r2_k3_s2_c64 dsa_r2_k3_s2_c128 "
        "dsa_r6_k3_s2_c256 dsa_r2_k3_s2_c512 fc10"
    )


@PROPERTY
@given(blocks=st.lists(groups, min_size=1, max_size=6))
def test_merge_blocks(blocks: list[BlockSpec]) -> None:
    merged = merge_blocks(blocks)
    assert expand_blocks(merged) == expand_blocks(blocks)
    assert merge_blocks(expand_blocks(blocks)) == merged
    assert merge_blocks(merged) == merged
