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

from captioner.constants import END_ID, PAD_ID, START_ID

StepFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor]]
NEG_INF = -1e9


def length_normalizer(lengths, alpha: float):
    """GNMT length penalty ``((5 + len) / 6) ** alpha``."""
    return tf.pow((5.0 + tf.cast(lengths, tf.float32)) / 6.0, alpha)


def _state_invariant(state) -> tf.TensorShape:
    # Rows change with beams and the cache grows by one position per step: leave every axis open.
    return tf.TensorShape([None] * state.shape.rank)


def _mask_invalid(log_probs, t):
    """<pad> and <start> are never generated, and <end> not at the first position: an empty caption
    is never the answer (an undertrained model, or beam search's bias to short outputs, would
    otherwise produce one)."""
    vocab = tf.shape(log_probs)[-1]
    never = tf.reduce_sum(tf.one_hot([PAD_ID, START_ID], vocab, on_value=NEG_INF, off_value=0.0), axis=0)
    first = tf.one_hot(END_ID, vocab, on_value=NEG_INF, off_value=0.0)
    return log_probs + (never + tf.where(tf.equal(t, 0), first, tf.zeros_like(first)))[None]


def greedy_search(step_fn: StepFn, state, batch_size, max_length: int, num_regions: int) -> dict:
    """Returns ``tokens [B, T]`` (ending with <end> or cut at max_length), ``scores [B]``,
    ``lengths [B]`` and ``attention [B, T, N]``."""
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
    _, _, _, tokens, attention, scores, _, lengths = tf.while_loop(
        cond, body, loop, shape_invariants=invariants)
    return {"tokens": tokens, "scores": scores, "lengths": lengths, "attention": attention}


def beam_search(step_fn: StepFn, state, batch_size, beam_size: int, max_length: int, num_regions: int,
                length_penalty: float = 0.6) -> dict:
    """Batched beam search. ``state`` (and whatever ``step_fn`` closes over) must already be tiled
    to ``batch_size * beam_size`` rows, beams of an image adjacent.

    Returns, best first per image: ``tokens [B, K, T]``, ``scores [B, K]`` (length-normalised log
    probability), ``log_probs [B, K]`` (raw), ``lengths [B, K]`` and ``attention [B, K, T, N]``.
    """
    k = beam_size
    batch_size = tf.convert_to_tensor(batch_size, tf.int32)
    rows = batch_size * k
    state = tf.convert_to_tensor(state)
    last = tf.fill([rows], START_ID)
    tokens = tf.zeros([rows, 0], tf.int32)
    attention = tf.zeros([rows, 0, num_regions], tf.float32)
    # Only the first beam is live at the start, so the k beams do not all pick the same word.
    first = tf.concat([tf.zeros([1]), tf.fill([k - 1], NEG_INF)], axis=0)
    scores = tf.tile(first[None], [batch_size, 1])
    finished = tf.zeros([batch_size, k], tf.bool)
    lengths = tf.zeros([batch_size, k], tf.int32)
    base = tf.range(batch_size)[:, None] * k
    best_possible_divisor = length_normalizer(max_length, length_penalty)

    def settled(scores, finished, lengths):
        """Per image: its best finished caption can no longer be beaten. A live beam's log-probability
        only falls as it grows, so its best normalised score is at most score / penalty(max_length)
        (length_penalty >= 0). A settled image is frozen, so each image's result is the same whether
        it is decoded alone or in a batch."""
        done = tf.where(finished, scores / length_normalizer(tf.maximum(lengths, 1), length_penalty), NEG_INF * 2)
        live = tf.where(finished, NEG_INF * 2, scores / best_possible_divisor)
        return tf.reduce_max(done, axis=1) >= tf.reduce_max(live, axis=1)

    def cond(t, last, state, tokens, attention, scores, finished, lengths):
        return tf.logical_and(t < max_length, tf.logical_not(tf.reduce_all(finished)))

    def body(t, last, state, tokens, attention, scores, finished, lengths):
        log_probs, att, state = step_fn(last, state, t)
        vocab = tf.shape(log_probs)[-1]
        log_probs = _mask_invalid(tf.cast(log_probs, tf.float32), t)
        log_probs = tf.reshape(log_probs, [batch_size, k, vocab])
        # A finished beam continues with <pad> at no cost and nothing else.
        pad_only = tf.one_hot(PAD_ID, vocab, on_value=0.0, off_value=NEG_INF)
        log_probs = tf.where(finished[:, :, None], pad_only[None, None], log_probs)
        candidates = tf.reshape(scores[:, :, None] + log_probs, [batch_size, k * vocab])
        scores, index = tf.math.top_k(candidates, k=k)
        beam, token = index // vocab, index % vocab
        source = tf.reshape(base + beam, [-1])
        was_finished = tf.gather(finished, beam, batch_dims=1)
        lengths = tf.gather(lengths, beam, batch_dims=1) + tf.cast(tf.logical_not(was_finished), tf.int32)
        finished = tf.logical_or(was_finished, tf.equal(token, END_ID))
        finished = tf.logical_or(finished, settled(scores, finished, lengths)[:, None])
        flat_token = tf.reshape(token, [-1])
        tokens = tf.concat([tf.gather(tokens, source), flat_token[:, None]], axis=1)
        att = tf.gather(tf.cast(att, tf.float32), source)
        attention = tf.concat([tf.gather(attention, source), att[:, None]], axis=1)
        state = tf.gather(tf.convert_to_tensor(state), source)
        return t + 1, flat_token, state, tokens, attention, scores, finished, lengths

    loop = (tf.constant(0), last, state, tokens, attention, scores, finished, lengths)
    invariants = (tf.TensorShape([]), tf.TensorShape([None]), _state_invariant(state),
                  tf.TensorShape([None, None]), tf.TensorShape([None, None, num_regions]),
                  tf.TensorShape([None, k]), tf.TensorShape([None, k]), tf.TensorShape([None, k]))
    _, _, _, tokens, attention, raw, _, lengths = tf.while_loop(
        cond, body, loop, shape_invariants=invariants)
    normalised = raw / length_normalizer(tf.maximum(lengths, 1), length_penalty)
    order = tf.argsort(normalised, axis=1, direction="DESCENDING", stable=True)
    steps = tf.shape(tokens)[1]
    tokens = tf.gather(tf.reshape(tokens, [batch_size, k, steps]), order, batch_dims=1)
    attention = tf.gather(tf.reshape(attention, [batch_size, k, steps, num_regions]), order, batch_dims=1)
    return {"tokens": tokens, "scores": tf.gather(normalised, order, batch_dims=1),
            "log_probs": tf.gather(raw, order, batch_dims=1), "lengths": tf.gather(lengths, order, batch_dims=1),
            "attention": attention}


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
                            batch, max_length, regions)
        return {"tokens": out["tokens"][:, None], "scores": out["scores"][:, None],
                "log_probs": out["scores"][:, None], "lengths": out["lengths"][:, None],
                "attention": out["attention"][:, None]}
    tiled = tile_beams(cross, beam_size)
    return beam_search(lambda tok, st, t: model.step(tiled, tok, st, t), model.initial_state(batch * beam_size, max_length),
                       batch, beam_size, max_length, regions, length_penalty)
