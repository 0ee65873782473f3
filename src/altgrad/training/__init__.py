"""Training: model, data, config, optimizers, trainer, checkpoints, loggers, metrics."""
