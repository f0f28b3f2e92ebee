"""Real text for captures: a user file, or the English documentation every CPython ships."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import KvcError

DEFAULT_SOURCE = "python:pydoc_data.topics"


@dataclass
class Corpus:
    text: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def load_corpus(path: str | None) -> Corpus:
    """``path`` as UTF-8 text, or with no path the pydoc topics (several hundred KB of prose)."""
    if path is None:
        from pydoc_data.topics import topics

        return Corpus("\n\n".join(topics[key].strip() for key in sorted(topics)), DEFAULT_SOURCE)
    file = Path(path)
    if not file.is_file():
        raise KvcError(f"--text {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise KvcError(f"--text {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not text.strip():
        raise KvcError(f"--text {path} is empty")
    return Corpus(text, file.name)


@dataclass
class Framing:
    """The special tokens the model's tokenizer puts around a fresh input (BOS; [CLS] ... [SEP])."""

    prefix: list[int]
    suffix: list[int]
    added: bool  # False: --no-special-tokens asked for bare text
    text: str = ""  # the framing as the tokenizer writes it, e.g. "<s> ..."

    def wrap(self, ids: list[int]) -> list[int]:
        return self.prefix + ids + self.suffix

    @property
    def length(self) -> int:
        return len(self.prefix) + len(self.suffix)

    def to_meta(self) -> dict:
        return {"added": self.added, "prefix": self.prefix, "suffix": self.suffix, "text": self.text}


PROBE = "kvc probe text"


def framing(tokenizer, special_tokens: bool = True) -> Framing:
    """How ``tokenizer`` frames a text by default, read off one probe: its ids with special tokens
    are prefix + (its ids without them) + suffix. ``special_tokens=False``: no framing."""
    if not special_tokens:
        return Framing([], [], added=False)
    bare = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(PROBE, add_special_tokens=True)["input_ids"]
    starts = [i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare]
    if not starts:
        raise KvcError(f"{type(tokenizer).__name__} changes the text itself when it adds its special "
                       "tokens; pass --no-special-tokens to capture bare text")
    prefix, suffix = full[:starts[0]], full[starts[0] + len(bare):]
    pieces = [tokenizer.decode(prefix)] * bool(prefix) + ["..."] + [tokenizer.decode(suffix)] * bool(suffix)
    text = " ".join(pieces) if prefix or suffix else ""
    return Framing(prefix, suffix, added=True, text=text)


def token_windows(tokenizer, corpus: Corpus, seq_len: int, num_seqs: int,
                  frame: Framing | None = None) -> torch.Tensor:
    """``num_seqs`` windows of ``seq_len`` tokens, int64 [S, T]: consecutive, non-overlapping runs of
    the text, each framed like a fresh input of the model (``frame``; default: no framing)."""
    frame = frame or Framing([], [], added=False)
    if num_seqs < 1 or seq_len - frame.length < 1 or seq_len < 2:
        raise KvcError(f"--seq-len must be >= {max(2, frame.length + 1)} and --num-seqs >= 1 "
                       f"(got {seq_len}, {num_seqs})")
    body = seq_len - frame.length
    needed = body * num_seqs
    ids = tokenizer(corpus.text, add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        raise KvcError(f"{corpus.source} has {len(ids)} tokens; {num_seqs} windows of {seq_len} "
                       f"need {needed}: give more text or ask for fewer/shorter windows")
    windows = [frame.wrap(ids[i * body:(i + 1) * body]) for i in range(num_seqs)]
    return torch.tensor(windows, dtype=torch.int64)
