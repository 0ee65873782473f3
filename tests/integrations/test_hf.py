"""AltGradCallback in a Hugging Face Trainer: its default fused AdamW, gradient accumulation, the logs.

Flips are checked against ``ReferenceCount`` (ml_dtypes codes of weights copied by the test on the
Trainer's own ``on_pre_optimizer_step`` / ``on_optimizer_step`` events), not against altgrad's tracker.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from altgrad.integration import QuantPlan, quantize_model, quantized_layers  # noqa: E402
from altgrad.integrations.hf import AltGradCallback  # noqa: E402
from integrations.reference import (  # noqa: E402
    ReferenceCount,
    at_amax_scale,
    check_flips,
    tiny_gpt2,
    tiny_llama,
    token_dataset,
)

STEPS, LOG_EVERY, ACCUMULATE = 4, 2, 2


class ReferenceCallback(TrainerCallback):
    """Drives a ReferenceCount from the Trainer's optimizer-step events."""

    def __init__(self, reference: ReferenceCount) -> None:
        self.reference = reference

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.reference.before()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.reference.after()


class Sink(TrainerCallback):
    """Stands for a report_to integration: keeps what its on_log was handed."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def hf_trainer(model, tmp_path, callbacks, eval_dataset=None, **overrides) -> Trainer:
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=ACCUMULATE,
        logging_steps=LOG_EVERY,
        learning_rate=3e-3,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    args = TrainingArguments(**(settings | overrides))
    data = token_dataset(64)
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=eval_dataset, callbacks=callbacks)


def training_logs(trainer: Trainer) -> list[dict]:
    return [record for record in trainer.state.log_history if "loss" in record]


def test_quantized_gpt2_flips_equal_an_independent_count_per_optimizer_step(tmp_path):
    model = tiny_gpt2()
    quantize_model(model, QuantPlan(weight="E4M3", activation="E4M3", grad="E5M2"))
    layers = quantized_layers(model)
    reference = ReferenceCount(lambda: {name: (m.weight, m.weight_scale()) for name, m in layers.items()})
    trainer = hf_trainer(model, tmp_path, [AltGradCallback(), ReferenceCallback(reference)])
    trainer.train()

    assert trainer.optimizer.optimizer.defaults["fused"]  # the Trainer's default on this torch: fused AdamW
    assert len(reference.steps) == STEPS  # one count per optimizer step, not per micro-batch
    logs = training_logs(trainer)
    assert [record["step"] for record in logs] == [2, 4]
    for record in logs:
        check_flips(record, reference.interval(record["step"] - LOG_EVERY + 1, record["step"]))
        assert record["flip_steps"] == LOG_EVERY
    assert sum(record["flips/total"] for record in logs) > 0
    assert set(layers) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                           "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "lm_head"}  # fmt: skip
    record = logs[-1]
    for key in (
        "stall_ratio/mean", "predicted_stall_ratio/mean", "update_ulps/lm_head", "drift_flips/total",
        "quant/rel_error/weight", "quant/underflow_frac/grad", "quant/rel_error/lm_head/activation",
        "effective_rank/mean", "stable_rank/transformer.wte.weight",
        "effective_rank_quantized/transformer.h.0.attn.c_attn.weight",
    ):  # fmt: skip
        assert key in record, key
    assert 0 < record["quant/rel_error/weight"] < 0.1


def test_unquantized_llama_with_format_counts_every_weight_matrix_at_its_amax_scale(tmp_path):
    model = tiny_llama()
    reference = ReferenceCount(at_amax_scale(model))
    trainer = hf_trainer(model, tmp_path, [AltGradCallback(format="E4M3"), ReferenceCallback(reference)])
    trainer.train()

    logs = training_logs(trainer)
    for record in logs:
        check_flips(record, reference.interval(record["step"] - LOG_EVERY + 1, record["step"]))
    assert sum(record["flips/total"] for record in logs) > 0
    assert "flips/model.layers.0.self_attn.q_proj" in logs[-1]
    assert not any(key.startswith("quant/") for key in logs[-1])  # nothing quantizes: no quant statistics


def test_add_to_puts_the_keys_in_what_report_to_sinks_see_and_only_in_training_logs(tmp_path):
    model = tiny_gpt2()
    sink = Sink()
    evaluated = dict(eval_strategy="steps", eval_steps=LOG_EVERY)
    trainer = hf_trainer(model, tmp_path, [sink], token_dataset(8), **evaluated)
    AltGradCallback(format="E5M2").add_to(trainer)
    trainer.train()

    with_keys = [logs for logs in sink.logs if "flips/total" in logs]
    assert [logs["loss"] > 0 for logs in with_keys] == [True, True]  # the two training logs
    assert any("eval_loss" in logs for logs in sink.logs)
    assert not any("flips/total" in logs for logs in sink.logs if "loss" not in logs)  # eval, summary


def test_a_model_with_nothing_to_track_is_refused_at_train_begin(tmp_path):
    trainer = hf_trainer(tiny_gpt2(), tmp_path, [AltGradCallback()])
    with pytest.raises(ValueError, match="format: the model has no QuantizedLinear"):
        trainer.train()
    assert torch.is_grad_enabled()
