"""Caption normalisation and the word vocabulary.

Normalisation follows what the COCO caption evaluation does to both references and hypotheses
(Stanford PTB tokenisation, lower case, punctuation removed), so the model learns the very tokens it
is scored on: "A dog's ball ." -> ["a", "dog", "'s", "ball"]. The vocabulary is saved as JSON
(never pickle) and as a plain ``vocab.txt`` (one token per line, line number = id) for the in-graph
lookup table of the exported SavedModel.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from captioner.constants import END, END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, UNK, UNK_ID
from captioner.errors import DataError

_CONTRACTION = re.compile(r"(?<=[a-z0-9])(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:[-&][a-z0-9]+)*")


def normalize(text: str) -> list[str]:
    """Lower-case, PTB-style split of contractions, punctuation dropped."""
    text = text.lower().replace("`", "'").replace("\u2019", "'")
    text = _CONTRACTION.sub(r" \1", text)
    return _TOKEN.findall(text)


class Tokenizer:
    def __init__(self, tokens: Sequence[str], *, min_count: int = 1, max_size: int = 0):
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise DataError(f"vocabulary must start with {SPECIAL_TOKENS}, got {tokens[:4]}")
        self.tokens = tokens
        self.index = {token: i for i, token in enumerate(tokens)}
        self.min_count = min_count
        self.max_size = max_size

    @classmethod
    def fit(cls, captions: Iterable[str], *, min_count: int = 5, max_size: int = 10000) -> Tokenizer:
        counts = Counter(token for caption in captions for token in normalize(caption))
        kept = sorted((t for t, c in counts.items() if c >= min_count and t not in SPECIAL_TOKENS),
                      key=lambda t: (-counts[t], t))
        kept = kept[: max(0, max_size - len(SPECIAL_TOKENS))]
        if not kept:
            raise DataError(f"no word occurs at least {min_count} times in the training captions")
        return cls(list(SPECIAL_TOKENS) + kept, min_count=min_count, max_size=max_size)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, caption: str, max_length: int | None = None) -> list[int]:
        """``<start> w1 .. wn <end>``; cut so that the whole fits in ``max_length`` (keeping ``<end>``)."""
        ids = [self.index.get(token, UNK_ID) for token in normalize(caption)]
        if max_length is not None:
            ids = ids[: max(0, max_length - 2)]
        return [START_ID, *ids, END_ID]

    def decode(self, ids: Iterable[int]) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i in (PAD_ID, START_ID):
                continue
            words.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return " ".join(words)

    def to_json(self) -> dict:
        return {"format": "captioner-vocab", "version": 1, "tokens": self.tokens,
                "min_count": self.min_count, "max_size": self.max_size}

    def save(self, folder: Path | str) -> Path:
        """Write ``vocab.json`` and ``vocab.txt`` atomically; returns the JSON path."""
        from captioner.constants import VOCAB_JSON, VOCAB_TXT
        from captioner.io_utils import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / VOCAB_TXT, "\n".join(self.tokens) + "\n")
        return atomic_write_text(folder / VOCAB_JSON, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path | str) -> Tokenizer:
        from captioner.constants import VOCAB_JSON

        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_JSON
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError("vocabulary file not found", path=str(path)) from None
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg}", path=str(path), line=exc.lineno) from None
        if not isinstance(data, dict) or data.get("format") != "captioner-vocab":
            raise DataError("not a captioner vocabulary (field 'format' must be 'captioner-vocab')", path=str(path))
        return cls(data["tokens"], min_count=data.get("min_count", 1), max_size=data.get("max_size", 0))


def id_to_token_table(vocab_txt: str | os.PathLike):
    """In-graph id -> token lookup built from ``vocab.txt`` (an asset of the SavedModel)."""
    import tensorflow as tf

    init = tf.lookup.TextFileInitializer(
        vocab_txt if tf.is_tensor(vocab_txt) else str(vocab_txt), tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
        tf.string, tf.lookup.TextFileIndex.WHOLE_LINE)
    return tf.lookup.StaticHashTable(init, default_value=UNK)


def ids_to_text(ids, table):
    """In-graph: int ids ``[B, T]`` -> captions ``[B]``, stopping at ``<end>``, skipping pad/start."""
    import tensorflow as tf

    ids = tf.cast(ids, tf.int64)
    ended = tf.cumsum(tf.cast(tf.equal(ids, END_ID), tf.int32), axis=1) > 0
    keep = tf.logical_and(tf.logical_not(ended), ids > START_ID)
    words = table.lookup(ids)
    words = tf.ragged.boolean_mask(words, keep)
    return tf.strings.reduce_join(words, axis=1, separator=" ")


__all__ = ["Tokenizer", "normalize", "id_to_token_table", "ids_to_text", "END"]
