"""Which model a run trains: altgrad's GPT, a Hugging Face causal LM from a config file, or your own.

``build_model(config, vocab_size)`` reads the ``model`` section of a run config:

* ``source: altgrad`` (default): altgrad's nanoGPT-style ``GPT`` with ``n_layer``, ``n_head``,
  ``n_embd``, ``block_size``, ``dropout``, ``bias``.
* ``source: hf``: ``transformers.AutoModelForCausalLM.from_config`` on the local
  ``hf_config`` (a ``config.json`` file, or the folder holding one; randomly initialised, no
  network). Its ``vocab_size`` is set to the tokenizer's, and its position limit
  (``max_position_embeddings``) must be at least ``block_size``; the other shape keys of the
  ``model`` section are not used. Needs the ``hf`` extra.
* ``factory: "package.module:function"``: your own model, built by
  ``function(model_config, vocab_size)`` with ``model_config`` the run's ``model`` section
  (``ModelConfig``: ``block_size``, ``n_layer``, ...) and ``vocab_size`` the tokenizer's. Its
  ``forward(idx)`` takes token ids ``(B, T)`` and returns the logits ``(B, T, vocab_size)``, a
  tuple whose first item is the logits, or an object with a ``.logits`` attribute.

The models are kept in float32 (low precision is simulated by the quantized layers). The trainer
calls every model as ``logits, loss = model(idx, targets)``, the call of altgrad's GPT; for the
other two, ``next_token_interface`` gives the model that call with a forward pre-hook and a
forward hook, so module names, parameters, ``state_dict`` and ``save_pretrained`` stay the model's
own (quant rules and metric keys use its names, e.g. ``transformer.h.0.attn.c_attn`` for GPT-2,
``model.layers.0.self_attn.q_proj`` for Llama). The loss is the mean next-token cross-entropy of
the logits against ``targets``, computed here for every model alike.

Example::

    >>> from altgrad.training.config import load_config
    >>> config = load_config(None, ["model.source=hf", "model.hf_config=tiny-llama/config.json"])
    >>> model = build_model(config, vocab_size=256)  # doctest: +SKIP
    >>> logits, loss = model(idx, targets)           # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import RunConfig
from .model import GPT, GPTConfig


def build_model(config: RunConfig, vocab_size: int) -> nn.Module:
    """The run's model on the CPU in float32, callable as ``logits, loss = model(idx, targets)``."""
    section = config.model
    if section.factory is not None:
        model = load_factory(section.factory)(section, vocab_size)
        if not isinstance(model, nn.Module):
            got = type(model).__name__
            raise ValueError(f"model.factory {section.factory!r} returned a {got}, not an nn.Module")
        return next_token_interface(model.float())
    if section.source == "hf":
        model = hf_causal_lm(section.hf_config, vocab_size, section.block_size)
        return next_token_interface(model, input_name="input_ids", use_cache=False)
    return GPT(
        GPTConfig(
            block_size=section.block_size,
            vocab_size=vocab_size,
            n_layer=section.n_layer,
            n_head=section.n_head,
            n_embd=section.n_embd,
            dropout=section.dropout,
            bias=section.bias,
        )
    )


def load_factory(spec: str) -> Callable[..., Any]:
    """The function named by ``"package.module:function"``; a bad spec is a one-line ValueError."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"model.factory {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"model.factory {spec!r}: cannot import {module_name!r} ({error})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"model.factory {spec!r}: {module_name!r} has no function {attribute!r}")
    return function


def hf_causal_lm(config_path: str | None, vocab_size: int, block_size: int) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` on a local config.json, with the tokenizer's vocab size."""
    if config_path is None:
        raise ValueError("model.source 'hf' needs model.hf_config, a local config.json (or its folder)")
    path = Path(config_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model.hf_config {config_path!r}: no config.json there")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as error:
        raise ImportError("model.source 'hf' needs transformers: pip install 'altgrad[hf]'") from error
    data = json.loads(path.read_text())
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"model.hf_config {config_path!r}: config.json has no 'model_type'")
    data["vocab_size"] = vocab_size
    hf_config = AutoConfig.for_model(model_type, **data)
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and limit < block_size:
        raise ValueError(
            f"model.block_size {block_size} exceeds the {model_type} config's max_position_embeddings {limit}"
        )
    return AutoModelForCausalLM.from_config(hf_config).float()


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, the first item of a tuple, or ``output.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ValueError(f"the model returned {type(output).__name__}; expected logits, a tuple or .logits")


def next_token_interface(model: nn.Module, input_name: str | None = None, **fixed: Any) -> nn.Module:
    """Make ``model(idx, targets)`` return ``(logits, mean next-token cross-entropy or None)``.

    The model's own forward receives ``idx`` positionally, or as the keyword ``input_name``, plus the
    ``fixed`` keywords (e.g. ``input_name="input_ids", use_cache=False`` for a transformers model).
    Hooks do the translation, so the model keeps its class and its names.
    """
    pending: dict[str, torch.Tensor | None] = {}  # the targets, from the pre-hook to the hook

    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs or not 1 <= len(args) <= 2:
            raise ValueError("this model is called as model(idx, targets=None) with positional arguments")
        pending["targets"] = args[1] if len(args) == 2 else None
        if input_name is None:
            return (args[0],), dict(fixed)
        return (), {input_name: args[0], **fixed}

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> tuple:
        targets = pending.pop("targets")
        logits = logits_of(output)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)
    return model
