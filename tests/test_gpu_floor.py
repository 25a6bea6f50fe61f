"""benchmarks/gpu_floor.py: the floor model of the CUDA backend counts what the design moves and computes."""

from __future__ import annotations

import pytest

from benchmarks import gpu_floor
from benchmarks.shapes import BenchShape


def test_products_and_bytes_of_the_target_shape():
    shape = BenchShape("b8_c256_64x64", 8, 256, 64, 64, 256)
    stages = gpu_floor.call_stages(shape, "bfloat16")
    products = [st for st in stages if st.flops]
    assert len(products) == 3
    k_c = 9 * 256
    pixels = 8 * 64 * 64
    assert products[1].flops == products[2].flops == 2.0 * pixels * 256 * k_c
    assert products[0].flops == products[1].flops + 2.0 * pixels * 256  # the bias's column of ones
    sample = next(st for st in stages if st.call == "forward" and st.name.startswith("sample"))
    # x once, offset and mask (3 values a sample), the columns: K*C plus the ones column, padded to 8
    assert sample.bytes == 2 * (8 * 256 * 64 * 64 + pixels * 9 * 3 + pixels * 2312)
    # At 990 TFLOP/s and 4.8 TB/s the bf16 column-gradient product of this shape is bound by compute
    # (the weight gradient's, which adds into grad_weight once per image, by memory); sampling by memory.
    card = gpu_floor.H200
    grad_columns = next(st for st in products if "grad_columns" in st.name)
    assert grad_columns.flops / card.peak("bfloat16", False) > grad_columns.bytes / card.bandwidth
    assert sample.seconds(card, "bfloat16", False) == sample.bytes / card.bandwidth


def test_tf32_and_half_types_are_faster_than_float32():
    shape = BenchShape("b8_c256_64x64", 8, 256, 64, 64, 256)
    card = gpu_floor.H200
    floor = {name: gpu_floor.floor_seconds(gpu_floor.call_stages(shape, name), card, name)
             for name in gpu_floor.ITEM_SIZES}
    tf32 = gpu_floor.floor_seconds(gpu_floor.call_stages(shape, "float32"), card, "float32", tf32=True)
    assert floor["bfloat16"] == floor["float16"] < tf32 < floor["float32"] < floor["float64"]
    deterministic = gpu_floor.floor_seconds(gpu_floor.call_stages(shape, "bfloat16", deterministic=True), card,
                                            "bfloat16")
    assert deterministic > floor["bfloat16"]


def test_command_line(capsys):
    assert gpu_floor.main(["--shape", "b8_c64_64x64", "--dtype", "float32", "--stages"]) == 0
    text = capsys.readouterr().out
    assert "float32 + TF32" in text and "| backward | sample_backward" in text
    with pytest.raises(SystemExit):
        gpu_floor.main(["--dtype", "int8"])
