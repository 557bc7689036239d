"""The cross-entropy input pipeline with ``train.length_buckets`` (issue #9): batches of similar
caption length, each cut to its longest caption, in an order that is a function of (seed, epoch)
and sees every pair once; with the switch off, the batches of before (full length, plain shuffle)."""

from __future__ import annotations

import numpy as np
import pytest

from captioner.constants import PAD_ID
from captioner.train import BUCKET_POOL_BATCHES, CaptionPairs, input_pipeline

pytestmark = pytest.mark.unit

BATCH = 8
COUNT = 2 * BUCKET_POOL_BATCHES * BATCH + 3  # two full pools, then a pool of one partial batch
LENGTH = 24  # tokenizer.max_length
IMAGES = 40


def make_pairs(flipped: bool = False) -> CaptionPairs:
    """Pair ``p`` has token 10 + p after <start> (so a batch tells which pairs it holds) and a
    random length of 4..LENGTH tokens, <start> and <end> included; image ``i``'s features are all i."""
    rng = np.random.default_rng(7)
    tokens = np.full((COUNT, LENGTH), PAD_ID, np.int32)
    lengths = rng.integers(4, LENGTH + 1, COUNT)
    for pair, length in enumerate(lengths):
        tokens[pair, 0], tokens[pair, 1], tokens[pair, length - 1] = 1, 10 + pair, 2
        tokens[pair, 2:length - 1] = 5
    features = np.broadcast_to(np.arange(IMAGES, dtype=np.float16)[:, None, None], (IMAGES, 3, 4)).copy()
    return CaptionPairs([f"{i}.jpg" for i in range(IMAGES)], features, rng.integers(0, IMAGES, COUNT).astype(np.int32),
                        tokens, -features if flipped else None)


def MEAN_TARGET_TOKENS(pairs: CaptionPairs) -> float:  # noqa: N802 - a constant of the pairs
    return float(((pairs.tokens != PAD_ID).sum(1) - 1).mean())


def epoch(dataset) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """One pass: (features, input tokens, targets, weights) per batch."""
    return [(f, x, y, w) for (f, x), y, w in dataset.as_numpy_iterator()]


def pair_ids(batch) -> np.ndarray:
    return batch[1][:, 1] - 10


def test_buckets_trim_each_batch_to_its_longest_caption_and_see_every_pair_once():
    pairs = make_pairs()
    lengths = (pairs.tokens != PAD_ID).sum(1)
    dataset = input_pipeline(pairs, BATCH, shuffle=True, seed=3, length_buckets=True)
    assert dataset.element_spec[1].shape.as_list() == [None, None]
    batches = epoch(dataset)
    seen = np.concatenate([pair_ids(b) for b in batches])
    assert sorted(seen.tolist()) == list(range(COUNT))
    assert [len(b[1]) for b in batches] == [BATCH] * (COUNT // BATCH) + [COUNT % BATCH]  # partial batch last
    for features, inputs, targets, weights in batches:
        ids = inputs[:, 1] - 10
        assert inputs.shape[1] == targets.shape[1] == lengths[ids].max() - 1
        mask = (targets != PAD_ID).astype(np.float32)
        np.testing.assert_array_equal(weights > 0, mask > 0)  # every real target token counts, no padding
        # Under the bucketed loss's reduction (sum / (rows x positions)) each real token weighs
        # 1 / (rows x mean tokens per caption), in a batch of short captions as in one of long ones.
        per_token = weights[mask > 0] / (len(ids) * targets.shape[1])
        np.testing.assert_allclose(per_token, 1.0 / (len(ids) * MEAN_TARGET_TOKENS(pairs)), rtol=1e-6)
        np.testing.assert_array_equal(features[:, 0, 0], pairs.image_index[ids])
    # Similar lengths share a batch: far fewer padded positions than the unbucketed full length ...
    positions = sum(b[1].size for b in batches)
    assert positions < 0.6 * COUNT * (LENGTH - 1)
    assert sum(b[3].sum() for b in batches) / positions > 0.85
    # ... yet the epoch is not sorted by length: short and long batches alternate.
    longest = np.array([b[1].shape[1] for b in batches[:-1]])
    assert (np.diff(longest) > 0).any() and (np.diff(longest) < 0).any()


def test_bucketed_order_is_a_function_of_seed_and_epoch():
    pairs = make_pairs(flipped=True)
    first = input_pipeline(pairs, BATCH, shuffle=True, seed=3, length_buckets=True)
    epoch0, epoch1 = epoch(first), epoch(first)
    again = epoch(input_pipeline(pairs, BATCH, shuffle=True, seed=3, length_buckets=True))
    resumed = epoch(input_pipeline(pairs, BATCH, shuffle=True, seed=3, first_epoch=1, length_buckets=True))
    other_seed = epoch(input_pipeline(pairs, BATCH, shuffle=True, seed=4, length_buckets=True))
    for a, b in [(epoch0, again), (epoch1, resumed)]:
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            for u, v in zip(x, y, strict=True):
                np.testing.assert_array_equal(u, v)
    assert not np.array_equal(pair_ids(epoch0[0]), pair_ids(epoch1[0]))
    assert not np.array_equal(pair_ids(epoch0[0]), pair_ids(other_seed[0]))
    # Mirrored features still replace about half of the rows' features, and only with their own.
    features = np.concatenate([b[0][:, 0, 0] for b in epoch0])
    index = pairs.image_index[np.concatenate([pair_ids(b) for b in epoch0])]
    mirrored = features == -index.astype(np.float16)
    assert ((features == index) | mirrored).all()
    assert 0.4 < mirrored[index > 0].mean() < 0.6


def test_without_buckets_batches_are_as_before():
    pairs = make_pairs()
    dataset = input_pipeline(pairs, BATCH, shuffle=True, seed=3, length_buckets=False)
    assert dataset.element_spec[1].shape.as_list() == [None, LENGTH - 1]
    order = np.random.default_rng([3, 0]).permutation(COUNT)  # the order of before: one shuffle
    batches = epoch(dataset)
    assert len(batches) == -(-COUNT // BATCH)
    for start, (_, inputs, targets, _) in zip(range(0, COUNT, BATCH), batches, strict=True):
        assert inputs.shape[1] == targets.shape[1] == LENGTH - 1
        np.testing.assert_array_equal(inputs, pairs.tokens[order[start:start + BATCH], :-1])


def test_unshuffled_pipeline_keeps_the_order_and_trims():
    pairs = make_pairs()
    lengths = (pairs.tokens != PAD_ID).sum(1)
    batches = epoch(input_pipeline(pairs, 256, shuffle=False, seed=0, length_buckets=True))
    np.testing.assert_array_equal(np.concatenate([pair_ids(b) for b in batches]), np.arange(COUNT))
    assert [b[1].shape[1] for b in batches] == [lengths[s:s + 256].max() - 1 for s in range(0, COUNT, 256)]


def test_bucketed_loss_weighs_every_token_alike_whatever_its_batch():
    """The compiled loss with buckets (``sum_over_batch_size`` over the pipeline's weights) is the
    batch's summed token loss over rows x the mean caption length: twice the tokens, twice the loss.
    The unbucketed loss (a mean over the batch's own tokens) gives both batches the same loss."""
    import keras

    from captioner.config import Config, TrainConfig
    from captioner.train import _loss_class, compile_model

    pairs = make_pairs()
    batches = epoch(input_pipeline(pairs, BATCH, shuffle=True, seed=3, length_buckets=True))[:-1]
    short = min(batches, key=lambda b: b[3].astype(bool).sum())
    long = max(batches, key=lambda b: b[3].astype(bool).sum())
    vocab = 1024  # above every token id of make_pairs

    def loss(batch, reduction, weights=None):
        _, _, targets, w = batch
        logits = np.zeros((*targets.shape, vocab), np.float32)  # every token: loss log(vocab)
        return float(_loss_class()(0.0, reduction=reduction)(targets, logits,
                                                              sample_weight=w if weights is None else weights))

    for buckets, reduction in ((True, "sum_over_batch_size"), (False, "mean_with_sample_weight")):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        compile_model(model, Config(train=TrainConfig(length_buckets=buckets)), steps_per_epoch=10)
        assert model.loss.reduction == reduction
    for batch in (short, long):
        tokens = batch[3].astype(bool).sum()
        expected = tokens * np.log(vocab) / (BATCH * MEAN_TARGET_TOKENS(pairs))
        assert loss(batch, "sum_over_batch_size") == pytest.approx(expected, rel=1e-5)
    assert long[3].astype(bool).sum() > 1.5 * short[3].astype(bool).sum()
    plain = [loss(b, "mean_with_sample_weight", (b[2] != PAD_ID).astype(np.float32)) for b in (short, long)]
    assert plain[0] == pytest.approx(plain[1]) == pytest.approx(np.log(vocab))


@pytest.mark.parametrize("buckets", [True, False])
def test_grouped_batches_hold_whole_images_once_each(buckets):
    """``train.group_by_image``: every pair once; an image's pairs adjacent in one batch, with its
    id and its own (possibly mirrored, the same way for all its captions) features; about BATCH
    rows a batch; the order a function of (seed, epoch)."""
    pairs = make_pairs(flipped=True)
    lengths = (pairs.tokens != PAD_ID).sum(1)
    dataset = input_pipeline(pairs, BATCH, shuffle=True, seed=3, length_buckets=buckets, group_by_image=True)
    batches = [(f, x, i, y, w) for (f, x, i), y, w in dataset.as_numpy_iterator()]
    seen = np.concatenate([b[1][:, 1] - 10 for b in batches])
    assert sorted(seen.tolist()) == list(range(COUNT))
    images_seen = []
    for features, inputs, ids, _, _ in batches:
        rows = inputs[:, 1] - 10
        np.testing.assert_array_equal(ids, pairs.image_index[rows])
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        assert len(starts) == len(set(ids.tolist()))  # adjacent
        images_seen += ids[starts].tolist()
        assert np.abs(features[:, 0, 0]).tolist() == ids.astype(np.float16).tolist()
        for image in set(ids.tolist()):
            assert len(set(features[ids == image, 0, 0].tolist())) == 1  # one view per image
        if buckets:
            assert inputs.shape[1] == lengths[rows].max() - 1
    assert sorted(images_seen) == sorted(set(pairs.image_index.tolist()))  # each image in one batch
    mean_rows = COUNT / len(images_seen)
    assert abs(np.mean([len(b[1]) for b in batches[:-1]]) - BATCH) <= mean_rows
    again = [(f, x, i) for (f, x, i), _, _ in input_pipeline(
        pairs, BATCH, shuffle=True, seed=3, length_buckets=buckets, group_by_image=True).as_numpy_iterator()]
    for first, second in zip([b[:3] for b in batches], again, strict=True):
        for a, b in zip(first, second, strict=True):
            np.testing.assert_array_equal(a, b)


def test_model_encodes_grouped_images_once_with_the_same_outputs_and_gradients():
    """``CaptionModel.call`` with image ids: logits and gradients equal the per-caption pass."""
    import tensorflow as tf

    from captioner.config import ModelConfig
    from captioner.model.captioner import build_model

    model = build_model(30, 4, 8, ModelConfig(d_model=16, num_layers=2, num_heads=2, ff_dim=32, encoder_layers=1))
    rng = np.random.default_rng(0)
    image_features = rng.normal(size=(3, 4, 8)).astype(np.float32)
    ids = np.array([2, 2, 0, 0, 0, 1], np.int32)
    features = tf.constant(image_features[ids])
    tokens = tf.constant(rng.integers(3, 30, size=(6, 5)).astype(np.int32))
    weights = tf.constant(rng.normal(size=(6, 5, 30)).astype(np.float32))

    def run(inputs):
        with tf.GradientTape() as tape:
            logits = model(inputs)
            loss = tf.reduce_sum(logits * weights)
        return logits.numpy(), [tf.convert_to_tensor(g).numpy()
                                for g in tape.gradient(loss, model.trainable_variables)]

    plain, plain_grads = run((features, tokens))
    grouped, grouped_grads = run((features, tokens, tf.constant(ids)))
    np.testing.assert_allclose(grouped, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(grouped_grads, plain_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
