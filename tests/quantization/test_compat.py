"""The original AltGrad's names (docs/compat.md), each against an independent reference: ml_dtypes codes,
hand-computed values, a brute-force loop. Its numeric bugs must stay fixed: E4M3 max 448 (not 480), ties
to even (not away), NaN stays NaN (not 0), E3M4 bias 3 (not 1), stall ratios never negative."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from altgrad.quantization import (
    FORMAT_REGISTRY,
    AmaxHistory,
    DequantizeFunc,
    FP8Format,
    QuantizeFunc,
    ScalingConfig,
    compute_scale,
    compute_stall_ratio,
    compute_stiffness_field,
    decode,
    dequantize,
    detect_bit_stall,
    get_format,
)

E4M3, E5M2, E3M4, E0M7 = (FORMAT_REGISTRY[name] for name in ("E4M3", "E5M2", "E3M4", "E0M7"))
ML = {"E4M3": ml_dtypes.float8_e4m3fn, "E5M2": ml_dtypes.float8_e5m2}


# ---- FORMAT_REGISTRY and FP8Format --------------------------------------------------------------------


def test_registry_holds_the_eight_splits_with_sound_parameters() -> None:
    assert list(FORMAT_REGISTRY) == ["E0M7", "E1M6", "E2M5", "E3M4", "E4M3", "E5M2", "E6M1", "E7M0"]
    assert all(isinstance(fmt, FP8Format) and fmt.total_bits == 8 for fmt in FORMAT_REGISTRY.values())
    assert E4M3.max_representable_value == 448.0 == float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
    assert E5M2.max_representable_value == 57344.0 == float(ml_dtypes.finfo(ml_dtypes.float8_e5m2).max)
    assert E3M4.bias == 3 and E3M4.max_representable_value == (1 + 15 / 16) * 2.0 ** (7 - 3)  # 31
    assert E0M7.max_representable_value == 127 / 128
    assert FORMAT_REGISTRY["E7M0"].max_representable_value == 2.0**64
    flags = {name: (fmt.has_inf, fmt.has_nan) for name, fmt in FORMAT_REGISTRY.items()}
    assert (
        flags["E5M2"] == (True, True) and flags["E4M3"] == (False, True) and flags["E3M4"] == (False, False)
    )


@pytest.mark.parametrize("name", ["E4M3", "E5M2"])
def test_to_real_of_every_code_matches_ml_dtypes(name: str) -> None:
    fmt = FORMAT_REGISTRY[name]
    with np.errstate(invalid="ignore"):
        reference = np.arange(256, dtype=np.uint8).view(ML[name]).astype(np.float64)
    got = np.array([fmt.to_real(code) for code in range(256)])
    np.testing.assert_array_equal(got, reference)  # NaN where ml_dtypes has NaN
    numbers = ~np.isnan(reference)
    assert np.array_equal(np.signbit(got[numbers]), np.signbit(reference[numbers]))  # -0.0 included


@pytest.mark.parametrize("name", ["E4M3", "E5M2"])
def test_to_bits_rounds_to_nearest_even_like_ml_dtypes(name: str) -> None:
    fmt = FORMAT_REGISTRY[name]
    finite = np.arange(256, dtype=np.uint8).view(ML[name]).astype(np.float64)
    finite = np.unique(finite[np.isfinite(finite)])
    midpoints = (finite[:-1] + finite[1:]) / 2  # every tie between neighbours
    values = np.concatenate(
        [finite, midpoints, np.random.default_rng(0).uniform(-finite[-1], finite[-1], 500)]
    )
    values = values.astype(np.float32)
    reference = values.astype(ML[name]).view(np.uint8)
    got = np.array([fmt.to_bits(float(v)) for v in values], dtype=np.uint8)
    np.testing.assert_array_equal(got, reference)


def test_to_bits_ties_go_to_even_not_away_and_nan_stays_nan() -> None:
    assert E4M3.to_real(E4M3.to_bits(1.0625)) == 1.0  # halfway 1.0 | 1.125: even mantissa 0, not away
    assert E4M3.to_real(E4M3.to_bits(1.1875)) == 1.25  # halfway 1.125 | 1.25: even mantissa 2
    assert E4M3.to_bits(1e6) == 0x7E and E4M3.to_real(0x7E) == 448.0  # saturates at 448, not 480
    assert math.isnan(E4M3.to_real(E4M3.to_bits(math.nan)))
    assert math.isnan(E5M2.to_real(E5M2.to_bits(math.nan)))
    with pytest.raises(ValueError, match="NaN has no code in E3M4"):
        E3M4.to_bits(math.nan)  # the original returned code 0: a NaN silently became 0.0


# ---- QuantizeFunc, DequantizeFunc, dequantize -----------------------------------------------------------


def test_quantize_func_matches_ml_dtypes_with_a_straight_through_gradient() -> None:
    x = torch.tensor([0.3, -1.0625, 2.5e-3, 1000.0, math.nan, -0.0], requires_grad=True)
    scale = torch.tensor(0.5)
    y = QuantizeFunc.apply(x, E4M3, scale)
    scaled = (x.detach().numpy() / np.float32(0.5)).astype(np.float32)
    reference = np.clip(scaled, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.float32(
        0.5
    )
    np.testing.assert_array_equal(y.detach().numpy(), reference)  # NaN stays NaN, 1000 saturates at 224
    y.backward(torch.ones(6))
    assert torch.equal(x.grad, torch.ones(6))


def test_dequantize_means_times_scale_and_refuses_codes() -> None:
    q = torch.tensor([1.5, -448.0, 0.0], requires_grad=True)
    y = dequantize(q, torch.tensor(0.25))
    assert y.tolist() == [0.375, -112.0, 0.0]
    y.sum().backward()
    assert q.grad.tolist() == [0.25, 0.25, 0.25]  # d(q * s)/dq = s
    assert DequantizeFunc.apply(q.detach(), 3.0).tolist() == [4.5, -1344.0, 0.0]
    with pytest.raises(ValueError, match="decode"):
        dequantize(torch.tensor([0x38], dtype=torch.uint8), 1.0)
    assert decode(torch.tensor([0x38], dtype=torch.uint8), E4M3, 2.0).tolist() == [2.0]  # codes: decode


# ---- scaling ---------------------------------------------------------------------------------------------


def test_amax_history_get_amax_over_the_last_history_len_updates() -> None:
    history = AmaxHistory(history_len=3)
    assert history.get_amax() == 1.0 and history.length == 3  # empty: 1.0, as in the original
    for tensor in ([-5.0, 1.0], [2.0, -0.5], [0.25], [1.5]):
        history.update(torch.tensor(tensor))
    assert history.get_amax() == 2.0  # |-5| aged out: the window holds 2, 0.25, 1.5


def test_compute_scale_scale_min_and_scaling_config() -> None:
    config = ScalingConfig()
    assert (config.history_len, config.scale_min) == (16, 1e-10)
    assert compute_scale(448.0, E4M3, scale_min=config.scale_min) == 1.0  # amax / 448, no 1.01 factor
    assert compute_scale(1e-20, E4M3, scale_min=1e-10) == 1e-10
    assert compute_scale(1e-20, E4M3) == pytest.approx(1e-20 / 448)
    floored = compute_scale(torch.tensor([1e-20, 896.0]), E4M3, scale_min=1e-10)
    assert floored.tolist() == pytest.approx([1e-10, 2.0])
    with pytest.raises(ValueError, match="scale_min"):
        compute_scale(1.0, E4M3, scale_min=-1.0)
    with pytest.raises(ValueError, match="history_len"):
        ScalingConfig(history_len=0)


# ---- detect_bit_stall, stall ratios, stiffness ------------------------------------------------------------


def test_detect_bit_stall_matches_a_brute_force_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(400, generator=generator)
    g = torch.randn(400, generator=generator) * torch.logspace(-6, 0, 400)
    g[::7] = 0.0
    lr, scale = 0.01, 0.125
    stalled = total = 0
    for wi, gi in zip(w.tolist(), g.tolist(), strict=True):
        if gi == 0:
            continue
        total += 1
        before = np.float32(np.float32(wi) / np.float32(scale)).astype(ml_dtypes.float8_e5m2)
        stepped = np.float32(np.float32(wi) - np.float32(lr) * np.float32(gi))
        after = np.float32(stepped / np.float32(scale)).astype(ml_dtypes.float8_e5m2)
        stalled += int(before == after)
    assert detect_bit_stall(w, g, lr, E5M2, scale) == (stalled, total)
    assert 0 < stalled < total


def test_stall_ratios_are_never_negative() -> None:
    assert compute_stall_ratio(12, 10) == 0.0  # more flips than updates (drift): 0, not -0.2
    stalled, total = detect_bit_stall(torch.ones(8), torch.full((8,), 1e-9), 1.0, E4M3, 1.0)
    assert (stalled, total) == (8, 8)  # every tiny update stalls: ratio 1, never above


def test_stiffness_field_by_mantissa_bits_and_by_format() -> None:
    w = torch.tensor([1.0, 0.5, 0.3, 3.0, -6.0, 0.0])
    expected = [2.0**-2, 2.0**-3, 2.0**-4, 2.0**-1, 2.0**0, math.nan]  # 2^(floor(log2|w|) - 2)
    assert compute_stiffness_field(w, 2).tolist() == pytest.approx(expected, nan_ok=True)
    assert compute_stiffness_field(torch.tensor([1.0, 4.0]), 7).tolist() == [2.0**-7, 2.0**-5]  # bfloat16
    assert compute_stiffness_field(torch.tensor([0.9, 0.01, 0.0]), E0M7).tolist() == [1 / 128] * 3
    e4m3 = compute_stiffness_field(torch.tensor([1.0, 300.0, 0.0]), get_format("E4M3"))
    assert e4m3.tolist() == [0.125, 32.0, 2.0**-9]  # the top binade; zero at the subnormal spacing
    with pytest.raises(ValueError, match="mantissa_bits"):
        compute_stiffness_field(w, -1)


ORIGINAL_IMPORT_PATHS = {
    "altgrad.quantization.formats": ["FORMAT_REGISTRY", "FP8Format"],
    "altgrad.quantization.ops": ["QuantizeFunc", "DequantizeFunc", "dequantize", "quantize"],
    "altgrad.quantization.scaling": ["ScalingConfig", "AmaxHistory", "compute_scale"],
    "altgrad.quantization.diagnostics": ["detect_bit_stall", "BitStallDetector"],
    "altgrad.quantization.advanced_diagnostics": ["compute_stiffness_field"],
}


@pytest.mark.parametrize("module", list(ORIGINAL_IMPORT_PATHS))
def test_names_import_from_the_module_paths_the_original_used(module):
    """``from altgrad.quantization.formats import FORMAT_REGISTRY`` etc. give the compat objects."""
    import importlib

    import altgrad.quantization as package

    imported = importlib.import_module(module)
    for name in ORIGINAL_IMPORT_PATHS[module]:
        assert getattr(imported, name) is getattr(package, name), (module, name)
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        imported.not_a_name  # noqa: B018
