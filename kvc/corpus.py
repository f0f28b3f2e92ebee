"""Real text for captures: a user file, or the English documentation every CPython ships."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import KvcError

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


def token_windows(tokenizer, corpus: Corpus, seq_len: int, num_seqs: int) -> torch.Tensor:
    """``num_seqs`` consecutive, non-overlapping windows of ``seq_len`` tokens: int64 [S, T]."""
    if seq_len < 2 or num_seqs < 1:
        raise KvcError(f"--seq-len must be >= 2 and --num-seqs >= 1 (got {seq_len}, {num_seqs})")
    needed = seq_len * num_seqs
    ids = tokenizer(corpus.text, add_special_tokens=False)["input_ids"]
    if len(ids) < needed:
        raise KvcError(f"{corpus.source} has {len(ids)} tokens; {num_seqs} windows of {seq_len} "
                       f"need {needed}: give more text or ask for fewer/shorter windows")
    return torch.tensor(ids[:needed], dtype=torch.int64).view(num_seqs, seq_len)
