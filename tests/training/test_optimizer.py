"""Update rules on hand-computed cases, torch parity, state_dict round trips, devices and bad options."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from altgrad.diagnostics.flips import WeightFlipTracker
from altgrad.quantization import E0M7, E4M3, E7M0, get_format
from altgrad.training.optimizer import (
    OPTIMIZERS,
    SGD,
    AdamW,
    GridOptim,
    Madam,
    ManifoldAdamW,
    build_optimizer,
    quant_info_from_model,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


pytestmark = pytest.mark.usefixtures("one_thread")


def param(*values: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


def step_with(opt: torch.optim.Optimizer, p: torch.Tensor, *grad: float):
    p.grad = torch.tensor(grad, dtype=p.dtype).reshape(p.shape)
    return opt.step()


# ---- torch parity ----------------------------------------------------------------------------------------


def _random_run(make, steps=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(4, 3, generator=gen)),
        torch.nn.Parameter(torch.randn(3, generator=gen)),
    ]
    opt = make([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}])
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in params]


def test_adamw_matches_torch_bit_for_bit():
    ours = _random_run(lambda g: AdamW(g, lr=0.01, betas=(0.9, 0.95), eps=1e-8))
    ref = _random_run(lambda g: torch.optim.AdamW(g, lr=0.01, betas=(0.9, 0.95), eps=1e-8, foreach=False))
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


def torch_sgd_with_decoupled_decay(groups, **kwargs):
    """The reference: torch.optim.SGD without its coupled decay, AdamW's ``w (1 - lr wd)`` by hand first."""
    opt = torch.optim.SGD([g | {"weight_decay": 0.0} for g in groups], foreach=False, **kwargs)
    decays, torch_step = [g["weight_decay"] for g in groups], opt.step

    def step():
        with torch.no_grad():
            for group, wd in zip(opt.param_groups, decays, strict=True):
                for p in group["params"]:
                    p.mul_(1 - group["lr"] * wd)
        return torch_step()

    opt.step = step
    return opt


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_bit_for_bit(nesterov):
    ours = _random_run(lambda g: SGD(g, lr=0.05, momentum=0.9, nesterov=nesterov))
    ref = _random_run(lambda g: torch_sgd_with_decoupled_decay(g, lr=0.05, momentum=0.9, nesterov=nesterov))
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [ManifoldAdamW, GridOptim, Madam])
def test_parameters_without_a_format_get_adamw_at_weight_lr(cls):
    """A foreign model's ``model.parameters()``: plain AdamW at ``weight_lr``, whatever ``lr`` says."""
    ours = _random_run(lambda g: cls(g, lr=1.0, weight_lr=0.01, weight_decay=0.1, quant_info=lambda p: None))
    ref = _random_run(lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1, foreach=False))
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [ManifoldAdamW, GridOptim, Madam])
def test_parameters_without_a_format_default_to_weight_lr_1e_3(cls):
    w = param(1.0, -1.0)
    step_with(cls([w], weight_decay=0.0), w, 1.0, -1.0)  # lr left at its grid-unit default
    torch.testing.assert_close(w.detach(), torch.tensor([1.0 - 1e-3, -1.0 + 1e-3]), rtol=0, atol=1e-7)


# ---- ManifoldAdamW ----------------------------------------------------------------------------------------
# With |g| = 1 the first Adam direction m_hat / (sqrt(v_hat) + 1e-8) is +-1 to float32 precision,
# so the first step moves each weight by exactly lr * S(w) with S hand-computed from the format.


def test_ulp_step_e4m3_hand_computed():
    w = param(1.0, 3.0, 0.0, 0.001, -0.2)
    opt = ManifoldAdamW([w], lr=1.0, weight_decay=0.0, quant_info=lambda p: (E4M3, 1.0))
    step_with(opt, w, 1, 1, -1, 1, -1)
    # S: 2^-3 in [1, 2), 2^-2 in [2, 4), subnormal 2^(-6-3) at 0 and 0.001, 2^(-3-3) at 0.2
    expected = torch.tensor([1 - 2**-3, 3 - 2**-2, 2**-9, 0.001 - 2**-9, -0.2 + 2**-6])
    torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-9)


def test_ulp_step_e0m7_uniform_grid():
    w = param(0.5, 0.01, -0.9, 0.0)
    opt = ManifoldAdamW([w], lr=2.0, weight_decay=0.0, quant_info=lambda p: (E0M7, 1.0))
    step_with(opt, w, 1, -1, 1, 1)
    expected = torch.tensor([0.5, 0.01, -0.9, 0.0]) - 2 / 128 * torch.tensor([1.0, -1.0, 1.0, 1.0])
    torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-9)


def test_ulp_step_e7m0_powers_of_two():
    w = param(1.0, 3.0, 0.3, -6.0)
    opt = ManifoldAdamW([w], lr=0.5, weight_decay=0.0, quant_info=lambda p: (E7M0, 1.0))
    step_with(opt, w, 1, 1, 1, 1)
    # S = 2^floor(log2|w|): 1, 2, 0.25, 4  -> moves of 0.5, 1, 0.125, 2
    torch.testing.assert_close(w.detach(), torch.tensor([0.5, 2.0, 0.175, -8.0]), rtol=1e-6, atol=0)


def test_ulp_step_per_channel_scale():
    w = torch.nn.Parameter(torch.tensor([[0.5, -0.25], [0.5, -0.25]]))
    scale = torch.tensor([[1.0], [8.0]])
    opt = ManifoldAdamW([w], lr=1.0, weight_decay=0.0, quant_info=lambda p: (E0M7, scale))
    step_with(opt, w, 1, 1, 1, 1)
    spacing = torch.tensor([[1 / 128], [8 / 128]])
    torch.testing.assert_close(
        w.detach(), torch.tensor([[0.5, -0.25], [0.5, -0.25]]) - spacing, rtol=1e-6, atol=0
    )


def test_grad_scale_first_step_hand_computed():
    w = param(1.0, 0.001)
    eps, lr = 1e-8, 0.01
    opt = ManifoldAdamW(
        [w], lr=lr, eps=eps, weight_decay=0.0, mode="grad_scale", quant_info=lambda p: (E4M3, 1.0)
    )
    step_with(opt, w, 1e-3, 1e-3)
    spacing = torch.tensor([2**-3, 2**-9], dtype=torch.float64)
    move = lr * spacing * 1e-3 / (spacing * 1e-3 + eps)  # m_hat = S g, sqrt(v_hat) = S |g|
    torch.testing.assert_close(w.detach().double(), torch.tensor([1.0, 0.001], dtype=torch.float64) - move,
                               rtol=1e-6, atol=1e-9)  # fmt: skip


def test_grad_scale_with_constant_spacing_is_adam_with_eps_over_s():
    """The module docstring's claim: m'/(sqrt(v')+eps) = m/(sqrt(v)+eps/S) while S is constant."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.tensor([1.3, -0.7, 0.02, 0.3])  # moves of <= 5e-3 keep every S constant
    w = torch.nn.Parameter(w0.clone())
    eps, lr, (b1, b2) = 1e-6, 1e-3, (0.9, 0.99)
    opt = ManifoldAdamW([w], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0, mode="grad_scale",
                        quant_info=lambda p: (E4M3, 1.0))  # fmt: skip
    spacing = torch.tensor([2**-3, 2**-4, 2**-9, 2**-5], dtype=torch.float64)
    ref, m, v = w0.double(), torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for t in range(1, 6):
        g = torch.randn(4, generator=gen) * 1e-4
        w.grad = g.clone()
        opt.step()
        m, v = b1 * m + (1 - b1) * g.double(), b2 * v + (1 - b2) * g.double() ** 2
        ref = ref - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps / spacing)
    torch.testing.assert_close(w.detach().double(), ref, rtol=0, atol=5e-7)  # float32 rounding of w
    plain_adam_move = 5 * lr  # |m_hat / sqrt(v_hat)| <= ~1: eps / S = 5e-4 visibly shrinks the 0.02 weight's
    assert abs(w[2].item() - 0.02) < 0.5 * plain_adam_move


def test_group_format_wins_over_quant_info():
    w = param(0.5)
    opt = ManifoldAdamW([{"params": [w], "format": "E0M7", "scale": 2.0}], lr=1.0, weight_decay=0.0,
                        quant_info=lambda p: (E7M0, 1.0))  # fmt: skip
    step_with(opt, w, 1)
    assert w.item() == pytest.approx(0.5 - 2 / 128, rel=1e-6)
    assert opt.param_groups[0]["format"] == "E0M7"  # stored by name: state_dict-safe
    assert opt.quantization_of(w) == (E0M7, 2.0)


def test_bit_position_counts_grid_steps():
    w = param(1.25, -2.5)  # mid-binade: S = 2^-3 and 2^-2 throughout
    opt = ManifoldAdamW(
        [w], lr=0.25, weight_decay=0.0, track_bit_position=True, quant_info=lambda p: (E4M3, 1.0)
    )
    for _ in range(3):
        step_with(opt, w, 1, -1)
    torch.testing.assert_close(opt.state[w]["bit_position"], torch.tensor([-0.75, 0.75]), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        w.detach(), torch.tensor([1.25 - 0.75 / 8, -2.5 + 0.75 / 4]), rtol=1e-6, atol=0
    )


def test_quantized_storage_with_sub_half_ulp_steps_never_moves():
    """lr = 0.4 ULP with the weights stored in their own format at nearest: a stall by construction."""
    w = param(1.25, -2.5)
    opt = ManifoldAdamW([w], lr=0.4, weight_decay=0.0, track_bit_position=True, weight_storage="quantized",
                        quant_info=lambda p: (E4M3, 1.0))  # fmt: skip
    for _ in range(5):
        step_with(opt, w, 1, -1)
    assert w.detach().tolist() == [1.25, -2.5]
    assert opt.state[w]["bit_position"].tolist() == [0.0, 0.0]


def test_quant_info_from_model_reads_duck_typed_layers():
    class Layer(torch.nn.Module):
        def __init__(self, fmt):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(2, 2))
            self.bias = torch.nn.Parameter(torch.zeros(2))
            self.weight_format = fmt

        def weight_scale(self):
            return torch.tensor(0.5)

    model = torch.nn.Sequential(Layer(E4M3), Layer(None))
    info = quant_info_from_model(model)
    fmt, scale = info(model[0].weight)
    assert fmt is E4M3 and float(scale) == 0.5
    assert info(model[0].bias) is None and info(model[1].weight) is None


# ---- GridOptim -----------------------------------------------------------------------------------------


# With |g| = 1 the first Adam direction d = m_hat / (sqrt(v_hat) + 1e-8) is +-1 in float32: a step of
# lr d rungs is the whole number lr (no random draw) wherever lr is an integer.


def grid(p, fmt, **kw):
    return GridOptim([{"params": [p], "format": fmt}], **{"lr": 1.0, "seed": 0, **kw})


def tracked_step(opt, p, fmt, *grad: float) -> tuple[int, int]:
    """One step of ``opt`` with ``grad``: (codes changed, elements updated), counted by the flip tracker."""
    tracker = WeightFlipTracker()
    p.grad = torch.tensor(grad, dtype=p.dtype).reshape(p.shape)
    tracker.snapshot_pre_step("w", p, fmt, 1.0, grad=p.grad)
    assert opt.step() is None  # step returns the (absent) closure loss
    tracker.record_post_step("w", p, fmt, 1.0)
    return tracker.get_flip_counts()["w"], tracker.get_update_counts()["w"]


def test_grid_e0m7_moves_whole_rungs():
    w = param(0.5, 0.5, 1 / 128)
    opt = grid(w, E0M7, lr=2.0)
    assert tracked_step(opt, w, E0M7, 1.0, -1.0, 1.0) == (3, 3)
    assert (w.detach() * 128).tolist() == [62.0, 66.0, -1.0]  # crosses zero through the single 0


def test_grid_step_returns_the_closure_loss():
    w = param(0.5)
    opt = grid(w, E0M7)

    def closure():
        w.grad = torch.ones(1)
        return torch.tensor(3.0)

    assert opt.step(closure).item() == 3.0 and w.item() * 128 == 63.0


def test_grid_e7m0_walks_powers_of_two():
    w = param(1.0, 1.0, 1.0, 0.25)
    opt = grid(w, E7M0)
    assert tracked_step(opt, w, E7M0, 1.0, -1.0, 0.0, -1.0) == (3, 3)  # rungs 1, -1, 0 (d = 0/(0 + eps)), -1
    assert w.detach().tolist() == [0.5, 2.0, 1.0, 0.5]


def test_grid_clamps_at_table_ends_and_clips_rungs():
    w = param(448.0, -448.0, 0.0)
    opt = grid(w, E4M3, lr=10.0, rung_clip=4.0)
    assert tracked_step(opt, w, E4M3, -1.0, 1.0, 1.0)[0] == 1  # lr d = +-10 rungs, clipped to +-4
    assert w.detach().tolist() == [448.0, -448.0, -4 * 2**-9]  # 4 subnormal rungs below zero


def test_grid_follows_adams_direction():
    """betas (0.5, 0.5): step 1 g = -1 gives d = -1; step 2 g = +1 gives m_hat = 0.25/0.75 = 1/3 and
    v_hat = 0.75/0.75 = 1, so d = 1/3: one rung down with probability 1/3."""
    w = torch.nn.Parameter(torch.zeros(30000))
    opt = grid(w, E0M7, betas=(0.5, 0.5))
    step_with(opt, w, *([-1.0] * 30000))
    assert torch.all(w.detach() == 1 / 128)
    step_with(opt, w, *([1.0] * 30000))
    moved = (w.detach() == 0).float().mean().item()
    assert set((w.detach() * 128).tolist()) == {0.0, 1.0}
    assert abs(moved - 1 / 3) < 0.014  # 5 sigma of a Bernoulli(1/3) mean over 30000


def test_grid_stochastic_rounding_is_unbiased_and_seeded():
    def run(seed):
        w = torch.nn.Parameter(torch.full((20000,), 0.5))
        opt = grid(w, E0M7, lr=0.25, seed=seed)
        counts = tracked_step(opt, w, E0M7, *([1.0] * 20000))  # d = 1: 0.25 rung
        return w.detach().clone(), counts

    a, (flips, updates) = run(0)
    moved = (a != 0.5).float().mean().item()
    assert abs(moved - 0.25) < 0.015  # 5 sigma of a Bernoulli(0.25) mean over 20000
    assert flips == int((a != 0.5).sum()) and updates == 20000
    assert torch.equal(a, run(0)[0]) and not torch.equal(a, run(1)[0])


def test_grid_weight_decay_in_rungs():
    w = param(0.5)  # E0M7: S = 1/128, so weight_lr wd w / S = (1/32)(0.5)(128) = 2 rungs
    step_with(grid(w, E0M7, weight_decay=0.5, weight_lr=1 / 16), w, 0.0)
    assert w.item() * 128 == 62.0


def test_grid_projects_off_grid_master_weights_and_keeps_nan():
    w = param(0.503, float("nan"))
    opt = grid(w, E0M7)
    assert tracked_step(opt, w, E0M7, 0.0, 0.0) == (0, 0)  # projected to the nearest code: no flip
    assert w[0].item() == 0.5 and torch.isnan(w[1])


def test_grid_per_channel_scale():
    w = torch.nn.Parameter(torch.tensor([[0.5], [4.0]]))
    scale = torch.tensor([[1.0], [8.0]])
    step_with(GridOptim([w], lr=1.0, quant_info=lambda p: (E0M7, scale)), w, 1.0, 1.0)
    assert w.detach().flatten().tolist() == [0.5 - 1 / 128, 4.0 - 8 / 128]


# ---- state_dict round trips: a resumed optimizer takes the identical next step --------------------------


def _storage_sr(ps):
    return AdamW(ps, lr=1e-3, weight_storage="bfloat16", storage_rounding="stochastic", seed=1)


ROUND_TRIP = {
    "adamw": lambda ps: AdamW(ps, lr=0.01),
    "adamw_bf16_sr": _storage_sr,
    "adamw_bf16_kahan": lambda ps: AdamW(ps, lr=1e-3, weight_storage="bfloat16", kahan=True),
    "sgd_e4m3_sr_kahan": lambda ps: SGD(ps, lr=0.01, momentum=0.9, weight_storage="E4M3",
                                        storage_rounding="stochastic", kahan=True, seed=2),
    "manifold_ulp": lambda ps: ManifoldAdamW(ps, lr=0.5, weight_decay=0.1, track_bit_position=True,
                                             quant_info=lambda p: (E4M3, torch.tensor(0.05))),
    "manifold_grad_scale": lambda ps: ManifoldAdamW(ps, lr=0.01, mode="grad_scale",
                                                    quant_info=lambda p: (E0M7, torch.tensor(0.5))),
    "grid": lambda ps: GridOptim(ps, lr=0.3, seed=3, weight_decay=0.1, quant_info=lambda p: (E4M3, 0.05)),
    "madam": lambda ps: Madam(ps, lr=0.05, weight_decay=0.1, quant_info=lambda p: (E4M3, 0.05)),
    "madam_e7m0_sr_kahan": lambda ps: Madam(ps, lr=0.05, weight_storage="quantized", kahan=True, seed=4,
                                            storage_rounding="stochastic", quant_info=lambda p: (E7M0, 0.05)),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(ROUND_TRIP))
def test_state_dict_round_trip_gives_identical_next_step(kind):
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 8, generator=gen) * 0.1)
    grads = [torch.randn(8, 8, generator=gen) * 0.1 for _ in range(5)]
    opt_a = ROUND_TRIP[kind]([a])
    for g in grads[:3]:
        a.grad = g.clone()
        opt_a.step()
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors, numbers and strings only

    b = torch.nn.Parameter(a.detach().clone())
    opt_b = ROUND_TRIP[kind]([b])
    if hasattr(opt_b, "_seed") and opt_b._seed is not None:
        opt_b._seed += 100  # a different fresh generator: only the loaded state can make it agree
    opt_b.load_state_dict(saved)
    for g in grads[3:]:
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
        assert torch.equal(a.detach(), b.detach())
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]


# ---- devices ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_cpu_step_keeps_state_on_param_device_and_dtype(name):
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = build_optimizer(name, [w], lr=0.1, quant_info=lambda p: (E4M3, torch.tensor(0.01)), seed=0)
    w.grad = torch.randn(4, 4)
    opt.step()
    for value in opt.state[w].values():
        if isinstance(value, torch.Tensor):
            assert value.device == w.device


@CUDA
@pytest.mark.parametrize("name", ["adamw", "manifold_adamw", "sgd"])
def test_cuda_matches_cpu(name):
    w_cpu = torch.nn.Parameter(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    w_gpu = torch.nn.Parameter(w_cpu.detach().cuda())
    grad = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    for w in (w_cpu, w_gpu):
        opt = build_optimizer(name, [w], lr=0.1, weight_decay=0.1,
                              quant_info=lambda p: (E4M3, torch.tensor(0.02, device=p.device)))  # fmt: skip
        for _ in range(3):
            w.grad = grad.to(w.device)
            opt.step()
    torch.testing.assert_close(w_gpu.detach().cpu(), w_cpu.detach(), rtol=1e-5, atol=1e-6)


@CUDA
def test_cuda_grid_and_stochastic_storage_run_on_device_generators():
    w = torch.nn.Parameter(torch.randn(64, device="cuda") * 0.1)
    for opt in (
        GridOptim([w], lr=0.5, seed=0, quant_info=lambda p: (E4M3, 0.01)),
        AdamW([w], lr=1e-3, weight_storage="bfloat16", storage_rounding="stochastic", seed=0),
    ):
        w.grad = torch.randn(64, device="cuda")
        opt.step()
        assert w.device.type == "cuda"
        state = opt.state_dict()
        assert list(state["generators"]) == ["cuda:0"]
        opt.load_state_dict(copy.deepcopy(state))


# ---- build_optimizer and bad options ---------------------------------------------------------------------


def test_build_optimizer_names_and_options():
    ps = lambda: [torch.nn.Parameter(torch.ones(2))]  # noqa: E731
    everything = dict(
        momentum=0.9,
        mode="ulp_step",
        rung_clip=4.0,
        weight_lr=1e-3,
        weight_storage=None,
        storage_rounding="nearest",
        kahan=False,
        seed=0,
    )  # what a trainer passes, always
    classes = {"adamw": AdamW, "manifold_adamw": ManifoldAdamW, "grid": GridOptim, "sgd": SGD, "madam": Madam}
    for name, cls in classes.items():
        opt = build_optimizer(name, ps(), lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **everything)
        assert type(opt) is cls
    opt = build_optimizer("manifold_adamw", ps(), lr=0.5, mode="grad_scale", track_bit_position=True)
    assert opt.param_groups[0]["mode"] == "grad_scale" and opt.param_groups[0]["track_bit_position"]
    opt = build_optimizer("sgd", ps(), lr=0.1, weight_storage=get_format("bfloat16"), kahan=True)
    assert opt.param_groups[0]["weight_storage"] == "bfloat16" and opt.param_groups[0]["momentum"] == 0.9
    opt = build_optimizer("grid", ps(), lr=0.1, betas=(0.5, 0.9), rung_clip=2.0, weight_lr=0.01)
    assert opt.param_groups[0]["rung_clip"] == 2.0 and opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert opt.param_groups[0]["weight_lr"] == 0.01
    opt = build_optimizer("grid", ps(), lr=0.1, weight_storage="quantized", storage_rounding="stochastic")
    # accepted because grid stores its weights on the grid, stochastically rounded, anyway: nothing to keep
    assert type(opt) is GridOptim and "weight_storage" not in opt.param_groups[0]
    opt = build_optimizer("madam", ps(), lr=0.1, weight_storage="quantized", kahan=True)
    assert opt.param_groups[0]["weight_storage"] == "quantized" and opt.param_groups[0]["kahan"]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: build_optimizer("adam", ps, lr=0.1), "adamw, manifold_adamw, grid, sgd, madam"),
        (lambda ps: build_optimizer("sgd", ps, lr=0.1, momentun=0.9), "unknown \\['momentun'\\]"),
        (lambda ps: build_optimizer("grid", ps, lr=0.1, weight_storage="bfloat16"), "none or 'quantized'"),
        (lambda ps: build_optimizer("grid", ps, lr=0.1, weight_storage="quantized"), "rounding: stoch"),
        (lambda ps: build_optimizer("grid", ps, lr=0.1, kahan=True), "kahan: the grid optimizer"),
        (lambda ps: build_optimizer("sgd", ps, lr=0.1, fallback_lr=0.1), "unknown \\['fallback_lr'\\]"),
        (lambda ps: ManifoldAdamW(ps, weight_lr=-1.0), "weight_lr: must be"),
        (lambda ps: GridOptim([{"params": ps, "weight_lr": "1e-3"}]), "weight_lr: must be"),
        (lambda ps: Madam(ps, max_scale=0.0), "max_scale: must be"),
        (lambda ps: Madam(ps, grad_bound=-1.0), "grad_bound: must be"),
        (lambda ps: ManifoldAdamW(ps, mode="ulp"), "mode: 'ulp' is not one of"),
        (lambda ps: AdamW(ps, weight_storage="E9M9X"), "weight_storage: unknown format"),
        (lambda ps: AdamW(ps, weight_storage="bfloat16", storage_rounding="up"), "storage_rounding: 'up'"),
        (lambda ps: AdamW(ps, kahan=True), "need weight_storage"),
        (lambda ps: SGD(ps, storage_rounding="stochastic"), "need weight_storage"),
        (lambda ps: AdamW(ps, lr=-1.0), "lr: must be"),
        (lambda ps: AdamW(ps, betas=(0.9, 1.0)), "betas"),
        (lambda ps: AdamW(ps, eps=0.0), "eps"),
        (lambda ps: AdamW(ps, weight_decay=-0.1), "weight_decay"),
        (lambda ps: SGD(ps, momentum=1.5), "momentum"),
        (lambda ps: SGD(ps, nesterov=True), "nesterov"),
        (lambda ps: GridOptim(ps, rung_clip=0.0), "rung_clip"),
        (
            lambda ps: GridOptim([{"params": ps, "weight_storage": "bfloat16"}]),
            "keeps its weights on the grid",
        ),
        (lambda ps: GridOptim([{"params": ps, "format": "E4M3", "scale": 0.0}]), "scale: must be"),
        (lambda ps: GridOptim([{"params": ps, "format": "E4M4X"}]), "unknown format"),
        (lambda ps: AdamW(ps, quant_info="E4M3"), "quant_info: must be callable"),
        (lambda ps: AdamW(ps, seed=1.5), "seed"),
    ],
)
def test_bad_options_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.ones(2))])


def test_rejected_param_group_leaves_optimizer_unchanged():
    opt = AdamW([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "betas": (2.0, 0.9)})
    assert len(opt.param_groups) == 1


@CUDA
@pytest.mark.parametrize("kind", list(ROUND_TRIP))
def test_cuda_step_never_synchronizes(kind):
    import warnings

    w = torch.nn.Parameter(torch.randn(32, 32, device="cuda") * 0.1)
    opt = ROUND_TRIP[kind]([w])
    for value in opt.param_groups[0].values():
        assert not isinstance(value, torch.Tensor)
    w.grad = torch.randn(32, 32, device="cuda")
    opt.step()  # the first step creates state and the seeded device generator
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(2):
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not [str(c.message) for c in caught if "synchroniz" in str(c.message)]
