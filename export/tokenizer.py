"""Tokenizers from a checkpoint's tokenizer.json, through the `tokenizers` library (the "hf" extra).

This is the one place that imports `tokenizers`. `load_tokenizer(path)` returns a small wrapper: `encode` /
`encode_batch` give token ids (special tokens added as the tokenizer.json's post-processor says, e.g.
[CLS] ... [SEP] for BERT), `pad` / `__call__` give (input_ids, attention_mask) int64 arrays padded to the
longest sequence of the batch, `decode` turns ids back into text.

A tokenizer.json may carry fixed padding / truncation (all-MiniLM-L6-v2's pads every input to 128 tokens);
they are switched off, so each sequence keeps its own length, and truncation uses `max_length`: the
argument, else sentence_bert_config.json's max_seq_length, else tokenizer_config.json's model_max_length
(when it is a real limit), else none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ByteTokenizer", "Tokenizer", "load_tokenizer"]

EXTRA_HINT = "pip install 'rawformer[hf]' (or pip install tokenizers)"


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(f"reading tokenizer.json needs the `tokenizers` package: {EXTRA_HINT}") from e
    return tokenizers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    return d if isinstance(d, dict) else {}


def _token_id(tok: Any, token: Any) -> int | None:
    if isinstance(token, dict):  # {"content": "</s>", ...} in some tokenizer_config.json files
        token = token.get("content")
    return tok.token_to_id(token) if isinstance(token, str) else None


def pad_sequences(sequences: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 (B, longest): token-id lists right-padded with pad_id."""
    longest = max((len(s) for s in sequences), default=0)
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


class Tokenizer:
    """A `tokenizers.Tokenizer` with batch padding to NumPy arrays.

    Attributes
    ----------
    pad_token_id, bos_token_id, eos_token_id : int or None
    max_length : truncation length or None
    vocab_size : size of the vocabulary, added tokens included
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        max_length: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        tokenizer.no_padding()
        if max_length is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(max_length)
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.max_length = max_length
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text (ragged)."""
        return [
            list(e.ids)
            for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ]

    def pad(self, sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int64 (B, longest), right-padded with pad_token_id (0 without one)."""
        return pad_sequences(sequences, self.pad_token_id if self.pad_token_id is not None else 0)

    def __call__(self, texts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) of a text or a batch of texts, padded to the longest."""
        return self.pad(self.encode_batch([texts] if isinstance(texts, str) else texts))

    def decode(self, ids: Any, *, skip_special_tokens: bool = True) -> str:
        """Text of token ids."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def load_tokenizer(path: str | os.PathLike, max_length: int | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory (its tokenizer.json), or of a tokenizer.json file.

    Parameters
    ----------
    path : checkpoint directory or tokenizer.json
    max_length : truncate longer inputs (default: from sentence_bert_config.json / tokenizer_config.json)

    Raises
    ------
    ImportError naming the "hf" extra when `tokenizers` is not installed; FileNotFoundError without a
    tokenizer.json.
    """
    p = Path(path)
    file, root = (p / "tokenizer.json", p) if p.is_dir() else (p, p.parent)
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    tk = _tokenizers()
    tok = tk.Tokenizer.from_file(str(file))
    raw = _read_json(file)
    cfg = _read_json(root / "tokenizer_config.json")
    model_cfg = _read_json(root / "config.json")
    if max_length is None:
        st = _read_json(root / "sentence_bert_config.json").get("max_seq_length")
        mml = cfg.get("model_max_length")
        if isinstance(st, int):
            max_length = st
        elif isinstance(mml, int) and mml < 1_000_000:  # transformers writes 1e30 for "no limit"
            max_length = mml
    padding = raw.get("padding") or {}
    pad_id = padding.get("pad_id") if "pad_id" in padding else _token_id(tok, cfg.get("pad_token"))
    if pad_id is None and isinstance(model_cfg.get("pad_token_id"), int):
        pad_id = model_cfg["pad_token_id"]

    def special(name: str) -> int | None:
        v = model_cfg.get(f"{name}_token_id")
        if isinstance(v, list):  # Llama 3 lists several end tokens; the first is the usual one
            v = v[0] if v else None
        return v if isinstance(v, int) else _token_id(tok, cfg.get(f"{name}_token"))

    return Tokenizer(
        tok,
        pad_token_id=pad_id,
        bos_token_id=special("bos"),
        eos_token_id=special("eos"),
        max_length=max_length,
    )


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are the UTF-8 bytes of the text, 256 is the end-of-text token.

    The interface of `Tokenizer` (encode, encode_batch, pad, __call__, decode, token_to_id and the id
    attributes), with no file to read: the bundled byte-level model and its training corpus use it.
    `add_special_tokens=True` appends nothing (documents are separated by end-of-text in the corpus, not
    framed); decode drops end-of-text unless skip_special_tokens is False and replaces invalid UTF-8.
    """

    EOT = 256
    EOT_TOKEN = "<|endoftext|>"

    def __init__(self) -> None:
        self.pad_token_id: int | None = self.EOT
        self.bos_token_id: int | None = None
        self.eos_token_id: int | None = self.EOT
        self.max_length: int | None = None
        self.vocab_size = 257

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The UTF-8 bytes of `text` as ids."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    def pad(self, sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int64 (B, longest), right-padded with end-of-text."""
        return pad_sequences(sequences, self.EOT)

    def __call__(self, texts: str | list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.pad(self.encode_batch([texts] if isinstance(texts, str) else texts))

    def decode(self, ids: Any, *, skip_special_tokens: bool = True) -> str:
        """Text of ids: bytes decoded as UTF-8 (invalid sequences become U+FFFD); end-of-text is dropped, or
        written as <|endoftext|> with skip_special_tokens=False."""
        out, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if i != self.EOT:
                raise ValueError(f"ByteTokenizer.decode: id {i} is outside 0..256")
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                out.append(self.EOT_TOKEN)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token == self.EOT_TOKEN:
            return self.EOT
        raw = token.encode("utf-8")
        return raw[0] if len(raw) == 1 else None
