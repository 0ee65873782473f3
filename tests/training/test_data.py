"""Data: the shipped corpus, tokenizers, sources, the deterministic split and the resumable sampler."""

import base64
import socket
import sys
from importlib.resources import files

import pytest
import torch

from altgrad.training.data import (
    BatchSampler,
    ByteTokenizer,
    TextDataset,
    load_data,
    load_shakespeare,
    tokenizer_from_state,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def shakespeare() -> TextDataset:
    return load_data(source="shakespeare", tokenizer="char")


# ----------------------------------------------------------------------------- the shipped corpus


def test_corpus_loads_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    text = load_shakespeare()
    assert 900_000 < len(text.encode("utf-8")) < 1_200_000
    assert text.startswith("HAMLET, PRINCE OF DENMARK")
    assert "The Tempest".upper() in text


def test_corpus_has_no_gutenberg_boilerplate():
    text = load_shakespeare()
    assert "gutenberg" not in text.lower()
    assert "*** START OF" not in text and "*** END OF" not in text


def test_corpus_ships_with_its_notice():
    notice = (files("altgrad") / "data" / "SHAKESPEARE_NOTICE.txt").read_text()
    assert "public domain" in notice and "shakespeare" in notice and "Hamlet" in notice


# ----------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trip(shakespeare):
    tok = shakespeare.tokenizer
    assert tok.name == "char" and tok.vocab_size == len(set(load_shakespeare()))
    sample = load_shakespeare()[5000:7000]
    assert tok.decode(tok.encode(sample)) == sample
    assert tokenizer_from_state(tok.state()).encode(sample) == tok.encode(sample)
    with pytest.raises(ValueError, match="'é'"):
        tok.encode("café")


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve — 名前 🙂\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and max(ids) < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tokenizer_from_state(tok.state()).decode(ids) == text


def tiny_tiktoken_file(tmp_path):
    """256 single bytes, then merges "he", "ll", "hell" (ranks 256, 257, 258)."""
    tokens = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell"]
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def test_bpe_from_a_local_tiktoken_file(tmp_path):
    pytest.importorskip("tiktoken")
    text_file = tmp_path / "t.txt"
    text_file.write_text("hello hello hello hello")
    data = load_data(source="text", path=text_file, tokenizer="bpe", bpe_path=tiny_tiktoken_file(tmp_path))
    tok = data.tokenizer
    assert tok.name == "bpe" and tok.vocab_size == 260  # 259 ranks + <|endoftext|>
    assert tok.encode("hello") == [258, ord("o")]
    assert tok.decode(tok.encode("say <|endoftext|> hello")) == "say <|endoftext|> hello"
    assert tokenizer_from_state(tok.state()).encode("hello") == [258, ord("o")]
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        load_data(source="text", path=text_file, tokenizer="bpe", bpe_path=tmp_path / "nope.tiktoken")


def test_bpe_without_a_file_or_tiktoken_is_a_clear_error(tmp_path, monkeypatch):
    text_file = tmp_path / "t.txt"
    text_file.write_text("hello")
    with pytest.raises(ValueError, match="bpe_path"):
        load_data(source="text", path=text_file, tokenizer="bpe")
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # as if not installed
    with pytest.raises(ImportError, match=r"altgrad\[bpe\]"):
        load_data(source="text", path=text_file, tokenizer="bpe", bpe_path=tiny_tiktoken_file(tmp_path))


# ----------------------------------------------------------------------------- split and batches


def test_split_is_deterministic_and_val_is_the_tail(shakespeare):
    text = load_shakespeare()
    ids = torch.tensor(shakespeare.tokenizer.encode(text), dtype=torch.int32)
    assert len(shakespeare.val) == int(len(ids) * 0.1)
    assert torch.equal(torch.cat([shakespeare.train, shakespeare.val]), ids)
    again = load_data(source="shakespeare", tokenizer="char", val_fraction=0.2)
    assert torch.equal(again.val, ids[len(ids) - int(len(ids) * 0.2) :])


def test_batches_are_shifted_windows(shakespeare):
    x, y = shakespeare.get_batch("train", 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = shakespeare.tokenizer.decode(shakespeare.train.tolist())
    window = shakespeare.tokenizer.decode(x[0].tolist() + y[0, -1:].tolist())
    assert window in text


def test_same_seed_same_batches_and_splits_draw_independently(shakespeare):
    a = BatchSampler(shakespeare, batch_size=4, block_size=32, seed=7)
    b = BatchSampler(shakespeare, batch_size=4, block_size=32, seed=7)
    b.get_batch("val")  # evaluation must not move the training stream
    assert torch.equal(a.get_batch("train")[0], b.get_batch("train")[0])
    other = BatchSampler(shakespeare, batch_size=4, block_size=32, seed=8)
    assert not torch.equal(a.get_batch("train")[0], other.get_batch("train")[0])


def test_sampler_state_round_trip(shakespeare):
    sampler = BatchSampler(shakespeare, batch_size=4, block_size=32, seed=3)
    sampler.get_batch("train")
    saved = sampler.state_dict()
    expected = [sampler.get_batch(split)[0] for split in ("train", "val", "train")]

    resumed = BatchSampler(shakespeare, batch_size=4, block_size=32, seed=999)
    resumed.load_state_dict(saved)
    for split, x in zip(("train", "val", "train"), expected, strict=True):
        assert torch.equal(resumed.get_batch(split)[0], x)
    with pytest.raises(ValueError, match="expected"):
        resumed.load_state_dict({"train": saved["train"]})


def test_batch_errors_are_clear(shakespeare, tmp_path):
    with pytest.raises(ValueError, match="unknown split 'test'"):
        BatchSampler(shakespeare, batch_size=2, block_size=8).get_batch("test")
    small = tmp_path / "small.txt"
    small.write_text("abcdefghij" * 3)
    data = load_data(source="text", path=small)
    with pytest.raises(ValueError, match="too few for block_size 8"):
        data.get_batch("val", 2, 8, torch.Generator())


# ----------------------------------------------------------------------------- sources


def test_text_source_from_a_file_and_a_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third\n")
    (tmp_path / "ignored.md").write_text("not text\n")

    one = load_data(source="text", path=tmp_path / "a.txt", tokenizer="byte", val_fraction=0.5)
    assert one.tokenizer.decode(torch.cat([one.train, one.val]).tolist()) == "first\n"

    folder = load_data(source="text", path=str(tmp_path), tokenizer="byte")
    assert (
        folder.tokenizer.decode(torch.cat([folder.train, folder.val]).tolist())
        == "first\n\nsecond\n\nthird\n"
    )


def hf_text(data: TextDataset) -> str:
    return data.tokenizer.decode(torch.cat([data.train, data.val]).tolist())


def test_hf_source_from_a_local_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = {"body": ["First record.", "Second record."], "label": [0, 1]}
    datasets.Dataset.from_dict(records).save_to_disk(tmp_path / "flat")
    data = load_data(source="hf", path=tmp_path / "flat", text_field="body", tokenizer="char")
    assert hf_text(data) == "First record.\n\nSecond record."

    splits = {
        "train": datasets.Dataset.from_dict({"text": ["train text"]}),
        "validation": datasets.Dataset.from_dict({"text": ["validation text"]}),
    }
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dict")
    data = load_data(source="hf", path=tmp_path / "dict", hf_split="validation", tokenizer="byte")
    assert hf_text(data) == "validation text"

    with pytest.raises(ValueError, match=r"text_field 'text'.*\['body', 'label'\]"):
        load_data(source="hf", path=tmp_path / "flat")
    with pytest.raises(ValueError, match=r"split 'test'.*\['train', 'validation'\]"):
        load_data(source="hf", path=tmp_path / "dict", hf_split="test")


def test_hf_source_errors_are_clear(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    with pytest.raises(ValueError, match="hf_name"):
        load_data(source="hf")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_data(source="hf", path=tmp_path / "missing_dir")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"altgrad\[hf\]"):
        load_data(source="hf", path=tmp_path)


def test_bad_options_raise_errors_naming_the_allowed_values(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.txt"):
        load_data(source="text", path=tmp_path / "no_such.txt")
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        load_data(source="text", path=tmp_path)
    with pytest.raises(ValueError, match="source 'text' needs path"):
        load_data(source="text")
    with pytest.raises(ValueError, match=r"unknown data source 'wiki'.*'shakespeare', 'text', 'hf'"):
        load_data(source="wiki")
    with pytest.raises(ValueError, match=r"unknown tokenizer 'word'.*'char', 'byte', 'bpe'"):
        load_data(tokenizer="word")
    with pytest.raises(ValueError, match="val_fraction"):
        load_data(val_fraction=1.0)
    with pytest.raises(ValueError, match="unknown tokenizer 'word'"):
        tokenizer_from_state({"name": "word"})
