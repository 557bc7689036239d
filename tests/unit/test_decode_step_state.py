"""``CaptionModel.step`` moves the decode state through memory once per call (issue #11); these tests
pin that its outputs are bit-identical to the straightforward formulation it replaced (every layer
writes into and attends over the whole cache, the caches are stacked again at the end), for rows at
different positions in one batch, so that no caption changes by a single float."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from captioner.config import ModelConfig
from captioner.model.captioner import build_model
from captioner.model.layers import sinusoid

SLOTS = 8
POSITIONS = [0, 3, 5, 2]  # the furthest row (5) leaves slots 6 and 7 past every row's prefix


def reference_step(model, cross, tokens, state, position):
    """The step as it was: full-size caches per layer, ``tf.where`` over every slot, ``tf.stack``."""
    d = model.cfg.d_model
    x = model.embed(tokens[:, None]) * tf.cast(tf.sqrt(float(d)), model.compute_dtype)
    x += sinusoid(tf.reshape(position, [-1]), d, model.compute_dtype)[:, None]
    state = tf.cast(state, model.compute_dtype)
    cross = tf.cast(cross, model.compute_dtype)
    caches, attention = [], None
    for i, layer in enumerate(model.decoders):
        k_cross, v_cross = cross[..., 2 * i * d:(2 * i + 1) * d], cross[..., (2 * i + 1) * d:(2 * i + 2) * d]
        k_cache, v_cache = state[:, 2 * i], state[:, 2 * i + 1]
        h = layer.norm1(x)
        k, v = layer.self_attn.project_kv(h)
        rows = tf.reshape(position, [-1, 1])
        write = tf.equal(tf.range(tf.shape(k_cache)[1])[None], rows)[:, :, None]
        k_cache, v_cache = tf.where(write, k, k_cache), tf.where(write, v, v_cache)
        visible = tf.reduce_max(position) + 1
        mask = tf.range(visible)[None] <= rows
        x = x + layer.self_attn.attend(h, k_cache[:, :visible], v_cache[:, :visible], mask[:, None, None])[0]
        h, attention = layer.cross_attn.attend(layer.norm2(x), k_cross, v_cross)
        x = x + h
        x = x + layer.ff(layer.norm3(x))
        caches += [k_cache, v_cache]
    log_probs = tf.nn.log_softmax(model._logits(x)[:, 0], axis=-1)
    return log_probs, attention[:, 0], tf.stack(caches, axis=1)


def _model(policy: str = "float32"):
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        tf.random.set_seed(4)
        return build_model(40, 9, 12, ModelConfig(d_model=32, num_layers=2, num_heads=4, ff_dim=64,
                                                  dropout=0.0, feature_dropout=0.0))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def _inputs(model, dtype):
    rng = np.random.default_rng(5)
    cross = model.cross_memory(model.encode(tf.constant(rng.normal(size=(4, 9, 12)), tf.float32)))
    # Every slot holds a distinct non-zero value, also past each row's position: reading a slot the
    # row has not reached, or writing the wrong one, changes the outputs.
    state = tf.constant(rng.normal(size=(4, 2 * model.num_layers, SLOTS, model.cfg.d_model)), dtype)
    return cross, tf.constant([1, 7, 9, 11]), state, tf.constant(POSITIONS)


def _assert_identical(new, ref):
    for name, a, b in zip(("log_probs", "attention", "state"), new, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_step_is_bit_identical_to_the_full_cache_formulation(graph):
    model = _model()
    cross, tokens, state, position = _inputs(model, tf.float32)
    step, reference = model.step, reference_step
    if graph:
        step, reference = tf.function(step), tf.function(reference)
    new = step(cross, tokens, state, position)
    ref = reference(model, cross, tokens, state, position)
    _assert_identical(new, ref)
    # Each row's slot at its position was written, and nothing else changed.
    changed = np.any(new[2].numpy() != state.numpy(), axis=-1)            # [B, 2L, T]
    expected = np.zeros_like(changed)
    expected[np.arange(4), :, POSITIONS] = True
    np.testing.assert_array_equal(changed, expected)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_step_takes_the_keys_values_split_once_with_identical_outputs(graph):
    """Decoding loops (library decoding, SCST's sampler) split the image's keys/values into heads
    once (``split_cross``) instead of at every step: the step's outputs are bit-identical."""
    model = _model()
    cross, tokens, state, position = _inputs(model, tf.float32)
    step = tf.function(model.step) if graph else model.step
    split = model.split_cross(cross)
    assert split.shape.rank == 5 and split.shape[0] == 2 * model.num_layers
    _assert_identical(step(split, tokens, state, position), step(cross, tokens, state, position))


def test_step_with_one_position_for_all_rows_is_bit_identical():
    model = _model()
    cross, tokens, state, _ = _inputs(model, tf.float32)
    _assert_identical(model.step(cross, tokens, state, 3), reference_step(model, cross, tokens, state,
                                                                          tf.constant(3)))


def test_mixed_precision_step_is_bit_identical_and_keeps_the_state_dtype():
    model = _model("mixed_float16")
    # As decoding runs it: the state in the compute dtype (float16) -> identical outputs, float16 state.
    cross, tokens, state, position = _inputs(model, tf.float16)
    _assert_identical(model.step(cross, tokens, state, position), reference_step(model, cross, tokens, state,
                                                                                 position))
    # As the export runs it: a float32 state of float16 values (what the previous step returned) ->
    # the same numbers, kept in float32 instead of cast to float16 and back.
    state32 = tf.cast(state, tf.float32)
    log_probs, attention, new_state = model.step(cross, tokens, state32, position)
    ref = reference_step(model, cross, tokens, state, position)
    assert new_state.dtype == tf.float32
    np.testing.assert_array_equal(log_probs.numpy(), ref[0].numpy())
    np.testing.assert_array_equal(attention.numpy(), ref[1].numpy())
    np.testing.assert_array_equal(new_state.numpy(), tf.cast(ref[2], tf.float32).numpy())


def test_decoder_layer_step_takes_cross_keys_whole_or_split_into_heads():
    """``CaptionModel.step`` hands the layers the image's keys/values split into heads once per step;
    a caller with ``[B, N, d]`` keys/values (what ``Attention.attend`` takes) gets the same numbers."""
    model = _model()
    cross, tokens, state, position = _inputs(model, tf.float32)
    layer, d, heads = model.decoders[1], model.cfg.d_model, model.cfg.num_heads
    x = tf.constant(np.random.default_rng(6).normal(size=(4, 1, d)), tf.float32)
    k, v = cross[..., 2 * d:3 * d], cross[..., 3 * d:4 * d]
    split = [tf.transpose(tf.reshape(t, [4, 9, heads, d // heads]), [0, 2, 1, 3]) for t in (k, v)]
    caches = (state[:, 2, :6], state[:, 3, :6])
    whole = layer.step(x, k, v, *caches, position)
    assert split[0].shape.rank == 4 and k.shape.rank == 3
    for a, b in zip(whole, layer.step(x, *split, *caches, position), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
