"""TrainingDiagnostics on a hand-written loop: what a record holds and which forwards it counts."""

import numpy as np
import pytest
import torch

from altgrad.integration import QuantPlan, quantize_model
from altgrad.integrations import TrainingDiagnostics
from integrations.reference import e4m3_values


def quantized_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    quantize_model(model, QuantPlan(weight="E4M3", activation="E4M3"))
    return model


def test_quant_statistics_count_only_the_training_forwards_and_flip_keys_need_a_step():
    model = quantized_mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    diagnostics = TrainingDiagnostics()
    diagnostics.attach(model, [optimizer])
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))

    diagnostics.collect_quant_stats(True)
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    diagnostics.collect_quant_stats(False)
    with torch.no_grad():  # an evaluation forward far outside the delayed scale: it would overflow
        model.eval()(1000 * x)
    record = diagnostics.record(step=1)

    assert record["quant/overflow_frac/activation"] == 0.0
    scale = x.abs().max() / 448  # the first forward of delayed scaling: this call's amax
    reference = np.linalg.norm(e4m3_values(x, scale) * scale.numpy() - x.numpy()) / np.linalg.norm(x.numpy())
    assert record["quant/rel_error/0/activation"] == pytest.approx(reference, rel=1e-6)
    assert {"flips/0", "flips/2", "effective_rank/0.weight", "stable_rank/mean"} <= set(record)

    again = diagnostics.record(step=1)  # no optimizer step and no training forward since the last record
    assert not any(key.startswith(("flips/", "stall_ratio/", "quant/")) for key in again)
    assert "effective_rank/mean" in again


def test_record_before_attach_and_detach_stops_counting():
    model = quantized_mlp()
    diagnostics = TrainingDiagnostics()
    with pytest.raises(RuntimeError, match="attach"):
        diagnostics.record(step=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    diagnostics.attach(model, [optimizer])
    diagnostics.detach()
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    assert diagnostics.tracker.get_flip_counts() == {}
