"""Caption images with a trained model: in memory, or from an exported SavedModel.

Both runners share the preprocessing (``captioner.data.images.load_image``) and the decoders
(``captioner.model.decoding``); the SavedModel runner drives the ``encode``/``decode_step``
signatures exactly as the gateway does, so its captions equal the in-graph ``serving_default``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captioner import constants as C
from captioner.data.images import load_image
from captioner.errors import ImageError, ModelError


@dataclass
class Caption:
    caption: str
    score: float
    nbest: list[tuple[str, float]] = field(default_factory=list)
    words: list[str] = field(default_factory=list)
    # Per-word attention over the image regions: [len(words), N]; None unless asked for.
    attention: np.ndarray | None = None
    # False when no caption ended within max_length: this one (and every n-best entry) was cut there.
    finished: bool = True

    def to_dict(self, with_attention: bool = False) -> dict[str, Any]:
        out = {"caption": self.caption, "score": self.score, "finished": self.finished,
               "nbest": [{"caption": c, "score": s} for c, s in self.nbest]}
        if with_attention and self.attention is not None:
            out["words"] = self.words
            out["attention"] = np.round(self.attention, 5).tolist()
        return out


def results_from_decode(out: dict, vocab: Sequence[str], with_attention: bool = False) -> list[Caption]:
    """Turn ``decode`` output (``[B, K, T]`` tokens etc., best first) into ``Caption`` objects.

    The n-best list holds only the captions that ended with <end> when any did; otherwise it holds
    the captions cut at max_length, and the result says ``finished=False``.
    """
    tokens = np.asarray(out["tokens"])
    scores = np.asarray(out["scores"])
    # Decoder outputs without the flag (older callers): a caption finished if it holds <end>.
    finished = (np.asarray(out["finished"], bool) if "finished" in out
                else (tokens == C.END_ID).any(axis=-1))
    attention = np.asarray(out["attention"]) if with_attention else None
    results = []
    for b in range(tokens.shape[0]):
        keep = [k for k in range(tokens.shape[1]) if finished[b, k]] or list(range(tokens.shape[1]))
        nbest = [(" ".join(_words(tokens[b, k], vocab)), float(scores[b, k])) for k in keep]
        words = _words(tokens[b, keep[0]], vocab)
        att = attention[b, keep[0], : len(words)] if attention is not None else None
        results.append(Caption(nbest[0][0], nbest[0][1], nbest, words, att, bool(finished[b, keep[0]])))
    return results


def _words(ids, vocab: Sequence[str]) -> list[str]:
    words = []
    for i in ids:
        i = int(i)
        if i == C.END_ID:
            break
        if i > C.START_ID:
            words.append(vocab[i] if i < len(vocab) else C.UNK)
    return words


def decode_images(encode: Callable, step: Callable, pixels, *, num_regions: int, state_shape: Sequence,
                  beam_size: int, max_length: int, length_penalty: float, no_repeat_ngram_size: int = 0) -> dict:
    """Greedy or beam search over ``encode``/``decode_step``-shaped callables.

    ``encode(pixels) -> features [B, N, d]``; ``step(features, tokens, state, position) -> (log_probs,
    attention, state)`` with ``position [rows]`` int32 and ``state`` of the fixed ``state_shape``
    ``[None, 2L, T, d]`` (zeros at first). Runs eagerly (the gateway over gRPC) or inside a
    ``tf.function`` (in-process). Returns ``decode`` output with a beam axis: ``tokens [B, K, T]``, ...
    """
    import tensorflow as tf

    from captioner.model.decoding import beam_search, greedy_search, tile_beams

    slots = int(state_shape[2])
    if max_length > slots:
        raise ModelError(f"max_length {max_length} is longer than this export's decode state holds "
                         f"({slots} positions; set export.max_decode_length when exporting)")
    features = tf.convert_to_tensor(encode(pixels), tf.float32)
    batch = tf.shape(features)[0]
    rows = batch * beam_size
    tiled = tile_beams(features, beam_size) if beam_size > 1 else features
    state = tf.zeros([rows, state_shape[1], slots, state_shape[3]], tf.float32)

    def step_fn(tokens, state, t):
        # One position per row, as the decode_step signature takes it (rows of merged requests
        # may be at different positions).
        return step(tiled, tokens, state, tf.fill([tf.shape(tokens)[0]], tf.cast(t, tf.int32)))

    if beam_size == 1:
        out = greedy_search(step_fn, state, batch, max_length, num_regions, length_penalty, no_repeat_ngram_size)
        return {k: v[:, None] for k, v in out.items()}
    return beam_search(step_fn, state, batch, beam_size, max_length, num_regions, length_penalty,
                       no_repeat_ngram_size)


class StepwiseSearch:
    """One request's greedy or beam search, advanced one position at a time by a caller that runs the
    ``decode_step`` itself, for the rows of many searches at once (the gateway's batch scheduler).

    The update is ``decoding``'s (``greedy_advance_np``/``beam_advance_np``, the NumPy twins of the
    in-graph updates, and the same ``greedy_result``/``beam_result``), so the result equals
    ``decode_images`` on the same pixels with the same step outputs. Rows: ``images x beam_size``,
    beams of an image adjacent; ``tokens``, ``position`` and ``features`` are this search's rows of
    the next ``decode_step`` call. After ``advance``, the caller reorders the search's decode state
    rows by the ``source`` it returns."""

    def __init__(self, features: np.ndarray, *, beam_size: int, max_length: int, length_penalty: float,
                 num_regions: int, no_repeat_ngram_size: int = 0):
        from captioner.model import decoding as D

        self.images = int(features.shape[0])
        self.beam_size, self.max_length = int(beam_size), int(max_length)
        self.alpha = float(length_penalty)
        self.no_repeat_ngram_size = int(no_repeat_ngram_size)
        self.rows = self.images * self.beam_size
        self.features = np.repeat(np.asarray(features, np.float32), self.beam_size, axis=0)
        self.tokens = np.full([self.rows], C.START_ID, np.int32)
        self.t = 0
        self.done = self.max_length <= 0
        self._search = _start_np(self.images, self.beam_size, num_regions)
        self._penalty = D.penalties(self.max_length, self.alpha)

    @property
    def position(self) -> np.ndarray:
        return np.full([self.rows], self.t, np.int32)

    def advance(self, log_probs: np.ndarray, attention: np.ndarray) -> np.ndarray:
        """Take this search's ``log_probs [rows, V]`` and ``attention [rows, N]`` at position ``t``;
        returns ``source [rows]``: the row (of this search) whose decode state each row continues."""
        from captioner.model import decoding as D

        if self.beam_size == 1:
            self.tokens, self._search = D.greedy_advance_np(self._search, log_probs, attention, self.t,
                                                            self.no_repeat_ngram_size)
            source = np.arange(self.rows)
            finished = self._search["finished"].all()
        else:
            self.tokens, source, self._search = D.beam_advance_np(
                self._search, log_probs, attention, self.t, self.beam_size, self.max_length, self._penalty,
                self.no_repeat_ngram_size)
            finished = self._search["done"].all()
        self.t += 1
        self.done = bool(finished) or self.t >= self.max_length
        return source

    def result(self) -> dict[str, np.ndarray]:
        """``decode_images``' output for this request: ``tokens [B, K, T]``, ``scores [B, K]``, ...
        (``decoding.greedy_result``/``beam_result`` in NumPy, the same bits: tests compare them)."""
        search = self._search
        if self.beam_size == 1:
            scores, lengths = search["scores"], search["lengths"]
            out = {"tokens": search["tokens"], "scores": scores / _normalizer(lengths, self.alpha),
                   "log_probs": scores, "lengths": lengths, "attention": search["attention"],
                   "finished": search["finished"]}
            return {k: v[:, None] for k, v in out.items()}
        return _beam_result_np(search, self.beam_size, self.alpha)


def _normalizer(lengths: np.ndarray, alpha: float) -> np.ndarray:
    """``length_normalizer(max(lengths, 1))`` by TensorFlow's own (eager) ops on the same shape as the
    eager ``decoding.beam_result`` (a vectorised pow may round differently from a scalar one). Inside
    a traced graph Grappler folds ``/ 6`` into a multiplication, so a normaliser there can differ in
    the last bit: scores may, captions do not (tested). Cached by value (the same lengths give the
    same bits): in the gateway's batched path these few eager ops per request, waiting for the GIL
    among the decode loop and the HTTP threads, took ~5 ms."""
    lengths = np.maximum(np.asarray(lengths, np.int32), 1)
    return _normalizer_of(lengths.tobytes(), lengths.shape, float(alpha))


@functools.lru_cache(maxsize=4096)
def _normalizer_of(lengths: bytes, shape: tuple[int, ...], alpha: float) -> np.ndarray:
    from captioner.model import decoding as D

    out = D.length_normalizer(np.frombuffer(lengths, np.int32).reshape(shape), alpha).numpy()
    out.flags.writeable = False
    return out


def _beam_result_np(search: dict[str, np.ndarray], k: int, alpha: float) -> dict[str, np.ndarray]:
    """``decoding.beam_result`` on NumPy arrays: tf.argsort's stable order (ties keep the lower
    index, descending too) is NumPy's stable argsort of the negated values."""
    from captioner.model import decoding as D

    raw, pool_scores = search["scores"], search["pool_scores"]
    tokens, attention = search["tokens"], search["attention"]
    batch_size, steps, num_regions = raw.shape[0], tokens.shape[1], attention.shape[-1]
    live_lengths = np.tile(search["live_lengths"][:, None], [1, k])
    live_scores = raw / _normalizer(live_lengths, alpha)
    in_pool = pool_scores > np.float32(D.VALID)
    tier = np.concatenate([np.where(in_pool, 0, 2), np.where(raw > np.float32(D.VALID), 1, 2)], axis=1)
    normalised = np.concatenate([pool_scores, live_scores], axis=1)
    by_score = np.argsort(-normalised, axis=1, kind="stable")
    by_tier = np.argsort(np.take_along_axis(tier, by_score, axis=1), axis=1, kind="stable")
    order = np.take_along_axis(by_score, by_tier, axis=1)[:, :k]
    tokens = np.concatenate([search["pool_tokens"].reshape(batch_size, k, steps),
                             tokens.reshape(batch_size, k, steps)], axis=1)
    attention = np.concatenate([search["pool_attention"].reshape(batch_size, k, steps, num_regions),
                                attention.reshape(batch_size, k, steps, num_regions)], axis=1)
    finished = np.concatenate([in_pool, np.zeros([batch_size, k], bool)], axis=1)

    def pick(x: np.ndarray) -> np.ndarray:
        return np.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)

    return {"tokens": pick(tokens), "scores": pick(normalised),
            "log_probs": pick(np.concatenate([search["pool_raw"], raw], axis=1)),
            "lengths": pick(np.concatenate([search["pool_lengths"], live_lengths], axis=1)),
            "attention": pick(attention), "finished": pick(finished)}


# The fields of decoding's searches that grow by one position per step.
_HISTORIES = {"tokens", "attention", "pool_tokens", "pool_attention"}


class SearchGroup:
    """The searches of many requests with the same beam size, max length and length penalty, each at
    its own position, advanced together: one NumPy update for all their images per ``decode_step``
    (the batch scheduler's shared loop), where ``StepwiseSearch.advance`` costs some ninety small
    NumPy calls per request. Each search's result is the one ``StepwiseSearch.advance`` gives it
    alone (tests compare them step by step).

    Rows are the members' rows in member order (joined searches go last). The histories live in
    buffers of ``max_length`` positions, written at each image's own position; a search's arrays are
    its rows and its first ``t`` positions, which equal ``decoding``'s growing arrays because the
    unwritten positions hold zeros (``PAD_ID``, no attention), what those append."""

    def __init__(self, beam_size: int, max_length: int, length_penalty: float, num_regions: int,
                 no_repeat_ngram_size: int = 0):
        from captioner.model import decoding as D

        self.beam_size, self.max_length = int(beam_size), int(max_length)
        self.alpha, self.num_regions = float(length_penalty), int(num_regions)
        self.no_repeat_ngram_size = int(no_repeat_ngram_size)
        self.members: list[StepwiseSearch] = []
        self._penalty = D.penalties(self.max_length, self.alpha)
        self._t = np.zeros([0], np.int32)                  # per image
        self.tokens = np.zeros([0], np.int32)              # per row: what the next decode_step feeds
        self._search: dict[str, np.ndarray] = {}

    @property
    def key(self) -> tuple[int, int, float, int]:
        return self.beam_size, self.max_length, self.alpha, self.no_repeat_ngram_size

    @property
    def rows(self) -> int:
        return len(self.tokens)

    @property
    def position(self) -> np.ndarray:
        return np.repeat(self._t, self.beam_size)

    def add(self, search: StepwiseSearch) -> None:
        """Take a search that has not advanced yet; its rows go last."""
        if (search.beam_size, search.max_length, search.alpha, search.no_repeat_ngram_size) != self.key \
                or search.t != 0:
            raise ValueError("a group takes fresh searches of its own beam size, max length, length penalty and "
                             "n-gram blocking")
        fresh = {}
        for name, value in search._search.items():
            if name in _HISTORIES:  # positions go in a buffer
                value = np.zeros([value.shape[0], self.max_length, *value.shape[2:]], value.dtype)
            fresh[name] = value
        self._search = fresh if not self.members else {
            name: np.concatenate([self._search[name], value]) for name, value in fresh.items()}
        self._t = np.concatenate([self._t, np.zeros([search.images], np.int32)])
        self.tokens = np.concatenate([self.tokens, search.tokens])
        self.members.append(search)

    def advance(self, log_probs: np.ndarray, attention: np.ndarray) -> tuple[np.ndarray, list[StepwiseSearch]]:
        """Take the group's ``log_probs [rows, V]`` and ``attention [rows, N]``; returns ``(source,
        finished)``: for each row that goes on (in the new row order, the finished searches' rows
        removed), the row (of the group before this step) whose decode state it continues; and the
        searches that finished, holding their final arrays (``result()`` is theirs alone)."""
        from captioner.model import decoding as D

        vocab = log_probs.shape[-1]
        t_rows = self.position
        masked = np.asarray(log_probs, np.float32) + D._np_mask(vocab, 1)[None]
        first = t_rows == 0
        if first.any():
            masked[first] = np.asarray(log_probs, np.float32)[first] + D._np_mask(vocab, 0)[None]
        if self.no_repeat_ngram_size:
            masked += D.repeat_mask_np(self._search["tokens"], t_rows, self.no_repeat_ngram_size, vocab)
        attention = np.asarray(attention, np.float32)
        source = self._greedy(masked, attention) if self.beam_size == 1 else self._beam(masked, attention)
        self._t = self._t + 1
        return self._leave(source)

    def _greedy(self, log_probs: np.ndarray, attention: np.ndarray) -> np.ndarray:
        search, rows = self._search, np.arange(len(self._t))
        finished = search["finished"]
        token = np.where(finished, C.PAD_ID, np.argmax(log_probs, axis=-1)).astype(np.int32)
        gain = log_probs[rows, token]
        search["tokens"][rows, self._t] = token
        search["attention"][rows, self._t] = attention
        search["scores"] = search["scores"] + np.where(finished, np.float32(0), gain)
        search["finished"] = finished | (token == C.END_ID)
        search["lengths"] = search["lengths"] + (~finished).astype(np.int32)
        self.tokens = token
        return rows

    def _beam(self, log_probs: np.ndarray, attention: np.ndarray) -> np.ndarray:
        """``decoding.beam_advance_np`` with a position per image."""
        from captioner.model import decoding as D

        k, search, t = self.beam_size, self._search, self._t
        scores, done = search["scores"], search["done"]
        batch_size = scores.shape[0]
        rows, vocab = batch_size * k, log_probs.shape[-1]
        t_rows, every_row = np.repeat(t, k), np.arange(rows)
        base = np.arange(batch_size)[:, None] * k
        candidates = (scores[:, :, None] + log_probs.reshape(batch_size, k, vocab)).reshape(batch_size, k * vocab)
        index = _top_k(candidates, 2 * k)
        top = np.take_along_axis(candidates, index, axis=1)
        top_beam, top_token = index // vocab, index % vocab
        ends = top_token == C.END_ID
        top_source = (base + top_beam).reshape(-1)
        frozen = np.repeat(done, k)

        pick = np.argsort(ends, axis=1, kind="stable")[:, :k]
        new_scores = np.where(done[:, None], scores, np.take_along_axis(top, pick, axis=1))
        token = np.where(frozen, C.PAD_ID, np.take_along_axis(top_token, pick, axis=1).reshape(-1)).astype(np.int32)
        source = np.where(frozen, every_row, np.take_along_axis(base + top_beam, pick, axis=1).reshape(-1))
        tokens, attention_so_far = search["tokens"], search["attention"]
        new_tokens = tokens[source]
        new_tokens[every_row, t_rows] = token
        new_attention = attention_so_far[source]
        new_attention[every_row, t_rows] = np.where(frozen[:, None], np.float32(0), attention[source])

        length = t + 1
        ended = ends & (top > np.float32(D.VALID)) & ~done[:, None]
        ended_scores = np.where(ended, top / self._penalty[length][:, None], np.float32(D.EMPTY))
        merged = np.concatenate([search["pool_scores"], ended_scores], axis=1)
        take = np.argsort(-merged, axis=1, kind="stable")[:, :k]
        new_pool_scores = np.take_along_axis(merged, take, axis=1)
        ended_rows, t_ended = np.arange(2 * rows), np.repeat(t, 2 * k)
        ended_tokens = tokens[top_source]
        ended_tokens[ended_rows, t_ended] = C.END_ID
        ended_attention = attention_so_far[top_source]
        ended_attention[ended_rows, t_ended] = attention[top_source]
        steps, regions = self.max_length, self.num_regions
        all_tokens = np.concatenate([search["pool_tokens"].reshape(batch_size, k, steps),
                                     ended_tokens.reshape(batch_size, 2 * k, steps)], axis=1)
        all_attention = np.concatenate([search["pool_attention"].reshape(batch_size, k, steps, regions),
                                        ended_attention.reshape(batch_size, 2 * k, steps, regions)], axis=1)
        search["pool_tokens"] = np.take_along_axis(all_tokens, take[:, :, None], axis=1).reshape(rows, steps)
        search["pool_attention"] = np.take_along_axis(all_attention, take[:, :, None, None], axis=1).reshape(
            rows, steps, regions)
        search["pool_raw"] = np.take_along_axis(np.concatenate([search["pool_raw"], top], axis=1), take, axis=1)
        search["pool_lengths"] = np.take_along_axis(np.concatenate(
            [search["pool_lengths"], np.repeat(length[:, None], 2 * k, axis=1)], axis=1), take, axis=1)
        search["live_lengths"] = search["live_lengths"] + (~done).astype(np.int32)
        best_live = new_scores.max(axis=1)
        divisor = np.maximum(self._penalty[t + 2], self._penalty[self.max_length])
        worst = new_pool_scores[:, k - 1]
        settled = ((worst > np.float32(D.VALID)) & (worst >= best_live / divisor)) | (best_live <= np.float32(D.VALID))
        search.update(tokens=new_tokens, attention=new_attention, scores=new_scores, pool_scores=new_pool_scores,
                      done=done | settled)
        self.tokens = token
        return source

    def _leave(self, source: np.ndarray) -> tuple[np.ndarray, list[StepwiseSearch]]:
        k = self.beam_size
        over = self._search["finished" if k == 1 else "done"]
        kept_images, finished, image = [], [], 0
        for search in self.members:
            images = slice(image, image + search.images)
            search.t += 1
            if over[images].all() or search.t >= self.max_length:
                search.done = True
                rows = slice(image * k, (image + search.images) * k)
                # Per image or per row (as decoding's arrays are), histories cut to the positions taken.
                search._search = {name: (value[images] if len(value) == len(self._t) else value[rows])
                                  for name, value in self._search.items()}
                for name in _HISTORIES & search._search.keys():
                    search._search[name] = search._search[name][:, :search.t]
                finished.append(search)
            else:
                kept_images.append(np.arange(images.start, images.stop))
            image += search.images
        if not finished:
            return source, []
        self.members = [s for s in self.members if not s.done]
        images = np.concatenate(kept_images) if kept_images else np.zeros([0], np.int64)
        rows = (images[:, None] * k + np.arange(k)).reshape(-1)
        self._search = {name: (value[images] if len(value) == len(self._t) else value[rows])
                        for name, value in self._search.items()}
        self._t, self.tokens = self._t[images], self.tokens[rows]
        return source[rows], finished


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    """``decoding._np_top_k`` (indices of the ``k`` largest of each row, largest first, the lower
    index first on ties) for many rows in a few calls: a row with exactly ``k`` values at or above
    its k-th largest (one without a tie there: nearly all) is done at once, the others by
    ``_np_top_k`` itself, which walks row by row."""
    from captioner.model import decoding as D

    n = x.shape[1]
    if n <= 4 * k:
        return D._np_top_k(x, k)
    chosen = x >= np.partition(x, n - k, axis=1)[:, n - k, None]
    plain = chosen.sum(axis=1) == k
    out = np.empty([x.shape[0], k], np.int64)
    if plain.any():
        columns = np.nonzero(chosen[plain])[1].reshape(-1, k)   # ascending within each row
        values = np.take_along_axis(x[plain], columns, axis=1)
        out[plain] = np.take_along_axis(columns, np.argsort(-values, axis=1, kind="stable"), axis=1)
    if not plain.all():
        out[~plain] = D._np_top_k(x[~plain], k)
    return out


def _start_np(images: int, beam_size: int, num_regions: int) -> dict[str, np.ndarray]:
    """``decoding.greedy_start``/``beam_start`` as NumPy arrays (the same values and dtypes), built
    without TensorFlow ops: a dozen eager ops cost milliseconds on the batch scheduler's thread."""
    from captioner.model import decoding as D

    def empty(rows: int, *shape: int, dtype=np.float32) -> np.ndarray:
        return np.zeros([rows, *shape], dtype)

    if beam_size == 1:
        return {"tokens": empty(images, 0, dtype=np.int32), "attention": empty(images, 0, num_regions),
                "scores": empty(images), "finished": empty(images, dtype=bool),
                "lengths": empty(images, dtype=np.int32)}
    k, rows = beam_size, images * beam_size
    # Only the first beam is live at the start, so the k beams do not all pick the same word.
    first = np.array([0.0] + [D.NEG_INF] * (k - 1), np.float32)
    return {"tokens": empty(rows, 0, dtype=np.int32), "attention": empty(rows, 0, num_regions),
            "scores": np.tile(first[None], [images, 1]), "live_lengths": empty(images, dtype=np.int32),
            "pool_tokens": empty(rows, 0, dtype=np.int32), "pool_attention": empty(rows, 0, num_regions),
            "pool_scores": np.full([images, k], D.EMPTY, np.float32),
            "pool_raw": np.full([images, k], D.EMPTY, np.float32),
            "pool_lengths": empty(images, k, dtype=np.int32), "done": empty(images, dtype=bool)}


class SavedModelCaptioner:
    """Runs an exported SavedModel in-process with the library's preprocessing and decoders."""

    def __init__(self, saved_model_dir: Path | str):
        import tensorflow as tf

        self.path = Path(saved_model_dir)
        if not (self.path / "saved_model.pb").is_file():
            raise ModelError("not a SavedModel folder (no saved_model.pb)", path=str(self.path))
        self.loaded = tf.saved_model.load(str(self.path), tags=[C.SERVE_TAG])
        missing = [s for s in (C.SIG_ENCODE, C.SIG_DECODE_STEP, C.SIG_METADATA) if s not in self.loaded.signatures]
        if missing:
            raise ModelError(f"SavedModel lacks signature(s) {missing}", path=str(self.path))
        if C.IN_ROWS not in self.loaded.signatures[C.SIG_METADATA].structured_input_signature[1]:
            raise ModelError("exported by an older captioner (growing decode state, metadata without "
                             "inputs); export it again with `captioner export`", path=str(self.path))
        meta = self.loaded.signatures[C.SIG_METADATA](**{C.IN_ROWS: tf.constant([0], tf.int32)})
        self.metadata = json.loads(meta[C.OUT_METADATA].numpy()[0])
        self.vocab = [t.decode() for t in meta[C.OUT_VOCAB].numpy()[0]]
        self.image_size = int(self.metadata["input_size"])
        self.max_length = int(self.metadata["max_length"])
        self.max_decode_length = int(self.metadata["max_decode_length"])
        # Exports from before n-gram blocking decode without it, as their serving_default does.
        self.no_repeat_ngram_size = int(self.metadata.get("no_repeat_ngram_size", 0))
        self._encode = self.loaded.signatures[C.SIG_ENCODE]
        self._step = self.loaded.signatures[C.SIG_DECODE_STEP]
        self._decoders: dict[tuple, Callable] = {}

    def encode(self, pixels):
        """The ``encode`` signature: ``pixels [B, S, S, 3]`` uint8 -> ``features [B, N, F]`` (a tensor)."""
        return self._encode(**{C.IN_IMAGES: pixels})[C.OUT_FEATURES]

    def decode_step(self, features, tokens, state, position) -> tuple:
        """The ``decode_step`` signature -> ``(log_probs, attention, state)`` (tensors)."""
        out = self._step(**{C.IN_FEATURES: features, C.IN_TOKENS: tokens, C.IN_STATE: state,
                            C.IN_POSITION: position})
        return out[C.OUT_LOG_PROBS], out[C.OUT_ATTENTION], out[C.OUT_STATE]

    def _decoder(self, beam_size: int, max_length: int, length_penalty: float) -> Callable:
        import tensorflow as tf

        key = (beam_size, max_length, length_penalty)
        if key not in self._decoders:
            self._decoders[key] = tf.function(
                lambda images: decode_images(self.encode, self.decode_step, images,
                                             num_regions=int(self.metadata["num_regions"]),
                                             state_shape=self.metadata["state_shape"], beam_size=beam_size,
                                             max_length=max_length, length_penalty=length_penalty,
                                             no_repeat_ngram_size=self.no_repeat_ngram_size),
                reduce_retracing=True)
        return self._decoders[key]

    def decode_pixels(self, pixels: np.ndarray, *, beam_size: int | None = None, max_length: int | None = None,
                      length_penalty: float | None = None) -> dict[str, np.ndarray]:
        """Raw ``decode`` output for preprocessed ``pixels [B, S, S, 3]``: ``tokens [B, K, T]`` (T is the
        number of decode steps taken), ``scores``, ``attention``, ..."""
        beam_size = beam_size or int(self.metadata["beam_size"])
        max_length = max_length or self.max_length
        if max_length > self.max_decode_length:
            raise ModelError(f"max_length {max_length} is longer than this export's decode state holds "
                             f"({self.max_decode_length} positions)", path=str(self.path))
        alpha = float(self.metadata["length_penalty"] if length_penalty is None else length_penalty)
        out = self._decoder(beam_size, max_length, alpha)(np.asarray(pixels, np.uint8))
        return {k: v.numpy() for k, v in out.items()}

    def caption_pixels(self, pixels: np.ndarray, *, beam_size: int | None = None, max_length: int | None = None,
                       length_penalty: float | None = None, with_attention: bool = False) -> list[Caption]:
        out = self.decode_pixels(pixels, beam_size=beam_size, max_length=max_length, length_penalty=length_penalty)
        return results_from_decode(out, self.vocab, with_attention)

    def caption_files(self, paths: Sequence[Path | str], **kwargs) -> list[Caption]:
        pixels = np.stack([load_image(p, self.image_size) for p in paths])
        return self.caption_pixels(pixels, **kwargs)

    def caption_each(self, paths: Sequence[Path | str], **kwargs) -> list[Caption | ImageError]:
        """Like ``caption_files``, but an image that cannot be read does not spoil the others: its
        entry is the ``ImageError`` saying why (it names the file), the readable ones are captioned."""
        loaded: list[np.ndarray | ImageError] = []
        for path in paths:
            try:
                loaded.append(load_image(path, self.image_size))
            except ImageError as exc:
                loaded.append(exc)
        good = [p for p in loaded if not isinstance(p, ImageError)]
        captions = iter(self.caption_pixels(np.stack(good), **kwargs) if good else [])
        return [p if isinstance(p, ImageError) else next(captions) for p in loaded]


# What a folder given to ``caption`` is searched for (what ``load_image`` reads; not recursive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def expand_image_paths(paths: Sequence[Path | str]) -> tuple[list[Path], list[str]]:
    """Files as given; a folder is replaced by its image files (by suffix, sorted by name, hidden
    files ignored). Returns ``(paths, notes)``: a note for each entry of a folder that was skipped."""
    found: list[Path] = []
    notes: list[str] = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
            continue
        images = []
        for entry in sorted(path.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
                images.append(entry)
            else:
                kind = "a folder (folders are not searched)" if entry.is_dir() else "not an image file name"
                notes.append(f"{entry}: skipped: {kind}")
        if not images:
            notes.append(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        found.extend(images)
    return found, notes


def caption_images(model_dir: Path | str, paths: Sequence[Path | str], beam_size: int = 3,
                   max_length: int | None = None, with_attention: bool = False) -> list[Caption]:
    """Caption image files with an exported SavedModel; the notebook/script entry point. ``model_dir``
    is anything ``captioner.registry.resolve_model`` takes (a repository, model, version or run folder)."""
    from captioner.registry import resolve_model

    captioner = SavedModelCaptioner(resolve_model(model_dir).path)
    return captioner.caption_files(paths, beam_size=beam_size, max_length=max_length, with_attention=with_attention)
