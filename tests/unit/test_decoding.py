import math

import numpy as np
import pytest
import tensorflow as tf

from captioner.config import ModelConfig
from captioner.model.captioner import build_model
from captioner.model.decoding import beam_search, decode, greedy_search

pytestmark = pytest.mark.unit

# A Markov "model": the next-token distribution depends on the last token only.
# Greedy takes 3 (0.5) then <end> (0.4) = 0.20; the better caption is 4 (0.4) then <end> (0.9) = 0.36.
TABLE = np.full((6, 6), 1e-9)
TABLE[1, [3, 4, 2]] = [0.5, 0.4, 0.1]
TABLE[3, [5, 4, 2]] = [0.3, 0.3, 0.4]
TABLE[4, [2, 5]] = [0.9, 0.1]
TABLE[5, [2]] = [1.0]
LOG = tf.constant(np.log(TABLE / TABLE.sum(1, keepdims=True)), tf.float32)


def markov_step(tokens, state, t=None):
    rows = tf.shape(tokens)[0]
    attention = tf.one_hot(tf.fill([rows], 0), 4)
    return tf.gather(LOG, tokens), attention, state


def test_beam_finds_the_better_caption_greedy_misses():
    state = tf.zeros([2, 1])
    greedy = greedy_search(markov_step, state[:1], 1, 10, 4)
    assert greedy["tokens"].numpy().tolist() == [[3, 2]]
    assert greedy["scores"].numpy()[0] == pytest.approx(math.log(0.2), abs=1e-4)
    beam = beam_search(markov_step, state, 1, 2, 10, 4, length_penalty=0.0)
    assert beam["tokens"].numpy()[0, 0].tolist() == [4, 2]
    assert beam["scores"].numpy()[0].tolist() == pytest.approx([math.log(0.36), math.log(0.2)], abs=1e-4)
    assert beam["attention"].shape == (1, 2, 2, 4)


def test_beam_runs_in_graph_mode_too():
    run = tf.function(lambda s: beam_search(markov_step, s, 1, 2, 10, 4, length_penalty=0.0))
    assert run(tf.zeros([2, 1]))["tokens"].numpy()[0, 0].tolist() == [4, 2]


def test_max_length_cuts_unfinished_captions():
    out = greedy_search(markov_step, tf.zeros([1, 1]), 1, 1, 4)
    assert out["tokens"].numpy().tolist() == [[3]] and out["lengths"].numpy().tolist() == [1]


@pytest.fixture(scope="module")
def model():
    tf.random.set_seed(1)
    return build_model(40, 9, 12, ModelConfig(d_model=32, num_layers=2, num_heads=4, ff_dim=64, dropout=0.0,
                                              feature_dropout=0.0))


def test_step_by_step_equals_teacher_forcing(model):
    features = tf.constant(np.random.default_rng(1).normal(size=(2, 9, 12)), tf.float32)
    memory = model.encode(features)
    tokens = tf.constant([[1, 7, 9, 11, 13], [1, 4, 5, 6, 8]])
    full = tf.nn.log_softmax(model.decode(memory, tokens), axis=-1)
    state, cross = model.initial_state(2), model.cross_memory(memory)
    for t in range(tokens.shape[1]):
        log_probs, attention, state = model.step(cross, tokens[:, t], state)
        np.testing.assert_allclose(log_probs.numpy(), full[:, t].numpy(), atol=1e-4)
        np.testing.assert_allclose(attention.numpy().sum(-1), 1.0, atol=1e-5)
    assert state.shape == (2, 4, 5, 32)


def test_batched_beams_equal_one_image_at_a_time(model):
    memory = model.encode(tf.constant(np.random.default_rng(2).normal(size=(3, 9, 12)), tf.float32))
    batched = decode(model, memory, beam_size=3, max_length=8)
    for i in range(3):
        single = decode(model, memory[i:i + 1], beam_size=3, max_length=8)
        steps = single["tokens"].shape[2]
        np.testing.assert_array_equal(single["tokens"][0].numpy(), batched["tokens"][i, :, :steps].numpy())
        np.testing.assert_allclose(single["scores"][0].numpy(), batched["scores"][i].numpy(), atol=1e-4)


def test_a_beam_of_one_is_greedy(model):
    memory = model.encode(tf.constant(np.random.default_rng(3).normal(size=(3, 9, 12)), tf.float32))
    greedy = decode(model, memory, beam_size=1, max_length=8)
    cross = model.cross_memory(memory)
    one = beam_search(lambda tok, st, t: model.step(cross, tok, st, t), model.initial_state(3), 3, 1, 8, 9,
                      length_penalty=0.0)
    steps = greedy["tokens"].shape[2]
    np.testing.assert_array_equal(one["tokens"][:, :, :steps].numpy(), greedy["tokens"].numpy())
    np.testing.assert_allclose(one["log_probs"].numpy(), greedy["log_probs"].numpy(), atol=1e-4)
    assert decode(model, memory, beam_size=2, max_length=8)["tokens"].shape[:2] == (3, 2)


def test_mixed_precision_model_decodes_in_float32():
    import keras

    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        mp = build_model(30, 9, 12, ModelConfig(d_model=32, num_layers=1, num_heads=4, ff_dim=64))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert mp.project.compute_dtype == "float16"
    memory = mp.encode(tf.random.normal([2, 9, 12]))
    log_probs, attention, state = mp.step(mp.cross_memory(memory), tf.constant([1, 1]), mp.initial_state(2))
    assert log_probs.dtype == tf.float32 and np.isfinite(log_probs.numpy()).all()
