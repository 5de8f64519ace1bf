"""Block-wise FP8 dequantisation of DeepSeek-V3 checkpoints (docs/reference.md §1).

A weight W [..., out, in] is stored as float8_e4m3fn next to `<name>_scale_inv` [..., ceil(out/b0), ceil(in/b1)]
(fp32), b = quantization_config.weight_block_size (V3: [128, 128]); the real weight is each b0 x b1 block times
its scale (despite the name, `scale_inv` multiplies). Edge blocks are partial. Reads are per block of W, so only
the scale rows/columns covering that block are read.
"""

from __future__ import annotations

import numpy as np

from r1jax.hf.safetensors_io import DTYPES, CheckpointError, Ranges, SafetensorsDir

FP8 = (DTYPES["F8_E4M3"], DTYPES["F8_E5M2"])


def scale_name(name: str) -> str:
    return name + "_scale_inv"


def block_size(hf_config: dict) -> tuple[int, int] | None:
    """weight_block_size from config.json's quantization_config (None when the checkpoint is not quantised)."""
    q = hf_config.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method", "fp8") != "fp8" or "weight_block_size" not in q:
        raise CheckpointError(f"config.json: quantization_config {q!r} is not supported "
                              "(supported: quant_method 'fp8' with weight_block_size)")
    b = tuple(int(x) for x in q["weight_block_size"])
    if len(b) != 2 or min(b) < 1:
        raise CheckpointError(f"config.json: quantization_config.weight_block_size = {q['weight_block_size']!r} "
                              "must be two positive ints [rows, cols]")
    return b


def is_fp8(reader: SafetensorsDir, name: str) -> bool:
    return reader.info(name).dtype in FP8


def check_scale(reader: SafetensorsDir, name: str, block: tuple[int, int] | None) -> str:
    """Validate the scale tensor of the FP8 tensor `name`; returns the scale's name."""
    shape = reader.info(name).shape
    if block is None:
        raise CheckpointError(f"tensor {name!r} is stored as FP8 but config.json has no quantization_config "
                              "(needed for weight_block_size)")
    if len(shape) < 2:
        raise CheckpointError(f"FP8 tensor {name!r} has shape {shape}; block scales need at least 2 dims")
    sname = scale_name(name)
    want = shape[:-2] + (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    if sname not in reader:
        raise CheckpointError(f"FP8 tensor {name!r} has no scale tensor {sname!r} in {reader.path}")
    got = reader.info(sname).shape
    if got != want:
        raise CheckpointError(f"scale tensor {sname!r} has shape {got}, expected {want} for {name!r} of shape "
                              f"{shape} with weight_block_size {list(block)} from config.json")
    return sname


def read_float32(reader: SafetensorsDir, name: str, ranges: Ranges, block: tuple[int, int] | None) -> np.ndarray:
    """Block `ranges` of tensor `name` as float32, dequantising FP8 with the matching part of its block scales."""
    q = reader.read(name, ranges)
    if reader.info(name).dtype not in FP8:
        return q.astype(np.float32)
    (r0, r1), (c0, c1) = ranges[-2], ranges[-1]
    b0, b1 = block
    s = reader.read(scale_name(name), list(ranges[:-2]) + [(r0 // b0, -(-r1 // b0)), (c0 // b1, -(-c1 // b1))])
    s = np.repeat(np.repeat(s.astype(np.float32), b0, axis=-2), b1, axis=-1)  # one scale per element
    s = s[..., r0 - (r0 // b0) * b0:, c0 - (c0 // b1) * b1:][..., : r1 - r0, : c1 - c0]
    return q.astype(np.float32) * s
