"""The format table, checked against ml_dtypes, gfloat and a decoder written here from the bit layout."""

from __future__ import annotations

import math

import gfloat
import ml_dtypes
import numpy as np
import pytest
from gfloat.formats import (
    format_info_bfloat16,
    format_info_binary16,
    format_info_ocp_e2m1,
    format_info_ocp_e2m3,
    format_info_ocp_e3m2,
    format_info_ocp_e4m3,
    format_info_ocp_e5m2,
    format_info_ocp_e8m0,
    format_info_p3109,
)
from gfloat.types import Domain, Signedness

from altgrad.quantization import formats
from altgrad.quantization.formats import (
    E0M7,
    E1M6,
    E4M3,
    E5M2,
    E7M0,
    FORMATS,
    FloatFormat,
    get_format,
    grid_key,
    parse_format,
    same_grid,
)
from references import CUSTOM_SPECS, gfloat_info, same_values

# ---- an independent decoder, from the bit layout in the module docstring ---------------------------------


def reference_decode(
    code: int, E: int, M: int, bias: int, specials: str, subnormals: bool = True, signed: bool = True
) -> float:
    """Decode one code by reading the fields off its bits (float64 is exact for formats of <= 16 bits)."""
    width = E + M
    sign_bit = (code >> width) & 1 if signed else 0
    exponent_field = (code >> M) & ((1 << E) - 1)
    mantissa_field = code & ((1 << M) - 1)
    all_ones_exponent = exponent_field == (1 << E) - 1
    if specials == "ieee" and all_ones_exponent:
        if mantissa_field:
            return math.nan
        return -math.inf if sign_bit else math.inf
    if specials == "fn" and all_ones_exponent and mantissa_field == (1 << M) - 1:
        return math.nan
    if specials == "fnuz" and sign_bit and exponent_field == 0 and mantissa_field == 0:
        return math.nan
    if exponent_field == 0 and subnormals:
        magnitude = mantissa_field / 2**M * 2.0 ** (1 - bias)
    else:
        magnitude = (1 + mantissa_field / 2**M) * 2.0 ** (exponent_field - bias)
    return -magnitude if sign_bit else magnitude


def reference_table(fmt: FloatFormat) -> np.ndarray:
    return np.array(
        [
            reference_decode(
                c,
                fmt.exponent_bits,
                fmt.mantissa_bits,
                fmt.bias,
                fmt.specials,
                fmt.subnormals,
                fmt.signed,
            )
            for c in range(fmt.num_codes)
        ]
    )


@pytest.mark.parametrize("name", [*FORMATS, *CUSTOM_SPECS])
def test_values_match_the_bit_layout(name):
    fmt = get_format(name)
    assert same_values(fmt.values().numpy(), reference_table(fmt)).all()


# ---- ml_dtypes -------------------------------------------------------------------------------------------

ML_DTYPES_NAMES = [
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3",
    "float8_e3m4",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e4m3b11fnuz",
    "float6_e2m3fn",
    "float6_e3m2fn",
    "float4_e2m1fn",
    "float8_e8m0fnu",
]


@pytest.mark.parametrize("name", ML_DTYPES_NAMES)
def test_every_code_decodes_as_in_ml_dtypes(name):
    fmt = FORMATS[name]
    reference = np.arange(fmt.num_codes, dtype=np.uint8).view(getattr(ml_dtypes, name)).astype(np.float64)
    assert same_values(fmt.values().numpy(), reference).all()


@pytest.mark.parametrize(("name", "dtype"), [("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)])
def test_16_bit_codes_decode_as_in_numpy(name, dtype):
    fmt = FORMATS[name]
    with np.errstate(invalid="ignore"):  # NaN codes
        reference = np.arange(1 << 16, dtype=np.uint16).view(dtype).astype(np.float64)
    assert same_values(fmt.values().numpy(), reference).all()


@pytest.mark.parametrize(("ours", "theirs"), [("E4M3", "float8_e4m3fn"), ("E5M2", "float8_e5m2")])
def test_e4m3_and_e5m2_are_the_ocp_formats(ours, theirs):
    assert same_values(FORMATS[ours].values().numpy(), FORMATS[theirs].values().numpy()).all()


@pytest.mark.parametrize("name", ML_DTYPES_NAMES)
def test_range_matches_ml_dtypes_finfo(name):
    fmt = FORMATS[name]
    info = ml_dtypes.finfo(getattr(ml_dtypes, name))
    assert fmt.max_finite == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_subnormal == float(info.smallest_subnormal)


# ---- gfloat ----------------------------------------------------------------------------------------------


GFLOAT_OWN = {
    "float8_e4m3fn": format_info_ocp_e4m3,
    "E4M3": format_info_ocp_e4m3,
    "float8_e5m2": format_info_ocp_e5m2,
    "E5M2": format_info_ocp_e5m2,
    "float6_e2m3fn": format_info_ocp_e2m3,
    "float6_e3m2fn": format_info_ocp_e3m2,
    "float4_e2m1fn": format_info_ocp_e2m1,
    "float8_e8m0fnu": format_info_ocp_e8m0,
    "float16": format_info_binary16,
    "bfloat16": format_info_bfloat16,
    # P3109 binary8 "finite" signed formats: NaN at the negative-zero code, no inf, bias 2^(7 - p).
    "float8_e4m3fnuz": format_info_p3109(8, 4, Signedness.Signed, Domain.Finite),
    "float8_e5m2fnuz": format_info_p3109(8, 3, Signedness.Signed, Domain.Finite),
    "e1m6:bias=1,specials=fnuz": format_info_p3109(8, 7, Signedness.Signed, Domain.Finite),
}


def gfloat_table(info: gfloat.FormatInfo) -> np.ndarray:
    return np.array([gfloat.decode_float(info, code).fval for code in range(1 << info.k)])


@pytest.mark.parametrize("name", list(GFLOAT_OWN))
def test_every_code_decodes_as_gfloat_formats(name):
    assert same_values(get_format(name).values().numpy(), gfloat_table(GFLOAT_OWN[name])).all()


@pytest.mark.parametrize(
    "name", ["E0M7", "E1M6", "E2M5", "E3M4", "E6M1", "E7M0", "float8_e4m3", "float8_e3m4"]
)
def test_every_code_decodes_as_gfloat_with_the_same_layout(name):
    fmt = FORMATS[name]
    info = gfloat_info(fmt)
    assert same_values(fmt.values().numpy(), gfloat_table(info)).all()
    assert fmt.max_finite == info.max


# ---- the table in numbers -------------------------------------------------------------------------------

RANGES = {
    # name: (max_finite, min_normal, min_subnormal)
    "E0M7": (127 / 128, 1.0, 1 / 128),
    "E1M6": (3.96875, 2.0, 1 / 32),
    "E2M5": (7.875, 1.0, 1 / 32),
    "E3M4": (31.0, 0.25, 1 / 64),
    "E4M3": (448.0, 2.0**-6, 2.0**-9),
    "E5M2": (57344.0, 2.0**-14, 2.0**-16),
    "E6M1": (1.5 * 2.0**32, 2.0**-30, 2.0**-31),
    "E7M0": (2.0**64, 2.0**-62, 2.0**-62),
    "float8_e4m3fn": (448.0, 2.0**-6, 2.0**-9),
    "float8_e5m2": (57344.0, 2.0**-14, 2.0**-16),
    "float8_e4m3": (240.0, 2.0**-6, 2.0**-9),
    "float8_e3m4": (15.5, 0.25, 1 / 64),
    "float8_e4m3fnuz": (240.0, 2.0**-7, 2.0**-10),
    "float8_e5m2fnuz": (57344.0, 2.0**-15, 2.0**-17),
    "float8_e4m3b11fnuz": (30.0, 2.0**-10, 2.0**-13),
    "float6_e2m3fn": (7.5, 1.0, 0.125),
    "float6_e3m2fn": (28.0, 0.25, 1 / 16),
    "float4_e2m1fn": (6.0, 1.0, 0.5),
    "float8_e8m0fnu": (2.0**127, 2.0**-127, 2.0**-127),
    "float16": (65504.0, 2.0**-14, 2.0**-24),
    "bfloat16": (float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), 2.0**-126, 2.0**-133),
}


def test_every_registered_format_has_a_range_row():
    assert set(RANGES) == set(FORMATS)


@pytest.mark.parametrize("name", list(RANGES))
def test_range(name):
    fmt = FORMATS[name]
    max_finite, min_normal, min_subnormal = RANGES[name]
    assert fmt.max_finite == max_finite
    assert fmt.min_normal == min_normal
    assert fmt.min_subnormal == min_subnormal
    values = fmt.values().numpy()
    finite = values[np.isfinite(values)]
    assert finite.max() == max_finite
    assert np.abs(finite[finite != 0]).min() == min_subnormal
    assert fmt.emax == math.floor(math.log2(max_finite))


def test_bfloat16_max():
    assert FORMATS["bfloat16"].max_finite == (2 - 2**-7) * 2.0**127


@pytest.mark.parametrize(("fmt", "step"), [(E0M7, 1 / 128), (E1M6, 1 / 32)])
def test_e0m7_and_e1m6_are_uniform_grids(fmt, step):
    positive = np.unique(np.abs(fmt.values().numpy()))
    assert positive[0] == 0
    np.testing.assert_array_equal(np.diff(positive), np.full(len(positive) - 1, step))
    assert len(positive) == 128


def test_e7m0_is_zero_and_powers_of_two():
    positive = np.unique(np.abs(E7M0.values().numpy()))
    assert positive[0] == 0
    np.testing.assert_array_equal(positive[1:], 2.0 ** np.arange(-62, 65))


def test_e8m0_is_powers_of_two_and_one_nan():
    values = FORMATS["float8_e8m0fnu"].values().numpy()
    np.testing.assert_array_equal(values[:255], 2.0 ** np.arange(-127, 128))
    assert np.isnan(values[255])


@pytest.mark.parametrize("name", list(FORMATS))
def test_special_value_flags_agree_with_the_table(name):
    fmt = FORMATS[name]
    values = fmt.values().numpy()
    assert fmt.has_nan == bool(np.isnan(values).any())
    assert fmt.has_inf == bool(np.isinf(values).any())
    zeros = values[values == 0]
    assert fmt.has_zero == (len(zeros) > 0)
    assert fmt.has_negative_zero == bool(np.signbit(zeros).any())
    assert fmt.num_codes == len(values) == 2**fmt.total_bits


def test_eight_bit_splits_are_eight_bits():
    for name in ["E0M7", "E1M6", "E2M5", "E3M4", "E4M3", "E5M2", "E6M1", "E7M0"]:
        fmt = FORMATS[name]
        assert fmt.total_bits == 8
        assert fmt.exponent_bits + fmt.mantissa_bits == 7
        assert f"E{fmt.exponent_bits}M{fmt.mantissa_bits}" == name


# ---- the scalar encoder ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in FORMATS if FORMATS[n].total_bits <= 8])
def test_scalar_encode_decode_round_trip(name):
    fmt = FORMATS[name]
    for code in range(fmt.num_codes):
        value = fmt.decode(code)
        if math.isnan(value):
            assert math.isnan(fmt.decode(fmt.encode(value)))
            continue
        assert fmt.encode(value) == code


def test_scalar_encode_rounds_ties_to_even_and_saturates():
    assert E4M3.decode(E4M3.encode(0.3)) == 0.3125
    assert E4M3.decode(E4M3.encode(17.0)) == 16.0  # 16 and 18: 16 has the even significand
    assert E4M3.decode(E4M3.encode(19.0)) == 20.0
    assert E4M3.decode(E4M3.encode(1e9)) == 448.0
    assert E4M3.decode(E4M3.encode(-math.inf)) == -448.0
    assert E5M2.decode(E5M2.encode(math.inf)) == math.inf
    assert E7M0.decode(E7M0.encode(1.5)) == 2.0  # M = 0: the tie goes up
    assert E7M0.decode(E7M0.encode(3.0)) == 4.0
    assert math.copysign(1.0, E4M3.decode(E4M3.encode(-0.0))) == -1.0
    fnuz = FORMATS["float8_e4m3fnuz"]
    assert math.copysign(1.0, fnuz.decode(fnuz.encode(-0.0))) == 1.0


def test_scalar_encode_of_nan_needs_a_nan_code():
    with pytest.raises(ValueError, match="NaN"):
        FORMATS["E3M4"].encode(math.nan)
    assert math.isnan(E4M3.decode(E4M3.encode(math.nan)))


def test_scalar_decode_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match="code"):
        E4M3.decode(256)
    with pytest.raises(ValueError, match="code"):
        E4M3.decode(-1)


# ---- names, specs and validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling", ["E4M3", "e4m3", " E4m3 ", "FLOAT8_E4M3FN", "Float8_E5M2FNUZ", "BFloat16"]
)
def test_get_format_ignores_case(spelling):
    assert get_format(spelling) is FORMATS[next(k for k in FORMATS if k.lower() == spelling.strip().lower())]


def test_get_format_passes_formats_through():
    assert get_format(E4M3) is E4M3


def test_unknown_format_lists_the_known_names():
    with pytest.raises(ValueError, match="unknown format 'float7'") as info:
        get_format("float7")
    for name in FORMATS:
        assert name in str(info.value)


def test_get_format_rejects_non_strings():
    with pytest.raises(ValueError, match="format"):
        get_format(8)  # type: ignore[arg-type]


def test_custom_spec():
    fmt = get_format("e3m4:bias=1")
    assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.specials) == (3, 4, 1, "none")
    assert fmt.max_finite == 124.0
    assert same_values(get_format("E4M3:specials=fn").values().numpy(), E4M3.values().numpy()).all()
    default = get_format("e5m2")
    assert default is FORMATS["E5M2"]
    unsigned = get_format("e4m4:signed=false")
    assert unsigned.total_bits == 8 and not unsigned.signed
    assert (unsigned.values() >= 0).all()


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("e3m4:colour=red", "unknown option"),
        ("e3m4:bias=x", "bias"),
        ("e3m4:subnormals=maybe", "subnormals"),
        ("e3m4:specials=weird", "specials"),
        ("e1m6:specials=ieee", "specials"),
        ("e9m9", "exponent_bits"),
        ("e0m0", "exponent_bits"),
        ("e0m7:subnormals=false", "subnormals"),
        ("e4m3:signed=false,specials=fnuz", "specials"),
    ],
)
def test_bad_specs_name_the_field(spec, field):
    with pytest.raises(ValueError, match=field):
        get_format(spec)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "", "exponent_bits": 4, "mantissa_bits": 3, "bias": 7}, "name"),
        ({"name": "x", "exponent_bits": -1, "mantissa_bits": 3, "bias": 7}, "exponent_bits"),
        ({"name": "x", "exponent_bits": 4, "mantissa_bits": -3, "bias": 7}, "mantissa_bits"),
        ({"name": "x", "exponent_bits": 4.0, "mantissa_bits": 3, "bias": 7}, "exponent_bits"),
        ({"name": "x", "exponent_bits": 4, "mantissa_bits": 3, "bias": True}, "bias"),
        ({"name": "x", "exponent_bits": 4, "mantissa_bits": 3, "bias": 7, "specials": "ieee754"}, "specials"),
        ({"name": "x", "exponent_bits": 10, "mantissa_bits": 10, "bias": 7}, "exponent_bits"),
        ({"name": "x", "exponent_bits": 1, "mantissa_bits": 0, "bias": 0, "specials": "fn"}, "specials"),
    ],
)
def test_bad_fields_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FloatFormat(**kwargs)


def test_formats_are_frozen_and_hashable():
    with pytest.raises(AttributeError):
        E4M3.bias = 8  # type: ignore[misc]
    assert {E4M3: 1}[FloatFormat("E4M3", 4, 3, bias=7, specials="fn")] == 1


def test_fp8format_is_the_same_class():
    assert formats.FP8Format is FloatFormat


def test_describe_row():
    row = E4M3.describe()
    assert row == {
        "name": "E4M3",
        "E": 4,
        "M": 3,
        "bias": 7,
        "specials": "fn",
        "min_subnormal": 2.0**-9,
        "min_normal": 2.0**-6,
        "max": 448.0,
    }
    assert E0M7.describe()["bias"] == "-"
    assert E7M0.describe()["min_subnormal"] == "-"


# ---- "no format" and equivalent formats -----------------------------------------------------------------


NO_FORMAT_SPELLINGS = [None, "none", "None", "NONE", " none ", "fp32", "FP32", " Fp32", "", "  "]


@pytest.mark.parametrize("spelling", NO_FORMAT_SPELLINGS)
def test_every_spelling_of_no_format_parses_to_none(spelling):
    assert parse_format(spelling) is None


@pytest.mark.parametrize("spelling", ["E4M3", "e4m3", " E4M3 ", E4M3, "torch.float8_e4m3fn"])
def test_parse_format_reads_names_like_get_format(spelling):
    assert parse_format(spelling) == get_format("float8_e4m3fn" if "torch" in str(spelling) else "E4M3")


@pytest.mark.parametrize("bad", ["unset", "fp16", "e9m9", "E4M3 fn"])
def test_parse_format_rejects_what_is_neither_a_format_nor_no_format(bad):
    with pytest.raises(ValueError, match="format") as error:
        parse_format(bad)
    assert "\n" not in str(error.value)


EQUIVALENCE_FORMATS = [
    *(name for name, fmt in FORMATS.items() if fmt.total_bits <= 8),
    *CUSTOM_SPECS,
    "e4m3:bias=8,specials=fn", "e4m3:bias=8", "e1m6:bias=3", "e0m7:bias=5", "e0m7:specials=fn",
    "e1m6:specials=fn", "e2m0:specials=ieee", "e1m1:specials=fn", "e1m1", "e0m2", "e3m4:bias=2",
]  # fmt: skip


def _brute_force_same_grid(a: FloatFormat, b: FloatFormat) -> bool:
    """Decode every code from its bits; equal special values, and finite value sets equal after
    multiplying one by the power of two that maps its largest finite value onto the other's."""

    def parts(fmt: FloatFormat) -> tuple[set[float], tuple[bool, bool, bool]]:
        values = reference_table(fmt)
        negative_zero = any(v == 0 and math.copysign(1.0, v) < 0 for v in values)
        specials = (bool(np.isinf(values).any()), bool(np.isnan(values).any()), negative_zero)
        return set(values[np.isfinite(values)].tolist()), specials

    (finite_a, specials_a), (finite_b, specials_b) = parts(a), parts(b)
    k = math.log2(max(finite_b) / max(finite_a))
    if specials_a != specials_b or k != int(k):
        return False
    return {math.ldexp(v, int(k)) for v in finite_a} == finite_b


def test_same_grid_agrees_with_brute_force_on_every_pair():
    fmts = [get_format(name) for name in EQUIVALENCE_FORMATS]
    found = {
        (a.name, b.name) for a in fmts for b in fmts if a.name < b.name and _brute_force_same_grid(a, b)
    }
    for a in fmts:
        for b in fmts:
            assert same_grid(a, b) == _brute_force_same_grid(a, b), (a.name, b.name)
    # the pairs that exist, so that the test would fail if same_grid said False everywhere
    assert {("E0M7", "E1M6"), ("E4M3", "float8_e4m3fn"), ("E4M3", "E4M3:bias=8,specials=fn")} <= found
    assert {("E0M7", "E0M7:bias=5"), ("E1M6", "E1M6:bias=3"), ("E0M2", "E1M1")} <= found
    assert ("E1M1:specials=fn", "E2M0:specials=ieee") not in found  # 3 magnitudes each; inf vs NaN
    assert ("E0M7:specials=fn", "E1M6") not in found


def test_same_grid_of_no_format_and_names():
    assert same_grid("none", None) and same_grid("fp32", "")
    assert not same_grid("none", "E4M3") and not same_grid(E4M3, None)
    assert same_grid("E1M6", "e0m7") and same_grid(E0M7, "E0M7")
    assert grid_key(E1M6) == grid_key(E0M7) and grid_key(E1M6) != grid_key(E5M2)
