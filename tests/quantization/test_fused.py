"""The fused compiled kernel against the eager path it replaces: ``compute_scale`` + ``ops.quantize`` +
``ops.encode`` (independent kernels: the scale rule, the chunked eager rounding and its encoder), bit
for bit, on every float32 next to each grid value and midpoint, zeros, subnormals, overflow, +-inf
and NaN. Each (format, rounding, codes) compiles once (seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from altgrad.quantization import fused
from altgrad.quantization.formats import get_format
from altgrad.quantization.ops import encode, quantize
from altgrad.quantization.scaling import AmaxHistory, compute_scale

FORMATS = ["E4M3", "E5M2", "E3M4", "E0M7", "E7M0", "FLOAT8_E4M3FNUZ", "FLOAT6_E2M3FN", "FLOAT4_E2M1FN"]


def _neighbours(values: torch.Tensor) -> torch.Tensor:
    """Each float32 value and the float32 numbers on either side of it."""
    values = values.to(torch.float32)
    up = torch.nextafter(values, torch.tensor(math.inf))
    down = torch.nextafter(values, torch.tensor(-math.inf))
    return torch.cat([values, up, down])


def _edge_inputs(fmt, seed: int = 0) -> torch.Tensor:
    """Grid values, midpoints (ties) and their float32 neighbours, both signs, beyond max_finite,
    float32 subnormals, zeros, +-inf and NaN, and random normals over many binades; shuffled."""
    grid = fmt.values().to(torch.float32)
    positive = torch.unique(grid[torch.isfinite(grid) & (grid >= 0)])
    midpoints = (positive[1:] + positive[:-1]) / 2  # exact in float32 for <= 8-bit formats
    top = fmt.max_finite
    beyond = torch.tensor([top * 1.0625, top * 1.5, top * 2, top * 64, 3e38])
    tiny = torch.tensor([1e-45, 1e-40, 1.1754942e-38, 1e-30])
    magnitudes = torch.cat([_neighbours(positive), _neighbours(midpoints), _neighbours(beyond), tiny])
    generator = torch.Generator().manual_seed(seed)
    spread = torch.randn(4000, generator=generator) * torch.exp2(
        torch.randint(-20, 20, (4000,), generator=generator)
    )
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan])
    x = torch.cat([magnitudes, -magnitudes, spread, specials])
    return x[torch.randperm(x.numel(), generator=generator)]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, except that any NaN equals any NaN (payloads are not specified)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(
        a[~nan].view(torch.int32), b[~nan].view(torch.int32)
    )


def _history(*amaxes: float | torch.Tensor, length: int = 4) -> AmaxHistory:
    history = AmaxHistory(length)
    for amax in amaxes:
        history.update(torch.as_tensor(amax, dtype=torch.float32))
    return history


def _eager(x, fmt, margin, rounding, history, algo):
    """What the eager quantizer computes (``scale_for`` + ``quantize`` + ``encode``)."""
    low, high = torch.aminmax(x)
    current = torch.maximum(high, -low)
    amax = current if history is None or len(history) == 0 else history.amax_by(algo)
    scale = compute_scale(amax, fmt, margin=margin)
    codes = encode(x, fmt, scale, check_nan=False) if rounding == "nearest" and fmt.total_bits <= 8 else None
    return quantize(x, fmt, scale, rounding=rounding), scale, current, codes


def _check(x, fmt, margin=0, rounding="nearest", history=None, algo="max"):
    want_codes = rounding == "nearest" and fmt.total_bits <= 8
    values, scale, current, codes = _eager(x, fmt, margin, rounding, history, algo)
    result = fused.scale_and_quantize(x, fmt, margin, rounding, history, algo, codes=want_codes)
    assert result is not None, "compiling failed on this machine"
    assert result.values.shape == x.shape and result.values.dtype == torch.float32
    assert _same_bits(result.scale, scale.reshape(()))
    assert _same_bits(result.current_amax, current)
    assert _same_bits(result.values, values)
    if want_codes:
        finite_or_inf = ~torch.isnan(x)  # a NaN's code is unspecified for formats without one
        assert result.codes.dtype == torch.uint8 and result.codes.shape == x.shape
        assert torch.equal(result.codes[finite_or_inf], codes[finite_or_inf])


@pytest.mark.parametrize("name", FORMATS)
def test_nearest_at_scale_one_matches_eager_on_every_edge(name):
    """History amax = max_finite, so the scale is exactly 1 and the ties are ties."""
    fmt = get_format(name)
    x = _edge_inputs(fmt)
    _check(x, fmt, history=_history(fmt.max_finite))
    _check(x.reshape(8, -1) if x.numel() % 8 == 0 else x, fmt, history=_history(fmt.max_finite * 4))


@pytest.mark.parametrize("name", ["E4M3", "E5M2", "FLOAT4_E2M1FN"])
def test_current_and_delayed_scales_and_margins_match_eager(name):
    fmt = get_format(name)
    generator = torch.Generator().manual_seed(1)
    for trial in range(6):
        x = torch.randn(3000, generator=generator) * 10.0 ** (trial - 3)
        for margin in (0, 1, 3):
            _check(x, fmt, margin=margin)  # current scaling: this call's amax
            _check(x, fmt, margin=margin, history=_history(x.abs().amax() * 0.37))  # saturates the top
    _check(torch.zeros(64), fmt)  # amax 0: scale 1
    _check(-torch.zeros(64), fmt)
    _check(torch.tensor([1.0, math.nan, -2.0]), fmt)  # NaN amax: scale 1, values NaN where x is


@pytest.mark.parametrize("name", ["E4M3", "E3M4"])
def test_toward_zero_matches_eager(name):
    fmt = get_format(name)
    x = _edge_inputs(fmt, seed=2)
    _check(x, fmt, rounding="toward_zero", history=_history(fmt.max_finite))
    _check(x[torch.isfinite(x)], fmt, rounding="toward_zero")


@pytest.mark.parametrize("algo", ["max", "most_recent"])
def test_the_history_is_read_and_recorded_as_update_does(algo):
    """Scales from the history's amax (max over it, or its latest entry), then this call's amax pushed
    into it, through a wrap-around of the ring: the same buffer, position and count as eager."""
    fmt = get_format("E4M3")
    generator = torch.Generator().manual_seed(3)
    eager, kernel = AmaxHistory(3), AmaxHistory(3)
    for step in range(7):
        x = torch.randn(500, generator=generator) * (2.0 if step % 2 else 0.25)
        _check(x, fmt, history=kernel, algo=algo)  # reads only
        values, scale, current, _ = _eager(x, fmt, 0, "nearest", eager, algo)
        eager.update(current)
        result = fused.scale_and_quantize(x, fmt, history=kernel, algo=algo, record=True)
        assert _same_bits(result.values, values) and _same_bits(result.scale, scale.reshape(()))
        assert torch.equal(kernel.buffer, eager.buffer)
        assert (kernel.position, len(kernel)) == (eager.position, len(eager))


def test_one_graph_serves_every_length():
    fmt = get_format("E5M2")
    fused.scale_and_quantize(torch.randn(100), fmt)  # compiled (or cached) here
    fused.scale_and_quantize(torch.randn(100), fmt, history=_history(3.0))
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for n in (2, 7, 1000, 70001):
        _check(torch.randn(n), fmt)
        _check(torch.randn(n), fmt, history=_history(3.0))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


def test_supports_only_what_it_computes_exactly():
    x = torch.randn(8)
    e4m3 = get_format("E4M3")
    assert fused.supports(x, e4m3, "nearest") and fused.supports(x, e4m3, "toward_zero")
    assert not fused.supports(x, e4m3, "stochastic")
    assert not fused.supports(x, e4m3, "nearest", power_of_two=True)
    assert not fused.supports(x.double(), e4m3, "nearest")
    assert not fused.supports(x.bfloat16(), e4m3, "nearest")
    assert not fused.supports(torch.randn(1), e4m3, "nearest")
    assert not fused.supports(x, get_format("FLOAT8_E8M0FNU"), "nearest")  # float64 arithmetic
    assert not fused.supports(x, get_format("BFLOAT16"), "nearest")
    with pytest.raises(ValueError, match="codes"):
        fused.scale_and_quantize(x, get_format("FLOAT16"), codes=True)


def test_a_backend_that_cannot_compile_warns_once_and_hands_back_to_eager(monkeypatch):
    """A machine without a working C++ compiler (inductor pointed at a missing one, its caches off):
    one warning naming the cause, None (the caller's eager kernels) from then on."""
    monkeypatch.setattr(fused, "_enabled", True)
    monkeypatch.setattr(fused, "_KERNELS", {})
    fmt = get_format("E4M3")
    no_compiler = {"cpp.cxx": ("/nonexistent/g++",), "force_disable_caches": True}
    with torch._inductor.config.patch(no_compiler):  # inductor's own patch restores its config exactly
        with pytest.warns(RuntimeWarning, match="compiled quantize kernels are unavailable .*nonexistent"):
            assert fused.scale_and_quantize(torch.randn(16), fmt) is None
        assert not fused.supports(torch.randn(16), fmt, "nearest")  # later calls go eager without trying
        assert fused.scale_and_quantize(torch.randn(16), fmt) is None


def test_an_error_that_is_not_the_backends_propagates(monkeypatch):
    """Only a failing backend means 'use the eager kernels': any other error is a bug, not hidden."""
    monkeypatch.setattr(fused, "_enabled", True)

    def broken(*args):
        raise IndexError("a bug in the traced code")

    monkeypatch.setattr(fused, "_kernel", lambda *args: broken)
    with pytest.raises(IndexError, match="a bug"):
        fused.scale_and_quantize(torch.randn(16), get_format("E4M3"))
    assert fused._enabled
