"""Run settings shared by tests that train a tiny model."""

TINY_MODEL = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "train.batch_size=4",
]
"""A one-layer, 32-wide GPT on batches of 4 x 16 tokens."""

EVERY_DIAGNOSTIC_DUE = [  # the tiny model with every diagnostic due
    *TINY_MODEL,
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.eval_interval=4",
    "train.eval_batches=1",
    "train.grad_clip=1.0",  # grad_norm
    "diagnostics.rank_interval=2",
    "diagnostics.grad_stats_interval=2",
    "diagnostics.quant_stats_interval=2",
    "diagnostics.optimizer_stats_interval=2",
    "checkpoint.interval=100",
    "logging.progress=false",
]
