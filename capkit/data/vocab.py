"""The tokenizer and the word vocabulary (shared by training and evaluation)."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable

from capkit.types import BOS_ID, EOS_ID, SPECIAL_TOKENS, UNK_ID

__all__ = ["tokenize", "Vocabulary"]

_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters/digits, inner apostrophes kept ("man's", "don't")


def tokenize(text: str) -> list[str]:
    """Lowercase words; punctuation is dropped. ``"A dog's toy, red."`` -> ``["a", "dog's", "toy", "red"]``."""
    return _WORD_RE.findall(text.lower())


class Vocabulary:
    """Word <-> id mapping; ids 0..3 are ``<pad> <start> <end> <unk>`` (``capkit.types``), then words.

    Args:
        words: the words after the special tokens, most frequent first.
    """

    def __init__(self, words: Iterable[str]):
        self.itos: list[str] = list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5, max_size: int = 5000) -> Vocabulary:
        """Words seen at least ``min_count`` times, the most frequent first (ties alphabetical), so that
        ``len(vocab) <= max_size`` (special tokens included). Build it from training captions only."""
        if max_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab max_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {max_size}")
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept[: max_size - len(SPECIAL_TOKENS)])

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """``[<start>] + word ids (the first max_len words; unknown -> <unk>) + [<end>]``."""
        words = tokenize(text)[:max_len]
        return [BOS_ID] + [self.stoi.get(w, UNK_ID) for w in words] + [EOS_ID]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first ``<end>``, special tokens skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i >= len(SPECIAL_TOKENS):
                words.append(self.itos[i])
        return " ".join(words)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"itos": self.itos}, f, ensure_ascii=False, indent=0)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        with open(path, encoding="utf-8") as f:
            itos = json.load(f)["itos"]
        if tuple(itos[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"{path}: not a capkit vocabulary (must start with {', '.join(SPECIAL_TOKENS)})")
        return cls(itos[len(SPECIAL_TOKENS) :])
