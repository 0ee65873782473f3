"""quantize / encode / decode against independent references.

References: ml_dtypes casts, torch's own float8 casts, gfloat's ``round_float``, and a brute-force
nearest-value search over the decoded table written here. Semantics that differ between them, and
how each comparison maps onto our options:

* ``"nearest"`` ties go to the even *integral significand* (ml_dtypes and torch do the same). For
  M >= 1 that is the even code. For M = 0 formats (E7M0, float8_e8m0fnu) a tie between 2^e and
  2^(e+1) goes up -- 2^(e+1) has significand 2 -- while gfloat picks the even *code*, so M = 0
  formats are compared with gfloat off ties only.
* ml_dtypes' overflow behaviour is our ``overflow="inf"`` for IEEE formats, ``"nan"`` for fn/fnuz
  formats and ``"saturate"`` for the float6/float4 formats (which have neither). ml_dtypes turns NaN
  into -0 for float6/float4 (we keep NaN): NaN inputs are skipped there.
* ml_dtypes mis-rounds float32 *subnormal* inputs to float8_e8m0fnu (the value just below
  1.5 * 2^-127 goes to 2^-126 instead of 2^-127); those inputs are left out of the ml_dtypes
  comparison and covered by the brute force.
* torch's float8_e4m3fn cast saturates (+inf -> 448): our default ``"saturate"``; torch's float8_e5m2
  cast is IEEE (``"inf"``) and its fnuz casts overflow to NaN (``"nan"``).
"""

from __future__ import annotations

import math
import os

import gfloat
import ml_dtypes
import numpy as np
import pytest
import torch
from gfloat.formats import (
    format_info_bfloat16,
    format_info_binary16,
    format_info_ocp_e2m1,
    format_info_ocp_e2m3,
    format_info_ocp_e3m2,
    format_info_ocp_e4m3,
    format_info_ocp_e5m2,
    format_info_p3109,
)
from gfloat.types import Domain, RoundMode, Signedness
from hypothesis import given, settings
from hypothesis import strategies as st

from altgrad.quantization import (
    E0M7,
    E3M4,
    E4M3,
    E5M2,
    E7M0,
    FORMATS,
    _engine,
    decode,
    encode,
    get_format,
    quantize,
)
from altgrad.quantization.formats import FloatFormat
from altgrad.quantization.reference import round_value
from references import CUSTOM_SPECS, gfloat_info, same_values

ALL_NAMES = [*FORMATS, *CUSTOM_SPECS]


def assert_same(got, expected, inputs) -> None:
    ok = same_values(got, expected)
    if not ok.all():
        bad = np.flatnonzero(~ok)[:8]
        raise AssertionError(
            f"{(~ok).sum()} mismatches, e.g. inputs {np.asarray(inputs)[bad].tolist()} "
            f"got {np.asarray(got)[bad].tolist()} expected {np.asarray(expected)[bad].tolist()}"
        )


def policies(fmt: FloatFormat) -> list[str]:
    return ["saturate"] + (["inf"] if fmt.has_inf else []) + (["nan"] if fmt.has_nan else [])


# ---- probes: every value, every midpoint, both sides of every tie ----------------------------------------


def grid(fmt: FloatFormat) -> np.ndarray:
    """Distinct finite non-negative values, ascending."""
    values = fmt.values().numpy()
    return np.unique(np.abs(values[np.isfinite(values)]))


def next_above_max(fmt: FloatFormat) -> float:
    """The value after max_finite if the exponent range went on: the overflow threshold's far side."""
    top = fmt.max_finite
    smallest_exponent = 1 - fmt.bias if fmt.subnormals else -fmt.bias
    return top + 2.0 ** (max(math.floor(math.log2(top)), smallest_exponent) - fmt.mantissa_bits)


def probes(fmt: FloatFormat, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Inputs that exercise every rounding decision of the format (sampled for 16-bit formats)."""
    rng = np.random.default_rng(seed)
    g = grid(fmt)
    if fmt.total_bits > 8:  # sample, keeping the ends of the range
        g = np.unique(np.concatenate([g[:40], g[-40:], rng.choice(g, 1500, replace=False)]))
        full = grid(fmt)
        nxt = full[np.minimum(np.searchsorted(full, g) + 1, len(full) - 1)]
        mids = (g + nxt) / 2
    else:
        mids = (g[1:] + g[:-1]) / 2
    top_next = next_above_max(fmt)
    base = np.concatenate(
        [g, mids, [(fmt.max_finite + top_next) / 2, top_next, fmt.min_normal, fmt.min_subnormal / 2]]
    )
    finfo = np.finfo(dtype)
    base = base[base <= finfo.max].astype(dtype)
    base = np.concatenate([base, -base])
    out = [
        base,
        np.nextafter(base, dtype(np.inf)),
        np.nextafter(base, dtype(-np.inf)),
        np.array(
            [0.0, -0.0, np.inf, -np.inf, np.nan, finfo.max, -finfo.max, finfo.smallest_subnormal], dtype
        ),
        np.array([1e-30, -1e-30, 1e30, -1e30, 3.0e-39, -3.0e-39], dtype),
        (rng.standard_normal(500) * np.exp2(rng.integers(-20, 20, 500))).astype(dtype),
    ]
    return np.concatenate(out)


# ---- the brute-force reference ---------------------------------------------------------------------------


def brute_force(x: np.ndarray, fmt: FloatFormat, rounding: str = "nearest", overflow: str = "saturate"):
    """Round each element of ``x`` by searching the decoded table (float64; exact, see below).

    Differences are taken only between ``|x|`` and its two neighbours in the table (adjacent grid
    values, or 0), which float64 holds exactly for float32 and float64 inputs alike. A tie goes to
    the neighbour whose value, in units of the spacing between the two, is even.
    """
    x = np.asarray(x, dtype=np.float64)
    g = grid(fmt)
    top, top_next = g[-1], next_above_max(fmt)
    extended = np.append(g, top_next)
    ax = np.abs(x)
    finite = np.isfinite(x)
    safe = np.where(finite, ax, 0.0)
    out = np.empty_like(ax)
    overflowed = np.zeros(ax.shape, dtype=bool)
    if rounding == "nearest":
        i = np.clip(np.searchsorted(extended, safe, side="left"), 1, len(extended) - 1)
        lo, hi = extended[i - 1], extended[i]
        d_lo, d_hi = safe - lo, hi - safe
        lo_even = np.fmod(lo / (hi - lo), 2) == 0
        pick_lo = (d_lo < d_hi) | ((d_lo == d_hi) & lo_even)
        out = np.where(pick_lo, lo, hi)
        out = np.where(safe <= g[0], g[0], out)  # formats without zero: below the smallest value
        overflowed = (out == top_next) | (safe > top_next)
    elif rounding == "toward_zero":
        i = np.searchsorted(g, safe, side="right") - 1
        out = g[np.clip(i, 0, len(g) - 1)]  # finite overflow truncates to max_finite (IEEE)
    else:
        raise ValueError(rounding)
    out = np.where(overflowed, {"saturate": top, "inf": np.inf, "nan": np.nan}[overflow], out)
    infinite = np.isinf(x)
    if rounding == "toward_zero":
        out = np.where(infinite, {"saturate": top, "inf": np.inf, "nan": np.nan}[overflow], out)
    else:
        out = np.where(infinite, {"saturate": top, "inf": np.inf, "nan": np.nan}[overflow], out)
    negative = np.signbit(x)
    if fmt.signed:
        out = np.where(negative, -out, out)
        if not fmt.has_negative_zero:
            out = np.where(out == 0, 0.0, out)
    else:
        out = np.where(negative & ~np.isnan(x), np.nan, out)
    if not fmt.has_zero:
        out = np.where(x == 0, np.nan, out)
    return np.where(np.isnan(x), np.nan, out)


def bracket(x: np.ndarray, fmt: FloatFormat) -> tuple[np.ndarray, np.ndarray]:
    """Signed neighbours (toward zero, away from zero) of finite in-range ``x``."""
    g = grid(fmt)
    ax = np.abs(x.astype(np.float64))
    below = g[np.clip(np.searchsorted(g, ax, side="right") - 1, 0, len(g) - 1)]
    above = g[np.clip(np.searchsorted(g, ax, side="left"), 0, len(g) - 1)]
    sign = np.where(np.signbit(x), -1.0, 1.0)
    return sign * below, sign * above


def test_brute_force_reference_itself():
    """A few hand-checked values, so the reference is not only checked against the code under test."""
    x = np.array([0.3, 17.0, 19.0, 464.0, 465.0, -0.0, 1e-9, 2.0**-10, 3 * 2.0**-10, np.inf])
    np.testing.assert_array_equal(
        brute_force(x, E4M3), [0.3125, 16.0, 20.0, 448.0, 448.0, -0.0, 0.0, 0.0, 2.0**-8, 448.0]
    )
    assert np.isnan(brute_force(np.array([465.0]), E4M3, overflow="nan")[0])
    assert brute_force(np.array([464.0]), E4M3, overflow="nan")[0] == 448.0
    assert brute_force(np.array([61440.0]), E5M2, overflow="inf")[0] == np.inf
    np.testing.assert_array_equal(brute_force(np.array([1.5, 3.0, 2.0**-63]), E7M0), [2.0, 4.0, 0.0])
    np.testing.assert_array_equal(brute_force(np.array([0.3, -0.99]), E0M7), [38 / 128, -127 / 128])
    np.testing.assert_array_equal(brute_force(np.array([0.3, 1e9]), E4M3, "toward_zero"), [0.28125, 448.0])


# ---- bit-exact against ml_dtypes -------------------------------------------------------------------------

ML_DTYPES_POLICY = {
    "float8_e4m3fn": "nan",
    "float8_e5m2": "inf",
    "float8_e4m3": "inf",
    "float8_e3m4": "inf",
    "float8_e4m3fnuz": "nan",
    "float8_e5m2fnuz": "nan",
    "float8_e4m3b11fnuz": "nan",
    "float6_e2m3fn": "saturate",
    "float6_e3m2fn": "saturate",
    "float4_e2m1fn": "saturate",
    "float8_e8m0fnu": "nan",
}


def ml_dtypes_inputs(name: str, x: np.ndarray) -> np.ndarray:
    if name.startswith(("float6", "float4")):
        x = x[~np.isnan(x)]  # ml_dtypes turns NaN into -0 in these formats; we keep NaN
    if name == "float8_e8m0fnu":
        # ml_dtypes mis-rounds float32 subnormal inputs to e8m0; the brute force covers them.
        x = x[~((x != 0) & (np.abs(x) < np.finfo(np.float32).tiny))]
    return x


@pytest.mark.parametrize("name", list(ML_DTYPES_POLICY))
def test_nearest_values_and_codes_match_ml_dtypes(name):
    fmt, dtype, policy = FORMATS[name], getattr(ml_dtypes, name), ML_DTYPES_POLICY[name]
    x = ml_dtypes_inputs(name, probes(fmt))
    with np.errstate(invalid="ignore", over="ignore"):
        reference = x.astype(dtype)
    got = quantize(torch.from_numpy(x), fmt, overflow=policy)
    assert got.dtype == torch.float32
    assert_same(got.numpy(), reference.astype(np.float32), x)
    codes = encode(torch.from_numpy(x), fmt, overflow=policy).numpy()
    assert codes.dtype == np.uint8
    reference_codes = reference.view(np.uint8)
    is_nan = np.isnan(reference.astype(np.float32))
    np.testing.assert_array_equal(codes[~is_nan], reference_codes[~is_nan])
    assert np.isnan(fmt.values().numpy()[codes[is_nan]]).all()


@pytest.mark.parametrize("name", ["E4M3", "E5M2"])
def test_e4m3_and_e5m2_match_ml_dtypes_ocp_types(name):
    theirs = {"E4M3": "float8_e4m3fn", "E5M2": "float8_e5m2"}[name]
    x = probes(FORMATS[name])
    with np.errstate(invalid="ignore", over="ignore"):
        reference = x.astype(getattr(ml_dtypes, theirs)).astype(np.float32)
    got = quantize(torch.from_numpy(x), name, overflow=ML_DTYPES_POLICY[theirs]).numpy()
    assert_same(got, reference, x)


@pytest.mark.parametrize("name", list(ML_DTYPES_POLICY))
def test_decode_of_every_code_matches_ml_dtypes(name):
    fmt = FORMATS[name]
    codes = np.arange(fmt.num_codes, dtype=np.uint8)
    with np.errstate(invalid="ignore"):
        reference = codes.view(getattr(ml_dtypes, name)).astype(np.float32)
    got = decode(torch.from_numpy(codes), fmt)
    assert got.dtype == torch.float32
    assert_same(got.numpy(), reference, codes)


@pytest.mark.parametrize(("name", "dtype"), [("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)])
def test_16_bit_formats_match_numpy_and_ml_dtypes(name, dtype):
    fmt = FORMATS[name]
    rng = np.random.default_rng(1)
    random_bits = rng.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([probes(fmt), random_bits])
    with np.errstate(invalid="ignore", over="ignore"):
        reference = x.astype(dtype)
    got = quantize(torch.from_numpy(x), fmt, overflow="inf")
    assert_same(got.numpy(), reference.astype(np.float32), x)
    codes = encode(torch.from_numpy(x), fmt, overflow="inf").numpy()
    assert codes.dtype == np.int32
    is_nan = np.isnan(x)
    np.testing.assert_array_equal(codes[~is_nan], reference.view(np.uint16)[~is_nan].astype(np.int32))
    all_codes = np.arange(1 << 16, dtype=np.uint16)
    with np.errstate(invalid="ignore"):
        reference_values = all_codes.view(dtype).astype(np.float64)
    assert_same(
        decode(torch.from_numpy(all_codes.astype(np.int32)), fmt).numpy(), reference_values, all_codes
    )


def test_e8m0_float32_subnormal_inputs_round_to_nearest():
    """ml_dtypes sends the value just below 1.5 * 2^-127 to 2^-126; the nearest value is 2^-127."""
    fmt = FORMATS["float8_e8m0fnu"]
    below = np.nextafter(np.float32(1.5 * 2.0**-127), np.float32(0))
    x = np.array([below, 1.5 * 2.0**-127, 2.0**-127, 2.0**-130, 2.0**-149, 1.2e-38], dtype=np.float32)
    got = quantize(torch.from_numpy(x), fmt).numpy()
    np.testing.assert_array_equal(got, [2.0**-127, 2.0**-126, 2.0**-127, 2.0**-127, 2.0**-127, 2.0**-126])
    assert_same(got, brute_force(x, fmt), x)


# ---- torch's own float8 casts ----------------------------------------------------------------------------

TORCH_CASTS = [
    ("float8_e4m3fn", torch.float8_e4m3fn, "saturate"),
    ("E4M3", torch.float8_e4m3fn, "saturate"),
    ("float8_e5m2", torch.float8_e5m2, "inf"),
    ("float8_e4m3fnuz", torch.float8_e4m3fnuz, "nan"),
    ("float8_e5m2fnuz", torch.float8_e5m2fnuz, "nan"),
]


@pytest.mark.parametrize(("name", "dtype", "policy"), TORCH_CASTS)
def test_nearest_matches_torch_casts(name, dtype, policy):
    fmt = get_format(name)
    x = torch.from_numpy(probes(fmt))
    reference = x.to(dtype)
    assert_same(quantize(x, fmt, overflow=policy).numpy(), reference.float().numpy(), x.numpy())
    is_nan = torch.isnan(reference.float())
    codes = encode(x, fmt, overflow=policy)
    assert torch.equal(codes[~is_nan], reference.view(torch.uint8)[~is_nan])


def test_e8m0_matches_torch_cast_on_positive_normal_values():
    fmt = FORMATS["float8_e8m0fnu"]
    x = probes(fmt)
    x = torch.from_numpy(x[(x >= np.finfo(np.float32).tiny) & (x <= fmt.max_finite)])
    assert_same(quantize(x, fmt).numpy(), x.to(torch.float8_e8m0fnu).float().numpy(), x.numpy())


# ---- the brute force over every format -------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_nearest_matches_brute_force(name):
    fmt = get_format(name)
    x = probes(fmt)
    for policy in policies(fmt):
        got = quantize(torch.from_numpy(x), fmt, overflow=policy).numpy()
        assert_same(got, brute_force(x, fmt, "nearest", policy), x)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_toward_zero_matches_brute_force(name):
    fmt = get_format(name)
    x = probes(fmt)
    for policy in policies(fmt):
        got = quantize(torch.from_numpy(x), fmt, rounding="toward_zero", overflow=policy).numpy()
        assert_same(got, brute_force(x, fmt, "toward_zero", policy), x)


@pytest.mark.parametrize("name", ["E4M3", "E3M4", "E0M7", "E7M0", "float8_e8m0fnu", "float16", "bfloat16"])
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
def test_float64_inputs_are_rounded_once(name, rounding):
    """float64 inputs a hair off a tie must not be pre-rounded to float32 (which would make them ties)."""
    fmt = get_format(name)
    x = probes(fmt, dtype=np.float64)
    offsets = np.array([1 - 2.0**-40, 1 + 2.0**-40])
    with np.errstate(over="ignore"):
        x = np.concatenate([x, np.outer(x[np.isfinite(x)][:3000], offsets).ravel()])
    got = quantize(torch.from_numpy(x), fmt, rounding=rounding)
    assert got.dtype == torch.float64
    assert_same(got.numpy(), brute_force(x, fmt, rounding), x)


@pytest.mark.parametrize("name", ["E4M3", "E5M2", "E0M7", "float16"])
def test_half_precision_inputs_keep_their_dtype(name):
    fmt = get_format(name)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.from_numpy(probes(fmt)).to(dtype)
        got = quantize(x, fmt)
        assert got.dtype == dtype
        expected = brute_force(x.double().numpy(), fmt)
        with np.errstate(over="ignore"):
            expected = torch.from_numpy(expected).to(dtype)
        assert_same(got.double().numpy(), expected.double().numpy(), x.double().numpy())


# ---- gfloat ----------------------------------------------------------------------------------------------


GFLOAT_FORMATS = {
    "E4M3": format_info_ocp_e4m3,
    "E5M2": format_info_ocp_e5m2,
    "float6_e2m3fn": format_info_ocp_e2m3,
    "float6_e3m2fn": format_info_ocp_e3m2,
    "float4_e2m1fn": format_info_ocp_e2m1,
    "float16": format_info_binary16,
    "bfloat16": format_info_bfloat16,
    "float8_e4m3fnuz": format_info_p3109(8, 4, Signedness.Signed, Domain.Finite),
    "float8_e5m2fnuz": format_info_p3109(8, 3, Signedness.Signed, Domain.Finite),
    "e1m6:bias=1,specials=fnuz": format_info_p3109(8, 7, Signedness.Signed, Domain.Finite),
    **{name: None for name in ["E0M7", "E1M6", "E2M5", "E3M4", "E6M1", "E7M0", "float8_e4m3", "float8_e3m4"]},
    "float8_e8m0fnu": None,
    "e3m4:bias=1": None,
}


def gfloat_inputs(fmt: FloatFormat, x: np.ndarray) -> np.ndarray:
    if fmt.total_bits > 8:
        x = x[:: max(1, len(x) // 1500)]
    if not fmt.has_nan:
        x = x[~np.isnan(x)]
    if fmt.mantissa_bits == 0:  # gfloat breaks M = 0 ties to the even code; we go up (see module docstring)
        g = grid(fmt)
        g = np.append(g, next_above_max(fmt))
        mids = ((g[1:] + g[:-1]) / 2)[g[:-1] > 0]
        x = x[~np.isin(np.abs(x.astype(np.float64)), mids)]
    if not fmt.signed:  # gfloat drops the sign for unsigned formats and has no "below the smallest value"
        x = x[(x >= fmt.min_subnormal) | np.isnan(x)]
    return x


def gfloat_policies(fmt: FloatFormat) -> list[str]:
    """gfloat's sat=False is inf for IEEE formats and NaN for fn/fnuz ones."""
    return ["saturate"] + {"ieee": ["inf"], "fn": ["nan"], "fnuz": ["nan"]}.get(fmt.specials, [])


@pytest.mark.parametrize("name", list(GFLOAT_FORMATS))
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
def test_rounding_matches_gfloat(name, rounding):
    fmt = get_format(name)
    info = GFLOAT_FORMATS[name] or gfloat_info(fmt)
    mode = {"nearest": RoundMode.TiesToEven, "toward_zero": RoundMode.TowardZero}[rounding]
    x = gfloat_inputs(fmt, probes(fmt))
    for policy in gfloat_policies(fmt):
        expected = np.array([gfloat.round_float(info, float(v), mode, sat=policy == "saturate") for v in x])
        got = quantize(torch.from_numpy(x), fmt, rounding=rounding, overflow=policy).numpy()
        assert_same(got, expected, x)


def test_m0_ties_differ_from_gfloat_as_documented():
    """E7M0: 3 lies between 2 (code 64, even) and 4 (code 65): we go up, gfloat goes to the even code."""
    x = torch.tensor([3.0, 1.5, 0.75])
    np.testing.assert_array_equal(quantize(x, E7M0).numpy(), [4.0, 2.0, 1.0])
    info = gfloat_info(E7M0)
    assert gfloat.round_float(info, 3.0) == 2.0
    assert gfloat.round_float(info, 1.5) == 2.0


# ---- encode / decode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_decode_of_encode_is_quantize(name):
    fmt = get_format(name)
    x = probes(fmt)
    if not fmt.has_nan:
        x = x[np.isfinite(x) & (x != 0 if not fmt.has_zero else True)]
        if not fmt.signed:
            x = x[x > 0]
    for policy in policies(fmt):
        t = torch.from_numpy(x)
        codes = encode(t, fmt, overflow=policy)
        assert codes.dtype == (torch.uint8 if fmt.total_bits <= 8 else torch.int32)
        assert_same(decode(codes, fmt).numpy(), quantize(t, fmt, overflow=policy).numpy(), x)


def test_decode_of_encode_with_a_scale():
    x = torch.randn(1000) * 30
    for scale in (0.25, 3.0, torch.tensor(0.7)):
        codes = encode(x, E4M3, scale=scale)
        assert torch.equal(decode(codes, E4M3, scale=scale), quantize(x, E4M3, scale=scale))


def test_encode_of_nan_without_a_nan_code_raises():
    with pytest.raises(ValueError, match="NaN"):
        encode(torch.tensor([1.0, math.nan]), E3M4)
    with pytest.raises(ValueError, match="NaN"):
        encode(torch.tensor([0.0]), "e5m2:subnormals=false")  # no zero, no NaN: zero has no code
    encode(torch.tensor([1.0, math.nan]), E3M4, check_nan=False)  # no check, unspecified code


def test_encode_codes_by_hand():
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, 448.0, -448.0, 2.0**-9, math.nan])
    assert encode(x, E4M3).tolist() == [0x00, 0x80, 0x38, 0xB8, 0x7E, 0xFE, 0x01, 0x7F]
    assert encode(torch.tensor([1.0, 2.0**-127, 2.0**127]), "float8_e8m0fnu").tolist() == [127, 0, 254]
    assert encode(torch.tensor([-0.0, math.nan]), "float8_e4m3fnuz").tolist() == [0x00, 0x80]


def test_decode_rejects_float_codes():
    with pytest.raises(ValueError, match="codes"):
        decode(torch.tensor([1.0]), E4M3)


# ---- properties ------------------------------------------------------------------------------------------

PROPERTY_FORMATS = ["E4M3", "E5M2", "E3M4", "E2M5", "E0M7", "E7M0", "float6_e2m3fn", "float16", "bfloat16"]


def spacing_at(fmt: FloatFormat, value: np.ndarray) -> np.ndarray:
    """The format's grid spacing in the binade of |value| (written from the format's fields)."""
    smallest_exponent = 1 - fmt.bias if fmt.subnormals else -fmt.bias
    exponent = np.floor(np.log2(np.maximum(np.abs(value), 2.0**smallest_exponent)))
    return 2.0 ** (np.maximum(exponent, smallest_exponent) - fmt.mantissa_bits)


def in_range(name: str):
    fmt = get_format(name)
    bound = float(np.float32(min(fmt.max_finite, 3e38)))
    return st.lists(st.floats(-bound, bound, width=32), min_size=1, max_size=64)


@pytest.mark.parametrize("name", PROPERTY_FORMATS)
def test_properties(name):
    fmt = get_format(name)

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(values=in_range(name))
    def check(values):
        x = torch.tensor(values, dtype=torch.float32)
        q = quantize(x, fmt)
        # idempotent
        assert torch.equal(quantize(q, fmt), q)
        # sign-symmetric
        assert torch.equal(quantize(-x, fmt), -q)
        # monotonic
        order = torch.argsort(x)
        assert bool((torch.diff(q[order].double()) >= 0).all())
        # within half a spacing of the format at that value
        error = np.abs(q.double().numpy() - x.double().numpy())
        assert (error <= spacing_at(fmt, x.double().numpy()) / 2).all()
        # toward zero never increases the magnitude and is within one spacing
        t = quantize(x, fmt, rounding="toward_zero")
        assert bool((t.abs() <= x.abs()).all())
        assert (np.abs(t.double().numpy() - x.double().numpy()) < spacing_at(fmt, x.double().numpy())).all()

    check()


# ---- stochastic rounding ---------------------------------------------------------------------------------


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "name",
    ["E4M3", "E5M2", "E3M4", "E0M7", "E7M0", "float16", "bfloat16", "float8_e8m0fnu", "float8_e4m3fnuz"],
)
def test_stochastic_result_is_a_neighbour(name):
    fmt = get_format(name)
    x = probes(fmt)
    x = x[np.isfinite(x) & (np.abs(x) <= fmt.max_finite)]
    if not fmt.signed:
        x = x[x >= fmt.min_subnormal]
    lo, hi = bracket(x, fmt)
    for seed in range(3):
        got = quantize(torch.from_numpy(x), fmt, rounding="stochastic", generator=seeded(seed)).numpy()
        ok = same_values(got, lo) | same_values(got, hi)
        if not fmt.has_negative_zero:
            ok |= (got == 0) & (lo == 0)
        assert ok.all(), x[~ok][:5]
        on_grid = lo == hi
        assert_same(got[on_grid], brute_force(x[on_grid], fmt), x[on_grid])


STOCHASTIC_CASES = [
    ("E4M3", 0.3),  # p = 0.6
    ("E4M3", -0.3),
    ("E4M3", 0.001),  # in the subnormal range
    ("E4M3", 440.0),  # just below max
    ("E4M3", 1.0 + 0.125 * 2**-10),  # p = 2^-10
    ("E5M2", 3e-6),
    ("E3M4", 7.1),
    ("E0M7", 0.3),
    ("E7M0", 3.0),  # between 2 and 4: p = 1/2
    ("E7M0", 2.0**-63),  # between 0 and 2^-62
    ("float16", 1.0 + 2.0**-12),
    ("bfloat16", 1.0 + 2.0**-9),  # float64 working precision
    ("float8_e8m0fnu", 2.5),
]


@pytest.mark.parametrize(("name", "value"), STOCHASTIC_CASES)
def test_stochastic_rounding_is_unbiased(name, value):
    fmt = get_format(name)
    n = 200_000
    lo, hi = (float(v[0]) for v in bracket(np.array([value], dtype=np.float32), fmt))
    x32 = float(np.float32(value))
    p = (x32 - lo) / (hi - lo)
    q = quantize(torch.full((n,), value), fmt, rounding="stochastic", generator=seeded(7)).double()
    assert bool(((q == lo) | (q == hi)).all())
    ups = int((q == hi).sum())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(ups - n * p) <= 4 * sigma + 1, (ups, n * p, sigma)
    mean = float(q.mean())
    assert abs(mean - x32) <= 4 * abs(hi - lo) * math.sqrt(p * (1 - p) / n) + 1e-12 * abs(x32)


def test_stochastic_float64_input_is_unbiased():
    n = 200_000
    value = 1.0 + 0.3 * 0.125  # E4M3 spacing at 1 is 0.125
    q = quantize(
        torch.full((n,), value, dtype=torch.float64), E4M3, rounding="stochastic", generator=seeded(3)
    )
    assert q.dtype == torch.float64
    ups = int((q == 1.125).sum())
    assert abs(ups - 0.3 * n) <= 4 * math.sqrt(n * 0.21)


def test_stochastic_decisions_are_uncorrelated():
    n = 200_000
    x = torch.full((n,), 1.0625)  # E4M3: halfway between 1 and 1.125
    a = (quantize(x, E4M3, rounding="stochastic", generator=seeded(1)) > 1.07).double() - 0.5
    b = (quantize(x, E4M3, rounding="stochastic", generator=seeded(2)) > 1.07).double() - 0.5
    bound = 4 / math.sqrt(n) * 0.25
    assert abs(float((a[1:] * a[:-1]).mean())) < bound  # neighbours within one call
    assert abs(float((a[1024:] * a[:-1024]).mean())) < bound
    assert abs(float((a * b).mean())) < bound  # same element, two calls


def test_stochastic_with_a_scale_rounds_x_over_scale():
    n = 100_000
    x = torch.full((n,), 0.3 * 4)
    q = quantize(x, E4M3, scale=4.0, rounding="stochastic", generator=seeded(0))
    assert set(q.unique().tolist()) == {0.28125 * 4, 0.3125 * 4}
    q_tensor_scale = quantize(x, E4M3, scale=torch.tensor(4.0), rounding="stochastic", generator=seeded(0))
    assert torch.equal(q, q_tensor_scale)
    assert abs(float(q.mean()) - 1.2) < 4 * 0.125 * math.sqrt(0.24 / n)


def test_stochastic_is_reproducible():
    x = torch.randn(10_000)
    a = quantize(x, E4M3, rounding="stochastic", generator=seeded(0))
    b = quantize(x, E4M3, rounding="stochastic", generator=seeded(0))
    c = quantize(x, E4M3, rounding="stochastic", generator=seeded(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(5)
    d = quantize(x, E4M3, rounding="stochastic")
    torch.manual_seed(5)
    assert torch.equal(d, quantize(x, E4M3, rounding="stochastic"))
    g = seeded(0)
    first, second = (quantize(x, E4M3, rounding="stochastic", generator=g) for _ in range(2))
    assert not torch.equal(first, second)  # the generator advances


def test_stochastic_result_does_not_depend_on_chunking(monkeypatch):
    x = torch.randn(100_003)
    whole = quantize(x, E4M3, rounding="stochastic", generator=seeded(4))
    monkeypatch.setattr(_engine, "CHUNK_BYTES", 4096 * 4 + 12)
    chunked = quantize(x, E4M3, rounding="stochastic", generator=seeded(4))
    assert torch.equal(whole, chunked)


@pytest.mark.parametrize("name", ["E4M3", "E5M2", "float8_e4m3fnuz", "E3M4"])
def test_stochastic_specials(name):
    fmt = get_format(name)
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30])
    for policy in policies(fmt):
        got = quantize(x, fmt, rounding="stochastic", overflow=policy, generator=seeded(0)).numpy()
        expected = brute_force(x.numpy(), fmt, "nearest", policy)
        assert_same(got, expected, x.numpy())


def test_stochastic_overflow_policy():
    x = torch.full((10_000,), 60000.0)  # E5M2: between 57344 and (virtual) 65536
    inf = quantize(x, E5M2, rounding="stochastic", overflow="inf", generator=seeded(0))
    assert set(inf.unique().tolist()) == {57344.0, math.inf}
    saturated = quantize(x, E5M2, rounding="stochastic", generator=seeded(0))
    assert set(saturated.unique().tolist()) == {57344.0}
    nan = quantize(x.neg(), "float8_e5m2fnuz", rounding="stochastic", overflow="nan", generator=seeded(0))
    assert bool((torch.isnan(nan) | (nan == -57344.0)).all()) and bool(torch.isnan(nan).any())


def test_toward_zero_never_increases_magnitude():
    x = torch.randn(50_000) * torch.exp2(torch.randint(-12, 12, (50_000,)).float())
    for name in ["E4M3", "E5M2", "E0M7", "E7M0", "float16"]:
        for policy in policies(get_format(name)):
            q = quantize(x, name, rounding="toward_zero", overflow=policy)
            assert bool((q.abs() <= x.abs()).all()), name


# ---- gradients -------------------------------------------------------------------------------------------


def test_straight_through_gradient():
    x = torch.tensor([0.3, 500.0, -1000.0, 1.0], requires_grad=True)
    y = quantize(x, E4M3)
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_mask_saturated_grad():
    x = torch.tensor([0.3, 500.0, -1000.0, 448.0, 1.0], requires_grad=True)
    quantize(x, E4M3, mask_saturated_grad=True).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    x.grad = None
    quantize(x, E4M3, scale=4.0, mask_saturated_grad=True).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]
    x.grad = None
    scale = torch.tensor([1.0, 1.0, 4.0, 1.0, 1.0])
    quantize(x, E4M3, scale=scale, mask_saturated_grad=True).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]


def test_gradient_flows_in_double_and_bfloat16():
    for dtype in (torch.float64, torch.bfloat16):
        x = torch.randn(8, dtype=dtype, requires_grad=True)
        y = quantize(x, E5M2, rounding="stochastic", generator=seeded(0))
        assert y.dtype == dtype
        y.sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))


# ---- scales ----------------------------------------------------------------------------------------------


def test_scale_is_applied_around_the_rounding():
    x = torch.from_numpy(probes(E4M3))
    for scale in (0.5, 2.0**-10, 2.0**20):
        expected = brute_force((x / scale).numpy(), E4M3) * scale
        assert_same(quantize(x, E4M3, scale=scale).numpy(), expected.astype(np.float32), x.numpy())
    scale = 3.0
    expected = (brute_force((x / scale).numpy(), E4M3) * np.float32(scale)).astype(np.float32)
    got = quantize(x, E4M3, scale=scale).numpy()
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=2**-23)


def test_per_channel_scale():
    torch.manual_seed(0)
    x = torch.randn(4, 16) * torch.tensor([1.0, 10.0, 100.0, 1000.0])[:, None]
    scale = torch.tensor([0.01, 0.1, 1.0, 10.0])[:, None]
    got = quantize(x, E4M3, scale=scale)
    for row in range(4):
        assert torch.equal(got[row], quantize(x[row], E4M3, scale=float(scale[row])))
    columns = quantize(x.T, E4M3, scale=scale.T)
    assert torch.equal(columns, got.T)
    codes = encode(x, E4M3, scale=scale)
    assert torch.equal(decode(codes, E4M3, scale=scale), got)
    powers = torch.tensor([2.0**-7, 2.0**-3, 1.0, 8.0])[:, None]
    for rounding in ("toward_zero", "stochastic"):
        out = quantize(x, E4M3, scale=powers, rounding=rounding, generator=seeded(0))
        assert torch.equal(quantize(out / powers, E4M3), out / powers)
        assert bool(((out - x).abs() <= 32 * powers).all())


def test_tensor_scale_equals_float_scale():
    x = torch.randn(1000) * 100
    for rounding in ("nearest", "toward_zero", "stochastic"):
        a = quantize(x, E5M2, scale=0.37, rounding=rounding, generator=seeded(1))
        b = quantize(x, E5M2, scale=torch.tensor(0.37), rounding=rounding, generator=seeded(1))
        c = quantize(x, E5M2, scale=torch.tensor([0.37]), rounding=rounding, generator=seeded(1))
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize(
    "scale",
    [0.0, -1.0, math.inf, math.nan, -math.inf, torch.tensor([1.0, 0.0]), torch.tensor(math.nan)]
    + [torch.tensor(0.0), torch.tensor(-0.0), torch.tensor(-2.0), torch.tensor(math.inf).double()],
)
def test_bad_scales_raise(scale):
    with pytest.raises(ValueError, match="scale"):
        quantize(torch.ones(2), E4M3, scale=scale)
    with pytest.raises(ValueError, match="scale"):
        encode(torch.ones(2), E4M3, scale=scale)
    with pytest.raises(ValueError, match="scale"):
        decode(torch.zeros(2, dtype=torch.uint8), E4M3, scale=scale)


@pytest.mark.parametrize("scale", ["2", True, None, torch.tensor([1, 2]), torch.ones(3, 1)])
def test_malformed_scales_raise(scale):
    with pytest.raises(ValueError, match="scale"):
        quantize(torch.ones(2), E4M3, scale=scale)


# ---- options and errors ----------------------------------------------------------------------------------


def test_bad_format_name_lists_known_ones():
    with pytest.raises(ValueError, match="known formats: .*E4M3"):
        quantize(torch.ones(2), "e4m3fnx")


@pytest.mark.parametrize(
    ("fmt", "policy", "match"),
    [(E4M3, "inf", "inf"), (E3M4, "nan", "nan"), (E3M4, "inf", "inf"), (E4M3, "clip", "overflow")],
)
def test_bad_overflow_policy_raises(fmt, policy, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.ones(2), fmt, overflow=policy)
    with pytest.raises(ValueError, match=match):
        encode(torch.ones(2), fmt, overflow=policy)


def test_bad_rounding_raises():
    with pytest.raises(ValueError, match="rounding: 'up'"):
        quantize(torch.ones(2), E4M3, rounding="up")


def test_non_float_input_raises():
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.ones(2, dtype=torch.int32), E4M3)


def test_nan_in_nan_out_everywhere():
    x = torch.tensor([math.nan, -math.nan, 1.0])
    for name in ALL_NAMES:
        fmt = get_format(name)
        for rounding in ("nearest", "stochastic", "toward_zero"):
            for policy in policies(fmt):
                q = quantize(x, fmt, rounding=rounding, overflow=policy, generator=seeded(0))
                assert bool(torch.isnan(q[:2]).all()), (name, rounding, policy)


def test_nan_payloads_stay_nan():
    bits = torch.tensor([0x7FC00000, 0x7FFFFFFF, -1, 0x7F800001, -0x400000] * 3, dtype=torch.int32)
    x = bits.view(torch.float32)
    for name in ["E4M3", "E7M0", "E0M7", "float16"]:
        for rounding in ("nearest", "stochastic", "toward_zero"):
            assert bool(torch.isnan(quantize(x, name, rounding=rounding, generator=seeded(0))).all())


def test_signed_zero():
    x = torch.tensor([-0.0, 0.0, -1e-30, 1e-30])
    for rounding in ("nearest", "stochastic", "toward_zero"):
        q = quantize(x, E4M3, rounding=rounding, generator=seeded(0))
        assert torch.signbit(q).tolist() == [True, False, True, False]
        q = quantize(x, "float8_e4m3fnuz", rounding=rounding, generator=seeded(0))
        assert torch.signbit(q).tolist() == [False] * 4


def test_shapes_layouts_and_empty_tensors(monkeypatch):
    monkeypatch.setattr(_engine, "CHUNK_BYTES", 1000)
    x = torch.randn(37, 53)
    assert torch.equal(quantize(x.T, E4M3), quantize(x.T.contiguous(), E4M3))
    assert torch.equal(quantize(x, E4M3).flatten(), quantize(x.flatten(), E4M3))
    assert quantize(torch.empty(0, 3), E4M3).shape == (0, 3)
    assert quantize(torch.tensor(0.3), E4M3).item() == 0.3125
    assert encode(torch.empty(0), E4M3).shape == (0,)


@pytest.mark.parametrize(
    "name", ["E4M3", "E5M2", "E3M4", "bfloat16", "float8_e8m0fnu", "e5m2:subnormals=false"]
)
def test_results_do_not_depend_on_chunking(monkeypatch, name):
    fmt = get_format(name)
    x = torch.from_numpy(np.tile(probes(fmt), 3))
    x = x[torch.randperm(len(x), generator=seeded(0))]
    if not fmt.has_nan:
        x = x[torch.isfinite(x) & (x > 0 if not fmt.signed else x == x)]
        x = x[x != 0] if not fmt.has_zero else x

    def everything():
        out = [encode(x, fmt), encode(x, fmt, scale=torch.full((len(x),), 0.5))]
        for rounding in ("nearest", "stochastic", "toward_zero"):
            for policy in policies(fmt):
                out.append(quantize(x, fmt, rounding=rounding, overflow=policy, generator=seeded(1)))
                out.append(
                    quantize(x, fmt, scale=0.75, rounding=rounding, overflow=policy, generator=seeded(1))
                )
        return out

    whole = everything()
    monkeypatch.setattr(_engine, "CHUNK_BYTES", 4096)
    for a, b in zip(whole, everything(), strict=True):
        assert_same(a.double().numpy(), b.double().numpy(), x.numpy())


def test_concurrent_calls_do_not_share_buffers():
    import threading

    x = [torch.randn(300_000) * (i + 1) for i in range(4)]
    expected = [quantize(v, E4M3) for v in x]
    results: dict[int, bool] = {}

    def work(i):
        results[i] = all(torch.equal(quantize(x[i], E4M3), expected[i]) for _ in range(5))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0: True, 1: True, 2: True, 3: True}


@pytest.mark.skipif(
    os.environ.get("ALTGRAD_TEST_COMPILE") != "1",
    reason="compiles with inductor (slow); ALTGRAD_TEST_COMPILE=1",
)
@pytest.mark.parametrize("name", ["E4M3", "E5M2", "E0M7", "float8_e4m3fnuz", "bfloat16"])
def test_quantize_compiled_matches_quantize(name):
    from altgrad.quantization.ops import quantize_compiled

    fmt = get_format(name)
    x = torch.cat([torch.from_numpy(probes(fmt)), torch.randn(10_001) * 100])
    for rounding in ("nearest", "stochastic", "toward_zero"):
        for policy in policies(fmt):
            for scale in (1.0, 0.37, torch.tensor(2.0)):
                args = {"rounding": rounding, "overflow": policy, "scale": scale}
                eager = quantize(x, fmt, generator=seeded(2), **args)
                fused = quantize_compiled(x, fmt, generator=seeded(2), **args)
                assert_same(fused.numpy(), eager.numpy(), x.numpy())
    y = (torch.rand(77) * fmt.max_finite / 2).requires_grad_()
    quantize_compiled(y * 4, fmt, mask_saturated_grad=True).sum().backward()
    assert torch.equal(y.grad, torch.where(y * 4 > fmt.max_finite, 0.0, 4.0))


def test_input_is_not_modified():
    x = torch.randn(1000)
    before = x.clone()
    for rounding in ("nearest", "stochastic", "toward_zero"):
        quantize(x, E4M3, scale=0.5, rounding=rounding)
        encode(x, E4M3)
    assert torch.equal(x, before)


# ---- CUDA ------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("name", ["E4M3", "E5M2", "E0M7", "E7M0", "bfloat16", "float8_e8m0fnu"])
def test_cuda_matches_cpu(name):
    fmt = get_format(name)
    x = torch.from_numpy(probes(fmt))
    for rounding in ("nearest", "toward_zero"):
        for policy in policies(fmt):
            cpu = quantize(x, fmt, rounding=rounding, overflow=policy)
            gpu = quantize(x.cuda(), fmt, rounding=rounding, overflow=policy).cpu()
            assert_same(gpu.numpy(), cpu.numpy(), x.numpy())
    # The hash is keyed by the generator: a CPU generator gives the same draws on either device.
    x = torch.randn(100_000)
    cpu = quantize(x, fmt, rounding="stochastic", generator=seeded(3))
    gpu = quantize(x.cuda(), fmt, rounding="stochastic", generator=seeded(3)).cpu()
    assert torch.equal(cpu, gpu)
    assert encode(x.cuda(), fmt, check_nan=False).device.type == "cuda"


@cuda
def test_cuda_has_no_host_sync():
    x = torch.randn(4096, device="cuda")
    scale = torch.tensor(0.5, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rounding in ("nearest", "stochastic", "toward_zero"):
            quantize(x, E4M3, scale=scale, rounding=rounding, generator=generator)
        quantize(x, E4M3, rounding="stochastic")
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- the scalar reference (quantization/reference.py) against the kernels and ml_dtypes ---------------

ALL_SPECS = list(FORMATS) + CUSTOM_SPECS


def reference_of(x: np.ndarray, fmt: FloatFormat, rounding: str, policy: str, randoms=None, precision=23):
    randoms = np.zeros(len(x), dtype=np.int64) if randoms is None else randoms
    return np.array(
        [
            round_value(float(v), fmt, rounding, policy, int(r), precision)
            for v, r in zip(x, randoms, strict=True)
        ]
    )


def kernel_randoms(n: int, fmt: FloatFormat, seed: int, work) -> np.ndarray:
    """The integers the stochastic kernel draws for elements 0..n-1 with ``seeded(seed)``."""
    plan = _engine._plan(fmt, work)
    keys = _engine._draw_keys(seeded(seed), torch.device("cpu"), work.bits)
    out, tmp = torch.empty(n, dtype=work.int_dtype), torch.empty(n, dtype=work.int_dtype)
    return _engine._random_ints(out, tmp, 0, keys, plan).numpy().astype(np.int64)


@pytest.mark.parametrize("name", ALL_SPECS)
def test_kernels_match_the_scalar_reference(name):
    """Every code, midpoint, tie side, special and random value; every rounding mode and policy."""
    fmt = get_format(name)
    x = probes(fmt, seed=3)
    work = _engine._working_float(fmt, torch.float32)
    for policy in policies(fmt):
        for rounding in ("nearest", "toward_zero"):
            got = quantize(torch.from_numpy(x), fmt, rounding=rounding, overflow=policy)
            assert_same(got.numpy(), reference_of(x, fmt, rounding, policy), x)
        randoms = kernel_randoms(len(x), fmt, 7, work)
        got = quantize(torch.from_numpy(x), fmt, rounding="stochastic", overflow=policy, generator=seeded(7))
        expected = reference_of(x, fmt, "stochastic", policy, randoms, work.mantissa_bits)
        assert_same(got.numpy(), expected, x)


@pytest.mark.parametrize("name", list(ML_DTYPES_POLICY))
def test_scalar_reference_matches_ml_dtypes(name):
    fmt, policy = FORMATS[name], ML_DTYPES_POLICY[name]
    x = ml_dtypes_inputs(name, probes(fmt, seed=4))
    with np.errstate(invalid="ignore", over="ignore"):
        expected = x.astype(getattr(ml_dtypes, name)).astype(np.float32)
    assert_same(reference_of(x, fmt, "nearest", policy), expected, x)


def test_scalar_reference_by_hand():
    assert round_value(0.3, E4M3) == 0.3125 and round_value(-500.0, E4M3) == -448.0
    assert round_value(1.0625, E4M3) == 1.0 and round_value(1.1875, E4M3) == 1.25  # ties to even
    assert round_value(3.0, E7M0) == 4.0  # M = 0: the tie between 2 and 4 goes up
    assert math.copysign(1, round_value(-1e-9, E4M3)) == -1 and round_value(-0.0, "float8_e4m3fnuz") == 0.0
    assert (
        math.isnan(round_value(500.0, E4M3, overflow="nan"))
        and round_value(1e9, E5M2, overflow="inf") == math.inf
    )
    assert (
        round_value(1e9, E5M2, "toward_zero", "inf") == 57344.0
        and round_value(math.inf, E5M2, "toward_zero", "inf") == math.inf
    )
    assert (
        round_value(1.0 + 2**-4, E4M3, "stochastic", random=(1 << 19) - 1) == 1.0
    )  # t = 2^19: up iff random >= 2^19
    assert round_value(1.0 + 2**-4, E4M3, "stochastic", random=1 << 19) == 1.125
    fnu = get_format("float8_e8m0fnu")
    assert (
        math.isnan(round_value(0.0, fnu))
        and round_value(1e-45, fnu) == 2.0**-127
        and math.isnan(round_value(-1.0, fnu))
    )
