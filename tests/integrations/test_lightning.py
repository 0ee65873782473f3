"""AltGradCallback in Lightning: automatic optimization (the step runs a closure), gradient
accumulation, the logger.

Flips are checked against ``ReferenceCount`` (ml_dtypes codes of weights copied by the test in the
module's own ``optimizer_step``, around Lightning's ``optimizer.step(closure)``).
"""

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")

from lightning.pytorch.loggers import Logger  # noqa: E402

from altgrad.integration import QuantPlan, quantize_model, quantized_layers  # noqa: E402
from altgrad.integrations.lightning import AltGradCallback  # noqa: E402
from integrations.reference import (  # noqa: E402
    ReferenceCount,
    at_amax_scale,
    check_flips,
    tiny_gpt2,
    tiny_llama,
    token_dataset,
)

STEPS, LOG_EVERY, ACCUMULATE = 4, 2, 2


class LitLM(pl.LightningModule):
    """A causal LM trained by Lightning; a ReferenceCount watches each optimizer step."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.reference: ReferenceCount | None = None

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        self.reference.before()
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.reference.after()


class MemoryLogger(Logger):
    """Keeps every (step, metrics) the trainer writes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def fit(module: LitLM, callback: AltGradCallback) -> MemoryLogger:
    logger = MemoryLogger()
    trainer = pl.Trainer(
        max_steps=STEPS,
        accumulate_grad_batches=ACCUMULATE,
        log_every_n_steps=LOG_EVERY,
        logger=logger,
        callbacks=[callback],
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(token_dataset(64), batch_size=4)
    trainer.fit(module, loader)
    return logger


def logged_records(logger: MemoryLogger) -> list[dict]:
    return [metrics for _, metrics in logger.rows if "flips/total" in metrics]


def test_quantized_gpt2_flips_equal_an_independent_count_under_closure_steps():
    module = LitLM(tiny_gpt2())
    quantize_model(module.model, QuantPlan(weight="E4M3", activation="E4M3", grad="E5M2"))
    layers = quantized_layers(module)  # names as the callback sees them: under the LightningModule
    module.reference = ReferenceCount(lambda: {n: (m.weight, m.weight_scale()) for n, m in layers.items()})
    logger = fit(module, AltGradCallback())

    assert len(module.reference.steps) == STEPS  # one count per optimizer step, not per batch
    records = logged_records(logger)
    assert len(records) == STEPS // LOG_EVERY
    for i, record in enumerate(records):
        check_flips(record, module.reference.interval(i * LOG_EVERY + 1, (i + 1) * LOG_EVERY))
        assert "train_loss" in record  # in the row of the module's own step metrics
        assert record["flip_steps"] == LOG_EVERY
    assert sum(record["flips/total"] for record in records) > 0
    keys = ("stall_ratio/mean", "quant/rel_error/weight", "quant/underflow_frac/grad", "effective_rank/mean")
    assert set(keys) <= set(records[-1])


def test_unquantized_llama_with_format_counts_every_weight_matrix_at_its_amax_scale():
    module = LitLM(tiny_llama())
    module.reference = ReferenceCount(at_amax_scale(module))
    records = logged_records(fit(module, AltGradCallback(format="E4M3")))

    assert len(records) == STEPS // LOG_EVERY
    for i, record in enumerate(records):
        check_flips(record, module.reference.interval(i * LOG_EVERY + 1, (i + 1) * LOG_EVERY))
    assert sum(record["flips/total"] for record in records) > 0


def test_counts_above_2_to_the_24_reach_the_logger_exactly(monkeypatch):
    module = LitLM(tiny_llama())
    module.reference = ReferenceCount(at_amax_scale(module))
    callback = AltGradCallback(format="E4M3")
    monkeypatch.setattr(callback.diagnostics, "record", lambda step: {"flips/total": 2**24 + 1})
    records = logged_records(fit(module, callback))

    assert [record["flips/total"] for record in records] == [2**24 + 1] * (STEPS // LOG_EVERY)
