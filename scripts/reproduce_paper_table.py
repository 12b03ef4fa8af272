"""Print the MobileNet paper's cost tables next to `mobisearch.cost`'s counts.

Paper: Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", https://arxiv.org/abs/1704.04861 (Tables 2, 6 and 7, and §3.3).

Usage:
    python scripts/reproduce_paper_table.py
"""

from __future__ import annotations

from collections.abc import Sequence

from mobisearch.arch import LayerSpec
from mobisearch.cost import breakdown, count_cost, layer_cost, parse_count
from mobisearch.presets import mobilenet_v1

# Figures exactly as the paper prints them.
# Table 6 (width multiplier at 224): α -> (mult-adds, parameters).
PAPER_WIDTH = {1.0: ("569M", "4.2M"), 0.75: ("325M", "2.6M"), 0.5: ("149M", "1.3M"),
               0.25: ("41M", "0.5M")}  # fmt: skip
# Table 7 (resolution at α = 1): resolution -> mult-adds.
PAPER_RESOLUTION = {224: "569M", 192: "418M", 160: "290M", 128: "186M"}
# §3.3 (14x14x512 -> 14x14x512, 3x3): layer -> (mult-adds, parameters).
PAPER_EXAMPLE = {"standard conv": ("462M", "2.36M"), "depthwise separable": ("52.3M", "0.27M")}
# Table 2 (α = 1 at 224): row -> (our op key, % mult-adds, % parameters).
PAPER_TABLE_2 = {
    "Conv 1x1": ("pw", 94.86, 74.59),
    "Conv DW 3x3": ("dw", 3.06, 1.06),
    "Conv 3x3": ("conv", 1.19, 0.02),
    "Fully Connected": ("fc", 0.18, 24.33),
}
# keras.applications.MobileNet(alpha=a, weights=None).count_params(), 1000 classes.
KERAS_PARAMS = {1.0: 4_253_864, 0.75: 2_601_976, 0.5: 1_342_536, 0.25: 475_544}


def _rel(ours: int, paper: str | int) -> str:
    theirs = parse_count(paper) if isinstance(paper, str) else paper
    return f"{100 * (ours - theirs) / theirs:+.2f}%"


def _pt(ours: float, paper: float) -> str:
    return f"{round(ours - paper, 2) + 0.0:+.2f}pt"  # + 0.0 turns -0.0 into 0.0


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, *rows]:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def main() -> None:
    """Print every table."""
    rows: list[Sequence[str]] = []
    for width, (p_macs, p_params) in PAPER_WIDTH.items():
        c = count_cost(mobilenet_v1(width=width))
        rows.append((
            f"{width} MobileNet-224",
            p_macs, f"{c.macs:,}", _rel(c.macs, p_macs),
            p_params, f"{c.weights:,}", f"{c.weights / 1e6:.1f}M", _rel(c.weights, p_params),
        ))  # fmt: skip
    _table(
        "Table 6, width multiplier (paper parameters = conv + fc weights, printed to 0.1M)",
        ("model", "paper MACs", "our MACs", "diff",
         "paper params", "our weights", "to 0.1M", "diff"),
        rows,
    )  # fmt: skip

    rows = []
    for resolution, p_macs in PAPER_RESOLUTION.items():
        c = count_cost(mobilenet_v1(resolution=resolution))
        rows.append((f"1.0 MobileNet-{resolution}", p_macs, f"{c.macs:,}", _rel(c.macs, p_macs)))
    _table("Table 7, resolution", ("model", "paper MACs", "our MACs", "diff"), rows)

    shape = {"in_ch": 512, "out_ch": 512, "in_hw": 14, "out_hw": 14}
    conv = layer_cost(LayerSpec(name="conv", op="conv", kernel=3, **shape))  # type: ignore[arg-type]
    dw = layer_cost(LayerSpec(name="dw", op="dw", kernel=3, groups=512, **shape))  # type: ignore[arg-type]
    pw = layer_cost(LayerSpec(name="pw", op="pw", **shape))  # type: ignore[arg-type]
    ours = {
        "standard conv": (conv.macs, conv.weights),
        "depthwise separable": (dw.macs + pw.macs, dw.weights + pw.weights),
    }
    rows = []
    for layer, (p_macs, p_params) in PAPER_EXAMPLE.items():
        macs, weights = ours[layer]
        rows.append((
            layer, p_macs, f"{macs:,}", _rel(macs, p_macs),
            p_params, f"{weights:,}", _rel(weights, p_params),
        ))  # fmt: skip
    _table(
        "Section 3.3, one 14x14x512 -> 14x14x512 layer, 3x3 kernel",
        ("layer", "paper MACs", "our MACs", "diff", "paper params", "our weights", "diff"),
        rows,
    )

    shares = breakdown(count_cost(mobilenet_v1()))
    rows = []
    for row, (op, p_macs_pct, p_weights_pct) in PAPER_TABLE_2.items():
        macs_pct, weights_pct = (100 * s for s in shares[op])
        rows.append((
            row, f"{p_macs_pct:.2f}%", f"{macs_pct:.2f}%", _pt(macs_pct, p_macs_pct),
            f"{p_weights_pct:.2f}%", f"{weights_pct:.2f}%", _pt(weights_pct, p_weights_pct),
        ))  # fmt: skip
    _table(
        "Table 2, share per layer type (1.0 MobileNet-224)",
        ("type", "paper MACs", "our MACs", "diff", "paper params", "our weights", "diff"),
        rows,
    )
    print(
        "  NOTE: the paper's Conv 3x3 mult-add share (1.19%) has its digits swapped: with it\n"
        "  the column sums to 99.29%; the stem conv is 10,838,016 MACs = 1.91%."
    )

    rows = []
    for width, keras in KERAS_PARAMS.items():
        c = count_cost(mobilenet_v1(width=width))
        rows.append((str(width), f"{keras:,}", f"{c.params:,}", _rel(c.params, keras)))
    _table(
        "Keras MobileNet(alpha, weights=None).count_params(): conv + BatchNorm + fc + bias",
        ("alpha", "Keras", "our params", "diff"),
        rows,
    )


if __name__ == "__main__":
    main()
