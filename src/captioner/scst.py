"""Self-critical sequence training (Rennie et al. 2017) after cross-entropy training.

From the best cross-entropy checkpoint, the model draws ``k`` captions per training image, each is
rewarded with its CIDEr-D against that image's references, and the reward of a caption minus the
mean reward of the other ``k - 1`` captions of the same image (the baseline) weighs the gradient of
its log-probability: captions better than their siblings become likelier. As in the self-critical
code bases:

* CIDEr-D's document frequencies come from the training references only (never dev or test);
* the <end> token is part of every caption and reference, so ending well is rewarded and a caption
  that stops mid-phrase loses the n-grams that close a reference;
* sampling follows the decoders' rule (no <pad>, <start> or <unk>, no <end> first) and runs batched
  through the cached-attention ``step`` the decoders use;
* the gradient pass re-reads the sampled captions in one teacher-forced pass with dropout off, so the
  log-probabilities it differentiates are those the captions were drawn from.

Each epoch ends with a greedy decode of dev scored by CIDEr-D (dev's own document frequencies, as the
COCO scorer computes them); the best epoch is kept, and SCST stops after ``scst.patience`` epochs
without a better one. Model, optimizer and epoch are checkpointed every epoch, so a killed run
resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.constants import CHECKPOINT_DIR, END_ID, PAD_ID, START_ID
from captioner.data.tokenizer import Tokenizer, normalize

log = logging.getLogger(__name__)
NGRAM_ORDER = 4
SIGMA = 6.0  # CIDEr-D's Gaussian length penalty
SCST_DIR = "scst"  # in checkpoints/: model + optimizer + epoch, for resume
SCST_BEST = "scst-best.weights.h5"
SCST_FINISHED = "SCST_FINISHED"
KILL_AFTER_SCST_EPOCH_ENV = "CAPTIONER_KILL_AFTER_SCST_EPOCH"  # fault injection for the resume test


# -- CIDEr-D with fixed document frequencies ------------------------------------------------------
def ngram_counts(tokens: Sequence[Any], order: int = NGRAM_ORDER) -> Counter:
    counts: Counter = Counter()
    for n in range(1, order + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i:i + n])] += 1
    return counts


@dataclass(frozen=True)
class _Vector:
    weights: tuple[dict, ...]  # per n-gram order: {ngram: tf-idf}
    norms: tuple[float, ...]
    length: int


class CiderD:
    """CIDEr-D exactly as coco-caption's ``CiderScorer`` computes it (tf-idf n-gram vectors of orders
    1-4, clipped similarity, Gaussian length penalty with sigma 6, x10), except that the document
    frequencies are those of the ``corpus`` given here instead of the references being scored.

    ``corpus``: one list of reference token sequences per image. Tokens may be words or ids.
    """

    def __init__(self, corpus: Iterable[Sequence[Sequence[Any]]]):
        df: Counter = Counter()
        images = 0
        for refs in corpus:
            images += 1
            df.update({gram for ref in refs for gram in ngram_counts(ref)})
        if not images:
            raise ValueError("CIDEr-D needs at least one image of references for its document frequencies")
        self.document_frequency = df
        self.ref_len = math.log(float(images))

    def vector(self, tokens: Sequence[Any]) -> _Vector:
        weights: tuple[dict, ...] = tuple({} for _ in range(NGRAM_ORDER))
        norms = [0.0] * NGRAM_ORDER
        length = 0
        for gram, count in ngram_counts(tokens).items():
            n = len(gram) - 1
            value = float(count) * (self.ref_len - math.log(max(1.0, self.document_frequency.get(gram, 0.0))))
            weights[n][gram] = value
            norms[n] += value * value
            if n == 2:  # coco-caption measures length in trigrams (its ``n == 2`` bookkeeping)
                length += count
        return _Vector(weights, tuple(math.sqrt(x) for x in norms), length)

    def prepare(self, references: Sequence[Sequence[Any]]) -> list[_Vector]:
        return [self.vector(ref) for ref in references]

    def score(self, candidate: Sequence[Any] | _Vector, references: Sequence[_Vector]) -> float:
        hyp = candidate if isinstance(candidate, _Vector) else self.vector(candidate)
        total = 0.0
        for ref in references:
            penalty = math.exp(-((hyp.length - ref.length) ** 2) / (2 * SIGMA ** 2))
            for n in range(NGRAM_ORDER):
                ref_weights = ref.weights[n]
                value = sum(min(w, ref_weights.get(g, 0.0)) * ref_weights.get(g, 0.0)
                            for g, w in hyp.weights[n].items())
                if hyp.norms[n] and ref.norms[n]:
                    value /= hyp.norms[n] * ref.norms[n]
                total += value * penalty / NGRAM_ORDER
        return 10.0 * total / len(references)

    def corpus_score(self, references: Mapping[str, Sequence[Sequence[Any]]],
                     hypotheses: Mapping[str, Sequence[Any]]) -> float:
        return float(np.mean([self.score(hypotheses[k], self.prepare(refs)) for k, refs in references.items()]))


def corpus_cider(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str]) -> float:
    """CIDEr-D of caption strings with the document frequencies of these references (how the COCO
    scorer reports it; words split by the tokenizer's normalisation instead of the Java PTB one)."""
    refs = {k: [normalize(c) for c in v] for k, v in references.items()}
    return CiderD(refs.values()).corpus_score(refs, {k: normalize(hypotheses[k]) for k in references})


# -- rewards ----------------------------------------------------------------------------------------
def caption_ids(ids: Iterable[int]) -> tuple[int, ...]:
    """A sampled or reference row as the reward sees it: the words and the <end> that closes them
    (no <start>, nothing after <end>)."""
    out = []
    for i in ids:
        i = int(i)
        if i in (START_ID, PAD_ID):
            continue
        out.append(i)
        if i == END_ID:
            break
    return tuple(out)


def reference_ids(captions: Sequence[str], tokenizer: Tokenizer, max_length: int) -> list[tuple[int, ...]]:
    return [caption_ids(tokenizer.encode(c, max_length)) for c in captions]


def self_critical_advantages(rewards: np.ndarray) -> np.ndarray:
    """``rewards [B, k]`` -> reward minus the mean reward of the other ``k - 1`` samples of the image."""
    rewards = np.asarray(rewards, np.float64)
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("the self-critical baseline needs at least 2 samples per image")
    baseline = (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)
    return rewards - baseline


def training_references(dataset, images: Sequence[str]) -> list[list[str]]:
    """The reference captions of ``images`` (the train split's, in the order of their features): the
    only captions the reward, and its document frequencies, may read."""
    return [list(dataset.captions[image]) for image in images]


class RewardFunction:
    """CIDEr-D rewards of sampled id rows against the training references of their images."""

    def __init__(self, train_references: Sequence[Sequence[str]], tokenizer: Tokenizer, max_length: int):
        refs = [reference_ids(captions, tokenizer, max_length) for captions in train_references]
        self.cider = CiderD(refs)
        self.targets = [self.cider.prepare(r) for r in refs]

    def __call__(self, image_index: Sequence[int], samples: np.ndarray) -> np.ndarray:
        """``samples [B * k, T]`` (rows of an image adjacent) -> rewards ``[B, k]``."""
        k = len(samples) // len(image_index)
        rewards = np.empty((len(image_index), k))
        for row, ids in enumerate(samples):
            image = image_index[row // k]
            rewards[row // k, row % k] = self.cider.score(caption_ids(ids), self.targets[image])
        return rewards


# -- TensorFlow parts -------------------------------------------------------------------------------
def sampler(model, samples: int, max_length: int):
    """A ``tf.function(features [B, N, C], seed [2]) -> tokens [B * samples, T]`` drawing ``samples``
    captions per image from the model (dropout off), rows of an image adjacent, <pad> after <end>;
    ``T <= max_length``: drawing stops once every caption has ended."""
    import tensorflow as tf

    from captioner.model.decoding import mask_invalid, tile_beams

    @tf.function(reduce_retracing=True)
    def sample(features, seed):
        memory = model.encode(features, training=False)
        cross = model.split_cross(tile_beams(model.cross_memory(memory), samples))  # [2L, rows, ...]
        rows = tf.shape(cross)[1]
        state = model.initial_state(rows, max_length)
        last = tf.fill([rows], START_ID)
        done = tf.zeros([rows], tf.bool)
        out = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None])
        for t in tf.range(max_length):
            if tf.reduce_all(done):
                break
            log_probs, _, state = model.step(cross, last, state, t)
            logits = mask_invalid(log_probs, t)
            token = tf.cast(tf.random.stateless_categorical(logits, 1, seed + tf.stack([0, t]))[:, 0], tf.int32)
            token = tf.where(done, PAD_ID, token)
            out = out.write(t, token)
            done = tf.logical_or(done, tf.equal(token, END_ID))
            last = token
        return tf.transpose(out.stack())

    return sample


def sequence_log_probs(model, features, inputs, targets, training: bool = False, repeats: int = 1):
    """Teacher-forced log-probability of every target token under the decoders' masking rule
    (dropout only when ``training``): ``[B, T]``, 0 at padding. With ``repeats``, ``features``
    holds one row per image and ``inputs``/``targets`` ``repeats`` adjacent rows per image: each
    image is encoded once (with ``training``, one feature-dropout draw per image, not per row)."""
    import tensorflow as tf

    from captioner.model.decoding import NEG_INF, NEVER_GENERATED

    memory = model.encode(features, training=training)
    rows = tf.repeat(tf.range(tf.shape(memory)[0]), repeats) if repeats > 1 else None
    logits = model.decode(memory, inputs, training=training, memory_rows=rows)
    vocab = tf.shape(logits)[-1]
    never = tf.reduce_sum(tf.one_hot(list(NEVER_GENERATED), vocab, on_value=NEG_INF, off_value=0.0), axis=0)
    first = tf.one_hot(END_ID, vocab, on_value=NEG_INF, off_value=0.0)
    length = tf.shape(logits)[1]
    at_first = tf.cast(tf.equal(tf.range(length), 0), tf.float32)[:, None] * first[None]
    log_probs = tf.nn.log_softmax(logits + never[None, None] + at_first[None], axis=-1)
    picked = tf.gather(log_probs, targets, batch_dims=2)
    return tf.where(tf.equal(targets, PAD_ID), 0.0, picked)


def teacher_forcing_rows(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sampled rows ``[M, T]`` -> (inputs: <start> + tokens[:-1], targets: tokens), cut after the
    last column that holds a token (the teacher-forced pass then costs what the captions need)."""
    used = np.flatnonzero((samples != PAD_ID).any(axis=0))
    samples = samples[:, : (used[-1] + 1 if used.size else 1)]
    inputs = np.concatenate([np.full((len(samples), 1), START_ID, np.int32), samples[:, :-1]], axis=1)
    inputs = np.where(inputs == END_ID, PAD_ID, inputs)  # nothing is read after <end>
    return inputs.astype(np.int32), samples.astype(np.int32)


def update_features(pairs, index: np.ndarray, rng: np.random.Generator, mirror: bool) -> np.ndarray:
    """The features of images ``index`` for one SCST update: with ``mirror`` (``scst.mirror``) each
    image is mirrored with probability 1/2, as in cross-entropy training with
    ``features.flip_train``, so SCST sees twice the views of the few training images it overfits."""
    features = pairs.features[index]
    if not mirror:
        return features
    if pairs.flipped is None:
        raise ValueError("scst.mirror needs the mirrored features (features.flip_train)")
    mirror = rng.random(len(index)) < 0.5
    return np.where(mirror[:, None, None], pairs.flipped[index], features)


# -- the SCST phase ---------------------------------------------------------------------------------
def train_scst(model, cfg, train, dev, dev_refs: Mapping[str, Sequence[str]], train_refs: Sequence[Sequence[str]],
               tokenizer: Tokenizer, model_dir: Path, tracker, *, first_epoch: int, strategy=None,
               progress: bool = True) -> dict[str, Any]:
    """Run SCST on ``model`` (holding the best cross-entropy weights) until dev CIDEr-D stops improving.

    ``train``/``dev`` are ``CaptionPairs``; ``train_refs[i]`` the captions of ``train.images[i]``.
    Epochs are numbered on from ``first_epoch`` (the cross-entropy epochs) in ``metrics.csv``, with
    ``phase = scst``. Leaves the model holding the best weights on dev (the cross-entropy ones if no
    SCST epoch beat them). Returns a summary for ``run_summary.json``.
    """
    import keras
    import tensorflow as tf

    from captioner.evaluate import quick_bleu4
    from captioner.model.decoding import decode

    sc = cfg.scst
    ckpt_dir = model_dir / CHECKPOINT_DIR
    best_path = ckpt_dir / SCST_BEST
    strategy = strategy or tf.distribute.get_strategy()
    max_length = sc.max_length or cfg.decode.max_length
    with strategy.scope():
        optimizer = keras.optimizers.Adam(learning_rate=sc.learning_rate, global_clipnorm=cfg.train.clip_norm or None)
        optimizer.build(model.trainable_variables)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)
    manager = tf.train.CheckpointManager(checkpoint, str(ckpt_dir / SCST_DIR), max_to_keep=1)

    greedy = tf.function(lambda f: decode(model, model.encode(f), beam_size=1, max_length=cfg.decode.max_length))

    def dev_scores() -> tuple[float, float]:
        hyps = {}
        for start in range(0, len(dev.images), 256):
            out = greedy(tf.constant(dev.features[start:start + 256]))
            for name, ids in zip(dev.images[start:start + 256], out["tokens"][:, 0].numpy(), strict=True):
                hyps[name] = tokenizer.decode(ids)
        return corpus_cider(dev_refs, hyps), quick_bleu4(dev_refs, hyps)

    history = [r for r in tracker.history() if r.get("phase") == "scst"]
    start_summary = tracker.extra.get("scst") or {}
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        done = int(epoch_var.numpy())
        summary = dict(start_summary)
        if "xe_dev_cider" not in summary:  # resumed in a new process: recover it from the state file
            summary.update(_read_state(ckpt_dir))
        if progress:
            print(f"SCST: resuming after epoch {done}", flush=True)
    else:
        done = 0
        cider, bleu = dev_scores()
        summary = {"xe_dev_cider": round(cider, 4), "xe_dev_bleu4": round(bleu, 4)}
        _write_state(ckpt_dir, summary)
        if progress:
            print(f"SCST: starting from the cross-entropy model, dev CIDEr-D {cider:.4f} BLEU-4 {bleu:.4f}",
                  flush=True)
    # Epoch 0 is the cross-entropy model; on a tie the earlier epoch stays.
    scored = [(summary["xe_dev_cider"], 0)] + [(r["dev_cider"], int(r["epoch"]) - first_epoch) for r in history
                                               if int(r["epoch"]) - first_epoch <= done]
    best, best_epoch = max(scored, key=lambda s: (s[0], -s[1]))
    finished = ckpt_dir / SCST_FINISHED

    reward_fn = RewardFunction(train_refs, tokenizer, max_length)
    sample = sampler(model, sc.samples, max_length)

    @tf.function(reduce_retracing=True)
    def train_step(features, inputs, targets, advantages):
        def replica(features, inputs, targets, advantages):
            with tf.GradientTape() as tape:
                log_probs = sequence_log_probs(model, features, inputs, targets, training=sc.dropout,
                                               repeats=sc.samples)
                tokens = tf.reduce_sum(tf.cast(tf.not_equal(targets, PAD_ID), tf.float32))
                # Mean over the batch's tokens, summed over replicas (each holds a slice).
                loss = -tf.reduce_sum(log_probs * advantages[:, None]) / tokens / strategy.num_replicas_in_sync
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        return strategy.reduce("SUM", strategy.run(replica, args=(features, inputs, targets, advantages)), axis=None)

    images_per_step = sc.batch_images
    num_images = len(train.images)
    while not finished.is_file() and done < sc.epochs and done - best_epoch < sc.patience:
        epoch = done + 1
        started = time.perf_counter()
        rng = np.random.default_rng([cfg.train.seed, 7919, epoch])
        order = rng.permutation(num_images)
        rewards_seen, losses = [], []
        for step, begin in enumerate(range(0, num_images, images_per_step)):
            index = order[begin:begin + images_per_step]
            features = tf.constant(update_features(train, index, rng, sc.mirror))
            seed = tf.constant([cfg.train.seed * 1_000_003 + epoch, step], tf.int32)
            drawn = sample(features, seed).numpy()
            rewards = reward_fn(index, drawn)
            advantages = self_critical_advantages(rewards).reshape(-1).astype(np.float32)
            inputs, targets = teacher_forcing_rows(drawn)
            loss = train_step(features, tf.constant(inputs), tf.constant(targets), tf.constant(advantages))
            rewards_seen.append(rewards.mean())
            losses.append(float(loss))
            if progress and step % 50 == 0:
                log.info("scst epoch %d step %d reward %.4f", epoch, step, rewards.mean())
        cider, bleu = dev_scores()
        seconds = round(time.perf_counter() - started, 2)
        improved = cider > best
        if improved:
            best, best_epoch = cider, epoch
            tmp = ckpt_dir / ".scst-best-tmp.weights.h5"
            model.save_weights(str(tmp))
            os.replace(tmp, best_path)
        tracker.log_metrics(epoch=first_epoch + epoch, phase="scst", train_reward=float(np.mean(rewards_seen)),
                            train_loss=float(np.mean(losses)), dev_cider=cider, dev_bleu4=bleu,
                            learning_rate=sc.learning_rate, epoch_seconds=seconds)
        epoch_var.assign(epoch)
        manager.save(checkpoint_number=epoch)
        done = epoch
        if progress:
            print(f"SCST epoch {epoch}: reward {np.mean(rewards_seen):.4f} dev CIDEr-D {cider:.4f} "
                  f"BLEU-4 {bleu:.4f} (best {'cross-entropy' if not best_epoch else f'SCST epoch {best_epoch}'}) "
                  f"{seconds:.1f}s", flush=True)
        if os.environ.get(KILL_AFTER_SCST_EPOCH_ENV) == str(epoch):
            os.kill(os.getpid(), signal.SIGKILL)
    finished.write_text(f"{done} SCST epochs\n")
    if best_epoch and best_path.is_file():
        model.load_weights(str(best_path))
    else:
        model.load_weights(str(ckpt_dir / "best.weights.h5"))
    summary.update({"epochs": done, "selected_epoch": best_epoch, "selected_dev_cider": round(best, 4),
                    "learning_rate": sc.learning_rate, "samples": sc.samples, "batch_images": sc.batch_images,
                    "dropout": sc.dropout, "mirror": sc.mirror})
    return summary


_STATE = "scst_state.json"


def _write_state(ckpt_dir: Path, data: dict[str, Any]) -> None:
    from captioner.io_utils import atomic_write_json

    atomic_write_json(ckpt_dir / _STATE, data)


def _read_state(ckpt_dir: Path) -> dict[str, Any]:
    import json

    path = ckpt_dir / _STATE
    return json.loads(path.read_text()) if path.is_file() else {"xe_dev_cider": -math.inf}
