"""Stable and effective rank against numpy's SVD; trend warnings; the model-wide monitor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from altgrad.diagnostics.rank_health import (
    compute_rank_metrics,
    rank_metrics_from_singular_values,
    singular_values,
)
from altgrad.quantization import (
    RankHealthMonitor,
    RankTrendDetector,
    compute_effective_rank,
    compute_stable_rank,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _numpy_ranks(w: torch.Tensor) -> tuple[float, float]:
    """The definitions, on numpy's float64 SVD (an independent reference)."""
    s = np.linalg.svd(w.reshape(w.shape[0], -1).double().numpy(), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float((s**2).sum() / s[0] ** 2), float(np.exp(-(p * np.log(p)).sum()))


# ---- single matrices ----------------------------------------------------------------------------------


def test_identity() -> None:
    assert compute_stable_rank(torch.eye(7)) == pytest.approx(7.0, rel=1e-12)
    assert compute_effective_rank(torch.eye(7)) == pytest.approx(7.0, rel=1e-12)


def test_rank_one() -> None:
    w = torch.outer(torch.randn(20, dtype=torch.float64), torch.randn(9, dtype=torch.float64))
    assert compute_stable_rank(w) == pytest.approx(1.0, abs=1e-12)
    assert compute_effective_rank(w) == pytest.approx(1.0, abs=1e-9)


def test_zero_matrix_has_no_rank() -> None:
    """0/0 is undefined: NaN, never a high rank (it once read as numel) nor a healthy 1."""
    assert math.isnan(compute_stable_rank(torch.zeros(3, 5)))
    assert math.isnan(compute_effective_rank(torch.zeros(3, 5)))


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (16, 3, 3, 3)])
def test_matches_numpy_and_bounds(shape) -> None:
    w = torch.randn(shape)
    stable, effective = _numpy_ranks(w)
    assert compute_stable_rank(w) == pytest.approx(stable, rel=1e-10)
    assert compute_effective_rank(w) == pytest.approx(effective, rel=1e-10)
    k = min(shape[0], math.prod(shape[1:]))
    assert 1.0 <= compute_effective_rank(w) <= k and 1.0 <= compute_stable_rank(w) <= k


def test_transpose_and_dtype_invariance() -> None:
    w = torch.randn(30, 8)
    assert compute_stable_rank(w) == pytest.approx(compute_stable_rank(w.T), rel=1e-12)
    assert compute_effective_rank(w.bfloat16()) == pytest.approx(
        compute_effective_rank(w.bfloat16().T), rel=1e-12
    )


def test_invalid_and_non_finite() -> None:
    with pytest.raises(ValueError, match="2\\+-dim"):
        compute_stable_rank(torch.ones(5))
    w = torch.randn(4, 4)
    w[1, 2] = math.nan
    assert math.isnan(compute_stable_rank(w)) and math.isnan(compute_effective_rank(w))


def test_metrics_from_singular_values_are_batched() -> None:
    s = torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    metrics = rank_metrics_from_singular_values(s)
    assert metrics["stable_rank"].tolist() == pytest.approx([14 / 9, 3.0, math.nan], nan_ok=True)
    assert metrics["effective_rank"][1:].tolist() == pytest.approx([3.0, math.nan], nan_ok=True)
    assert metrics["spectral_norm"].tolist() == [3.0, 1.0, 0.0]


def test_gram_and_svd_singular_values_agree() -> None:
    batch = torch.randn(3, 50, 20, dtype=torch.float64)
    s_svd, s_gram = singular_values(batch, "svd"), singular_values(batch, "gram")
    assert torch.allclose(s_gram, s_svd, rtol=1e-10)
    assert singular_values(batch.mT, "gram").shape == (3, 20)  # tall orientation either way
    with pytest.raises(ValueError, match="method"):
        singular_values(batch, "qr")


# ---- many matrices at once --------------------------------------------------------------------------


def test_compute_rank_metrics_matches_single_matrix_functions() -> None:
    matrices = {
        "a": torch.randn(64, 16), "b": torch.randn(64, 16), "wide": torch.randn(16, 64),
        "low": torch.randn(48, 3) @ torch.randn(3, 24), "eye": torch.eye(10), "zero": torch.zeros(6, 4),
        "conv": torch.randn(8, 2, 3, 3),
    }  # fmt: skip
    for method in ("gram", "svd"):
        ranks = compute_rank_metrics(matrices, method=method)
        assert list(ranks) == list(matrices)
        for name, w in matrices.items():
            stable, effective = compute_stable_rank(w), compute_effective_rank(w)
            assert ranks[name]["stable_rank"] == pytest.approx(stable, rel=1e-9, nan_ok=True), name
            assert ranks[name]["effective_rank"] == pytest.approx(effective, rel=1e-4, nan_ok=True), name
            spectral = float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1).double(), 2))
            assert ranks[name]["spectral_norm"] == pytest.approx(spectral, rel=1e-9), name
    nan = torch.ones(4, 4)
    nan[0, 0] = math.inf
    assert all(math.isnan(v) for v in compute_rank_metrics({"x": nan})["x"].values())


def test_large_matrices_are_row_sampled() -> None:
    w = torch.randn(4000, 8) * torch.linspace(0.5, 2.0, 8)  # stable rank ~ 3.2, effective ~ 7.6
    exact = compute_rank_metrics({"emb": w}, max_matrix_elements=None)["emb"]
    sampled = compute_rank_metrics({"emb": w}, max_matrix_elements=1000)["emb"]  # 125 of 4000 rows
    assert sampled == compute_rank_metrics({"emb": w}, max_matrix_elements=1000)["emb"]  # same rows each time
    assert sampled != exact
    for metric in ("stable_rank", "effective_rank", "spectral_norm"):
        assert sampled[metric] == pytest.approx(exact[metric], rel=0.15)


# ---- RankTrendDetector --------------------------------------------------------------------------------


def test_detector_ema_and_warmup_silence() -> None:
    detector = RankTrendDetector(alpha=0.5, threshold_pct=0.2, window=4)
    assert detector.ema is None and detector.step_count == 0
    assert detector.update(10.0) is None and detector.ema == 10.0
    assert detector.update(1.0) is None  # a huge drop inside the window is silent
    assert detector.update(1.0) is None and detector.update(1.0) is None
    assert detector.ema == pytest.approx(10 / 8 + 1 * 7 / 8) and detector.step_count == 4


def test_detector_warns_on_a_sustained_drop() -> None:
    detector = RankTrendDetector(alpha=0.5, threshold_pct=0.2, window=3)
    assert [detector.update(10.0) for _ in range(6)] == [None] * 6
    assert detector.update(8.0) is None  # EMA 9: 10% down
    message = detector.update(5.0)  # EMA 7: 30% down
    assert message is not None and message.startswith("WARN")
    assert "7" in message and "10" in message and "30.0%" in message
    assert detector.update(5.0) is not None  # still down: still warning
    detector.reset()
    assert detector.ema is None and detector.step_count == 0 and detector.update(1.0) is None


def test_detector_reference_follows_the_best_level_after_warmup() -> None:
    detector = RankTrendDetector(alpha=1.0, threshold_pct=0.2, window=1)
    assert [detector.update(v) for v in (10.0, 20.0, 17.0)] == [None, None, None]
    assert detector.reference == 20.0
    assert detector.update(15.0) is not None  # 25% below the best EMA after warmup


def test_detector_stable_series_and_non_finite() -> None:
    detector = RankTrendDetector(alpha=0.1, threshold_pct=0.2, window=5)
    assert all(detector.update(10.0 + 0.1 * (i % 3)) is None for i in range(50))
    assert detector.update(math.nan).startswith("WARN") and math.isfinite(detector.ema)
    with pytest.raises(ValueError, match="threshold_pct"):
        RankTrendDetector(threshold_pct=20)


# ---- RankHealthMonitor --------------------------------------------------------------------------------


class _TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, 16)
        self.c_attn = nn.Linear(16, 48)
        self.c_proj = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.wte.weight  # tied


def test_compute_layer_ranks_covers_matrices_once() -> None:
    model = _TinyGPT()
    ranks = RankHealthMonitor().compute_layer_ranks(model)
    assert set(ranks) == {"wte.weight", "c_attn.weight", "c_proj.weight"}  # no biases, norms or tied copy
    assert set(ranks["c_attn.weight"]) == {"stable_rank", "effective_rank", "spectral_norm"}
    assert ranks["c_attn.weight"]["stable_rank"] == pytest.approx(compute_stable_rank(model.c_attn.weight))


def test_critical_layers_and_thresholds() -> None:
    monitor = RankHealthMonitor(warn_threshold=0.3, critical_threshold_multiplier=0.5)
    monitor.compute_layer_ranks(_TinyGPT())
    assert monitor.is_critical("h.0.attn.c_proj.weight") and not monitor.is_critical("c_attn.weight")
    assert monitor.is_critical("wte.weight")  # tied to lm_head
    assert monitor.threshold_for("c_proj.weight") == pytest.approx(0.15)
    assert monitor.threshold_for("c_attn.weight") == pytest.approx(0.3)
    assert RankHealthMonitor(critical_layers=["mlp"]).is_critical("h.1.mlp.c_fc.weight")


def _collapsing(t: float, rows: int = 64, columns: int = 64) -> torch.Tensor:
    """``W_t = (1 - t) R + t s_1(R) u v^T``: a random matrix driven toward rank 1 as t goes 0 -> 1."""
    generator = torch.Generator().manual_seed(1)
    random = torch.randn(rows, columns, generator=generator, dtype=torch.float64) / columns**0.5
    u, v = (
        torch.randn(rows, generator=generator, dtype=torch.float64),
        torch.randn(columns, generator=generator, dtype=torch.float64),
    )
    spike = torch.outer(u / u.norm(), v / v.norm()) * torch.linalg.matrix_norm(random, 2)
    return (1 - t) * random + t * spike


def _run_monitor(monitor: RankHealthMonitor, series: list[torch.Tensor]) -> list[list[str]]:
    layer = nn.Linear(series[0].shape[1], series[0].shape[0], bias=False)
    warnings = []
    for w in series:
        layer.weight.data = w.float()
        warnings.append(monitor.check_warnings(monitor.compute_layer_ranks(layer)))
    return warnings


def _numpy_effective_rank(w: torch.Tensor) -> float:
    return _numpy_ranks(w)[1]


def test_collapse_is_warned_once_while_many_directions_remain() -> None:
    ts = [i / 40 for i in range(41)]
    series = [_collapsing(t) for t in ts]
    warnings = _run_monitor(RankHealthMonitor(warmup_checks=1), series)
    warned = [i for i, messages in enumerate(warnings) if messages]
    assert len(warned) == 1 and len(warnings[warned[0]]) == 1  # once, not at every later check
    first = warned[0]
    effective = _numpy_effective_rank(series[first])
    assert 1.0 < 0.25 * 64 * 0.5 < effective < 0.25 * 64  # below the floor, 8+ directions still there
    assert _numpy_effective_rank(series[first - 1]) >= 0.25 * 64  # the first check below the floor
    assert ts[first] < 1.0
    assert "weight effective_rank" in warnings[first][0] and "rank collapse" in warnings[first][0]


def test_healthy_learning_does_not_warn() -> None:
    """A spike grows on a bulk that stays (stable rank 18 -> 1.1, effective rank 51 -> 28 of 64)."""
    generator = torch.Generator().manual_seed(2)
    bulk = torch.randn(64, 64, generator=generator, dtype=torch.float64) / 8
    spike = torch.outer(
        torch.randn(64, generator=generator, dtype=torch.float64),
        torch.randn(64, generator=generator, dtype=torch.float64),
    )
    series = [bulk + a * spike / spike.norm() * bulk.norm() for a in torch.linspace(0, 3, 30).tolist()]
    assert compute_stable_rank(series[-1]) < 1.2 and compute_effective_rank(series[-1]) > 20
    assert _run_monitor(RankHealthMonitor(warmup_checks=1, ema_alpha=1.0), series) == [[]] * 30


def test_a_layer_built_low_rank_is_not_flagged_but_its_collapse_is() -> None:
    generator = torch.Generator().manual_seed(3)
    left = torch.randn(64, 4, generator=generator, dtype=torch.float64)
    low = left @ torch.randn(4, 64, generator=generator, dtype=torch.float64)  # effective rank ~4 of 64
    monitor = RankHealthMonitor(warmup_checks=1, ema_alpha=1.0)
    assert _run_monitor(monitor, [low] * 10) == [[]] * 10  # below the floor, but it has not fallen
    decayed = low - 0.95 * left[:, 1:] @ torch.linalg.lstsq(left[:, 1:], low).solution  # 3 of 4 fade
    assert _run_monitor(monitor, [decayed])[0][0].startswith("WARN weight effective_rank")


def test_zero_and_non_finite_matrices_warn_at_once() -> None:
    monitor = RankHealthMonitor(warmup_checks=5)
    w = torch.randn(16, 16, dtype=torch.float64)
    nan = w.clone()
    nan[3, 3] = math.nan
    warnings = _run_monitor(monitor, [torch.zeros(16, 16), torch.zeros(16, 16), w, nan, nan, w])
    assert [len(m) for m in warnings] == [1, 0, 0, 1, 0, 0]  # once per episode, warmup or not
    assert "zero matrix" in warnings[0][0] and "NaN or inf" in warnings[3][0]
    assert monitor.last_warnings == []
    ranks = monitor.compute_layer_ranks(
        nn.Linear(4, 4).requires_grad_(False).apply(lambda m: m.weight.zero_())
    )
    assert math.isnan(ranks["weight"]["stable_rank"]) and ranks["weight"]["spectral_norm"] == 0.0


def test_quantized_weight_ranks_match_numpy_on_ml_dtypes_codes() -> None:
    """``*_quantized`` metrics: those of the E4M3 weight the forward uses (ml_dtypes codes, numpy SVD)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from altgrad.integration.quantized_linear import LayerQuantSpec, QuantizedLinear
    from altgrad.quantization import E4M3

    layer = QuantizedLinear(nn.Linear(48, 24, bias=False), LayerQuantSpec(weight=E4M3, scaling="current"))
    layer(torch.randn(2, 48))
    scale = float(layer.weight_scale())
    w, scale32 = layer.weight.detach().numpy(), np.float32(scale)  # the forward's float32 arithmetic
    reference = ((w / scale32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale32).astype(
        np.float64
    )
    s = np.linalg.svd(reference, compute_uv=False)
    p = s / s.sum()
    ranks = RankHealthMonitor().compute_layer_ranks(layer)["weight"]
    assert ranks["stable_rank_quantized"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
    assert ranks["effective_rank_quantized"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert ranks["spectral_norm_quantized"] == pytest.approx(s[0], rel=1e-9)
    assert ranks["stable_rank"] == pytest.approx(_numpy_ranks(layer.weight.detach())[0], rel=1e-9)
    assert ranks["stable_rank_quantized"] != ranks["stable_rank"]


def test_a_quantized_weight_flushed_to_zero_warns() -> None:
    from altgrad.integration.quantized_linear import LayerQuantSpec, QuantizedLinear
    from altgrad.quantization import E4M3

    layer = QuantizedLinear(nn.Linear(16, 16, bias=False), LayerQuantSpec(weight=E4M3, scaling="delayed"))
    layer(torch.randn(2, 16))  # the amax history now holds the weight's amax
    with torch.no_grad():
        layer.weight.mul_(1e-9)  # far below E4M3's smallest subnormal at that scale
    monitor = RankHealthMonitor()
    warnings = monitor.check_warnings(monitor.compute_layer_ranks(layer))
    assert len(warnings) == 1 and "weight the forward uses is the zero matrix" in warnings[0]
    assert monitor.last_warnings[0]["metric"] == "effective_rank_quantized"


def test_unknown_layer_size_is_a_clear_error() -> None:
    monitor = RankHealthMonitor(warmup_checks=0, ema_alpha=1.0)
    with pytest.raises(ValueError, match="max_ranks: min\\(m, n\\) of 'fc'"):
        monitor.check_warnings({"fc": {"effective_rank": 3.0}})
    assert monitor.checks == 0 and monitor.active == set()  # nothing recorded by the refused call
    assert monitor.check_warnings({"fc": {"effective_rank": 30.0}}, max_ranks={"fc": 32}) == []
    assert len(monitor.check_warnings({"fc": {"effective_rank": 3.0}}, max_ranks={"fc": 32})) == 1
    assert (
        monitor.last_warnings[0]["metric"] == "effective_rank"
        and "rank collapse" in monitor.last_warnings[0]["message"]
    )
    nan = monitor.check_warnings({"fc": {"effective_rank": math.nan}})  # NaN without a spectral norm
    assert len(nan) == 1 and "NaN or inf" in nan[0]


def test_monitor_state_dict_round_trip() -> None:
    series = [_collapsing(t) for t in [i / 20 for i in range(21)]]
    expected = _run_monitor(RankHealthMonitor(warmup_checks=2), series)
    first = RankHealthMonitor(warmup_checks=2)
    _run_monitor(first, series[:15])
    resumed = RankHealthMonitor(warmup_checks=2)
    resumed.load_state_dict(first.state_dict())
    assert _run_monitor(resumed, series[15:]) == expected[15:]
    assert any(expected) and resumed.checks == len(series)


def test_monitor_should_check_and_validation() -> None:
    monitor = RankHealthMonitor(log_interval=50)
    assert monitor.should_check(100) and not monitor.should_check(101)
    with pytest.raises(ValueError, match="warn_threshold"):
        RankHealthMonitor(warn_threshold=30)
    with pytest.raises(ValueError, match="collapse_floor"):
        RankHealthMonitor(collapse_floor=2)


def _train_toy_mlp(weight_decay: float, steps: int = 80) -> list[tuple[int, str, dict[str, float]]]:
    """An MLP fitting a rank-1 map with AdamW; the monitor every 10 steps: (step, warned layer, its ranks)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    u, v = torch.randn(32, 1), torch.randn(1, 8)
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=1e-2, weight_decay=weight_decay)
    monitor = RankHealthMonitor(log_interval=10, warmup_checks=3)
    warned = []
    for step in range(1, steps + 1):
        x = torch.randn(128, 32)
        loss = ((mlp(x) - (x @ u) @ v) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor.should_check(step):
            ranks = monitor.compute_layer_ranks(mlp)
            monitor.check_warnings(ranks)
            warned += [(step, w["layer"], ranks[w["layer"]]) for w in monitor.last_warnings]
    return warned


def test_a_toy_mlp_driven_toward_rank_one_is_warned_early_and_a_healthy_one_not() -> None:
    assert _train_toy_mlp(weight_decay=0.1) == []  # learns the map: no warning
    warned = _train_toy_mlp(weight_decay=5.0)  # loss stays ~1; after 600 steps the hidden layer has r_e 2.8
    step, layer, ranks = warned[0]
    assert layer == "2.weight" and step <= 60
    assert 8 < ranks["effective_rank"] < 16 and ranks["stable_rank"] > 1.5  # many directions still there
