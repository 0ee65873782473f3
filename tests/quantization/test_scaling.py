"""Scales: amax history, compute_scale, per-channel scales, and MX blocks (against gfloat's)."""

from __future__ import annotations

import math

import gfloat
import numpy as np
import pytest
import torch
from gfloat.formats import (
    format_info_mxfp4_e2m1,
    format_info_mxfp6_e2m3,
    format_info_mxfp6_e3m2,
    format_info_mxfp8_e4m3,
    format_info_mxfp8_e5m2,
)

from altgrad.quantization import E4M3, E5M2, FORMATS, decode, encode, get_format, quantize
from altgrad.quantization.scaling import (
    AmaxHistory,
    compute_scale,
    mx_block_scale,
    mx_quantize,
    per_channel_scale,
)

# ---- AmaxHistory -----------------------------------------------------------------------------------------


def test_history_is_the_max_of_the_last_length_values():
    history = AmaxHistory(length=3)
    assert len(history) == 0 and history.amax.item() == 0.0
    for value, expected in [
        (2.0, 2.0),
        (5.0, 5.0),
        (1.0, 5.0),
        (3.0, 5.0),
        (0.5, 3.0),
        (0.25, 3.0),
        (0.1, 0.5),
    ]:
        history.update(torch.tensor(value))
        assert history.amax.item() == expected
    assert len(history) == 3
    assert history.history.tolist() == pytest.approx([0.5, 0.25, 0.1])


def test_history_accepts_numbers_and_full_tensors():
    history = AmaxHistory(length=4)
    history.update(2.5)
    history.update(torch.tensor([[-7.0, 3.0], [1.0, 0.0]]))  # reduced by its amax
    history.update(torch.tensor([4.0]))
    assert history.amax.item() == 7.0
    assert history.history.tolist() == [2.5, 7.0, 4.0]
    with pytest.raises(ValueError, match="amax"):
        history.update("big")  # type: ignore[arg-type]


def test_history_amax_is_a_tensor_on_the_data_device():
    history = AmaxHistory(length=2)
    history.update(torch.tensor(3.0, dtype=torch.float64))
    amax = history.amax
    assert isinstance(amax, torch.Tensor) and amax.dim() == 0 and amax.dtype == torch.float32


def test_history_keeps_nan_until_it_ages_out():
    history = AmaxHistory(length=2)
    history.update(torch.tensor(math.nan))
    assert math.isnan(history.amax.item())
    assert compute_scale(history.amax, E4M3).item() == 1.0
    history.update(1.0)
    history.update(448.0)
    assert history.amax.item() == 448.0


def test_history_state_dict_round_trip():
    history = AmaxHistory(length=4)
    for value in [1.0, 9.0, 2.0, 3.0, 4.0]:
        history.update(value)
    state = history.state_dict()
    restored = AmaxHistory(length=4)
    restored.load_state_dict(state)
    assert restored.amax.item() == history.amax.item() == 9.0  # the last four: 9, 2, 3, 4
    assert len(restored) == 4 and restored.history.tolist() == history.history.tolist()
    for value in [0.5, 0.5, 0.5]:
        history.update(value)
        restored.update(value)
        assert restored.amax.item() == history.amax.item()
    state["history"][0] = 100.0  # the state is a copy
    assert history.amax.item() != 100.0


def test_history_rejects_bad_arguments():
    for length in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="length"):
            AmaxHistory(length=length)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="length"):
        AmaxHistory(length=3).load_state_dict(AmaxHistory(length=4).state_dict())
    with pytest.raises(ValueError, match="missing"):
        AmaxHistory(length=3).load_state_dict({"length": 3})


def test_history_reset():
    history = AmaxHistory(length=2)
    history.update(5.0)
    history.reset()
    assert len(history) == 0 and history.amax.item() == 0.0


# ---- compute_scale ---------------------------------------------------------------------------------------


def test_compute_scale_maps_amax_to_max_finite():
    assert compute_scale(448.0, E4M3) == 1.0
    assert compute_scale(896.0, E4M3) == 2.0
    assert compute_scale(896.0, E4M3, margin=1) == 4.0  # amax lands on 224: one bit of headroom
    assert compute_scale(57344.0, "E5M2", margin=-1) == 0.5
    assert compute_scale(0.0, E4M3) == 1.0
    assert compute_scale(math.inf, E4M3) == 1.0
    assert compute_scale(math.nan, E4M3) == 1.0
    assert compute_scale(1e-44, E4M3) == 1.0  # the scale would underflow
    assert compute_scale(300.0, E4M3, power_of_two=True) == 1.0
    assert compute_scale(500.0, E4M3, power_of_two=True) == 2.0


def test_compute_scale_of_tensors():
    amax = torch.tensor([448.0, 896.0, 0.0, math.inf, math.nan, -1.0, 1e-44])
    scale = compute_scale(amax, E4M3)
    assert scale.dtype == torch.float32 and scale.shape == amax.shape
    assert scale.tolist() == [1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert compute_scale(torch.tensor(500.0), E4M3, power_of_two=True).item() == 2.0


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("margin", [0, 3, -2, 200])
def test_compute_scale_of_tensors_matches_numpy_on_every_kind_of_float32(margin, power_of_two):
    """Random bit patterns (NaN, +-inf, +-0, subnormals, negatives) against numpy in float32: the raw
    scale where it is a normal float32, else 1."""
    bits = np.random.default_rng(0).integers(-(2**31), 2**31, 200_000, dtype=np.int64).astype(np.int32)
    amax = np.concatenate([bits.view(np.float32), np.float32([0, -0.0, np.inf, -np.inf, np.nan, 1e-45])])
    with np.errstate(all="ignore"):
        raw = amax / np.float32(E5M2.max_finite * 2.0**-margin)
        if power_of_two:
            raw = np.exp2(np.ceil(np.log2(raw)))
        normal = (raw >= np.finfo(np.float32).tiny) & (raw <= np.finfo(np.float32).max)
    expected = np.where(normal, raw, np.float32(1)).astype(np.float32)
    scale = compute_scale(torch.from_numpy(amax), E5M2, margin=margin, power_of_two=power_of_two)
    assert np.array_equal(scale.numpy().view(np.int32), expected.view(np.int32))


def test_compute_scale_rejects_bad_arguments():
    with pytest.raises(ValueError, match="amax"):
        compute_scale(-1.0, E4M3)
    with pytest.raises(ValueError, match="amax"):
        compute_scale("1", E4M3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        compute_scale(1.0, E4M3, margin=math.nan)
    with pytest.raises(ValueError, match="unknown format"):
        compute_scale(1.0, "E9M9x")


@pytest.mark.parametrize("name", ["E4M3", "E5M2", "E3M4", "E2M5", "E0M7", "E7M0", "float6_e2m3fn"])
def test_scaled_tensor_uses_the_range_without_saturating(name):
    fmt = get_format(name)
    torch.manual_seed(0)
    x = torch.randn(10_000) * 123.0
    scale = compute_scale(x.abs().amax(), fmt)
    q = quantize(x, fmt, scale=scale)
    assert bool(((x / scale).abs() <= fmt.max_finite * (1 + 2**-20)).all())
    assert q.abs().max().item() == pytest.approx(x.abs().max().item(), rel=2.0**-fmt.mantissa_bits)


# ---- per-channel -----------------------------------------------------------------------------------------


def test_per_channel_scale_shapes_and_values():
    x = torch.tensor([[1.0, -896.0, 3.0], [0.5, 0.25, -0.125], [0.0, 0.0, 0.0]])
    rows = per_channel_scale(x, E4M3, axis=0)
    assert rows.shape == (3, 1)
    assert rows.flatten().tolist() == [2.0, float(torch.tensor(0.5) / 448), 1.0]
    columns = per_channel_scale(x, E4M3, axis=-1)
    assert columns.shape == (1, 3)
    assert columns.flatten().tolist() == (torch.tensor([1.0, 896.0, 3.0]) / 448).tolist()
    assert per_channel_scale(x, E4M3, axis=0, margin=2).flatten()[0].item() == 8.0
    q = quantize(x, E4M3, scale=rows)
    assert q[0, 1].item() == -896.0 and q[1, 0].item() == 0.5


def test_per_channel_scale_on_3d_and_1d():
    x = torch.randn(2, 3, 4)
    scale = per_channel_scale(x, E5M2, axis=1)
    assert scale.shape == (1, 3, 1)
    expected = x.abs().amax(dim=(0, 2)) / E5M2.max_finite
    torch.testing.assert_close(scale.flatten(), expected, rtol=0, atol=0)
    v = torch.tensor([2.0, -4.0])
    assert per_channel_scale(v, E4M3).tolist() == (torch.tensor([2.0, 4.0]) / 448).tolist()


def test_per_channel_scale_rejects_bad_arguments():
    with pytest.raises(ValueError, match="axis"):
        per_channel_scale(torch.ones(2, 3), E4M3, axis=2)
    with pytest.raises(ValueError, match="axis"):
        per_channel_scale(torch.ones(2, 3), E4M3, axis=-3)
    with pytest.raises(ValueError, match="dimension"):
        per_channel_scale(torch.tensor(1.0), E4M3)
    with pytest.raises(ValueError, match="floating-point"):
        per_channel_scale(torch.ones(2, dtype=torch.int64), E4M3)


# ---- MX: a hand-computed example --------------------------------------------------------------------------


def hand_example() -> torch.Tensor:
    """Four blocks of 32 (E4M3 elements, emax 8, max 448)."""
    blocks = torch.zeros(4, 32)
    blocks[0, :3] = torch.tensor([300.0, 1.0, -2.0])  # amax 300: floor(log2 300) = 8 -> X = 2^0
    blocks[1, :3] = torch.tensor([1000.0, -500.0, 3.0])  # amax 1000: 2^9 -> X = 2
    blocks[2, :2] = torch.tensor([0.001, -0.0003])  # amax 0.001: 2^-10 -> X = 2^-18
    return blocks.reshape(1, 128)  # block 3 is all zeros -> X = 2^-127


def test_mx_scale_by_hand():
    x = hand_example()
    floor = mx_block_scale(x, E4M3)
    assert floor.shape == (1, 4)
    assert floor.tolist() == [[1.0, 2.0, 2.0**-18, 2.0**-127]]
    # ceil: the smallest 2^e with amax / 2^e <= 448
    assert mx_block_scale(x, E4M3, rounding="ceil").tolist() == [[1.0, 4.0, 2.0**-18, 2.0**-127]]
    # even: 2^round(log2(amax / 448)): log2(300/448) = -0.58, log2(1000/448) = 1.16, log2(0.001/448) = -18.77
    assert mx_block_scale(x, E4M3, rounding="even").tolist() == [[0.5, 2.0, 2.0**-19, 2.0**-127]]
    codes = encode(floor, "float8_e8m0fnu")
    assert codes.tolist() == [[127, 128, 109, 0]]
    assert torch.equal(decode(codes, "float8_e8m0fnu"), floor)


def test_mx_quantize_by_hand():
    x = hand_example()
    values, saturated = mx_quantize(x, E4M3)
    blocks = values.reshape(4, 32)
    assert blocks[0, :3].tolist() == [288.0, 1.0, -2.0]  # 300 -> 288 (spacing 32 above 256)
    assert blocks[1, :3].tolist() == [896.0, -512.0, 3.0]  # 1000 / 2 = 500 saturates to 448
    assert blocks[2, :2].tolist() == [0.0009765625, -0.00030517578125]  # 0.001*2^18 = 262.1 -> 256
    assert bool((blocks[3] == 0).all())
    assert saturated.tolist() == [[0, 1, 0, 0]]
    values, saturated = mx_quantize(x, E4M3, rounding="ceil")
    assert values.reshape(4, 32)[1, :3].tolist() == [1024.0, -512.0, 3.0]  # 1000 / 4 = 250 -> 256
    assert saturated.tolist() == [[0, 0, 0, 0]]
    values, saturated = mx_quantize(x, E4M3, rounding="even")
    assert values.reshape(4, 32)[0, :3].tolist() == [224.0, 1.0, -2.0]  # 300 / 0.5 = 600 saturates
    assert saturated.tolist() == [[1, 1, 1, 0]]  # and 0.001 * 2^19 = 524


# ---- MX against gfloat ------------------------------------------------------------------------------------

GFLOAT_MX = {
    "float8_e4m3fn": format_info_mxfp8_e4m3,
    "float8_e5m2": format_info_mxfp8_e5m2,
    "float6_e3m2fn": format_info_mxfp6_e3m2,
    "float6_e2m3fn": format_info_mxfp6_e2m3,
    "float4_e2m1fn": format_info_mxfp4_e2m1,
}


def random_blocks(n_blocks: int, seed: int) -> np.ndarray:
    """Blocks of 32 with magnitudes across many binades, some with outliers, one all zero."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_blocks, 32)) * np.exp2(rng.integers(-30, 30, (n_blocks, 1)))
    x[::7, 5] *= 100.0  # outliers
    x[3] = 0.0
    x[4, :] = 2.0 ** rng.integers(-10, 10, 32)  # exact powers of two (amax on a binade edge)
    return x.astype(np.float32)


@pytest.mark.parametrize("name", list(GFLOAT_MX))
def test_mx_floor_matches_gfloat(name):
    info = GFLOAT_MX[name]
    fmt = FORMATS[name]
    x = random_blocks(60, seed=len(name))
    values, saturated = mx_quantize(torch.from_numpy(x), fmt)
    scale = mx_block_scale(torch.from_numpy(x), fmt)
    for i, block in enumerate(x.astype(np.float64)):
        expected_scale = gfloat.compute_scale_amax(info.etype.emax, block)
        expected = gfloat.quantize_block(info, block, gfloat.compute_scale_amax)
        assert scale[i].item() == expected_scale, i
        np.testing.assert_array_equal(values[i].double().numpy(), expected, err_msg=f"block {i}")
        assert saturated[i].item() == int((np.abs(block) / expected_scale > fmt.max_finite).sum())


def test_mx_nan_block_matches_gfloat():
    info = GFLOAT_MX["float8_e4m3fn"]
    block = np.ones(32)
    block[7] = np.nan
    expected = gfloat.quantize_block(info, block, gfloat.compute_scale_amax)
    values, saturated = mx_quantize(torch.from_numpy(block).float(), E4M3)
    assert np.isnan(expected).all() and bool(torch.isnan(values).all())
    assert saturated.tolist() == [0]


# ---- MX: padding, specials, options ----------------------------------------------------------------------


def test_mx_pads_a_short_last_block_with_zeros():
    torch.manual_seed(1)
    x = torch.randn(3, 40) * 10
    values, saturated = mx_quantize(x, E4M3)
    assert values.shape == (3, 40) and saturated.shape == (3, 2)
    padded = torch.cat([x, torch.zeros(3, 24)], dim=1)
    values_padded, saturated_padded = mx_quantize(padded, E4M3)
    assert torch.equal(values, values_padded[:, :40])
    assert torch.equal(saturated, saturated_padded)
    assert torch.equal(mx_block_scale(x, E4M3), mx_block_scale(padded, E4M3))
    # The short block's scale depends on its own 8 elements only.
    assert (
        mx_block_scale(x, E4M3)[:, 1].tolist() == mx_block_scale(x[:, 32:], E4M3, block_size=8)[:, 0].tolist()
    )


def test_mx_blocks_run_along_the_last_axis_only():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64)
    values, saturated = mx_quantize(x, E5M2, block_size=16)
    assert saturated.shape == (2, 3, 4)
    for i in range(2):
        for j in range(3):
            row_values, _ = mx_quantize(x[i, j], E5M2, block_size=16)
            assert torch.equal(values[i, j], row_values)


def test_mx_inf_makes_its_block_nan_only():
    x = torch.ones(64)
    x[3] = math.inf
    values, _ = mx_quantize(x, E4M3)
    assert bool(torch.isnan(values[:32]).all()) and bool((values[32:] == 1).all())
    assert math.isnan(mx_block_scale(x, E4M3)[0].item())


def test_mx_keeps_dtype_and_passes_the_gradient_straight_through():
    x = (torch.randn(4, 32) * 3).to(torch.bfloat16).requires_grad_()
    values, _ = mx_quantize(x, E4M3)
    assert values.dtype == torch.bfloat16
    values.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_mx_element_rounding_options():
    x = torch.full((1, 4096), 1.0625)  # E4M3 at scale 2^-8... halfway between two grid values
    values, _ = mx_quantize(x, E4M3, elem_rounding="toward_zero")
    assert bool((values == 1.0).all())
    a, _ = mx_quantize(x, E4M3, elem_rounding="stochastic", generator=torch.Generator().manual_seed(0))
    b, _ = mx_quantize(x, E4M3, elem_rounding="stochastic", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and set(a.unique().tolist()) == {1.0, 1.125}


def test_mx_rejects_bad_arguments():
    x = torch.ones(4, 32)
    for block_size in (0, -32, 2.0, True):
        with pytest.raises(ValueError, match="block_size"):
            mx_quantize(x, E4M3, block_size=block_size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rounding"):
        mx_block_scale(x, E4M3, rounding="up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="elem_rounding"):
        mx_quantize(x, E4M3, elem_rounding="up")
    with pytest.raises(ValueError, match="unknown format"):
        mx_quantize(x, "fp8")
    with pytest.raises(ValueError, match="dimension"):
        mx_quantize(torch.tensor(1.0), E4M3)
    with pytest.raises(ValueError, match="floating-point"):
        mx_block_scale(torch.ones(32, dtype=torch.int32), E4M3)


def test_mx_scales_stay_in_e8m0_range():
    x = torch.tensor([[3e38] + [0.0] * 31, [1e-45] + [0.0] * 31])
    assert mx_block_scale(x, "float4_e2m1fn").tolist() == [[2.0**125], [2.0**-127]]  # emax 2
    scale = mx_block_scale(x, "E0M7")  # emax -1: 2^128 is out of E8M0's range
    assert scale.tolist() == [[2.0**127], [2.0**-127]]
    assert bool(torch.isfinite(encode(scale, "float8_e8m0fnu").float()).all())
