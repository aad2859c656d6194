"""A word-level tokenizer for the embedded policy.

RefWorld prompts use a small closed vocabulary ("put the subject of image 2 at the
top left"), so one id per word is enough and keeps the text stream short. The
tokenizer is built from any word list (the world's vocabulary, or the words of a
manifest's prompts) and saved as JSON next to the weights.

Splitting: lowercase, then runs of letters and runs of digits are words and
everything else separates them, so "image2," -> ["image", "2"].
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
PAD_ID = 0
UNK_ID = 1
_SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN)
# Letters (any script) or digits; "_" and punctuation separate words.
_WORD_RE = re.compile(r"[^\W\d_]+|\d+")
_FORMAT = "refrl.word_tokenizer"


def split_words(text: str) -> list[str]:
    """Lowercase ``text`` and split it into words (letter runs and digit runs)."""
    return _WORD_RE.findall(text.lower())


class WordTokenizer:
    """Maps words to ids: ``<pad>`` = 0, ``<unk>`` = 1, then the vocabulary in order."""

    def __init__(self, vocab: Sequence[str]):
        if tuple(vocab[:2]) != _SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {list(_SPECIAL_TOKENS)}, got {list(vocab[:2])}")
        if len(set(vocab)) != len(vocab):
            dupes = sorted({w for w in vocab if list(vocab).count(w) > 1})
            raise ValueError(f"vocabulary has duplicate words: {dupes[:10]}")
        self.vocab: list[str] = list(vocab)
        self.word_to_id: dict[str, int] = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def from_words(cls, words: Iterable[str]) -> WordTokenizer:
        """Build from a word list (or sentences): each is split, lowercased and de-duplicated in order."""
        vocab = list(_SPECIAL_TOKENS)
        seen = set(vocab)
        for entry in words:
            for w in split_words(entry):
                if w not in seen:
                    seen.add(w)
                    vocab.append(w)
        return cls(vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[int]:
        """Ids of the words of ``text`` (unknown words -> UNK), no padding."""
        return [self.word_to_id.get(w, UNK_ID) for w in split_words(text)]

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) and validity mask (B, L) of a batch, right-padded with PAD.

        L is the longest prompt of the batch truncated to ``max_len`` (possibly 0 when
        every prompt is empty); words past ``max_len`` are dropped.
        """
        if max_len < 0:
            raise ValueError(f"max_len must be >= 0, got {max_len}")
        rows = [self.tokenize(t)[:max_len] for t in texts]
        length = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids, ids != PAD_ID

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Words of one id sequence joined by spaces; PAD is skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        words = []
        for i in ids:
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"token id {i} out of range [0, {len(self.vocab)})")
            if i != PAD_ID:
                words.append(self.vocab[i])
        return " ".join(words)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": _FORMAT, "vocab": self.vocab}, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != _FORMAT or "vocab" not in data:
            raise ValueError(f"{path} is not a refrl word tokenizer (expected keys 'format'={_FORMAT!r} and 'vocab')")
        return cls(data["vocab"])
