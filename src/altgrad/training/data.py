"""Training text: sources, tokenizers, a train/val split and a resumable batch sampler.

The entry point is ``load_data``; every option is a keyword with a default, so a config can pass its
data section straight through (``load_data(**config.data.model_dump())``)::

    load_data(
        *,
        source: str = "shakespeare",     # "shakespeare" | "text" | "hf"
        tokenizer: str = "char",         # "char" | "byte" | "bpe" | "hf"
        path: str | Path | None = None,  # text: a .txt file or a folder of them (read recursively,
                                         #       sorted by path); hf: a datasets.save_to_disk folder
        hf_name: str | None = None,      # hf: dataset name on the Hub, e.g. "NLP-AUEB/eurlex", "wikitext"
        hf_config: str | None = None,    # hf: dataset config, e.g. "wikitext-2-raw-v1"
        hf_split: str = "train",         # hf: the split read; train and val are both cut from it
        text_field: str = "text",        # hf: the column holding the text
        val_fraction: float = 0.1,       # the last this-much of the tokens is the validation split
        bpe_path: str | Path | None = None,  # bpe: a local GPT-2 ``gpt2.tiktoken`` file (never downloaded)
        hf_tokenizer: str | Path | None = None,  # hf: a local Hugging Face tokenizer folder
    ) -> TextDataset

Sources:

* ``shakespeare``: eight plays (about 1 MB, public domain) shipped inside the package, no network.
* ``text``: local UTF-8 text files; several files are joined with a newline.
* ``hf``: a Hugging Face dataset, from a local ``save_to_disk`` folder (``path``) or by name through
  the Hub cache (``hf_name``); records are joined with a blank line. Needs the ``hf`` extra.

Tokenizers (all have ``name``, ``vocab_size``, ``encode``, ``decode`` and ``state()``; rebuild one
from a checkpoint with ``tokenizer_from_state``):

* ``char``: one id per distinct character of the whole text, in sorted order (nanoGPT's
  shakespeare_char). Encoding a character outside that set is an error.
* ``byte``: the 256 byte values of the UTF-8 encoding.
* ``bpe``: GPT-2's byte-pair encoding from a local ``gpt2.tiktoken`` file. Needs the ``bpe`` extra.
* ``hf``: a Hugging Face tokenizer from a local folder (``hf_tokenizer``, as written by
  ``save_pretrained``; never downloaded), through ``AutoTokenizer``; no special tokens are added,
  the vocabulary size counts the added tokens. Needs the ``hf`` extra.

Batches: ``BatchSampler`` draws random windows of ``block_size + 1`` tokens, ``x`` the first
``block_size`` and ``y`` the same shifted by one. Train and val draw from their own seeded
``torch.Generator``s, so evaluation does not shift the training stream; ``state_dict()`` /
``load_state_dict()`` save and restore both for an exact resume.

Example::

    >>> from altgrad.training.data import BatchSampler, load_data
    >>> data = load_data(source="shakespeare", tokenizer="char")
    >>> data.tokenizer.vocab_size, data.tokenizer.decode(data.train[:6].tolist())
    (76, 'HAMLET')
    >>> sampler = BatchSampler(data, batch_size=4, block_size=64, seed=0)
    >>> x, y = sampler.get_batch("train")
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([4, 64]), True)
"""

from __future__ import annotations

import base64
import gzip
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol

import torch

SOURCES: tuple[str, ...] = ("shakespeare", "text", "hf")
TOKENIZERS: tuple[str, ...] = ("char", "byte", "bpe", "hf")
SPLITS: tuple[str, ...] = ("train", "val")

# GPT-2's pre-tokenization pattern and end-of-text token, as in tiktoken's "gpt2" encoding.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_END_OF_TEXT = "<|endoftext|>"


# ----------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    """What the trainer needs from a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def state(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One id per character of a fixed alphabet, ids in the alphabet's sorted order.

    >>> tok = CharTokenizer.from_text("hello")
    >>> tok.chars, tok.encode("hole"), tok.decode([3, 2, 1])
    ('ehlo', [1, 3, 2, 0], 'olh')
    """

    name = "char"

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.vocab_size = len(chars)
        self._id_of = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._id_of[c] for c in text]
        except KeyError as e:
            unknown = sorted(set(text) - set(self.chars))
            raise ValueError(f"characters {unknown} are not in this char tokenizer's alphabet") from e

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "chars": self.chars}


class ByteTokenizer:
    """The bytes of the UTF-8 encoding, 256 ids.

    Decoding replaces invalid UTF-8 (a sampled sequence may cut a character) with U+FFFD.

    >>> ByteTokenizer().encode("né")
    [110, 195, 169]
    """

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def state(self) -> dict[str, Any]:
        return {"name": self.name}


class TiktokenBPE:
    """GPT-2 byte-pair encoding from a local ``.tiktoken`` rank file, run by ``tiktoken``.

    The file has one ``<base64 token> <rank>`` per line (OpenAI's ``gpt2.tiktoken`` is the same as
    ``r50k_base.tiktoken``). It is read directly rather than through ``tiktoken.load``, whose cache
    is keyed by path and would keep serving an old file after the one at that path changed.
    ``<|endoftext|>`` gets the id after the last rank (50256 for GPT-2) and is never produced by
    ``encode``, which treats that string in the text as ordinary text.
    """

    name = "bpe"

    def __init__(self, path: str | Path) -> None:
        try:
            import tiktoken
        except ImportError as e:
            raise ImportError(
                "tokenizer 'bpe' needs tiktoken: pip install 'altgrad[bpe]' (or pip install tiktoken)"
            ) from e
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"bpe_path {str(path)!r} is not a file; give a local gpt2.tiktoken file")
        ranks = {
            base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in self.path.read_bytes().splitlines() if line)
        }
        self._encoding = tiktoken.Encoding(
            name=self.path.stem,
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={GPT2_END_OF_TEXT: max(ranks.values()) + 1},
        )
        self.vocab_size = self._encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids)

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path)}


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (``AutoTokenizer``, no network)."""

    name = "hf"

    def __init__(self, path: str | Path) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError("tokenizer 'hf' needs transformers: pip install 'altgrad[hf]'") from e
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"hf_tokenizer {str(path)!r} is not a folder written by save_pretrained")
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.vocab_size = len(self._tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False, verbose=False)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "vocab_size": self.vocab_size}


def build_tokenizer(
    name: str, text: str, bpe_path: str | Path | None = None, hf_tokenizer: str | Path | None = None
) -> Tokenizer:
    """The tokenizer called ``name``; ``text`` defines the char alphabet, ``bpe_path`` the BPE ranks,
    ``hf_tokenizer`` the folder of a Hugging Face tokenizer."""
    if name == "char":
        return CharTokenizer.from_text(text)
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        if bpe_path is None:
            raise ValueError("tokenizer 'bpe' needs bpe_path, a local gpt2.tiktoken file")
        return TiktokenBPE(bpe_path)
    if name == "hf":
        if hf_tokenizer is None:
            raise ValueError("tokenizer 'hf' needs hf_tokenizer, a local Hugging Face tokenizer folder")
        return HFTokenizer(hf_tokenizer)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {TOKENIZERS}")


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its ``state()``, e.g. one saved in a checkpoint."""
    name = state.get("name")
    if name == "char":
        return CharTokenizer(state["chars"])
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        return TiktokenBPE(state["path"])
    if name == "hf":
        return HFTokenizer(state["path"])
    raise ValueError(f"unknown tokenizer {name!r} in saved state; choose one of {TOKENIZERS}")


# ----------------------------------------------------------------------------- sources


def load_shakespeare() -> str:
    """The built-in corpus: eight Shakespeare plays, about 1 MB (see data/SHAKESPEARE_NOTICE.txt)."""
    compressed = (files("altgrad") / "data" / "shakespeare.txt.gz").read_bytes()
    return gzip.decompress(compressed).decode("utf-8")


def read_text_files(path: str | Path) -> str:
    """A UTF-8 text file, or every ``*.txt`` under a folder (sorted by path) joined with newlines."""
    path = Path(path)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        paths = sorted(path.rglob("*.txt"))
        if not paths:
            raise FileNotFoundError(f"no .txt files under folder {str(path)!r}")
        return "\n".join(p.read_text(encoding="utf-8") for p in paths)
    raise FileNotFoundError(f"path {str(path)!r} is neither a text file nor a folder of .txt files")


def read_hf_dataset(
    *,
    path: str | Path | None = None,
    hf_name: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    text_field: str = "text",
) -> str:
    """The ``text_field`` column of a Hugging Face dataset split, records joined with a blank line.

    From ``path`` (a ``save_to_disk`` folder, no network) if given, else ``hf_name``/``hf_config``
    through ``datasets.load_dataset`` (the Hub, or its local cache when ``HF_DATASETS_OFFLINE=1``).
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("source 'hf' needs the datasets package: pip install 'altgrad[hf]'") from e
    if path is not None:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"path {str(path)!r} is not a folder written by datasets' save_to_disk")
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if hf_split not in dataset:
                raise ValueError(f"split {hf_split!r} not in {str(path)!r}; it has {sorted(dataset)}")
            dataset = dataset[hf_split]
    elif hf_name is not None:
        dataset = datasets.load_dataset(hf_name, hf_config, split=hf_split)
    else:
        raise ValueError("source 'hf' needs hf_name (a Hub dataset) or path (a save_to_disk folder)")
    if text_field not in dataset.column_names:
        raise ValueError(f"text_field {text_field!r} not in the dataset; columns: {dataset.column_names}")
    return "\n\n".join(dataset[text_field])


def read_source(
    source: str,
    *,
    path: str | Path | None = None,
    hf_name: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    text_field: str = "text",
) -> str:
    """The raw text of a source (see ``load_data`` for the options each one uses)."""
    if source == "shakespeare":
        return load_shakespeare()
    if source == "text":
        if path is None:
            raise ValueError("source 'text' needs path, a .txt file or a folder of them")
        return read_text_files(path)
    if source == "hf":
        return read_hf_dataset(
            path=path, hf_name=hf_name, hf_config=hf_config, hf_split=hf_split, text_field=text_field
        )
    raise ValueError(f"unknown data source {source!r}; choose one of {SOURCES}")


# ----------------------------------------------------------------------------- dataset and batches


@dataclass
class TextDataset:
    """Token ids of a corpus split into ``train`` and ``val`` (1-D int32 tensors), and their tokenizer."""

    train: torch.Tensor
    val: torch.Tensor
    tokenizer: Tokenizer

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
        return self.train if name == "train" else self.val

    def get_batch(
        self, split: str, batch_size: int, block_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows of ``split``: inputs ``x`` and next-token targets ``y``,
        both int64 ``(batch_size, block_size)``, start positions drawn from ``generator``."""
        data = self.split(split)
        if len(data) <= block_size:
            raise ValueError(
                f"the {split} split has {len(data)} tokens, too few for block_size {block_size}; "
                "use more text, a smaller block_size or a different val_fraction"
            )
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        windows = data[starts[:, None] + torch.arange(block_size + 1)].long()
        return windows[:, :-1], windows[:, 1:]


def load_data(
    *,
    source: str = "shakespeare",
    tokenizer: str = "char",
    path: str | Path | None = None,
    hf_name: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    text_field: str = "text",
    val_fraction: float = 0.1,
    bpe_path: str | Path | None = None,
    hf_tokenizer: str | Path | None = None,
) -> TextDataset:
    """Read a source, tokenize it, and split off the last ``val_fraction`` of tokens for validation.

    >>> data = load_data(source="text", path="notes.txt", tokenizer="byte")  # doctest: +SKIP
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; choose one of {SOURCES}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose one of {TOKENIZERS}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    text = read_source(
        source, path=path, hf_name=hf_name, hf_config=hf_config, hf_split=hf_split, text_field=text_field
    )
    if not text:
        raise ValueError(f"source {source!r} gave no text")
    tok = build_tokenizer(tokenizer, text, bpe_path, hf_tokenizer)
    ids = torch.tensor(tok.encode(text), dtype=torch.int32)
    n_train = len(ids) - int(len(ids) * val_fraction)
    return TextDataset(train=ids[:n_train], val=ids[n_train:], tokenizer=tok)


class BatchSampler:
    """Endless random batches from a ``TextDataset``, reproducible from ``seed`` and resumable.

    >>> sampler = BatchSampler(load_data(), batch_size=8, block_size=128, seed=1)
    >>> saved = sampler.state_dict()  # e.g. into a checkpoint
    >>> x, y = sampler.get_batch("train")
    >>> sampler.load_state_dict(saved)  # e.g. on resume
    >>> bool((sampler.get_batch("train")[0] == x).all())
    True
    """

    def __init__(
        self,
        dataset: TextDataset,
        batch_size: int,
        block_size: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = torch.device(device)
        # One stream per split, from seeds seed and seed + 1, so evaluating never moves training's.
        self.generators = {
            split: torch.Generator().manual_seed(seed + offset) for offset, split in enumerate(SPLITS)
        }

    def get_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)`` of ``split`` ("train" or "val"), int64, on ``device``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        x, y = self.dataset.get_batch(split, self.batch_size, self.block_size, self.generators[split])
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator state of each split (a uint8 tensor each), for a checkpoint."""
        return {split: generator.get_state() for split, generator in self.generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(SPLITS):
            raise ValueError(f"sampler state has keys {sorted(state)}; expected {list(SPLITS)}")
        for split, generator_state in state.items():
            self.generators[split].set_state(generator_state)
