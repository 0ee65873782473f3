"""Units: the same decoupled weight decay under every optimizer, and each optimizer's step measured in
code ordinals of its format (ml_dtypes' float8_e4m3fn codes, log2 on the power-of-two grid E7M0).
Madam on hand-computed steps and on a small regression."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from altgrad.quantization import E4M3, E7M0
from altgrad.training.optimizer import OPTIMIZERS, GridOptim, Madam, ManifoldAdamW, build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

WD, WEIGHT_LR = 0.5, 0.01  # AdamW's per-step shrink factor at the peak lr: 1 - 0.01 * 0.5 = 0.995
OWN_LR = {"adamw": WEIGHT_LR, "sgd": WEIGHT_LR, "manifold_adamw": 1.0, "grid": 1.0, "madam": 0.05}


def e4m3_ordinal(values: torch.Tensor) -> np.ndarray:
    """Signed position on the E4M3 grid from ml_dtypes' codes: +-(code & 0x7F), -0 and +0 both 0."""
    codes = values.detach().numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8).astype(np.int64)
    magnitude = codes & 0x7F
    return np.where(codes & 0x80, -magnitude, magnitude)


# ---- weight decay: one factor for every optimizer ---------------------------------------------------


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "grid"])
def test_zero_gradient_decays_by_the_same_factor_under_every_optimizer(name):
    """Step 1 at the peak lr, step 2 with the schedule at half its peak (``lr = initial_lr / 2``):
    w (1 - 0.005) (1 - 0.0025), whatever unit the optimizer's own lr is in."""
    w0 = [1.25, -0.75, 0.3, 3e-3]
    w = torch.nn.Parameter(torch.tensor(w0))
    groups = [{"params": [w], "initial_lr": OWN_LR[name]}]
    opt = build_optimizer(name, groups, lr=OWN_LR[name], weight_decay=WD, weight_lr=WEIGHT_LR,
                          quant_info=lambda p: (E4M3, 1.0), seed=0)  # fmt: skip
    w.grad = torch.zeros(4)
    opt.step()
    opt.param_groups[0]["lr"] = OWN_LR[name] / 2
    opt.step()
    expected = torch.tensor(w0, dtype=torch.float64) * (1 - 0.005) * (1 - 0.0025)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "w0, rung, below",
    [
        (1.25, 1 / 8, 1.125),  # inside a binade: 0.005 * 1.25 / (1/8) = 0.05 rung
        (1.0, 1 / 16, 0.9375),  # a power of two: the rung toward zero is 1/16, 0.005 / (1/16) = 0.08 rung
    ],
)
def test_zero_gradient_decay_of_grid_optim_is_adamws_in_expectation(w0, rung, below):
    """One rung toward zero with probability p = 0.005 w0 / rung, so E[w'] = w0 - p rung = 0.995 w0."""
    n = 40000
    w = torch.nn.Parameter(torch.full((n,), w0))
    opt = GridOptim([{"params": [w], "format": E4M3}], lr=1.0, weight_decay=WD, weight_lr=WEIGHT_LR, seed=0)
    w.grad = torch.zeros(n)
    opt.step()
    assert set(w.detach().tolist()) == {w0, below}
    p = 0.005 * w0 / rung
    sigma = rung * math.sqrt(p * (1 - p) / n)  # std of the mean of n one-rung Bernoulli(p) moves
    assert abs(w.detach().double().mean().item() - w0 * 0.995) < 5 * sigma


# ---- realised step sizes -----------------------------------------------------------------------------------


def e4m3_interior_values() -> torch.Tensor:
    """Every finite E4M3 value that is not a power of two, zero, or at the top of the range."""
    values = torch.from_numpy(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    magnitude = values.abs()
    power_of_two = torch.frexp(magnitude).mantissa == 0.5
    keep = torch.isfinite(values) & (magnitude > 0) & ~power_of_two & (magnitude < 400)
    return values[keep]


@pytest.mark.parametrize("lr", [1.0, 3.0])
def test_manifold_adamw_moves_lr_ulps_under_a_constant_gradient(lr):
    """|d| = 1, every weight steps toward -inf by lr ULPs. lr 1: exactly one code for every value off a
    power of two. lr 3: exactly three codes wherever the move stays within the binade or ends on its
    power of two (mantissa field m >= 3 toward zero, m <= 5 away from it); elsewhere the spacing
    changes mid-step."""
    values = e4m3_interior_values()
    w = torch.nn.Parameter(values.clone())
    opt = ManifoldAdamW([w], lr=lr, weight_decay=0.0, quant_info=lambda p: (E4M3, 1.0))
    w.grad = torch.ones_like(values)
    opt.step()
    moved = e4m3_ordinal(values) - e4m3_ordinal(w.detach())
    if lr == 1.0:
        assert np.all(moved == 1)
    else:
        mantissa = values.numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8) & 0x7
        normal = values.abs().numpy() >= 2.0**-6
        inside = normal & np.where(values.numpy() > 0, mantissa >= 3, mantissa <= 5)
        assert inside.sum() > 50 and np.all(moved[inside] == 3)


def test_manifold_adamw_from_a_power_of_two_toward_zero_moves_two_codes():
    """S at a power of two is the spacing above it; the one below is half as wide (documented)."""
    w = torch.nn.Parameter(torch.tensor([1.0, 0.5, -2.0]))
    opt = ManifoldAdamW([w], lr=1.0, weight_decay=0.0, quant_info=lambda p: (E4M3, 1.0))
    before = e4m3_ordinal(w.detach().clone())
    w.grad = torch.tensor([1.0, 1.0, -1.0])
    opt.step()
    assert (before - e4m3_ordinal(w.detach())).tolist() == [2, 2, -2]


@pytest.mark.parametrize("lr", [1.0, 3.0])
def test_grid_optim_moves_lr_rungs_under_a_constant_gradient(lr):
    values = e4m3_interior_values()
    values = values[values >= -352]  # three rungs of room below each: -384, -416, -448 is the table's end
    w = torch.nn.Parameter(values.clone())
    opt = GridOptim([{"params": [w], "format": E4M3}], lr=lr, seed=0)
    w.grad = torch.ones_like(values)
    opt.step()
    moved = e4m3_ordinal(values) - e4m3_ordinal(w.detach())
    # crossing zero, the grid has one zero (ordinal 0) where the two signs of ml_dtypes meet: no gap
    assert np.all(moved == lr)


def test_grid_optim_fractional_lr_moves_lr_rungs_on_average():
    n = 20000
    w = torch.nn.Parameter(torch.full((n,), 1.25))
    opt = GridOptim([{"params": [w], "format": E4M3}], lr=0.3, seed=0)
    w.grad = torch.ones(n)
    opt.step()
    moved = e4m3_ordinal(torch.full((n,), 1.25)) - e4m3_ordinal(w.detach())
    assert set(moved.tolist()) == {0, 1}
    assert abs(moved.mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)


@pytest.mark.parametrize("storage", [None, "quantized"])
def test_madam_lr_ln2_moves_one_binade_per_step(storage):
    """On E7M0 (powers of two) a binade is one code: log2|w| falls by exactly 1 per step when the
    gradient has the weight's sign (|d| = 1 at every step of a constant gradient)."""
    w0 = torch.tensor([1.0, -0.25, 8.0, -2.0])
    w = torch.nn.Parameter(w0.clone())
    opt = Madam([w], lr=math.log(2), weight_storage=storage, quant_info=lambda p: (E7M0, 1.0))
    for step in range(1, 4):
        w.grad = torch.sign(w0)
        opt.step()
        expected = w0 * 2.0**-step
        if storage is None:  # float32 exp(-ln 2) is 0.5 to a few float32 ulps
            torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=0)
        else:
            assert torch.equal(w.detach(), expected)


# ---- Madam on hand-computed steps --------------------------------------------------------------------------


def assert_close64(w: torch.Tensor, expected: list[float]) -> None:
    """float32 weights equal to hand-computed float64 values up to float32 rounding."""
    expected64 = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(w.detach().double(), expected64, rtol=1e-6, atol=0)


def test_madam_two_hand_computed_steps():
    """betas[1] = 0.5, lr = 0.1. Step 1: v_hat = g^2, so d = sign(g) = (1, 1, -1).
    Step 2: v = 0.5 v1 + 0.5 g^2 with v1 = 0.5 g1^2, v_hat = v / 0.75:
    w0: g 0.2 then 0.1: v_hat = (0.01 + 0.005) / 0.75 = 0.02, d = 0.1 / sqrt(0.02) = 1/sqrt(2);
    w1: g 0.4 then -0.4: v_hat = 0.16, d = -1 (undoes step 1); w2: g -0.1 then 0: d = 0.
    The update is w exp(-lr sign(w) d)."""
    w = torch.nn.Parameter(torch.tensor([0.5, -2.0, 1.0]))
    opt = Madam([{"params": [w], "format": E4M3}], lr=0.1, betas=(0.9, 0.5), eps=1e-12)
    w.grad = torch.tensor([0.2, 0.4, -0.1])
    opt.step()
    step1 = [0.5 * math.exp(-0.1), -2.0 * math.exp(0.1), 1.0 * math.exp(0.1)]
    assert_close64(w, step1)
    w.grad = torch.tensor([0.1, -0.4, 0.0])
    opt.step()
    step2 = [step1[0] * math.exp(-0.1 / math.sqrt(2)), -2.0, step1[2]]
    assert_close64(w, step2)


def test_madam_clamps_to_three_times_the_initial_rms():
    w = torch.nn.Parameter(torch.tensor([1.0, 0.1]))
    opt = Madam([{"params": [w], "format": E4M3}], lr=1.0)
    w.grad = torch.tensor([-1.0, 0.0])  # w0 grows by e = 2.718 > 3 rms = 3 sqrt((1 + 0.01) / 2) = 2.1319
    opt.step()
    assert_close64(w, [3 * math.sqrt(1.01 / 2), 0.1])


def test_madam_trains_a_small_regression():
    """A 16-32-1 tanh MLP on a teacher: Madam on the quantized-format weights (E4M3, fp32 master),
    AdamW at weight_lr on the biases; the loss falls to well under half in 150 steps."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    y = torch.tanh(x @ torch.randn(16, 1, generator=gen))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    opt = Madam([{"params": weights, "format": E4M3}, {"params": biases}], lr=0.02, weight_lr=0.01)
    loss_fn = torch.nn.functional.mse_loss
    initial = loss_fn(model(x), y).item()
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    final = loss_fn(model(x), y).item()
    assert final < 0.3 * initial, (initial, final)
