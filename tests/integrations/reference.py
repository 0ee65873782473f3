"""Tiny random-init causal LMs, token data, and a flip count independent of altgrad (ml_dtypes codes)."""

from collections.abc import Callable

import ml_dtypes
import numpy as np
import torch

VOCAB = 64
TOKENS = 16
E4M3_MAX = 448.0

Weights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (weight, scale)


def tiny_gpt2() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=TOKENS, n_embd=32, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def tiny_llama() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=TOKENS,
    )
    return transformers.LlamaForCausalLM(config)


def token_dataset(samples: int) -> list[dict[str, torch.Tensor]]:
    """Random token windows whose labels are the inputs (the model shifts them)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (samples, TOKENS), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def e4m3_values(weight: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """``Q(w / s)`` in float8_e4m3fn by ml_dtypes (round to nearest even), saturating at +-448, as
    float32 values: comparing values makes -0 and +0 one code."""
    x = weight.detach().float().numpy() / np.float32(scale.detach().float().numpy())
    return np.clip(x, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


class ReferenceCount:
    """Flips and updates of each optimizer step: ``before()`` right before the step, ``after()`` right
    after it (before zero_grad); ``weights()`` gives each layer's weight and the scale of this step."""

    def __init__(self, weights: Callable[[], Weights]) -> None:
        self.weights = weights
        self.steps: list[dict[str, tuple[int, int]]] = []  # per step: layer -> (flips, updates)
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]] = {}

    def before(self) -> None:
        self._before = {name: (w, s, e4m3_values(w, s)) for name, (w, s) in self.weights().items()}

    def after(self) -> None:
        counts = {}
        for name, (w, s, codes) in self._before.items():
            flips = int(np.count_nonzero(e4m3_values(w, s) != codes))
            counts[name] = (flips, int((w.grad.abs() > 1e-10).sum()))
        self.steps.append(counts)

    def interval(self, first: int, last: int) -> dict[str, tuple[int, int]]:
        """Per layer, flips and updates summed over optimizer steps ``first..last`` (1-based)."""
        steps = self.steps[first - 1 : last]
        return {name: tuple(sum(step[name][i] for step in steps) for i in (0, 1)) for name in steps[0]}


def check_flips(record: dict, expected: dict[str, tuple[int, int]]) -> None:
    """The record's flips/ and updates/ keys equal the reference, layer by layer and in total."""
    assert {key.removeprefix("flips/") for key in record if key.startswith("flips/")} == {*expected, "total"}
    for name, (flips, updates) in expected.items():
        assert (record[f"flips/{name}"], record[f"updates/{name}"]) == (flips, updates), name
    assert record["flips/total"] == sum(flips for flips, _ in expected.values())


def at_amax_scale(model: torch.nn.Module) -> Callable[[], Weights]:
    """Every weight matrix of ``model`` by layer name, at ``amax(|W|) / 448`` taken when called."""
    matrices = {n.removesuffix(".weight"): p for n, p in model.named_parameters() if p.ndim >= 2}
    return lambda: {name: (p, p.detach().abs().max() / E4M3_MAX) for name, p in matrices.items()}
