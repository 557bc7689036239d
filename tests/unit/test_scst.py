"""SCST's reward and baseline: CIDEr-D with training document frequencies, hand-checked."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from captioner.constants import END_ID, PAD_ID, START_ID
from captioner.data.readers import CaptionDataset
from captioner.data.tokenizer import Tokenizer
from captioner.scst import (
    CiderD,
    RewardFunction,
    caption_ids,
    corpus_cider,
    self_critical_advantages,
    teacher_forcing_rows,
    training_references,
)


def test_cider_d_by_hand():
    # Two images; "a" is in both (df 2: idf 0), "dog", "cat" and their bigrams in one (idf log 2).
    cider = CiderD([[["a", "dog"]], [["a", "cat"]]])
    assert cider.ref_len == pytest.approx(math.log(2))
    refs = cider.prepare([["a", "dog"]])
    # Unigrams: cosine 1; bigrams: cosine 1; no trigrams or 4-grams (0); no length penalty.
    assert cider.score(["a", "dog"], refs) == pytest.approx(10 * (1 + 1 + 0 + 0) / 4)
    # Only "dog" (unigram cosine 1, no bigram): a quarter of the above... times 2 orders -> 2.5.
    assert cider.score(["dog"], refs) == pytest.approx(2.5)
    # "a" carries no weight and "cat" is not in the reference.
    assert cider.score(["a", "cat"], refs) == pytest.approx(0.0)


def test_cider_d_equals_coco_scorer_when_given_the_same_references():
    from pycocoevalcap.cider.cider import Cider

    gts = {"1": ["a dog runs on the grass", "a brown dog is running", "the dog runs outside"],
           "2": ["two children play in the water", "kids splash in a pool", "two kids are swimming"],
           "3": ["a man rides a bike on a dirt road", "a cyclist on a trail", "a man is riding a bicycle"]}
    res = {"1": ["a dog is running on the grass"], "2": ["two kids play in the pool"], "3": ["a man on a bike"]}
    expected, per_image = Cider().compute_score(gts, res)
    ours = CiderD([[r.split() for r in refs] for refs in gts.values()])
    for i, key in enumerate(gts):
        assert ours.score(res[key][0].split(), ours.prepare([r.split() for r in gts[key]])) == pytest.approx(
            per_image[i], abs=1e-9)
    assert corpus_cider(gts, {k: v[0] for k, v in res.items()}) == pytest.approx(expected, abs=1e-9)


def test_baseline_is_the_mean_of_the_other_samples():
    rewards = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 0.5, 0.5, 0.5, 0.5]])
    # Image 1: baselines 14/4, 13/4, 12/4, 11/4, 10/4; image 2: all samples equal -> no signal.
    np.testing.assert_allclose(self_critical_advantages(rewards),
                               [[-2.5, -1.25, 0.0, 1.25, 2.5], [0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="at least 2"):
        self_critical_advantages(np.ones((2, 1)))


def _tokenizer() -> Tokenizer:
    return Tokenizer.fit(["a dog runs", "a cat sits", "a dog sits"], min_count=1)


def test_reward_counts_the_end_token():
    tok = _tokenizer()
    reward = RewardFunction([["a dog runs"], ["a cat sits"]], tok, max_length=10)
    full = tok.encode("a dog runs")
    cut = full[:-1]  # the same words without <end>: stopped, not finished
    samples = np.zeros((2, 6), np.int32)
    samples[0, :len(full)] = full
    samples[1, :len(cut)] = cut
    samples[1, len(cut)] = tok.index["runs"]  # runs on instead of ending
    rewards = reward([0], samples)
    assert rewards.shape == (1, 2)
    assert rewards[0, 0] > rewards[0, 1]
    assert caption_ids([START_ID, 5, 6, END_ID, PAD_ID, 7]) == (5, 6, END_ID)


def test_document_frequencies_come_from_training_references_only():
    dataset = CaptionDataset(
        captions={"t1.jpg": ["a dog runs"], "t2.jpg": ["a cat sits"], "d1.jpg": ["a dog sits"], "e1.jpg": ["a dog"]},
        splits={"train": ["t1.jpg", "t2.jpg"], "dev": ["d1.jpg"], "test": ["e1.jpg"]}, name="toy", images_dir=Path("."))
    tok = _tokenizer()
    refs = training_references(dataset, dataset.splits["train"])
    assert refs == [["a dog runs"], ["a cat sits"]]
    reward = RewardFunction(refs, tok, max_length=10)
    df = reward.cider.document_frequency
    dog_sits = (tok.index["dog"], tok.index["sits"])
    assert dog_sits not in df  # only in a dev caption
    assert df[(tok.index["a"],)] == 2 and df[(tok.index["dog"],)] == 1
    assert reward.cider.ref_len == pytest.approx(math.log(2))


def test_teacher_forcing_rows_stop_reading_after_end():
    samples = np.array([[5, 6, END_ID, PAD_ID], [7, END_ID, PAD_ID, PAD_ID]], np.int32)
    inputs, targets = teacher_forcing_rows(samples)
    # Nothing is read after <end>, and the all-padding last column is dropped.
    np.testing.assert_array_equal(inputs, [[START_ID, 5, 6], [START_ID, 7, PAD_ID]])
    np.testing.assert_array_equal(targets, samples[:, :3])


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_gradient_pass_applies_dropout_only_when_asked(dropout):
    from captioner.config import ModelConfig
    from captioner.model.captioner import build_model
    from captioner.scst import sequence_log_probs

    cfg = ModelConfig(d_model=16, num_layers=1, num_heads=2, ff_dim=32, dropout=dropout, feature_dropout=dropout)
    model = build_model(12, 4, 8, cfg)
    features = np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32)
    targets = np.array([[5, 6, END_ID], [7, END_ID, PAD_ID], [8, 9, 10]], np.int32)
    inputs, targets = teacher_forcing_rows(targets)
    plain = sequence_log_probs(model, features, inputs, targets).numpy()
    np.testing.assert_array_equal(plain, sequence_log_probs(model, features, inputs, targets).numpy())
    noisy = sequence_log_probs(model, features, inputs, targets, training=True).numpy()
    assert (noisy[targets == PAD_ID] == 0).all()  # padding carries no log-probability either way
    if dropout:
        assert not np.allclose(noisy, plain)  # scst.dropout reaches the model's dropout layers
    else:
        np.testing.assert_allclose(noisy, plain, rtol=1e-6)


def test_update_encodes_each_image_once_with_the_same_log_probs_and_gradients():
    """SCST's update projects an image's keys/values once for its k samples: the log-probabilities
    and gradients equal those of the image repeated per row (what the update did before)."""
    import tensorflow as tf

    from captioner.config import ModelConfig
    from captioner.model.captioner import build_model
    from captioner.scst import sequence_log_probs

    model = build_model(12, 4, 8, ModelConfig(d_model=16, num_layers=2, num_heads=2, ff_dim=32, encoder_layers=1))
    features = tf.constant(np.random.default_rng(1).normal(size=(2, 4, 8)).astype(np.float32))
    samples = np.array([[5, 6, END_ID], [7, END_ID, PAD_ID], [8, 9, 10],
                        [11, END_ID, PAD_ID], [5, 5, END_ID], [9, 6, 7]], np.int32)  # 3 per image
    inputs, targets = teacher_forcing_rows(samples)
    weights = tf.constant(np.random.default_rng(2).normal(size=targets.shape).astype(np.float32))

    def run(feats, repeats):
        with tf.GradientTape() as tape:
            log_probs = sequence_log_probs(model, feats, inputs, targets, repeats=repeats)
            loss = tf.reduce_sum(log_probs * weights)
        return log_probs.numpy(), tape.gradient(loss, model.trainable_variables)

    per_row, grads_row = run(tf.repeat(features, 3, axis=0), 1)
    per_image, grads_image = run(features, 3)
    np.testing.assert_allclose(per_image, per_row, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_image, grads_row, strict=True):
        np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy(),
                                   rtol=1e-4, atol=1e-6)
    # A wrong row order (samples of one image not adjacent) would be caught: the rows differ.
    swapped, _ = run(tf.repeat(features[::-1], 3, axis=0), 1)
    assert not np.allclose(swapped, per_image)


def test_updates_mirror_half_the_images_with_scst_mirror():
    from captioner.scst import update_features
    from captioner.train import CaptionPairs

    n = 400
    features = np.arange(n, dtype=np.float16)[:, None, None] * np.ones((1, 2, 3), np.float16)
    pairs = CaptionPairs([f"{i}.jpg" for i in range(n)], features, np.arange(n), np.zeros((n, 4), np.int32))
    index = np.random.default_rng(1).permutation(n)[:300]
    with pytest.raises(ValueError, match="flip_train"):
        update_features(pairs, index, np.random.default_rng(0), mirror=True)

    mirrored = CaptionPairs(pairs.images, features, pairs.image_index, pairs.tokens, flipped=-features - 1)
    # Without scst.mirror, mirrored features (cross-entropy's flip_train) are not used.
    np.testing.assert_array_equal(update_features(mirrored, index, np.random.default_rng(0), False), features[index])
    out = update_features(mirrored, index, np.random.default_rng(0), mirror=True)
    flipped = (out == mirrored.flipped[index]).all(axis=(1, 2))
    plain = (out == features[index]).all(axis=(1, 2))
    assert (flipped ^ plain).all()  # every row is its own image, one view or the other
    assert 0.4 < flipped.mean() < 0.6
    # The same epoch's generator draws the same views (a resumed SCST epoch repeats its updates).
    np.testing.assert_array_equal(out, update_features(mirrored, index, np.random.default_rng(0), True))


def test_scst_mirror_needs_mirrored_features():
    from captioner.config import load_config
    from captioner.errors import ConfigError

    with pytest.raises(ConfigError, match="scst.mirror needs features.flip_train"):
        load_config("smoke", ["scst.mirror=true"])
    assert load_config("smoke", ["scst.mirror=true", "features.flip_train=true"]).scst.mirror


@pytest.mark.parametrize("dropout,mirror", [(False, False), (True, True)])
def test_train_scst_passes_its_dropout_and_mirror_settings_through(tmp_path, monkeypatch, dropout, mirror):
    """The unit tests above pin what ``scst.dropout`` and ``scst.mirror`` do; this one pins that
    ``train_scst`` hands them to those functions (a wiring slip would leave both silently off)."""
    import captioner.scst as scst
    from captioner.config import ModelConfig, load_config
    from captioner.constants import CHECKPOINT_DIR
    from captioner.model.captioner import build_model
    from captioner.tracking import ExperimentTracker
    from captioner.train import CaptionPairs, encode_captions

    seen = {"training": set(), "mirror": set()}
    real_log_probs, real_features = scst.sequence_log_probs, scst.update_features

    def log_probs_spy(*args, training=False, **kwargs):
        seen["training"].add(training)
        return real_log_probs(*args, training=training, **kwargs)

    def features_spy(pairs, index, rng, mirror):
        seen["mirror"].add(mirror)
        return real_features(pairs, index, rng, mirror)

    monkeypatch.setattr(scst, "sequence_log_probs", log_probs_spy)
    monkeypatch.setattr(scst, "update_features", features_spy)

    captions = ["a dog runs", "a cat sits", "a dog sits", "a cat runs"] * 2
    tokenizer = Tokenizer.fit(captions, min_count=1)
    cfg = load_config("smoke", ["scst.epochs=1", "scst.batch_images=4", "scst.samples=2", "decode.max_length=5",
                                "features.flip_train=true", f"scst.dropout={str(dropout).lower()}",
                                f"scst.mirror={str(mirror).lower()}"])
    rng = np.random.default_rng(0)
    features = rng.normal(size=(8, 4, 6)).astype(np.float16)
    images = [f"{i}.jpg" for i in range(8)]
    pairs = CaptionPairs(images, features, np.arange(8), encode_captions(captions, tokenizer, 6),
                         flipped=features[:, ::-1].copy())
    model = build_model(tokenizer.vocab_size, 4, 6, ModelConfig(d_model=16, num_layers=1, num_heads=2, ff_dim=32))
    (tmp_path / CHECKPOINT_DIR).mkdir()
    model.save_weights(str(tmp_path / CHECKPOINT_DIR / "best.weights.h5"))
    summary = scst.train_scst(model, cfg, pairs, pairs, dict(zip(images, ([c] for c in captions), strict=True)),
                              [[c] for c in captions], tokenizer, tmp_path, ExperimentTracker(tmp_path),
                              first_epoch=0, progress=False)
    assert seen == {"training": {dropout}, "mirror": {mirror}}
    assert (summary["dropout"], summary["mirror"]) == (dropout, mirror)
