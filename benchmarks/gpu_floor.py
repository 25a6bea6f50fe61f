"""The floor of the CUDA backend's design for one shape: bytes each stage must move, the products' FLOPs.

Run from the root of a clone::

    python benchmarks/gpu_floor.py                         # B=8 C=C_out=256 64x64, every dtype
    python benchmarks/gpu_floor.py --shape b8_c64_64x64    # a shape of benchmarks/shapes.py
    python benchmarks/gpu_floor.py --batch 16 --channels 128 --size 50x84 --dtype bfloat16 --stages

Each stage of a forward and a backward call (``deformcp/backends/cupy_backend.py``, in the
order it runs them) is charged the bytes it cannot avoid moving through device memory
(every array it reads or writes, once: the sampling kernels' four corner reads and the
atomics are assumed to hit the cache) and, for the three products, their FLOPs.  A
stage's floor is the larger of its bytes at the memory bandwidth and its FLOPs at the
card's peak for the dtype; a call's floor is the sum.  A measurement within 2x of it is
the issue's target (issue 11); ``benchmarks/NOTES.md`` keeps the figures.

The card is an H200 unless told otherwise: 4.8 TB/s, 67 TFLOP/s float32 (and float64, on
its tensor cores), 495 TFLOP/s TF32 and 990 TFLOP/s float16/bfloat16 (dense, tensor cores).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

if __name__ == "__main__" and str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a clone

from benchmarks.shapes import SHAPES, BenchShape  # noqa: E402

__all__ = ["H200", "Card", "Stage", "call_stages", "floor_seconds", "main"]

ITEM_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
ROW_ALIGNMENT = 8  # cupy_backend._ROW_ALIGNMENT: each group's columns padded to 8 elements


@dataclass(frozen=True)
class Card:
    """A GPU's limits: memory bandwidth in bytes/s and dense matrix-product peaks in FLOP/s."""

    name: str
    bandwidth: float
    flops: dict  # "float64", "float32", "tf32", "float16", "bfloat16" -> FLOP/s

    def peak(self, dtype_name: str, tf32: bool) -> float:
        return self.flops["tf32" if tf32 and dtype_name == "float32" else dtype_name]


H200 = Card("H200", 4.8e12, {"float64": 67e12, "float32": 67e12, "tf32": 495e12, "float16": 990e12,
                             "bfloat16": 990e12})


@dataclass(frozen=True)
class Stage:
    """One pass of a call: what it must move and compute."""

    call: str   # "forward" or "backward"
    name: str
    bytes: float
    flops: float = 0.0

    def seconds(self, card: Card, dtype_name: str, tf32: bool) -> float:
        return max(self.bytes / card.bandwidth, self.flops / card.peak(dtype_name, tf32))


def call_stages(shape: BenchShape, dtype_name: str, deterministic: bool = False,
                channels_last: bool = False) -> List[Stage]:
    """The stages of one forward and one backward (all five gradients), as the CUDA backend runs them."""
    s = ITEM_SIZES[dtype_name]
    a = 4 if s == 2 else s  # accumulation: float32 for the half types
    n, c, h, w, c_out = shape.batch, shape.in_channels, shape.height, shape.width, shape.out_channels
    kh, kw = shape.kernel
    k = kh * kw
    oh, ow = shape.out_size
    p = oh * ow
    g, og = shape.groups, shape.offset_groups
    r_group = k * c // g                                   # a group's samples of one pixel
    width = -(-(r_group + 1) // ROW_ALIGNMENT) * ROW_ALIGNMENT  # with the bias's ones column
    x = n * c * h * w
    samples = n * p * og * k
    geometry = samples * 3 * s                             # offset (2) and mask (1) per sample
    out = n * c_out * p
    product_flops = 2.0 * n * p * c_out * r_group
    weight = c_out * r_group
    stages = []
    for call in ("forward", "backward"):
        if not channels_last:
            stages.append(Stage(call, "x to channels-last", 2 * x * s))
        if call == "backward":
            stages.append(Stage(call, "grad_x accumulator zeroed", x * a))
        columns = n * p * (g * width if call == "forward" else g * r_group)
        stages.append(Stage(call, "sample (columns)", x * s + geometry + columns * s))
        if call == "forward":
            stages.append(Stage(call, "product: out = W' columns^T (bias included)",
                                (columns + weight + out) * s, product_flops + 2.0 * n * p * c_out))
            continue
        stages.append(Stage(call, "product: grad_weight += grad_out columns (per image)",
                            (columns + out) * s + 2 * n * weight * a, product_flops))
        grad_columns = n * p * k * c
        stages.append(Stage(call, "product: grad_columns = grad_out^T W'", (out + weight + grad_columns) * s,
                            product_flops))
        coordinates = samples * 3 * s                      # grad_offset (2) and grad_mask (1)
        if deterministic:
            stages.append(Stage(call, "sample_backward (offset, mask)", grad_columns * s + x * s + geometry
                                + coordinates))
            entries = 4 * samples
            stages.append(Stage(call, "gather keys", geometry + entries * (4 + a)))
            # CUB's radix sort of 32-bit keys with 64-bit values: about 4 passes over both.
            stages.append(Stage(call, "stable sort of the corners (4 passes)", 4 * 2 * entries * (4 + 8)))
            stages.append(Stage(call, "gather grad_x (each sample's column gradient read per corner)",
                                entries * (8 + a) + 4 * grad_columns * s + 2 * x * a))
        else:
            stages.append(Stage(call, "sample_backward (offset, mask, grad_x by atomics)",
                                grad_columns * s + x * s + geometry + coordinates + 2 * x * a))
        stages.append(Stage(call, "grad_x to NCHW", x * (a + s)))
        stages.append(Stage(call, "grad_weight to its layout", weight * (a + s)))
        stages.append(Stage(call, "grad_bias (a sum of grad_out)", out * s))
    return stages


def floor_seconds(stages: List[Stage], card: Card, dtype_name: str, tf32: bool = False,
                  call: Optional[str] = None) -> float:
    """The sum of the stages' floors, of one call or both."""
    return sum(st.seconds(card, dtype_name, tf32) for st in stages if call is None or st.call == call)


def _shape(args) -> BenchShape:
    if args.shape:
        return SHAPES[args.shape] if args.shape in SHAPES else _target()
    height, width = (int(v) for v in args.size.lower().split("x"))
    return BenchShape(f"b{args.batch}_c{args.channels}_{height}x{width}", args.batch, args.channels, height, width,
                      args.out_channels or args.channels, groups=args.groups, offset_groups=args.offset_groups)


def _target() -> BenchShape:
    """Issue 11's headline shape: B=8, C=C_out=256, 64x64, 3x3, padding 1."""
    return BenchShape("b8_c256_64x64", 8, 256, 64, 64, 256)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", help=f"a shape of benchmarks/shapes.py ({', '.join(SHAPES)}) or b8_c256_64x64")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--out-channels", type=int)
    parser.add_argument("--size", default="64x64", help="HxW")
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--offset-groups", type=int, default=1)
    parser.add_argument("--dtype", choices=[*ITEM_SIZES, "all"], default="all")
    parser.add_argument("--deterministic", action="store_true", help="grad_x by the sorted gather")
    parser.add_argument("--channels-last", action="store_true", help="x given channels-last (no copy)")
    parser.add_argument("--stages", action="store_true", help="print every stage, not only the totals")
    args = parser.parse_args(argv)
    shape = _shape(args)
    card = H200
    print(f"{shape.name}: {shape.label}, {shape.kernel[0]}x{shape.kernel[1]}, on an {card.name} "
          f"({card.bandwidth / 1e12:g} TB/s){', deterministic grad_x' if args.deterministic else ''}")
    variants = [(d, False) for d in ITEM_SIZES] + [("float32", True)] if args.dtype == "all" \
        else [(args.dtype, False)] + ([("float32", True)] if args.dtype == "float32" else [])
    print("| dtype | forward (us) | backward (us) | forward + backward (us) | products' share |")
    print("| --- | --- | --- | --- | --- |")
    for dtype_name, tf32 in variants:
        stages = call_stages(shape, dtype_name, args.deterministic, args.channels_last)
        total = floor_seconds(stages, card, dtype_name, tf32)
        products = sum(st.seconds(card, dtype_name, tf32) for st in stages if st.flops)
        label = "float32 + TF32" if tf32 else dtype_name
        print(f"| {label} | {floor_seconds(stages, card, dtype_name, tf32, 'forward') * 1e6:.1f} | "
              f"{floor_seconds(stages, card, dtype_name, tf32, 'backward') * 1e6:.1f} | {total * 1e6:.1f} | "
              f"{products / total:.0%} |")
    if args.stages:
        for dtype_name, tf32 in variants:
            stages = call_stages(shape, dtype_name, args.deterministic, args.channels_last)
            print(f"\n{'float32 + TF32' if tf32 else dtype_name}:\n")
            print("| call | stage | MB | GFLOP | floor (us) | bound by |")
            print("| --- | --- | --- | --- | --- | --- |")
            for st in stages:
                seconds = st.seconds(card, dtype_name, tf32)
                bound = "compute" if st.flops / card.peak(dtype_name, tf32) > st.bytes / card.bandwidth else "memory"
                print(f"| {st.call} | {st.name} | {st.bytes / 1e6:.1f} | {st.flops / 1e9:.1f} | "
                      f"{seconds * 1e6:.1f} | {bound} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
