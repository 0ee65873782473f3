"""Quantization statistics as metric keys, the full-precision-forward control at eval, and the NaN
trigger of the format-shift controller fed by the quant statistics' typed values."""

import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from altgrad.diagnostics.quant_stats import quant_stats_record
from altgrad.integration import STAT_FIELDS
from altgrad.training.config import load_config
from altgrad.training.trainer import Trainer, train
from tiny_runs import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    *TINY_MODEL,
    "train.max_steps=6",
    "train.warmup_steps=0",
    "train.eval_interval=3",
    "train.eval_batches=2",
    "diagnostics.quant_stats_interval=3",
    "diagnostics.rank_interval=100",
    "logging.progress=false",
]


def _sums(**fields: float) -> list[float]:
    return [fields.get(name, 0.0) for name in STAT_FIELDS]


def test_record_from_hand_made_sums():
    """Fractions are counts over elements, rel_error = sqrt(sum_sq_error / sum_sq); the mean is over the
    layers that quantize a kind, and a kind nobody quantized gets no key."""
    a = torch.tensor(
        [
            _sums(total=10, overflow=1, sum_sq_error=1.0, sum_sq=100.0),
            _sums(total=20, underflow=5, sum_sq_error=4.0, sum_sq=16.0),
            _sums(),
        ]
    )
    b = torch.tensor([_sums(total=10, nonfinite=2, sum_sq_error=9.0, sum_sq=100.0), _sums(), _sums()])
    record = quant_stats_record({"a": a, "b": b})
    assert record["quant/rel_error/a/weight"] == pytest.approx(0.1)
    assert record["quant/rel_error/b/weight"] == pytest.approx(0.3)
    assert record["quant/rel_error/weight"] == pytest.approx(0.2)
    assert record["quant/rel_error/a/activation"] == pytest.approx(0.5)
    assert record["quant/rel_error/activation"] == pytest.approx(0.5)  # b has no activation sums
    assert "quant/rel_error/b/activation" not in record and "quant/rel_error/grad" not in record
    assert record["quant/overflow_frac/a/weight"] == pytest.approx(0.1)
    assert record["quant/underflow_frac/a/activation"] == pytest.approx(0.25)
    assert record["quant/nonfinite_frac/b/weight"] == pytest.approx(0.2)
    assert record["quant/nonfinite_frac/weight"] == pytest.approx(0.1)


@pytest.fixture(scope="module")
def e4m3_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("runs")
    config = load_config(None, [*TINY, f"out_dir={tmp_path}", "name=e4m3"])
    train(config)
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    return config, records


def test_rel_error_keys_on_quant_steps_and_weight_error_matches_ml_dtypes(e4m3_run):
    """The logged weight rel_error of the last step's forward equals an ml_dtypes rounding of the weights
    the forward saw (the final checkpoint's weights are one optimizer step later, so rebuild them)."""
    config, records = e4m3_run
    quant_steps = [r for r in records if "quant/rel_error/weight" in r]
    assert [r["step"] for r in quant_steps] == [3, 6]
    layer = "transformer.h.0.mlp.c_fc"
    for kind in ("weight", "activation", "grad"):
        assert 0 < quant_steps[-1][f"quant/rel_error/{layer}/{kind}"] < 0.2
        assert f"quant/nonfinite_frac/{layer}/{kind}" in quant_steps[-1]
    # a fresh trainer's first forward: its logged weight error against an ml_dtypes rounding at its scale
    fresh = Trainer(load_config(None, [*TINY, f"out_dir={config.out_dir}", "name=fresh"]))
    fresh.layers[layer].collect_stats = True
    fresh.model.train()
    fresh.model(*fresh.sampler.get_batch("train"))
    weights = fresh.layers[layer].weight.detach().double().numpy()
    scale = fresh.layers[layer].weight_scale().double().numpy()
    saturated = np.clip(weights / scale, -448.0, 448.0)  # E4M3's max_finite; the layer saturates
    rounded = saturated.astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale
    expected = math.sqrt(((rounded - weights) ** 2).sum() / (weights**2).sum())
    record = fresh.components["quant_stats"].measure(step=3)
    assert record[f"quant/rel_error/{layer}/weight"] == pytest.approx(expected, rel=1e-5)


def test_val_loss_fp32_forward_is_logged_beside_val_loss(e4m3_run):
    _, records = e4m3_run
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert math.isfinite(r["val_loss_fp32_forward"]) and r["val_loss_fp32_forward"] != r["val_loss"]


def test_nonfinite_weight_triggers_a_format_shift(tmp_path):
    """The quant statistics' typed non-finite fraction of a layer's weight reaches the format shifter: one
    layer with a NaN weight element shifts to the next format (reason "nan"); the other layers do not."""
    config = load_config(None, [*TINY, f"out_dir={tmp_path}", "name=shift", "stability.format_shift=true",
                                "stability.shift_patience=1", "stability.shift_warmup_steps=0",
                                "diagnostics.quant_stats_interval=1"])  # fmt: skip
    trainer = Trainer(config)
    layer = "transformer.h.0.mlp.c_proj"
    with torch.no_grad():
        trainer.layers[layer].weight[0, 0] = float("nan")
    events = []
    trainer.logger.event = lambda step, kind, message, **fields: events.append({"kind": kind, **fields})
    trainer._train_step(1)
    record = {}
    for component in trainer.components.values():
        record |= component.measure(1)
    assert record[f"quant/nonfinite_frac/{layer}/weight"] == pytest.approx(
        1 / trainer.layers[layer].weight.numel()
    )
    trainer.components["format_shift"].on_log(1)
    shifts = [(e["layer"], e["reason"], e["from"], e["to"]) for e in events if e["kind"] == "format_shift"]
    assert shifts == [(layer, "nan", "E4M3", "E3M4")]
    assert trainer.layers[layer].weight_format.name == "E3M4"
