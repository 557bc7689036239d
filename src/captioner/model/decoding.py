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

from collections.abc import Callable

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


def greedy_search(step_fn: StepFn, state, batch_size, max_length: int, num_regions: int,
                  length_penalty: float = 0.0) -> dict:
    """Returns ``tokens [B, T]`` (ending with <end> or cut at max_length), ``scores [B]`` (the log
    probability divided by the length penalty, as beam search scores are, so that the two compare),
    ``log_probs [B]`` (raw), ``lengths [B]``, ``attention [B, T, N]`` and ``finished [B]`` (False
    when cut at max_length)."""
    batch_size = tf.convert_to_tensor(batch_size, tf.int32)
    state = tf.convert_to_tensor(state)
    last = tf.fill([batch_size], START_ID)
    tokens = tf.zeros([batch_size, 0], tf.int32)
    attention = tf.zeros([batch_size, 0, num_regions], tf.float32)
    scores = tf.zeros([batch_size], tf.float32)
    finished = tf.zeros([batch_size], tf.bool)
    lengths = tf.zeros([batch_size], tf.int32)

    def cond(t, last, state, tokens, attention, scores, finished, lengths):
        return tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(finished)))

    def body(t, last, state, tokens, attention, scores, finished, lengths):
        log_probs, att, state = step_fn(last, state, t)
        log_probs = _mask_invalid(tf.cast(log_probs, tf.float32), t)
        token = tf.cast(tf.argmax(log_probs, axis=-1), tf.int32)
        token = tf.where(finished, PAD_ID, token)
        gain = tf.gather(log_probs, token, batch_dims=1)
        scores += tf.where(finished, 0.0, gain)
        lengths += tf.cast(tf.logical_not(finished), tf.int32)
        finished = tf.logical_or(finished, tf.equal(token, END_ID))
        tokens = tf.concat([tokens, token[:, None]], axis=1)
        attention = tf.concat([attention, tf.cast(att, tf.float32)[:, None]], axis=1)
        return t + 1, token, tf.convert_to_tensor(state), tokens, attention, scores, finished, lengths

    loop = (tf.constant(0), last, state, tokens, attention, scores, finished, lengths)
    invariants = (tf.TensorShape([]), tf.TensorShape([None]), _state_invariant(state),
                  tf.TensorShape([None, None]), tf.TensorShape([None, None, num_regions]),
                  tf.TensorShape([None]), tf.TensorShape([None]), tf.TensorShape([None]))
    _, _, _, tokens, attention, scores, finished, lengths = tf.while_loop(
        cond, body, loop, shape_invariants=invariants)
    normalised = scores / length_normalizer(tf.maximum(lengths, 1), float(length_penalty))
    return {"tokens": tokens, "scores": normalised, "log_probs": scores, "lengths": lengths, "attention": attention,
            "finished": finished}


def beam_search(step_fn: StepFn, state, batch_size, beam_size: int, max_length: int, num_regions: int,
                length_penalty: float = 0.6) -> dict:
    """Batched beam search. ``state`` (and whatever ``step_fn`` closes over) must already be tiled
    to ``batch_size * beam_size`` rows, beams of an image adjacent.

    Each image keeps ``k`` live beams and a pool of up to ``k`` finished captions. A candidate that
    ends goes to the pool, ranked by length-normalised score, and never takes a live slot, so a short
    finished caption cannot be pushed out by longer live beams that score higher on raw
    log-probability (as tensor2tensor's and Hugging Face's ``BeamHypotheses`` do).

    Returns, best first per image: ``tokens [B, K, T]``, ``scores [B, K]`` (length-normalised log
    probability), ``log_probs [B, K]`` (raw), ``lengths [B, K]``, ``attention [B, K, T, N]`` and
    ``finished [B, K]``. Finished captions come first; unfinished ones (cut at ``max_length``) fill
    the remaining places only when fewer than ``k`` finished.
    """
    k = beam_size
    alpha = float(length_penalty)
    batch_size = tf.convert_to_tensor(batch_size, tf.int32)
    rows = batch_size * k
    state = tf.convert_to_tensor(state)
    last = tf.fill([rows], START_ID)
    tokens = tf.zeros([rows, 0], tf.int32)
    attention = tf.zeros([rows, 0, num_regions], tf.float32)
    # Only the first beam is live at the start, so the k beams do not all pick the same word.
    first = tf.concat([tf.zeros([1]), tf.fill([k - 1], NEG_INF)], axis=0)
    scores = tf.tile(first[None], [batch_size, 1])
    live_lengths = tf.zeros([batch_size], tf.int32)
    pool_tokens = tf.zeros([rows, 0], tf.int32)
    pool_attention = tf.zeros([rows, 0, num_regions], tf.float32)
    pool_scores = tf.fill([batch_size, k], EMPTY)
    pool_raw = tf.fill([batch_size, k], EMPTY)
    pool_lengths = tf.zeros([batch_size, k], tf.int32)
    done = tf.zeros([batch_size], tf.bool)
    base = tf.range(batch_size)[:, None] * k
    identity = tf.range(rows)

    def settled(t, scores, pool_scores):
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

    def cond(t, last, state, tokens, attention, scores, live_lengths, pool_tokens, pool_attention, pool_scores,
             pool_raw, pool_lengths, done):
        return tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(done)))

    def body(t, last, state, tokens, attention, scores, live_lengths, pool_tokens, pool_attention, pool_scores,
             pool_raw, pool_lengths, done):
        log_probs, att, state = step_fn(last, state, t)
        att = tf.cast(att, tf.float32)
        vocab = tf.shape(log_probs)[-1]
        log_probs = tf.reshape(_mask_invalid(tf.cast(log_probs, tf.float32), t), [batch_size, k, vocab])
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
        new_attention = tf.concat([tf.gather(attention, source), step_att[:, None]], axis=1)
        state = tf.gather(tf.convert_to_tensor(state), source)

        # The pool: the best k of what it held and the candidates that ended now.
        length = t + 1
        ended = tf.logical_and(tf.logical_and(ends, top > VALID), tf.logical_not(done)[:, None])
        ended_scores = tf.where(ended, top / length_normalizer(length, alpha), EMPTY)
        merged = tf.concat([pool_scores, ended_scores], axis=1)
        # top_k puts the lower index first on ties: a caption already in the pool keeps its place.
        new_pool_scores, take = tf.math.top_k(merged, k=k)
        steps = tf.shape(tokens)[1] + 1
        ended_tokens = tf.concat([tf.gather(tokens, top_source), tf.fill([rows * 2, 1], END_ID)], axis=1)
        ended_attention = tf.concat([tf.gather(attention, top_source), tf.gather(att, top_source)[:, None]], axis=1)
        held_tokens = tf.concat([pool_tokens, tf.fill([rows, 1], PAD_ID)], axis=1)
        held_attention = tf.concat([pool_attention, tf.zeros([rows, 1, num_regions])], axis=1)
        all_tokens = tf.concat([tf.reshape(held_tokens, [batch_size, k, steps]),
                                tf.reshape(ended_tokens, [batch_size, 2 * k, steps])], axis=1)
        all_attention = tf.concat([tf.reshape(held_attention, [batch_size, k, steps, num_regions]),
                                   tf.reshape(ended_attention, [batch_size, 2 * k, steps, num_regions])], axis=1)
        pool_tokens = tf.reshape(tf.gather(all_tokens, take, batch_dims=1), [rows, steps])
        pool_attention = tf.reshape(tf.gather(all_attention, take, batch_dims=1), [rows, steps, num_regions])
        pool_raw = tf.gather(tf.concat([pool_raw, top], axis=1), take, batch_dims=1)
        pool_lengths = tf.gather(tf.concat([pool_lengths, tf.fill([batch_size, 2 * k], length)], axis=1), take,
                                 batch_dims=1)

        live_lengths += tf.cast(tf.logical_not(done), tf.int32)
        done = tf.logical_or(done, settled(t, new_scores, new_pool_scores))
        return (t + 1, token, state, new_tokens, new_attention, new_scores, live_lengths, pool_tokens,
                pool_attention, new_pool_scores, pool_raw, pool_lengths, done)

    loop = (tf.constant(0), last, state, tokens, attention, scores, live_lengths, pool_tokens, pool_attention,
            pool_scores, pool_raw, pool_lengths, done)
    pair, seq = tf.TensorShape([None, k]), tf.TensorShape([None, None])
    regions = tf.TensorShape([None, None, num_regions])
    invariants = (tf.TensorShape([]), tf.TensorShape([None]), _state_invariant(state), seq, regions, pair,
                  tf.TensorShape([None]), seq, regions, pair, pair, pair, tf.TensorShape([None]))
    (_, _, _, tokens, attention, raw, live_lengths, pool_tokens, pool_attention, pool_scores, pool_raw,
     pool_lengths, _) = tf.while_loop(cond, body, loop, shape_invariants=invariants)

    # Finished captions first (best normalised score first), then unfinished live beams, then the
    # empty places of a pool that nothing could fill.
    live_lengths = tf.tile(live_lengths[:, None], [1, k])
    live_scores = raw / length_normalizer(tf.maximum(live_lengths, 1), alpha)
    in_pool = pool_scores > VALID
    tier = tf.concat([tf.where(in_pool, 0, 2), tf.where(raw > VALID, 1, 2)], axis=1)
    normalised = tf.concat([pool_scores, live_scores], axis=1)
    by_score = tf.argsort(normalised, axis=1, direction="DESCENDING", stable=True)
    by_tier = tf.argsort(tf.gather(tier, by_score, batch_dims=1), axis=1, stable=True)
    order = tf.gather(by_score, by_tier, batch_dims=1)[:, :k]
    steps = tf.shape(tokens)[1]
    tokens = tf.concat([tf.reshape(pool_tokens, [batch_size, k, steps]), tf.reshape(tokens, [batch_size, k, steps])],
                       axis=1)
    attention = tf.concat([tf.reshape(pool_attention, [batch_size, k, steps, num_regions]),
                           tf.reshape(attention, [batch_size, k, steps, num_regions])], axis=1)
    finished = tf.concat([in_pool, tf.zeros([batch_size, k], tf.bool)], axis=1)

    def pick(x):
        return tf.gather(x, order, batch_dims=1)

    return {"tokens": pick(tokens), "scores": pick(normalised),
            "log_probs": pick(tf.concat([pool_raw, raw], axis=1)),
            "lengths": pick(tf.concat([pool_lengths, live_lengths], axis=1)),
            "attention": pick(attention), "finished": pick(finished)}


def tile_beams(x, beam_size: int):
    """Repeat every row ``beam_size`` times, adjacent: ``[B, ...] -> [B * K, ...]``."""
    return tf.repeat(x, beam_size, axis=0)


def decode(model, memory, *, beam_size: int, max_length: int, length_penalty: float = 0.6) -> dict:
    """Decode ``memory [B, N, d]`` with ``model.step``: greedy when ``beam_size == 1``, else beam search.

    The result always has a beam axis: ``tokens [B, K, T]``, ``scores [B, K]``, ``attention [B, K, T, N]``.
    """
    batch = tf.shape(memory)[0]
    regions = memory.shape[1]
    cross = model.cross_memory(memory)
    if beam_size == 1:
        out = greedy_search(lambda tok, st, t: model.step(cross, tok, st, t), model.initial_state(batch, max_length),
                            batch, max_length, regions, length_penalty)
        return {k: v[:, None] for k, v in out.items()}
    tiled = tile_beams(cross, beam_size)
    return beam_search(lambda tok, st, t: model.step(tiled, tok, st, t),
                       model.initial_state(batch * beam_size, max_length), batch, beam_size, max_length, regions,
                       length_penalty)
