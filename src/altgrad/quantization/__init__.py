"""Numerics: formats, quantize/encode/decode, scaling, the grid.

The run diagnostics live in ``altgrad.diagnostics``; the names the original AltGrad exported from here
(``WeightFlipTracker``, ``compute_flip_rate``, the rank-health functions, ...) resolve on first use, so
that importing the numerics never imports the diagnostics built on them."""

from .compat import (
    FORMAT_REGISTRY,
    DequantizeFunc,
    QuantizeFunc,
    ScalingConfig,
    compute_stiffness_field,
    dequantize,
    detect_bit_stall,
)
from .formats import (
    BFLOAT16,
    E0M7,
    E1M6,
    E2M5,
    E3M4,
    E4M3,
    E5M2,
    E6M1,
    E7M0,
    FLOAT4_E2M1FN,
    FLOAT6_E2M3FN,
    FLOAT6_E3M2FN,
    FLOAT8_E3M4,
    FLOAT8_E4M3,
    FLOAT8_E4M3B11FNUZ,
    FLOAT8_E4M3FN,
    FLOAT8_E4M3FNUZ,
    FLOAT8_E5M2,
    FLOAT8_E5M2FNUZ,
    FLOAT8_E8M0FNU,
    FLOAT16,
    FORMATS,
    FloatFormat,
    FP8Format,
    get_format,
)
from .grid import crossing_probability, grid_spacing
from .ops import decode, encode, quantize, quantize_compiled
from .scaling import AmaxHistory, compute_scale, mx_block_scale, mx_quantize, per_channel_scale

__all__ = [
    "BFLOAT16", "E0M7", "E1M6", "E2M5", "E3M4", "E4M3", "E5M2", "E6M1", "E7M0", "FLOAT4_E2M1FN",
    "FLOAT6_E2M3FN", "FLOAT6_E3M2FN", "FLOAT8_E3M4", "FLOAT8_E4M3", "FLOAT8_E4M3B11FNUZ", "FLOAT8_E4M3FN",
    "FLOAT8_E4M3FNUZ", "FLOAT8_E5M2", "FLOAT8_E5M2FNUZ", "FLOAT8_E8M0FNU", "FLOAT16", "FORMATS",
    "FloatFormat", "FP8Format", "get_format", "quantize", "dequantize", "encode", "decode",
    "compute_flip_rate", "compute_stall_ratio", "WeightFlipTracker", "attach_flip_tracker",
    "BitStallDetector", "crossing_probability", "grid_spacing", "compute_stable_rank",
    "compute_effective_rank", "RankTrendDetector", "RankHealthMonitor",
    "quantize_compiled", "AmaxHistory", "compute_scale", "per_channel_scale", "mx_block_scale", "mx_quantize",
    # the original AltGrad's names (docs/compat.md)
    "FORMAT_REGISTRY", "QuantizeFunc", "DequantizeFunc", "ScalingConfig", "detect_bit_stall",
    "compute_stiffness_field",
]  # fmt: skip


_DIAGNOSTICS = {
    "BitStallDetector", "RankHealthMonitor", "RankTrendDetector", "WeightFlipTracker", "attach_flip_tracker",
    "compute_effective_rank", "compute_flip_rate", "compute_stable_rank", "compute_stall_ratio",
}  # fmt: skip


def __getattr__(name: str) -> object:
    if name in _DIAGNOSTICS:
        import altgrad.diagnostics

        return getattr(altgrad.diagnostics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
