"""The GPT: nanoGPT's module names and initialisation, tied head, causal loss, learning, sampling."""

import math

import pytest
import torch
import torch.nn as nn

from altgrad.training.model import GPT, GPTConfig

VOCAB = 32


def tiny_config(**overrides) -> GPTConfig:
    fields = dict(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    return GPTConfig(**(fields | overrides))


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config())


def test_forward_shapes_and_loss(model):
    idx = torch.randint(VOCAB, (3, 16))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 16, VOCAB)
    assert loss.shape == ()
    logits_only, no_loss = model(idx[:, :5])
    assert logits_only.shape == (3, 5, VOCAB) and no_loss is None


def test_module_names_follow_nanogpt(model):
    blocks = [f"transformer.h.{i}" for i in range(2)]
    matmuls = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    linears = {"lm_head"} | {f"{b}.{m}" for b in blocks for m in matmuls}
    others = {"transformer.wte", "transformer.wpe", "transformer.drop", "transformer.ln_f"}
    others |= {f"{b}.{m}" for b in blocks for m in ("ln_1", "ln_2")}
    modules = dict(model.named_modules())
    assert (linears | others) <= set(modules)
    assert {name for name, m in modules.items() if isinstance(m, nn.Linear)} == linears


def test_lm_head_is_tied_to_wte_and_survives_module_replacement(model):
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_parameters(non_embedding=False) == sum(p.numel() for p in model.parameters())

    replacement = nn.Linear(32, VOCAB, bias=False)  # what module surgery does: new module, same Parameter
    replacement.weight = model.lm_head.weight
    model.lm_head = replacement
    assert model.lm_head.weight is model.transformer.wte.weight


def test_nanogpt_initialisation():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=4, n_embd=128, n_head=4, vocab_size=256))
    c_proj_std = 0.02 / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(c_proj_std, rel=0.1)
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.1)
        elif name.endswith(".bias") and "ln_" not in name:
            assert torch.count_nonzero(p) == 0


def test_num_parameters_leaves_out_position_embeddings(model):
    wpe = model.transformer.wpe.weight.numel()
    assert model.num_parameters() == model.num_parameters(non_embedding=False) - wpe


def test_loss_at_init_is_about_log_vocab(model):
    idx = torch.randint(VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))
    _, loss = model(idx, targets=idx.roll(-1, dims=1))
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=0.1)


def test_attention_is_causal(model):
    idx = torch.randint(VOCAB, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % VOCAB
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_adamw_reduces_the_loss(model):
    idx = torch.randint(VOCAB, (4, 17), generator=torch.Generator().manual_seed(2))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    initial = model(x, y)[1].item()
    for _ in range(15):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model(x, y)[1].item() < 0.7 * initial


def test_generate_extends_and_crops_to_block_size(model):
    model.eval()
    prompt = torch.randint(VOCAB, (2, 20))  # longer than block_size: only the last 16 are fed
    out = model.generate(prompt, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 25)
    assert torch.equal(out[:, :20], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB
    again = model.generate(prompt, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_generate_top_k_1_is_greedy(model):
    model.eval()
    prompt = torch.randint(VOCAB, (1, 4))
    out = model.generate(prompt, max_new_tokens=3, temperature=0.5, top_k=1)
    idx = prompt
    for _ in range(3):
        idx = torch.cat([idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 1, temperature=0.0)
    with pytest.raises(ValueError, match="divisible by n_head"):
        tiny_config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="dropout"):
        tiny_config(dropout=1.0)
