"""Runs on models other than altgrad's GPT: a transformers config file, a factory, an HF tokenizer.

Everything is local: a tiny BPE tokenizer trained here on a few lines, tiny GPT-2 / Llama configs
written here, random init; no network (HF_HUB_OFFLINE=1 in make test).
"""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from altgrad.cli import main  # noqa: E402
from altgrad.training.config import ConfigError, load_config  # noqa: E402
from altgrad.training.data import load_data, tokenizer_from_state  # noqa: E402
from altgrad.training.models import build_model, load_factory, logits_of  # noqa: E402
from altgrad.training.trainer import Trainer, resume, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LINES = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
]


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    """A text corpus, a BPE tokenizer folder trained on it, and GPT-2 and Llama config.json files."""
    root = tmp_path_factory.mktemp("local")
    text = "\n".join(LINES * 40)
    (root / "corpus.txt").write_text(text)
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(LINES, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(root / "tokenizer")
    transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2).save_pretrained(root / "gpt2")
    llama = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    llama.save_pretrained(root / "llama")
    (root / "factories.py").write_text(FACTORY_MODULE)
    return root


FACTORY_MODULE = """
import torch.nn as nn

class TinyLM(nn.Module):
    def __init__(self, vocab_size, width):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, idx):
        return self.head(self.hidden(self.embed(idx)).relu())

def tiny_lm(model_config, vocab_size):
    return TinyLM(vocab_size, model_config.n_embd)

def not_a_model(model_config, vocab_size):
    return "a string"
"""


def run_overrides(root, tmp_path, *extra):
    return [
        f"out_dir={tmp_path}",
        "data.source=text",
        f"data.path={root / 'corpus.txt'}",
        "data.tokenizer=hf",
        f"data.hf_tokenizer={root / 'tokenizer'}",
        "model.block_size=16",
        "model.n_embd=32",
        "model.n_head=2",
        "train.batch_size=4",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.eval_interval=2",
        "train.eval_batches=1",
        "diagnostics.rank_interval=2",
        "diagnostics.quant_stats_interval=2",
        "checkpoint.interval=2",
        "logging.progress=false",
        *extra,
    ]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_hf_tokenizer_round_trips_and_rebuilds_from_its_state(local_files):
    data = load_data(
        source="text", path=local_files / "corpus.txt", tokenizer="hf", hf_tokenizer=local_files / "tokenizer"
    )
    reference = transformers.AutoTokenizer.from_pretrained(str(local_files / "tokenizer"))
    assert data.tokenizer.vocab_size == len(reference) > 256
    ids = data.tokenizer.encode(LINES[0])
    assert ids == reference.encode(LINES[0], add_special_tokens=False)
    assert data.tokenizer.decode(ids) == LINES[0]
    rebuilt = tokenizer_from_state(data.tokenizer.state())
    assert rebuilt.state() == data.tokenizer.state() and rebuilt.encode(LINES[1]) == data.tokenizer.encode(
        LINES[1]
    )


def test_hf_tokenizer_needs_a_local_folder(tmp_path):
    with pytest.raises(ValueError, match="needs hf_tokenizer"):
        load_data(source="text", path=__file__, tokenizer="hf")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_data(source="text", path=__file__, tokenizer="hf", hf_tokenizer=tmp_path / "missing")


def gpt2_config(root, out_dir, name):
    hf_config = f"model.hf_config={root / 'gpt2' / 'config.json'}"
    return load_config(None, run_overrides(root, out_dir, f"name={name}", "model.source=hf", hf_config))


@pytest.fixture(scope="module")
def gpt2_run(local_files, tmp_path_factory):
    config = gpt2_config(local_files, tmp_path_factory.mktemp("runs"), "gpt2")
    return config, train(config)


def test_gpt2_from_a_config_file_trains_with_every_diagnostic(local_files, gpt2_run):
    config, summary = gpt2_run
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["final_val_loss"])
    records = read_jsonl(config.run_dir / "metrics.jsonl")
    layer = "transformer.h.0.attn.c_attn"  # a Conv1D, quantized
    assert all(f"flips/{layer}" in r and f"stall_ratio/{layer}" in r for r in records)
    assert summary["total_flips"] is not None and summary["total_flips"] > 0
    assert f"quant/overflow_frac/{layer}/weight" in records[1]
    assert any(key.startswith(f"stable_rank/{layer}") for key in records[1]), sorted(records[1])
    model = build_model(config, vocab_size=config_vocab(local_files))
    assert type(model).__name__ == "GPT2LMHeadModel" and model.lm_head.weight is model.transformer.wte.weight


def test_a_gpt2_run_resumes_exactly(local_files, gpt2_run, tmp_path, monkeypatch):
    config, _ = gpt2_run
    crashing = gpt2_config(local_files, tmp_path, "gpt2")
    real_step = Trainer._train_step

    def crash_at_step_3(self, measure):
        if self.step == 3:
            raise RuntimeError("simulated crash")
        return real_step(self, measure)

    monkeypatch.setattr(Trainer, "_train_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing)
    monkeypatch.undo()
    # a crash saves nothing: the resume starts from the periodic step_2.pt (dropout RNG included)
    assert not (crashing.run_dir / "checkpoints" / "step_3.pt").exists()
    assert resume(crashing.run_dir)["status"] == "completed"

    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in records]

    resumed = strip(read_jsonl(crashing.run_dir / "metrics.jsonl"))
    assert resumed == strip(read_jsonl(config.run_dir / "metrics.jsonl")) and len(resumed) == 4


def config_vocab(root):
    return len(transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer")))


def test_llama_from_a_config_folder_through_the_cli(local_files, tmp_path, capsys):
    overrides = run_overrides(
        local_files, tmp_path, "name=llama", "model.source=hf", f"model.hf_config={local_files / 'llama'}"
    )
    assert main(["train", *[arg for item in overrides for arg in ("--set", item)]]) == 0
    summary = json.loads((tmp_path / "llama" / "summary.json").read_text())
    assert summary["status"] == "completed" and (tmp_path / "llama" / "report.html").exists()
    records = read_jsonl(tmp_path / "llama" / "metrics.jsonl")
    assert "flips/model.layers.0.self_attn.q_proj" in records[0]


def test_hf_model_loss_is_the_next_token_cross_entropy_of_its_logits(local_files, tmp_path):
    config = load_config(
        None,
        run_overrides(local_files, tmp_path, "model.source=hf", f"model.hf_config={local_files / 'llama'}"),
    )
    torch.manual_seed(0)
    model = build_model(config, vocab_size=50)
    assert model.config.vocab_size == 50 and next(model.parameters()).dtype == torch.float32
    idx, targets = torch.randint(50, (2, 8)), torch.randint(50, (2, 8))
    logits, loss = model(idx, targets)
    log_probs = torch.log_softmax(logits.detach().double(), dim=-1)  # by hand: mean of -log p(target)
    expected = -log_probs.gather(-1, targets[..., None]).mean()
    assert logits.shape == (2, 8, 50) and abs(float(loss.detach()) - float(expected)) < 1e-5
    assert model(idx)[1] is None
    unhooked = type(model).forward(model, input_ids=idx, use_cache=False)  # the model's own forward
    assert torch.equal(logits_of(unhooked), logits)


def test_factory_model_trains(local_files, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(local_files))
    config = load_config(
        None, run_overrides(local_files, tmp_path, "name=factory", "model.factory=factories:tiny_lm")
    )
    summary = train(config)
    assert summary["status"] == "completed"
    records = read_jsonl(config.run_dir / "metrics.jsonl")
    assert "flips/hidden" in records[0] and "flips/head" in records[0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("factories.tiny_lm", "expected 'package.module:function'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("factories:missing", "has no function 'missing'"),
    ],
)
def test_a_bad_factory_is_a_one_line_error(local_files, monkeypatch, spec, message):
    monkeypatch.syspath_prepend(str(local_files))
    with pytest.raises(ValueError, match=message) as error:
        load_factory(spec)
    assert "\n" not in str(error.value)


def test_a_factory_must_return_a_module(local_files, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(local_files))
    overrides = run_overrides(local_files, tmp_path, "model.factory=factories:not_a_model")
    assert main(["train", *[arg for item in overrides for arg in ("--set", item)]]) == 2
    assert "returned a str, not an nn.Module" in capsys.readouterr().err


def test_hf_source_needs_its_config_file(local_files, tmp_path):
    with pytest.raises(ConfigError, match="model.*needs hf_config"):
        load_config(None, ["model.source=hf"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["model.source=hf", "model.hf_config=x", "model.factory=a:b"])
    config = load_config(
        None,
        run_overrides(
            local_files,
            tmp_path,
            "model.source=hf",
            "model.block_size=128",
            f"model.hf_config={local_files / 'gpt2'}",
        ),
    )
    with pytest.raises(ValueError, match="block_size 128 exceeds .* max_position_embeddings 64"):
        build_model(config, vocab_size=50)
