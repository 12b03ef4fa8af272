"""Named architectures: the MobileNet v1 of the paper, its small-image variant, and `tiny()`.

Presets are small functions that return an `ArchSpec` (timm's `register_model` idea without
the registry: there is one family, so it is imported directly).
"""

from __future__ import annotations

from mobisearch.arch import ArchSpec, BlockSpec

_MOBILENET_V1_ARCH_DEF = (
    ("dsa_r1_k3_s1_c64",),  # stage 1: 112x112 in at 224
    ("dsa_r2_k3_s2_c128",),  # stage 2: 112x112 in -> 56x56
    ("dsa_r2_k3_s2_c256",),  # stage 3: 56x56 in -> 28x28
    ("dsa_r6_k3_s2_c512",),  # stage 4: 28x28 in -> 14x14 (1 strided + 5 at 14x14)
    ("dsa_r2_k3_s2_c1024",),  # stage 5: 14x14 in -> 7x7 (the paper's last "s2" is s1)
)


def _mobilenet_v1_stages() -> tuple[tuple[BlockSpec, ...], ...]:
    """MobileNet v1's 13 depthwise-separable blocks (paper Table 1, timm `mobilenetv1_100`)."""
    return tuple(
        tuple(BlockSpec.from_string(s) for s in stage) for stage in _MOBILENET_V1_ARCH_DEF
    )


def mobilenet_v1(
    width: float = 1.0,
    resolution: int = 224,
    kernel: int = 3,
    *,
    num_classes: int = 1000,
    in_ch: int = 3,
) -> ArchSpec:
    """MobileNet v1 as in the paper: conv3x3 s2 32 → 13 dsa blocks → GAP → FC.

    Paper: Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile
    Vision Applications", https://arxiv.org/abs/1704.04861 (Table 1).

    Args:
      width: the width multiplier α.
      resolution: input size ρ in pixels.
      kernel: depthwise kernel size (3 in the paper).
      num_classes: classifier outputs (1000 for ImageNet).
      in_ch: input channels.

    Examples:
      >>> mobilenet_v1(0.75, 160).display_id
      'mnv1_w075_r160_k3'
    """
    return ArchSpec(
        stages=_mobilenet_v1_stages(),
        width=width,
        resolution=resolution,
        stem_ch=32,  # stem: 224x224 in -> 112x112
        stem_stride=2,
        num_classes=num_classes,
        in_ch=in_ch,
    ).with_kernel(kernel)


def mobilenet_v1_small(
    width: float = 1.0,
    resolution: int = 28,
    kernel: int = 3,
    *,
    num_classes: int = 10,
    in_ch: int = 1,
) -> ArchSpec:
    """MobileNet v1 for 28×28 / 32×32 images (Fashion-MNIST, MNIST, CIFAR).

    The same 13 blocks, but the stem conv has stride 1, so a 28×28 input ends at 2×2
    rather than 1×1 (28 → 28 → 14 → 7 → 4 → 2); the paper's five stride-2 steps would
    take 28 → 14 → 7 → 4 → 2 → 1, a single pixel in the last stage.

    Examples:
      >>> [l.out_hw for l in mobilenet_v1_small().resolve() if l.op == "pw"][::2]
      [28, 14, 7, 4, 4, 4, 2]
    """
    return ArchSpec(
        stages=_mobilenet_v1_stages(),
        width=width,
        resolution=resolution,
        stem_ch=32,  # stem: 28x28 in -> 28x28
        stem_stride=1,
        num_classes=num_classes,
        in_ch=in_ch,
    ).with_kernel(kernel)


def tiny(width: float = 0.25, resolution: int = 32, kernel: int = 3) -> ArchSpec:
    """A 2-block network for tests and docs (flax's `_ResNet1`, timm's `test_efficientnet`).

    Examples:
      >>> [l.name for l in tiny().resolve()]
      ['stem', 'blocks/0/dw', 'blocks/0/pw', 'blocks/1/dw', 'blocks/1/pw', 'pool', 'head']
    """
    return ArchSpec(
        stages=(
            (BlockSpec(out_ch=64, kernel=kernel),),  # 16x16 in (stem stride 2 from 32)
            (BlockSpec(out_ch=128, stride=2, kernel=kernel),),  # 16x16 in -> 8x8
        ),
        width=width,
        resolution=resolution,
        stem_ch=32,
        stem_stride=2,
        num_classes=10,
        in_ch=3,
        name="tiny",
    )
