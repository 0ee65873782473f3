"""The native-cast encode against ml_dtypes' casts and ``ops.encode``/``ops.quantize``, bit for bit."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from altgrad.quantization import FORMATS, encode, get_format, quantize
from altgrad.quantization.codes import (
    decode_native,
    native_dtype,
    native_encode,
    quantize_keeping_codes,
    replace_code,
)
from references import CUSTOM_SPECS

ML_DTYPES = {
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
    torch.float8_e5m2: ml_dtypes.float8_e5m2,
    torch.float8_e4m3fnuz: ml_dtypes.float8_e4m3fnuz,
    torch.float8_e5m2fnuz: ml_dtypes.float8_e5m2fnuz,
}
NATIVE_NAMES = [name for name in [*FORMATS, *CUSTOM_SPECS] if native_dtype(get_format(name)) is not None]
SCALES = [1.0, 0.37, torch.tensor(2.5e-3), torch.tensor([7.0])]


def test_native_formats_are_found_from_their_value_tables() -> None:
    assert native_dtype(get_format("E4M3")) is torch.float8_e4m3fn
    assert native_dtype(get_format("E5M2")) is torch.float8_e5m2
    assert native_dtype(get_format("float8_e4m3fnuz")) is torch.float8_e4m3fnuz
    assert native_dtype(get_format("e4m3:specials=fnuz,bias=8")) is torch.float8_e4m3fnuz  # same table
    for name in ("E3M4", "float8_e4m3", "E2M5", "e5m2:subnormals=false", "float16", "float4_e2m1fn"):
        assert native_dtype(get_format(name)) is None, name


def _hard_inputs(name: str) -> torch.Tensor:
    """Every grid value and midpoint, with the float32s 1 and 2 ulps either side, both signs; +-0,
    +-inf, +-NaN, values beyond the range and far below it; and random values over 50 binades."""
    values = get_format(name).values().float()
    grid = values[torch.isfinite(values)].unique()
    points = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])
    bits = points.view(torch.int32)
    near = torch.cat([(bits + d).view(torch.float32) for d in (-2, -1, 0, 1, 2)])
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1e30, -1e-30, 1e-45])
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(20_000, generator=generator) * torch.exp2(
        torch.randint(-30, 20, (20_000,), generator=generator).float()
    )
    return torch.cat([near, -near, specials, spread])


def _ml_dtypes_codes(y: np.ndarray, name: str) -> np.ndarray:
    """The independent encoder: ml_dtypes' cast of the saturated y, NaN at the format's NaN code."""
    fmt = get_format(name)
    target = ML_DTYPES[native_dtype(fmt)]
    with np.errstate(invalid="ignore"):
        codes = np.clip(y, -fmt.max_finite, fmt.max_finite).astype(target).view(np.uint8)
    return np.where(np.isnan(y), fmt.encode(math.nan), codes)


@pytest.mark.parametrize("scale", SCALES, ids=["1", "0.37", "tensor", "tensor1d"])
@pytest.mark.parametrize("name", NATIVE_NAMES)
def test_native_encode_is_ml_dtypes_cast_and_ops_encode(name: str, scale) -> None:
    x = _hard_inputs(name) * (scale if isinstance(scale, float) else float(scale))
    codes = native_encode(x, name, scale)
    assert codes.dtype == torch.uint8
    y = (x / scale).numpy() if not isinstance(scale, float) or scale != 1 else x.numpy()
    np.testing.assert_array_equal(codes.numpy(), _ml_dtypes_codes(y, name))
    assert torch.equal(codes, encode(x, name, scale, check_nan=False))


@pytest.mark.parametrize("name", NATIVE_NAMES)
def test_per_channel_scales_divide_and_multiply_as_ops_does(name: str) -> None:
    w = torch.randn(64, 33) * 3
    scale = torch.rand(64, 1) + 0.01
    codes = native_encode(w, name, scale)
    assert torch.equal(codes, encode(w, name, scale, check_nan=False))
    decoded = decode_native(codes, name, scale)
    assert torch.equal(decoded.view(torch.int32), quantize(w, name, scale).view(torch.int32))


@pytest.mark.parametrize("scale", SCALES, ids=["1", "0.37", "tensor", "tensor1d"])
@pytest.mark.parametrize("name", NATIVE_NAMES)
def test_decoded_codes_are_the_quantized_values_bit_for_bit(name: str, scale) -> None:
    x = _hard_inputs(name)
    got = decode_native(native_encode(x, name, scale), name, scale)
    expected = quantize(x, name, scale)
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), expected[~nan].view(torch.int32))  # -0 included


@pytest.mark.parametrize("name", ["E3M4", "E2M5", "float16"])
def test_other_formats_and_dtypes_fall_back_to_ops_encode(name: str) -> None:
    x = torch.randn(1000)
    assert torch.equal(native_encode(x, name, 0.5), encode(x, name, 0.5, check_nan=False))
    half = torch.randn(100, dtype=torch.bfloat16)
    assert torch.equal(native_encode(half, "E4M3", 0.5), encode(half, "E4M3", 0.5))
    with pytest.raises(ValueError, match="uint8 codes of an 8-bit format"):
        decode_native(torch.zeros(3, dtype=torch.int32), "float16")


def test_replace_code_changes_exactly_one_code() -> None:
    every = torch.arange(256, dtype=torch.uint8)
    for old, new in [(128, 0), (255, 127), (127, 125), (0, 255), (5, 5)]:
        expected = every.clone()
        expected[old] = new
        assert torch.equal(replace_code(every.clone(), old, new), expected), (old, new)


def test_quantize_keeping_codes_is_quantize_with_its_codes() -> None:
    x = (torch.randn(32, 16) * 40).requires_grad_()
    scale = torch.tensor(0.3)
    values, codes = quantize_keeping_codes(x, "E4M3", scale)
    assert torch.equal(values.view(torch.int32), quantize(x, "E4M3", scale).view(torch.int32))
    assert torch.equal(codes, encode(x, "E4M3", scale))
    (values * torch.arange(16.0)).sum().backward()  # straight-through: the incoming gradient as is
    assert torch.equal(x.grad, torch.arange(16.0).expand(32, 16))
    generator = torch.Generator().manual_seed(0)
    stochastic, none = quantize_keeping_codes(x, "E4M3", scale, "stochastic", generator)
    assert none is None
    again = torch.Generator().manual_seed(0)
    assert torch.equal(stochastic, quantize(x, "E4M3", scale, "stochastic", generator=again))
    assert quantize_keeping_codes(x, "E3M4", scale)[1] is None
