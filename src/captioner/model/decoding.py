"""Greedy and beam search over any step function, in TensorFlow ops.

The same code runs three ways, so the three cannot drift apart:

* in the library, inside a ``tf.function`` over the in-memory model;
* in the exported SavedModel's ``serving_default`` (graph mode, stock ops, ``tf.while_loop``);
* in the gateway, eagerly, with a step function that calls the SavedModel's ``decode_step``
  signature in-process or over TF Serving's gRPC API.

``step_fn(tokens [M], state, t) -> (log_probs [M, V], attention [M, N], state)`` where ``M`` is the
number of rows being decoded (batch x beams), ``t`` the position (scalar int32) of ``tokens`` and
``state`` any tensor whose first axis is ``M``.
All beams of a batch are decoded in one ``step_fn`` call per position.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from captioner.constants import END_ID, PAD_ID, START_ID, UNK_ID

StepFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor]]
NEG_INF = -1e9
# Scores at or below VALID come from masked tokens or dead beams; EMPTY marks an unfilled pool place.
VALID = NEG_INF / 2
EMPTY = 4 * NEG_INF
NEVER_GENERATED = (PAD_ID, START_ID, UNK_ID)


def mask_invalid(log_probs, t):
    """``log_probs [M, V]`` at position ``t`` with the tokens no decoder may emit set to NEG_INF
    (for samplers outside this module: SCST draws its captions under the same rule)."""
    return _mask_invalid(tf.cast(log_probs, tf.float32), t)


def length_normalizer(lengths, alpha: float):
    """GNMT length penalty ``((5 + len) / 6) ** alpha``."""
    return tf.pow((5.0 + tf.cast(lengths, tf.float32)) / 6.0, alpha)


def _state_invariant(state) -> tf.TensorShape:
    # Rows change with beams and the cache grows by one position per step: leave every axis open.
    return tf.TensorShape([None] * state.shape.rank)


def _mask_invalid(log_probs, t):
    """<pad>, <start> and <unk> are never generated, and <end> not at the first position: an empty
    caption is never the answer (an undertrained model, or beam search's bias to short outputs, would
    otherwise produce one), and a user never reads "<unk>" (the model learns it for every rare word,
    so on photos unlike the training data it is often the likeliest next token)."""
    vocab = tf.shape(log_probs)[-1]
    never = tf.reduce_sum(tf.one_hot(list(NEVER_GENERATED), vocab, on_value=NEG_INF, off_value=0.0), axis=0)
    first = tf.one_hot(END_ID, vocab, on_value=NEG_INF, off_value=0.0)
    return log_probs + (never + tf.where(tf.equal(t, 0), first, tf.zeros_like(first)))[None]


def repeat_mask(tokens, n: int, vocab):
    """``[M, V]``: NEG_INF for every token that would complete an n-gram already in ``tokens [M, T]``
    (0 elsewhere; all 0 when ``n`` is 0). Blocking repeated n-grams (Hugging Face's
    ``no_repeat_ngram_size``) stops the loops that CIDEr-trained decoders fall into, "a man is riding
    a bike on a bike"; ``repeat_mask_np`` is its NumPy twin."""
    rows = tf.shape(tokens)[0]
    if n <= 0:
        return tf.zeros([rows, vocab], tf.float32)
    m = n - 1
    # m sentinels in front: every row has a last (n-1)-gram to compare, and no window that holds a
    # sentinel can match a real one.
    padded = tf.concat([tf.fill([rows, m], -1), tf.cast(tokens, tf.int32)], axis=1)
    count = tf.shape(padded)[1] - m
    match = tf.ones([rows, count], tf.bool)
    for i in range(m):
        match = tf.logical_and(match, tf.equal(padded[:, i:i + count], padded[:, count + i:count + i + 1]))
    following = tf.one_hot(padded[:, m:], vocab, on_value=True, off_value=False)
    banned = tf.reduce_any(tf.logical_and(following, match[:, :, None]), axis=1)
    return tf.where(banned, NEG_INF, 0.0)


# The searches are split into start / advance (one position) / result, so that the same code runs
# inside ``tf.while_loop`` (greedy_search, beam_search) and one position at a time outside it (the
# gateway's batch scheduler advances many requests' searches with one shared decode step). Every
# field's first axis is the image (or row) axis of one search.
GREEDY_FIELDS = ("tokens", "attention", "scores", "finished", "lengths")
BEAM_FIELDS = ("tokens", "attention", "scores", "live_lengths", "pool_tokens", "pool_attention", "pool_scores",
               "pool_raw", "pool_lengths", "done")


def _named(fields: tuple[str, ...], values) -> dict:
    return dict(zip(fields, values, strict=True))


def greedy_start(batch_size, num_regions: int) -> dict:
    """The empty greedy search of ``batch_size`` images: feed ``START_ID`` at position 0."""
    batch_size = tf.convert_to_tensor(batch_size, tf.int32)
    return {"tokens": tf.zeros([batch_size, 0], tf.int32),
            "attention": tf.zeros([batch_size, 0, num_regions], tf.float32),
            "scores": tf.zeros([batch_size], tf.float32), "finished": tf.zeros([batch_size], tf.bool),
            "lengths": tf.zeros([batch_size], tf.int32)}


def greedy_advance(search: dict, log_probs, attention, t, no_repeat_ngram_size: int = 0) -> tuple[tf.Tensor, dict]:
    """One position: ``log_probs [B, V]`` and ``attention [B, N]`` of position ``t`` -> (the tokens to
    feed at ``t + 1`` [B], the search after ``t``). The decode state needs no reordering."""
    log_probs = _mask_invalid(tf.cast(log_probs, tf.float32), t)
    if no_repeat_ngram_size:
        log_probs = log_probs + repeat_mask(search["tokens"], no_repeat_ngram_size, tf.shape(log_probs)[-1])
    finished = search["finished"]
    token = tf.cast(tf.argmax(log_probs, axis=-1), tf.int32)
    token = tf.where(finished, PAD_ID, token)
    gain = tf.gather(log_probs, token, batch_dims=1)
    scores = search["scores"] + tf.where(finished, 0.0, gain)
    lengths = search["lengths"] + tf.cast(tf.logical_not(finished), tf.int32)
    return token, {"tokens": tf.concat([search["tokens"], token[:, None]], axis=1),
                   "attention": tf.concat([search["attention"], tf.cast(attention, tf.float32)[:, None]], axis=1),
                   "scores": scores, "finished": tf.logical_or(finished, tf.equal(token, END_ID)),
                   "lengths": lengths}


def greedy_done(search: dict) -> tf.Tensor:
    """True once every image's caption ended."""
    return tf.reduce_all(search["finished"])


def greedy_result(search: dict, length_penalty: float = 0.0) -> dict:
    """``greedy_search``'s output from a search that stopped."""
    lengths, scores = search["lengths"], search["scores"]
    normalised = scores / length_normalizer(tf.maximum(lengths, 1), length_penalty)
    return {"tokens": search["tokens"], "scores": normalised, "log_probs": scores, "lengths": lengths,
            "attention": search["attention"], "finished": search["finished"]}


def greedy_search(step_fn: StepFn, state, batch_size, max_length: int, num_regions: int,
                  length_penalty: float = 0.0, no_repeat_ngram_size: int = 0) -> dict:
    """Returns ``tokens [B, T]`` (ending with <end> or cut at max_length), ``scores [B]`` (the log
    probability divided by the length penalty, as beam search scores are, so that the two compare),
    ``log_probs [B]`` (raw), ``lengths [B]``, ``attention [B, T, N]`` and ``finished [B]`` (False
    when cut at max_length). ``no_repeat_ngram_size``: see ``repeat_mask``."""
    batch_size = tf.convert_to_tensor(batch_size, tf.int32)
    state = tf.convert_to_tensor(state)
    last = tf.fill([batch_size], START_ID)
    search = greedy_start(batch_size, num_regions)

    def cond(t, last, state, *fields):
        return tf.logical_and(t < max_length, tf.logical_not(greedy_done(_named(GREEDY_FIELDS, fields))))

    def body(t, last, state, *fields):
        log_probs, att, state = step_fn(last, state, t)
        token, search = greedy_advance(_named(GREEDY_FIELDS, fields), log_probs, att, t, no_repeat_ngram_size)
        return (t + 1, token, tf.convert_to_tensor(state), *(search[f] for f in GREEDY_FIELDS))

    loop = (tf.constant(0), last, state, *(search[f] for f in GREEDY_FIELDS))
    invariants = (tf.TensorShape([]), tf.TensorShape([None]), _state_invariant(state),
                  tf.TensorShape([None, None]), tf.TensorShape([None, None, num_regions]),
                  tf.TensorShape([None]), tf.TensorShape([None]), tf.TensorShape([None]))
    out = tf.while_loop(cond, body, loop, shape_invariants=invariants)
    return greedy_result(_named(GREEDY_FIELDS, out[3:]), float(length_penalty))


def beam_start(batch_size, beam_size: int, num_regions: int) -> dict:
    """The empty beam search of ``batch_size`` images with ``beam_size`` beams each: feed
    ``START_ID`` to all ``batch_size * beam_size`` rows at position 0."""
    k = beam_size
    batch_size = tf.convert_to_tensor(batch_size, tf.int32)
    rows = batch_size * k
    # Only the first beam is live at the start, so the k beams do not all pick the same word.
    first = tf.concat([tf.zeros([1]), tf.fill([k - 1], NEG_INF)], axis=0)
    return {"tokens": tf.zeros([rows, 0], tf.int32), "attention": tf.zeros([rows, 0, num_regions], tf.float32),
            "scores": tf.tile(first[None], [batch_size, 1]), "live_lengths": tf.zeros([batch_size], tf.int32),
            "pool_tokens": tf.zeros([rows, 0], tf.int32),
            "pool_attention": tf.zeros([rows, 0, num_regions], tf.float32),
            "pool_scores": tf.fill([batch_size, k], EMPTY), "pool_raw": tf.fill([batch_size, k], EMPTY),
            "pool_lengths": tf.zeros([batch_size, k], tf.int32), "done": tf.zeros([batch_size], tf.bool)}


def _settled(t, scores, pool_scores, k: int, max_length, alpha):
    """Per image: no live beam can still enter the full pool. A live beam's log-probability only
    falls as it grows and it will end at a length in [t + 2, max_length], so its best normalised
    score is score / max(penalty(t + 2), penalty(max_length)) (penalty(max_length) when
    length_penalty >= 0). A settled image is frozen, so each image's result is the same whether
    it is decoded alone or in a batch."""
    best_live = tf.reduce_max(scores, axis=1)
    divisor = tf.maximum(length_normalizer(t + 2, alpha), length_normalizer(max_length, alpha))
    full = pool_scores[:, k - 1] > VALID
    beaten = tf.logical_and(full, pool_scores[:, k - 1] >= best_live / divisor)
    return tf.logical_or(beaten, best_live <= VALID)


def beam_advance(search: dict, log_probs, attention, t, beam_size: int, max_length,
                 length_penalty, no_repeat_ngram_size: int = 0) -> tuple[tf.Tensor, tf.Tensor, dict]:
    """One position of beam search: ``log_probs [B*K, V]`` and ``attention [B*K, N]`` of position
    ``t`` -> (the tokens to feed at ``t + 1`` [B*K], ``source [B*K]``: the row of the decode state
    each row continues, to gather the state by, the search after ``t``). ``max_length`` and
    ``length_penalty`` may be tensors."""
    k = beam_size
    alpha = length_penalty
    scores, done = search["scores"], search["done"]
    tokens, attention_so_far = search["tokens"], search["attention"]
    batch_size = tf.shape(scores)[0]
    rows = batch_size * k
    num_regions = attention_so_far.shape[-1]
    base = tf.range(batch_size)[:, None] * k
    identity = tf.range(rows)
    att = tf.cast(attention, tf.float32)
    vocab = tf.shape(log_probs)[-1]
    log_probs = _mask_invalid(tf.cast(log_probs, tf.float32), t)
    if no_repeat_ngram_size:
        log_probs = log_probs + repeat_mask(tokens, no_repeat_ngram_size, vocab)
    log_probs = tf.reshape(log_probs, [batch_size, k, vocab])
    candidates = tf.reshape(scores[:, :, None] + log_probs, [batch_size, k * vocab])
    # Each beam has one <end> candidate, so the best 2k hold at least k that go on.
    top, index = tf.math.top_k(candidates, k=2 * k)
    top_beam, top_token = index // vocab, index % vocab
    ends = tf.equal(top_token, END_ID)
    top_source = tf.reshape(base + top_beam, [-1])
    frozen = tf.repeat(done, k)

    # Live beams: the best k candidates that did not end.
    _, pick = tf.math.top_k(tf.where(ends, -float("inf"), top), k=k)
    new_scores = tf.where(done[:, None], scores, tf.gather(top, pick, batch_dims=1))
    token = tf.where(frozen, PAD_ID, tf.reshape(tf.gather(top_token, pick, batch_dims=1), [-1]))
    source = tf.where(frozen, identity, tf.reshape(tf.gather(base + top_beam, pick, batch_dims=1), [-1]))
    new_tokens = tf.concat([tf.gather(tokens, source), token[:, None]], axis=1)
    step_att = tf.where(frozen[:, None], 0.0, tf.gather(att, source))
    new_attention = tf.concat([tf.gather(attention_so_far, source), step_att[:, None]], axis=1)

    # The pool: the best k of what it held and the candidates that ended now.
    length = t + 1
    ended = tf.logical_and(tf.logical_and(ends, top > VALID), tf.logical_not(done)[:, None])
    ended_scores = tf.where(ended, top / length_normalizer(length, alpha), EMPTY)
    merged = tf.concat([search["pool_scores"], ended_scores], axis=1)
    # top_k puts the lower index first on ties: a caption already in the pool keeps its place.
    new_pool_scores, take = tf.math.top_k(merged, k=k)
    steps = tf.shape(tokens)[1] + 1
    ended_tokens = tf.concat([tf.gather(tokens, top_source), tf.fill([rows * 2, 1], END_ID)], axis=1)
    ended_attention = tf.concat([tf.gather(attention_so_far, top_source), tf.gather(att, top_source)[:, None]],
                                axis=1)
    held_tokens = tf.concat([search["pool_tokens"], tf.fill([rows, 1], PAD_ID)], axis=1)
    held_attention = tf.concat([search["pool_attention"], tf.zeros([rows, 1, num_regions])], axis=1)
    all_tokens = tf.concat([tf.reshape(held_tokens, [batch_size, k, steps]),
                            tf.reshape(ended_tokens, [batch_size, 2 * k, steps])], axis=1)
    all_attention = tf.concat([tf.reshape(held_attention, [batch_size, k, steps, num_regions]),
                               tf.reshape(ended_attention, [batch_size, 2 * k, steps, num_regions])], axis=1)
    pool_tokens = tf.reshape(tf.gather(all_tokens, take, batch_dims=1), [rows, steps])
    pool_attention = tf.reshape(tf.gather(all_attention, take, batch_dims=1), [rows, steps, num_regions])
    pool_raw = tf.gather(tf.concat([search["pool_raw"], top], axis=1), take, batch_dims=1)
    pool_lengths = tf.gather(tf.concat([search["pool_lengths"], tf.fill([batch_size, 2 * k], length)], axis=1),
                             take, batch_dims=1)

    live_lengths = search["live_lengths"] + tf.cast(tf.logical_not(done), tf.int32)
    done = tf.logical_or(done, _settled(t, new_scores, new_pool_scores, k, max_length, alpha))
    return token, source, {"tokens": new_tokens, "attention": new_attention, "scores": new_scores,
                           "live_lengths": live_lengths, "pool_tokens": pool_tokens,
                           "pool_attention": pool_attention, "pool_scores": new_pool_scores,
                           "pool_raw": pool_raw, "pool_lengths": pool_lengths, "done": done}


def beam_done(search: dict) -> tf.Tensor:
    """True once every image is settled (see ``_settled``)."""
    return tf.reduce_all(search["done"])


def beam_result(search: dict, beam_size: int, length_penalty) -> dict:
    """``beam_search``'s output from a search that stopped. Finished captions first (best normalised
    score first), then unfinished live beams, then the empty places of a pool that nothing could fill."""
    k = beam_size
    alpha = length_penalty
    raw, pool_scores = search["scores"], search["pool_scores"]
    tokens, attention = search["tokens"], search["attention"]
    batch_size = tf.shape(raw)[0]
    num_regions = attention.shape[-1]
    live_lengths = tf.tile(search["live_lengths"][:, None], [1, k])
    live_scores = raw / length_normalizer(tf.maximum(live_lengths, 1), alpha)
    in_pool = pool_scores > VALID
    tier = tf.concat([tf.where(in_pool, 0, 2), tf.where(raw > VALID, 1, 2)], axis=1)
    normalised = tf.concat([pool_scores, live_scores], axis=1)
    by_score = tf.argsort(normalised, axis=1, direction="DESCENDING", stable=True)
    by_tier = tf.argsort(tf.gather(tier, by_score, batch_dims=1), axis=1, stable=True)
    order = tf.gather(by_score, by_tier, batch_dims=1)[:, :k]
    steps = tf.shape(tokens)[1]
    tokens = tf.concat([tf.reshape(search["pool_tokens"], [batch_size, k, steps]),
                        tf.reshape(tokens, [batch_size, k, steps])], axis=1)
    attention = tf.concat([tf.reshape(search["pool_attention"], [batch_size, k, steps, num_regions]),
                           tf.reshape(attention, [batch_size, k, steps, num_regions])], axis=1)
    finished = tf.concat([in_pool, tf.zeros([batch_size, k], tf.bool)], axis=1)

    def pick(x):
        return tf.gather(x, order, batch_dims=1)

    return {"tokens": pick(tokens), "scores": pick(normalised),
            "log_probs": pick(tf.concat([search["pool_raw"], raw], axis=1)),
            "lengths": pick(tf.concat([search["pool_lengths"], live_lengths], axis=1)),
            "attention": pick(attention), "finished": pick(finished)}


def beam_search(step_fn: StepFn, state, batch_size, beam_size: int, max_length: int, num_regions: int,
                length_penalty: float = 0.6, no_repeat_ngram_size: int = 0) -> dict:
    """Batched beam search. ``state`` (and whatever ``step_fn`` closes over) must already be tiled
    to ``batch_size * beam_size`` rows, beams of an image adjacent.

    Each image keeps ``k`` live beams and a pool of up to ``k`` finished captions. A candidate that
    ends goes to the pool, ranked by length-normalised score, and never takes a live slot, so a short
    finished caption cannot be pushed out by longer live beams that score higher on raw
    log-probability (as tensor2tensor's and Hugging Face's ``BeamHypotheses`` do).

    Returns, best first per image: ``tokens [B, K, T]``, ``scores [B, K]`` (length-normalised log
    probability), ``log_probs [B, K]`` (raw), ``lengths [B, K]``, ``attention [B, K, T, N]`` and
    ``finished [B, K]``. Finished captions come first; unfinished ones (cut at ``max_length``) fill
    the remaining places only when fewer than ``k`` finished. ``no_repeat_ngram_size``: see
    ``repeat_mask``.
    """
    k = beam_size
    alpha = float(length_penalty)
    batch_size = tf.convert_to_tensor(batch_size, tf.int32)
    state = tf.convert_to_tensor(state)
    last = tf.fill([batch_size * k], START_ID)
    search = beam_start(batch_size, k, num_regions)

    def cond(t, last, state, *fields):
        return tf.logical_and(t < max_length, tf.logical_not(beam_done(_named(BEAM_FIELDS, fields))))

    def body(t, last, state, *fields):
        log_probs, att, state = step_fn(last, state, t)
        token, source, search = beam_advance(_named(BEAM_FIELDS, fields), log_probs, att, t, k, max_length,
                                             alpha, no_repeat_ngram_size)
        state = tf.gather(tf.convert_to_tensor(state), source)
        return (t + 1, token, state, *(search[f] for f in BEAM_FIELDS))

    loop = (tf.constant(0), last, state, *(search[f] for f in BEAM_FIELDS))
    pair, seq = tf.TensorShape([None, k]), tf.TensorShape([None, None])
    regions = tf.TensorShape([None, None, num_regions])
    invariants = (tf.TensorShape([]), tf.TensorShape([None]), _state_invariant(state), seq, regions, pair,
                  tf.TensorShape([None]), seq, regions, pair, pair, pair, tf.TensorShape([None]))
    out = tf.while_loop(cond, body, loop, shape_invariants=invariants)
    return beam_result(_named(BEAM_FIELDS, out[3:]), k, alpha)


# NumPy twins of greedy_advance / beam_advance, for a caller that advances many small searches one
# position at a time (the gateway's batch scheduler): a call costs tens of microseconds where the
# TensorFlow version costs a millisecond of op dispatch. They must give the same bits as the
# TensorFlow versions (tests compare them): float32 throughout, top-k ties broken by the lower
# index as tf.math.top_k does, and the length penalties taken from ``length_normalizer`` itself.
_NP_NEG_INF, _NP_VALID, _NP_EMPTY = np.float32(NEG_INF), np.float32(VALID), np.float32(EMPTY)


def _np_mask(vocab: int, t: int) -> np.ndarray:
    mask = np.zeros([vocab], np.float32)
    mask[list(NEVER_GENERATED)] = _NP_NEG_INF
    if t == 0:
        mask[END_ID] += _NP_NEG_INF
    return mask


def _np_top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest of each row, largest first, the lower index first on ties."""
    if x.shape[1] <= 4 * k:
        return np.argsort(-x, axis=1, kind="stable")[:, :k]
    out = np.empty([x.shape[0], k], np.int64)
    kth = np.partition(x, x.shape[1] - k, axis=1)[:, x.shape[1] - k]
    for row, threshold in enumerate(kth):
        chosen = np.flatnonzero(x[row] >= threshold)  # ascending: the stable sort keeps lower indices first
        out[row] = chosen[np.argsort(-x[row, chosen], kind="stable")[:k]]
    return out


def repeat_mask_np(tokens: np.ndarray, lengths: np.ndarray, n: int, vocab: int) -> np.ndarray:
    """``repeat_mask`` on NumPy arrays, each row's history its first ``lengths[r]`` positions (the
    gateway's batched searches keep histories in buffers of ``max_length`` positions)."""
    rows, steps = tokens.shape[0], tokens.shape[1]
    mask = np.zeros([rows, vocab], np.float32)
    m = n - 1
    count = steps - m
    if n <= 0 or count <= 0:
        return mask
    lengths = np.asarray(lengths, np.int64)
    every = np.arange(rows)
    match = np.arange(count)[None] + m < lengths[:, None]  # windows whose next token is in the history
    for i in range(m):
        last = tokens[every, np.clip(lengths - m + i, 0, steps - 1)]
        match &= tokens[:, i:i + count] == last[:, None]
    row, window = np.nonzero(match)
    mask[row, tokens[row, window + m]] = _NP_NEG_INF
    return mask


@functools.lru_cache(maxsize=256)
def penalties(max_length: int, alpha: float) -> np.ndarray:
    """``length_normalizer(0 .. max_length + 2, alpha)`` as NumPy float32, computed by TensorFlow one
    length at a time, as the searches compute them (a vectorised pow may round differently).
    Read-only: every search of these settings shares the cached table."""
    table = np.array([length_normalizer(tf.constant(n), float(alpha)).numpy() for n in range(max_length + 3)],
                     np.float32)
    table.flags.writeable = False
    return table


def greedy_advance_np(search: dict, log_probs: np.ndarray, attention: np.ndarray,
                      t: int, no_repeat_ngram_size: int = 0) -> tuple[np.ndarray, dict]:
    """``greedy_advance`` on NumPy arrays."""
    log_probs = np.asarray(log_probs, np.float32) + _np_mask(log_probs.shape[-1], t)[None]
    if no_repeat_ngram_size:
        tokens = search["tokens"]
        log_probs = log_probs + repeat_mask_np(tokens, np.full([len(tokens)], tokens.shape[1]),
                                               no_repeat_ngram_size, log_probs.shape[-1])
    finished = search["finished"]
    token = np.where(finished, PAD_ID, np.argmax(log_probs, axis=-1)).astype(np.int32)
    gain = log_probs[np.arange(len(token)), token]
    return token, {"tokens": np.concatenate([search["tokens"], token[:, None]], axis=1),
                   "attention": np.concatenate([search["attention"],
                                                np.asarray(attention, np.float32)[:, None]], axis=1),
                   "scores": search["scores"] + np.where(finished, np.float32(0), gain),
                   "finished": finished | (token == END_ID),
                   "lengths": search["lengths"] + (~finished).astype(np.int32)}


def beam_advance_np(search: dict, log_probs: np.ndarray, attention: np.ndarray, t: int, beam_size: int,
                    max_length: int, penalty: np.ndarray,
                    no_repeat_ngram_size: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """``beam_advance`` on NumPy arrays; ``penalty`` is ``penalties(max_length, length_penalty)``."""
    k = beam_size
    scores, done = search["scores"], search["done"]
    tokens, attention_so_far = search["tokens"], search["attention"]
    batch_size = scores.shape[0]
    rows, vocab = batch_size * k, log_probs.shape[-1]
    num_regions = attention_so_far.shape[-1]
    base = np.arange(batch_size)[:, None] * k
    att = np.asarray(attention, np.float32)
    log_probs = np.asarray(log_probs, np.float32) + _np_mask(vocab, t)[None]
    if no_repeat_ngram_size:
        log_probs = log_probs + repeat_mask_np(tokens, np.full([rows], tokens.shape[1]), no_repeat_ngram_size, vocab)
    log_probs = log_probs.reshape(batch_size, k, vocab)
    candidates = (scores[:, :, None] + log_probs).reshape(batch_size, k * vocab)
    index = _np_top_k(candidates, 2 * k)
    top = np.take_along_axis(candidates, index, axis=1)
    top_beam, top_token = index // vocab, index % vocab
    ends = top_token == END_ID
    top_source = (base + top_beam).reshape(-1)
    frozen = np.repeat(done, k)

    # Live beams: the first k candidates that did not end (``top`` is sorted, best first).
    pick = np.argsort(ends, axis=1, kind="stable")[:, :k]
    new_scores = np.where(done[:, None], scores, np.take_along_axis(top, pick, axis=1))
    token = np.where(frozen, PAD_ID, np.take_along_axis(top_token, pick, axis=1).reshape(-1)).astype(np.int32)
    source = np.where(frozen, np.arange(rows), np.take_along_axis(base + top_beam, pick, axis=1).reshape(-1))
    new_tokens = np.concatenate([tokens[source], token[:, None]], axis=1)
    step_att = np.where(frozen[:, None], np.float32(0), att[source])
    new_attention = np.concatenate([attention_so_far[source], step_att[:, None]], axis=1)

    length = t + 1
    ended = ends & (top > _NP_VALID) & ~done[:, None]
    ended_scores = np.where(ended, top / penalty[length], _NP_EMPTY)
    merged = np.concatenate([search["pool_scores"], ended_scores], axis=1)
    take = np.argsort(-merged, axis=1, kind="stable")[:, :k]
    new_pool_scores = np.take_along_axis(merged, take, axis=1)
    steps = tokens.shape[1] + 1
    ended_tokens = np.concatenate([tokens[top_source], np.full([rows * 2, 1], END_ID, np.int32)], axis=1)
    ended_attention = np.concatenate([attention_so_far[top_source], att[top_source][:, None]], axis=1)
    held_tokens = np.concatenate([search["pool_tokens"], np.full([rows, 1], PAD_ID, np.int32)], axis=1)
    held_attention = np.concatenate([search["pool_attention"], np.zeros([rows, 1, num_regions], np.float32)],
                                    axis=1)
    all_tokens = np.concatenate([held_tokens.reshape(batch_size, k, steps),
                                 ended_tokens.reshape(batch_size, 2 * k, steps)], axis=1)
    all_attention = np.concatenate([held_attention.reshape(batch_size, k, steps, num_regions),
                                    ended_attention.reshape(batch_size, 2 * k, steps, num_regions)], axis=1)
    pool_tokens = np.take_along_axis(all_tokens, take[:, :, None], axis=1).reshape(rows, steps)
    pool_attention = np.take_along_axis(all_attention, take[:, :, None, None], axis=1).reshape(
        rows, steps, num_regions)
    pool_raw = np.take_along_axis(np.concatenate([search["pool_raw"], top], axis=1), take, axis=1)
    pool_lengths = np.take_along_axis(np.concatenate(
        [search["pool_lengths"], np.full([batch_size, 2 * k], length, np.int32)], axis=1), take, axis=1)

    live_lengths = search["live_lengths"] + (~done).astype(np.int32)
    best_live = new_scores.max(axis=1)
    divisor = np.maximum(penalty[t + 2], penalty[max_length])
    worst = new_pool_scores[:, k - 1]
    settled = ((worst > _NP_VALID) & (worst >= best_live / divisor)) | (best_live <= _NP_VALID)
    return token, source, {"tokens": new_tokens, "attention": new_attention, "scores": new_scores,
                           "live_lengths": live_lengths, "pool_tokens": pool_tokens,
                           "pool_attention": pool_attention, "pool_scores": new_pool_scores,
                           "pool_raw": pool_raw, "pool_lengths": pool_lengths, "done": done | settled}


def tile_beams(x, beam_size: int):
    """Repeat every row ``beam_size`` times, adjacent: ``[B, ...] -> [B * K, ...]``."""
    return tf.repeat(x, beam_size, axis=0)


def decode(model, memory, *, beam_size: int, max_length: int, length_penalty: float = 0.6,
           no_repeat_ngram_size: int = 0) -> dict:
    """Decode ``memory [B, N, d]`` with ``model.step``: greedy when ``beam_size == 1``, else beam search.

    The result always has a beam axis: ``tokens [B, K, T]``, ``scores [B, K]``, ``attention [B, K, T, N]``.
    """
    batch = tf.shape(memory)[0]
    regions = memory.shape[1]
    cross = model.cross_memory(memory)
    # Split into heads once for all steps where the model can (CaptionModel.split_cross).
    split = getattr(model, "split_cross", lambda c: c)
    if beam_size == 1:
        cross = split(cross)
        out = greedy_search(lambda tok, st, t: model.step(cross, tok, st, t), model.initial_state(batch, max_length),
                            batch, max_length, regions, length_penalty, no_repeat_ngram_size)
        return {k: v[:, None] for k, v in out.items()}
    tiled = split(tile_beams(cross, beam_size))
    return beam_search(lambda tok, st, t: model.step(tiled, tok, st, t),
                       model.initial_state(batch * beam_size, max_length), batch, beam_size, max_length, regions,
                       length_penalty, no_repeat_ngram_size)
