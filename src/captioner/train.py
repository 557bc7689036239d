"""Training: input pipeline, distribution strategy, checkpoints with resume, model selection on dev.

A trained model is a folder (``model_dir``) holding ``model.weights.h5``, ``model.json`` (the shapes and
config needed to rebuild it) and the vocabulary; ``load_trained`` turns it back into a model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captioner.config import Config, ModelConfig, config_from_dict
from captioner.constants import CHECKPOINT_DIR, MEMBERS_DIR, METRICS_CSV, PAD_ID
from captioner.data.readers import CaptionDataset
from captioner.data.tokenizer import Tokenizer
from captioner.errors import ConfigError, ModelError
from captioner.features.extract import FLIP_SUFFIX, FeatureStore
from captioner.io_utils import atomic_write_json
from captioner.tracking import ExperimentTracker, set_global_seed

log = logging.getLogger(__name__)
WEIGHTS_FILE = "model.weights.h5"
MODEL_JSON = "model.json"
KILL_AFTER_EPOCH_ENV = "CAPTIONER_KILL_AFTER_EPOCH"  # fault injection for the resume test
# train.select_metric -> (column of metrics.csv, sign that makes larger better)
SELECTION_KEYS = {"bleu4": ("dev_bleu4", 1.0), "cider": ("dev_cider", 1.0), "val_loss": ("val_loss", -1.0)}


# -- input pipeline ----------------------------------------------------------------------------
@dataclass
class CaptionPairs:
    """Every (image, caption) pair of a split: ``image_index [P]`` into ``features``, ``tokens [P, L]``."""

    images: list[str]
    features: np.ndarray  # [n_images, N, C] float16
    image_index: np.ndarray
    tokens: np.ndarray
    flipped: np.ndarray | None = None  # features of mirrored images, same order, or None


def encode_captions(captions: list[str], tokenizer: Tokenizer, max_length: int) -> np.ndarray:
    out = np.full((len(captions), max_length), PAD_ID, dtype=np.int32)
    for row, caption in enumerate(captions):
        ids = tokenizer.encode(caption, max_length)
        out[row, : len(ids)] = ids
    return out


def caption_pairs(dataset: CaptionDataset, split: str, tokenizer: Tokenizer, store: FeatureStore,
                  max_length: int, flip: bool = False) -> CaptionPairs:
    images = dataset.splits[split]
    index, texts = [], []
    for i, image in enumerate(images):
        for caption in dataset.captions[image]:
            index.append(i)
            texts.append(caption)
    flipped = store.load([name + FLIP_SUFFIX for name in images]) if flip else None
    return CaptionPairs(images, store.load(images), np.asarray(index, np.int32),
                        encode_captions(texts, tokenizer, max_length), flipped)


# Length bucketing: the permutation is cut into pools of this many batches, each pool sorted by
# caption length before it is split into batches. Larger pools make batches more uniform (less
# padding) but batches' lengths correlate across more steps; 50 leaves the batch order well mixed.
BUCKET_POOL_BATCHES = 50


def caption_lengths(tokens: np.ndarray) -> np.ndarray:
    """Tokens of each row of ``tokens [P, L]`` before its padding (<start> and <end> included)."""
    return (tokens != PAD_ID).sum(axis=1)


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None,
                  buckets: bool = False) -> list[np.ndarray]:
    """One epoch's batches (rows into ``lengths``): every row once, in batches of ``batch_size``
    and a last, smaller one when ``batch_size`` does not divide the count.

    ``rng`` None keeps the rows' order. With ``buckets``, rows of similar length share a batch:
    each pool of ``BUCKET_POOL_BATCHES`` batches of a random permutation is sorted by length, then
    the full batches are shuffled (the partial one stays last, as without buckets).
    """
    count = len(lengths)
    order = rng.permutation(count) if rng is not None else np.arange(count)
    if buckets:
        pool = BUCKET_POOL_BATCHES * batch_size
        order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(pool, count, pool))]) if count else order
    batches = [order[start:start + batch_size] for start in range(0, count, batch_size)]
    if buckets and rng is not None:
        full = count // batch_size
        batches[:full] = [batches[i] for i in rng.permutation(full)]
    return batches


def image_batches(image_index: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None,
                  buckets: bool = False) -> list[np.ndarray]:
    """One epoch's batches grouped by image (``train.group_by_image``): every row once, all the rows
    of an image in one batch and adjacent, about ``batch_size`` rows a batch (whole images: the
    split's mean captions per image sets how many images a batch takes).

    As ``epoch_batches`` for the order: ``rng`` None keeps the images' order; with ``buckets``,
    images whose longest captions are of similar length share a batch (pools sorted by that length,
    then the full batches shuffled, the partial one last).
    """
    if not len(image_index):
        return []
    by_image = np.argsort(image_index, kind="stable")
    groups = np.split(by_image, np.flatnonzero(np.diff(image_index[by_image])) + 1)
    count = len(groups)
    per_batch = max(1, round(batch_size * count / len(image_index)))
    order = rng.permutation(count) if rng is not None else np.arange(count)
    if buckets:
        longest = np.array([lengths[g].max() for g in groups])
        pool = BUCKET_POOL_BATCHES * per_batch
        order = np.concatenate([chunk[np.argsort(longest[chunk], kind="stable")]
                                for chunk in np.split(order, range(pool, count, pool))])
    batches = [np.concatenate([groups[i] for i in order[start:start + per_batch]])
               for start in range(0, count, per_batch)]
    if buckets and rng is not None:
        full = count // per_batch
        batches[:full] = [batches[i] for i in rng.permutation(full)]
    return batches


def input_pipeline(pairs: CaptionPairs, batch_size: int, *, shuffle: bool, seed: int, first_epoch: int = 0,
                   length_buckets: bool = False, group_by_image: bool = False):
    """``tf.data`` of ``((features, input tokens), target tokens, target weights)`` batches.

    With ``group_by_image`` the inputs are ``(features, input tokens, image ids)``: a batch holds
    whole images (``image_batches``), all their captions, and the model encodes each image once
    for its captions (``CaptionModel.call``), as the self-critical code bases batch captions. The
    features stay one row per caption, so that any split of a batch (a distribution strategy's
    replicas) keeps each row's features and id together.

    Batches are gathered in NumPy from in-memory features (a generator the prefetch thread runs
    ahead of the model); each epoch's order is a function of (seed, epoch), so a resumed run sees
    the same order it would have seen. With ``length_buckets``, batches hold captions of similar
    length (``epoch_batches``) and every batch (bucketed or not) is cut to its longest caption:
    the decoder then spends no step on positions that are padding in every row. Without it, every
    batch keeps the tokenizer's full length.
    """
    import tensorflow as tf

    epoch = [first_epoch]
    full_length = pairs.tokens.shape[1]
    regions, dim = pairs.features.shape[1:]
    lengths = caption_lengths(pairs.tokens)
    mean_tokens = max(float(np.mean(lengths - 1)), 1.0) if len(lengths) else 1.0  # targets: all but <start>

    def generate():
        rng = np.random.default_rng([seed, epoch[0]])
        epoch[0] += 1
        order = rng if shuffle else None
        batches = (image_batches(pairs.image_index, lengths, batch_size, order, length_buckets and shuffle)
                   if group_by_image else epoch_batches(lengths, batch_size, order, length_buckets and shuffle))
        for rows in batches:
            images = pairs.image_index[rows]
            features = pairs.features[images]
            if pairs.flipped is not None and shuffle:
                # One draw per image when grouped: an image's captions see the same view.
                if group_by_image:
                    mirror = (rng.random(len(pairs.images)) < 0.5)[images]
                else:
                    mirror = rng.random(len(rows)) < 0.5
                features = np.where(mirror[:, None, None], pairs.flipped[images], features)
            # At least 2 tokens so that the decoder has one position even for empty captions.
            keep = max(int(lengths[rows].max()), 2) if length_buckets else full_length
            tokens = pairs.tokens[rows, :keep]
            target = tokens[:, 1:]
            weights = (target != PAD_ID).astype(np.float32)
            if length_buckets:
                # The loss (compile_model) divides by rows x positions; these weights turn that into
                # a sum over real tokens / (rows x the split's mean tokens per caption), so every
                # token weighs the same in a batch of short captions as in one of long captions (a
                # mean over each batch's own tokens would weigh a short caption's tokens more).
                weights *= target.shape[1] / mean_tokens
            if group_by_image:
                yield (features, tokens[:, :-1], images), target, weights
            else:
                yield (features, tokens[:, :-1]), target, weights

    # A variable length: Keras' fit traces its step once for the [None, None] spec (no retracing
    # per batch length without XLA, as on CPU; with XLA, e.g. jit_compile on a GPU, each batch length
    # compiles once, at most tokenizer.max_length times), so shorter batches cost fewer positions.
    length = None if length_buckets else full_length - 1
    inputs = (tf.TensorSpec([None, regions, dim], tf.float16), tf.TensorSpec([None, length], tf.int32))
    if group_by_image:
        inputs += (tf.TensorSpec([None], tf.int32),)
    spec = (inputs, tf.TensorSpec([None, length], tf.int32), tf.TensorSpec([None, length], tf.float32))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=spec)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(4)


# -- model, loss, schedule ---------------------------------------------------------------------
_MULTI_WORKER = None  # the process's MultiWorkerMirroredStrategy: TensorFlow allows one, made first


def make_strategy(name: str):
    """The ``train.distribute`` strategy. ``multi_worker`` reads the cluster from ``TF_CONFIG`` and must
    be made before any other TensorFlow op runs in the process (``run_training`` does so first)."""
    import tensorflow as tf

    global _MULTI_WORKER
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        if _MULTI_WORKER is None:
            worker_role(name)  # a malformed TF_CONFIG is named here rather than deep inside TensorFlow
            _MULTI_WORKER = tf.distribute.MultiWorkerMirroredStrategy()
        return _MULTI_WORKER
    raise ModelError(f"unknown strategy {name!r}", field="train.distribute")


@dataclass(frozen=True)
class WorkerRole:
    """This process's place in a multi-worker cluster. Only the chief writes the run; the others
    write into a temporary folder that is removed, as the TensorFlow multi-worker guide has it."""

    chief: bool = True
    task: str = "chief"
    num_workers: int = 1


def worker_role(distribute: str) -> WorkerRole:
    """The role ``TF_CONFIG`` gives this process under ``train.distribute=multi_worker``: the task of
    type ``chief``, else worker 0, is the chief. Without ``multi_worker`` or ``TF_CONFIG`` it is alone."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if distribute != "multi_worker" or not raw:
        return WorkerRole()
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        kind, index = task["type"], int(task["index"])
        addresses = cluster[kind]
        if not isinstance(addresses, list) or not 0 <= index < len(addresses):
            raise ValueError(f"task index {index} is not in the cluster's {len(addresses)} {kind} address(es)")
    except (ValueError, TypeError, KeyError) as exc:
        detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError('TF_CONFIG must be JSON like {"cluster": {"worker": ["host:port", ...]}, "task": '
                          f'{{"type": "worker", "index": 0}}}} ({detail})', field="TF_CONFIG") from None
    if kind not in ("chief", "worker"):
        raise ConfigError(f"TF_CONFIG task type {kind!r}: train.distribute=multi_worker runs chief and worker "
                          "tasks only", field="TF_CONFIG")
    chief = kind == "chief" or (index == 0 and "chief" not in cluster)
    workers = sum(len(cluster.get(k) or []) for k in ("chief", "worker"))
    return WorkerRole(chief=chief, task=f"{kind}:{index}", num_workers=workers)


def check_distribute(cfg: Config) -> None:
    """Refuse, before anything is written, what the chosen strategy cannot run."""
    if cfg.train.distribute == "multi_worker" and cfg.scst.enabled and cfg.scst.epochs > 0:
        # SCST's own loop samples and scores whole batches in each process, outside the strategy's
        # input sharding, and checkpoints with tf.train.CheckpointManager from every process: across
        # workers it would repeat the work on each and race on its files.
        raise ConfigError("scst.enabled=true is not supported with train.distribute=multi_worker: train on "
                          "several workers with --set scst.enabled=false, or on one machine with SCST",
                          field="scst.enabled")


def _loss_class():
    import keras
    import tensorflow as tf

    class SmoothedCaptionLoss(keras.losses.Loss):
        """Per-token cross-entropy with label smoothing; padding is masked by the sample weights."""

        def __init__(self, smoothing: float = 0.0, name: str = "caption_loss",
                     reduction: str = "mean_with_sample_weight"):
            super().__init__(name=name, reduction=reduction)
            self.smoothing = smoothing

        def call(self, y_true, y_pred):
            log_probs = tf.nn.log_softmax(tf.cast(y_pred, tf.float32), axis=-1)
            nll = -tf.gather(log_probs, tf.cast(y_true, tf.int32), batch_dims=2)
            if not self.smoothing:
                return nll
            return (1.0 - self.smoothing) * nll - self.smoothing * tf.reduce_mean(log_probs, axis=-1)

        def get_config(self):
            return {"smoothing": self.smoothing, "name": self.name, "reduction": self.reduction}

    return SmoothedCaptionLoss


def _schedule(peak: float, warmup: int, total: int):
    import keras

    class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
        """Linear warm-up to ``peak``, then cosine decay to 5% of it at the last step."""

        def __call__(self, step):
            import tensorflow as tf

            step = tf.cast(step, tf.float32)
            warm = peak * (step + 1.0) / max(warmup, 1)
            progress = tf.clip_by_value((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
            cosine = peak * (0.05 + 0.95 * 0.5 * (1.0 + tf.cos(math.pi * progress)))
            return tf.where(step < warmup, warm, cosine)

        def get_config(self):
            return {"peak": peak, "warmup": warmup, "total": total}

    return WarmupCosine()


def compile_model(model, cfg: Config, steps_per_epoch: int) -> None:
    import keras

    total = max(1, cfg.train.epochs * steps_per_epoch)
    optimizer = keras.optimizers.AdamW(
        learning_rate=_schedule(cfg.train.learning_rate, cfg.train.warmup_steps, total),
        weight_decay=cfg.train.weight_decay, global_clipnorm=cfg.train.clip_norm or None,
        use_ema=cfg.train.ema_momentum > 0, ema_momentum=cfg.train.ema_momentum or 0.99)
    # Length-bucketed batches carry weights that already hold the normaliser (input_pipeline), so
    # their loss is a plain sum over the batch's elements divided by its size.
    reduction = "sum_over_batch_size" if cfg.train.length_buckets else "mean_with_sample_weight"
    model.compile(optimizer=optimizer, loss=_loss_class()(cfg.train.label_smoothing, reduction=reduction))


# -- the trained-model folder --------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    num_regions: int
    feature_dim: int
    model: dict[str, Any]
    config: dict[str, Any]
    # An ensemble folder (``save_ensemble``): {"combine": rule, "members": [{"model": ModelConfig
    # fields, "weights": file in the folder, "source": where it was taken from}, ...]}.
    ensemble: dict[str, Any] | None = None

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model)

    @property
    def full_config(self) -> Config:
        return config_from_dict(self.config)


def save_trained(model, tokenizer: Tokenizer, spec: ModelSpec, model_dir: Path) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{os.getpid()}.weights.h5"
    model.save_weights(str(tmp))
    os.replace(tmp, model_dir / WEIGHTS_FILE)
    tokenizer.save(model_dir)
    atomic_write_json(model_dir / MODEL_JSON, asdict(spec))


def load_trained(model_dir: Path | str):
    """Rebuild ``(model, tokenizer, spec)`` from a trained-model folder."""
    from captioner.model.captioner import build_model

    model_dir = Path(model_dir)
    path = model_dir / MODEL_JSON
    if not path.is_file():
        raise ModelError(f"not a trained model folder (no {MODEL_JSON})", path=str(model_dir))
    spec = ModelSpec(**json.loads(path.read_text()))
    if spec.ensemble:
        from captioner.model.ensemble import EnsembleModel

        members = []
        for member in spec.ensemble["members"]:
            model = build_model(spec.vocab_size, spec.num_regions, spec.feature_dim, ModelConfig(**member["model"]))
            model.load_weights(str(model_dir / member["weights"]))
            members.append(model)
        return EnsembleModel(members, spec.ensemble["combine"]), Tokenizer.load(model_dir), spec
    model = build_model(spec.vocab_size, spec.num_regions, spec.feature_dim, spec.model_config)
    model.load_weights(str(model_dir / WEIGHTS_FILE))
    return model, Tokenizer.load(model_dir), spec


def _member_source(path: Path) -> tuple[Path, Path]:
    """``(trained-model folder, weights file)`` for an ensemble member named by a run folder (its
    final weights) or by a ``.weights.h5`` file inside one (a checkpoint: the run's model with them)."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_JSON).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise ModelError(f"not a trained model folder (needs {MODEL_JSON} and {WEIGHTS_FILE})", path=str(path))
        return path, path / WEIGHTS_FILE
    if path.is_file() and path.name.endswith(".weights.h5"):
        for folder in path.parents:
            if (folder / MODEL_JSON).is_file():
                return folder, path
        raise ModelError(f"a weights file outside any trained model folder (no {MODEL_JSON} above it)",
                         path=str(path))
    raise ModelError("name a trained model folder or a .weights.h5 checkpoint inside one", path=str(path))


def is_ensemble_folder(folder: Path) -> bool:
    """True for a folder ``save_ensemble`` wrote (the only kind it replaces)."""
    try:
        return bool(json.loads((Path(folder) / MODEL_JSON).read_text()).get("ensemble"))
    except (OSError, ValueError):
        return False


def _ensemble_members(sources: list[Path], combine: str, relative_to: Path | None = None):
    """Check that ``sources`` can decode as one model: ``(first folder, its spec, members' entries
    for model.json, [(folder, weights file)])``."""
    from captioner.model.ensemble import COMBINE_RULES

    if combine not in COMBINE_RULES:
        raise ConfigError(f"combine must be one of {COMBINE_RULES}, got {combine!r}", field="combine")
    if not sources:
        raise ConfigError("an ensemble needs at least one member", field="members")
    resolved = [_member_source(Path(s)) for s in sources]
    first_folder = resolved[0][0]
    first = ModelSpec(**json.loads((first_folder / MODEL_JSON).read_text()))
    vocabulary = (first_folder / "vocab.json").read_text()
    members = []
    for i, (folder, weights) in enumerate(resolved):
        spec = ModelSpec(**json.loads((folder / MODEL_JSON).read_text()))
        if spec.ensemble:
            raise ModelError("is an ensemble itself; name its members instead", path=str(folder))
        if (folder / "vocab.json").read_text() != vocabulary:
            raise ModelError(f"member {i} has another vocabulary than member 0 ({first_folder}): an ensemble "
                             f"averages next-word distributions over one vocabulary", path=str(folder))
        if (spec.num_regions, spec.feature_dim) != (first.num_regions, first.feature_dim):
            raise ModelError(f"member {i} reads other image features ({spec.num_regions} regions x "
                             f"{spec.feature_dim}) than member 0 ({first.num_regions} x {first.feature_dim})",
                             path=str(folder))
        source = weights.resolve() if relative_to is None else weights.resolve().relative_to(relative_to.resolve())
        members.append({"model": spec.model, "weights": f"member-{i}.weights.h5", "source": str(source)})
    return first_folder, first, members, resolved


def save_ensemble(sources: list[Path], output: Path | str, combine: str = "prob") -> Path:
    """Write an ensemble folder from trained models or checkpoints (``_member_source``): the members'
    weights, the shared vocabulary, and a ``model.json`` that ``load_trained`` reads back as an
    ``EnsembleModel``. The first member's config (decoding settings included) becomes the ensemble's.
    ``output`` must be new, empty or an ensemble folder written before."""
    from captioner.io_utils import atomic_directory

    first_folder, first, members, resolved = _ensemble_members(sources, combine)
    with atomic_directory(output, is_ensemble_folder) as tmp:
        for member, (_, weights) in zip(members, resolved, strict=True):
            shutil.copyfile(weights, tmp / member["weights"])
        Tokenizer.load(first_folder).save(tmp)
        spec = ModelSpec(first.vocab_size, first.num_regions, first.feature_dim, first.model, first.config,
                         ensemble={"combine": combine, "members": members})
        atomic_write_json(tmp / MODEL_JSON, asdict(spec))
    return Path(output)


def member_folder(model_dir: Path, index: int) -> Path:
    return Path(model_dir) / MEMBERS_DIR / f"member-{index}"


def train_ensemble(cfg: Config, dataset: CaptionDataset, tokenizer: Tokenizer, store: FeatureStore,
                   model_dir: Path | str, tracker: ExperimentTracker, progress: bool = True):
    """Train ``cfg.ensemble.members`` in turn (each into ``member_folder``; a member that finished
    before is not trained again), then make ``model_dir`` the ensemble of them: the members'
    weights and a ``model.json`` that ``load_trained`` reads as one model. Returns ``(model, spec)``."""
    from captioner.config import member_config

    model_dir = Path(model_dir)
    count = len(cfg.ensemble.members)
    folders, summaries = [], []
    for index in range(count):
        member_cfg = member_config(cfg, index)
        folder = member_folder(model_dir, index)
        member_tracker = ExperimentTracker(folder, seed=member_cfg.train.seed)
        member_tracker.log_config(member_cfg)
        if progress:
            print(f"ensemble member {index + 1}/{count} ({json.dumps(cfg.ensemble.members[index])}): {folder}",
                  flush=True)
        with tracker.time(f"member_{index}"):
            train_model(member_cfg, dataset, tokenizer, store, folder, member_tracker, progress)
        member_tracker.finalize()
        summaries.append({"folder": str(folder.relative_to(model_dir)), "overrides": cfg.ensemble.members[index],
                          "seed": member_cfg.train.seed,
                          **{k: member_tracker.extra[k] for k in ("selected_epoch", "xe_selected_epoch", "scst")
                             if k in member_tracker.extra}})
        folders.append(folder)
    first_folder, first, members, resolved = _ensemble_members(folders, cfg.ensemble.combine, relative_to=model_dir)
    for member, (_, weights) in zip(members, resolved, strict=True):
        tmp = model_dir / f".tmp-{os.getpid()}.weights.h5"
        shutil.copyfile(weights, tmp)
        os.replace(tmp, model_dir / member["weights"])
    tokenizer.save(model_dir)
    spec = ModelSpec(first.vocab_size, first.num_regions, first.feature_dim, first.model, cfg.to_dict(),
                     ensemble={"combine": cfg.ensemble.combine, "members": members})
    atomic_write_json(model_dir / MODEL_JSON, asdict(spec))  # last: the folder is an ensemble from here
    tracker.extra["ensemble"] = {"combine": cfg.ensemble.combine, "members": summaries}
    model, _, spec = load_trained(model_dir)
    return model, spec


@contextlib.contextmanager
def averaged_weights(model):
    """Temporarily swap in the optimizer's moving averages of the weights (when EMA is on)."""
    optimizer = model.optimizer
    if not getattr(optimizer, "use_ema", False) or not optimizer.iterations.numpy():
        yield
        return
    variables = model.trainable_variables
    saved = [v.numpy() for v in variables]
    optimizer._overwrite_model_variables_with_average_value(variables)
    try:
        yield
    finally:
        for variable, value in zip(variables, saved, strict=True):
            variable.assign(value)


# -- callbacks -----------------------------------------------------------------------------------
def _callbacks(cfg: Config, model_dir: Path, tracker: ExperimentTracker, dev: CaptionPairs,
               dev_refs: dict[str, list[str]], tokenizer: Tokenizer, progress: bool, resume_dir: Path | None = None):
    """``model_dir``: where this process writes; ``resume_dir``: the run whose backup it restores
    (the chief's, for a worker writing into its temporary folder; default ``model_dir``)."""
    import keras
    import tensorflow as tf

    from captioner.evaluate import quick_bleu4
    from captioner.model.decoding import decode
    from captioner.scst import corpus_cider

    ckpt = model_dir / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    select, patience = cfg.train.select_metric, cfg.train.early_stopping_patience

    class DevSelection(keras.callbacks.Callback):
        """Greedy dev BLEU-4 and CIDEr-D each epoch; keep the best weights by ``train.select_metric``;
        stop when it stops improving."""

        def __init__(self):
            super().__init__()
            self.decode_fn = None
            history = tracker.history()
            key, sign = SELECTION_KEYS[select]
            self.key, self.sign = key, sign
            values = [(row["epoch"], sign * row[key]) for row in history if key in row and row[key] != ""]
            self.best = max((v for _, v in values), default=-math.inf)
            self.best_epoch = max(((v, e) for e, v in values), default=(None, 0))[1]
            self.epoch_start = self.dev_start = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_start = time.perf_counter()

        def dev_scores(self) -> tuple[float, float]:
            if self.decode_fn is None:
                max_length = cfg.decode.max_length
                self.decode_fn = tf.function(
                    lambda f: decode(self.model, self.model.encode(f), beam_size=1, max_length=max_length))
            hyps = {}
            for start in range(0, len(dev.images), 256):
                out = self.decode_fn(tf.constant(dev.features[start:start + 256]))
                for name, ids in zip(dev.images[start:start + 256], out["tokens"][:, 0].numpy(), strict=True):
                    hyps[name] = tokenizer.decode(ids)
            return quick_bleu4(dev_refs, hyps), corpus_cider(dev_refs, hyps)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            with averaged_weights(self.model):
                self._select(epoch, logs)
            # Under multi_worker every worker decides alone, from the same weights and the chief's
            # history: all stop after the same epoch, as the strategy's collectives need.
            if epoch + 1 - self.best_epoch >= patience:
                print(f"early stop: no dev improvement for {patience} epoch(s)", flush=True)
                self.model.stop_training = True

        def on_test_begin(self, logs=None):
            self.dev_start = time.perf_counter()

        def _select(self, epoch, logs):
            # The dev part of the epoch: its loss pass (train.dev_loss) began it, else the decoding does.
            dev_start = self.dev_start if "val_loss" in logs else time.perf_counter()
            logs["dev_bleu4"], dev_cider = self.dev_scores()
            lr = self.model.optimizer.learning_rate
            row = {"phase": "xe", "train_loss": float(logs.get("loss", float("nan"))),
                   # Not measured (train.dev_loss off): left empty, not NaN, in metrics.csv and the reports.
                   **({"val_loss": float(logs["val_loss"])} if "val_loss" in logs else {}),
                   "dev_bleu4": logs["dev_bleu4"], "dev_cider": dev_cider, "learning_rate": float(np.asarray(lr)),
                   "epoch_seconds": round(time.perf_counter() - self.epoch_start, 2),
                   "dev_seconds": round(time.perf_counter() - dev_start, 2)}
            tracker.log_metrics(epoch=epoch + 1, **row)
            value = self.sign * row[self.key]
            if value > self.best:
                self.best, self.best_epoch = value, epoch + 1
                tmp = ckpt / ".best-tmp.weights.h5"
                self.model.save_weights(str(tmp))
                os.replace(tmp, ckpt / "best.weights.h5")
            if progress:
                val = f" val_loss {row['val_loss']:.4f}" if "val_loss" in row else ""
                print(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}{val} "
                      f"dev BLEU-4 {row['dev_bleu4']:.4f} CIDEr-D {dev_cider:.4f} (best epoch {self.best_epoch}) "
                      f"{row['epoch_seconds']:.1f}s (dev {row['dev_seconds']:.1f}s)", flush=True)

    class KillAfterEpoch(keras.callbacks.Callback):
        def __init__(self, epoch: int):
            super().__init__()
            self.kill_epoch = epoch

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == self.kill_epoch:
                os.kill(os.getpid(), signal.SIGKILL)

    class RestoreFrom(keras.callbacks.BackupAndRestore):
        """Keras' BackupAndRestore, restoring from another folder than it saves to: every worker must
        start from the chief's backup (on storage they all see), and only the chief may overwrite it."""

        def __init__(self, backup_dir: Path, restore_dir: Path):
            super().__init__(str(backup_dir), delete_checkpoint=False)
            self.restore_paths = (str(restore_dir / "latest.weights.h5"), str(restore_dir / "training_metadata.json"))

        def on_train_begin(self, logs=None):
            own = self._weights_path, self._training_metadata_path
            self._weights_path, self._training_metadata_path = self.restore_paths
            try:
                super().on_train_begin(logs)
            finally:
                self._weights_path, self._training_metadata_path = own

    backup = ckpt / "backup"
    restore = (resume_dir / CHECKPOINT_DIR / "backup") if resume_dir is not None else backup
    callbacks = [DevSelection(),
                 (keras.callbacks.BackupAndRestore(str(backup), delete_checkpoint=False) if restore == backup
                  else RestoreFrom(backup, restore)),
                 keras.callbacks.TensorBoard(str(tracker.log_dir), update_freq="epoch",
                                             write_graph=False, profile_batch=0)]
    if os.environ.get(KILL_AFTER_EPOCH_ENV):
        callbacks.append(KillAfterEpoch(int(os.environ[KILL_AFTER_EPOCH_ENV])))
    return callbacks


# -- the training step ----------------------------------------------------------------------------
@contextlib.contextmanager
def _keras_multi_worker(model, element_spec) -> Iterator[None]:
    """Work around two places where Keras 3's ``fit`` breaks under MultiWorkerMirroredStrategy.

    * It builds the model from a first batch averaged over the replicas with ``strategy.reduce``,
      which refuses a nested batch ("Attempt to convert a value (PerReplica...) to a Tensor"); the
      input's element spec gives the shapes and dtypes, which is all the build needs.
    * It averages each step's logs over the workers with ``strategy.reduce("MEAN", v, axis=0)``,
      which fails on the scalar losses ("Invalid reduction dimension 0 for input with 0 dimensions");
      scalars are averaged with ``axis=None`` instead.
    """
    from keras import tree
    from keras.src.backend.tensorflow import trainer as keras_tf

    def build(iterator=None, data_batch=None):
        with model.distribute_strategy.scope():
            model._symbolic_build(data_batch=element_spec)

    original = keras_tf.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction="auto"):
        if reduction not in ("auto", "mean") or not keras_tf._collective_all_reduce_multi_worker(strategy):
            return original(values, strategy, reduction=reduction)

        def mean(value):
            local = strategy.experimental_local_results(value)[0] if keras_tf._is_per_replica_instance(value) \
                else value
            if getattr(local, "shape", None) is not None and local.shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return original(value, strategy, reduction=reduction)

        return tree.map_structure(mean, values)

    model._maybe_symbolic_build = build
    keras_tf.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        keras_tf.reduce_per_replica = original
        del model._maybe_symbolic_build


@contextlib.contextmanager
def _worker_folder(role: WorkerRole, model_dir: Path, seed: int, fresh: bool) -> Iterator[ExperimentTracker]:
    """A tracker in a temporary folder (removed afterwards) for a worker that is not the chief,
    starting from the chief's metrics so far (unless ``fresh``), so that its early stopping and input
    order agree with the chief's."""
    import hashlib

    # A killed worker cannot remove its folder: the next start of the same task of the same run does.
    run_key = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:12]
    prefix = f"captioner-{role.task.replace(':', '-')}-{run_key}-"
    for stale in Path(tempfile.gettempdir()).glob(prefix + "*"):
        if stale.is_dir() and not stale.is_symlink() and stale.stat().st_uid == os.getuid():
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        if not fresh and (model_dir / METRICS_CSV).is_file():
            shutil.copyfile(model_dir / METRICS_CSV, Path(scratch) / METRICS_CSV)
        yield ExperimentTracker(scratch, seed=seed)


def train_model(cfg: Config, dataset: CaptionDataset, tokenizer: Tokenizer, store: FeatureStore,
                model_dir: Path | str, tracker: ExperimentTracker | None = None, progress: bool = True,
                *, fresh: bool = False):
    """Fit a model on the train split, select on dev, save the selected weights to ``model_dir``.

    Under ``train.distribute=multi_worker`` every worker runs this with the same ``model_dir`` (on
    storage they all see): the chief writes there; the others resume from it (unless ``fresh``: the
    chief is starting the run over) and write into a temporary folder that is removed.
    """
    check_distribute(cfg)
    model_dir = Path(model_dir)
    role = worker_role(cfg.train.distribute)
    if role.chief:
        tracker = tracker or ExperimentTracker(model_dir, seed=cfg.train.seed)
        return _train(cfg, dataset, tokenizer, store, model_dir, model_dir, tracker, progress)
    with _worker_folder(role, model_dir, cfg.train.seed, fresh) as scratch:
        return _train(cfg, dataset, tokenizer, store, scratch.run_dir, None if fresh else model_dir, scratch,
                      progress)


def _train(cfg: Config, dataset: CaptionDataset, tokenizer: Tokenizer, store: FeatureStore, model_dir: Path,
           resume_dir: Path | None, tracker: ExperimentTracker, progress: bool):
    import keras

    from captioner.model.captioner import build_model

    strategy = make_strategy(cfg.train.distribute)  # first: multi_worker must precede any other TF op
    set_global_seed(cfg.train.seed)
    max_length = cfg.tokenizer.max_length
    train = caption_pairs(dataset, "train", tokenizer, store, max_length, flip=cfg.features.flip_train)
    dev = caption_pairs(dataset, "dev", tokenizer, store, max_length)
    regions, dim = train.features.shape[1:]
    spec = ModelSpec(tokenizer.vocab_size, int(regions), int(dim), asdict(cfg.model), cfg.to_dict())
    tracker.extra["distribute"] = {"strategy": cfg.train.distribute, "replicas": strategy.num_replicas_in_sync,
                                   "workers": worker_role(cfg.train.distribute).num_workers}
    if cfg.train.mixed_precision:
        keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        with strategy.scope():
            model = build_model(spec.vocab_size, spec.num_regions, spec.feature_dim, cfg.model)
            steps = math.ceil(len(train.image_index) / cfg.train.batch_size)
            compile_model(model, cfg, steps)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    history = tracker.history()
    # train.batch_size is the global batch: the strategy splits each batch between its replicas.
    train_ds = input_pipeline(train, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                              first_epoch=len(history), length_buckets=cfg.train.length_buckets,
                              group_by_image=cfg.train.group_by_image)
    dev_ds = input_pipeline(dev, 256, shuffle=False, seed=0, length_buckets=cfg.train.length_buckets)
    callbacks = _callbacks(cfg, model_dir, tracker, dev, dataset.split_captions("dev"), tokenizer, progress,
                           resume_dir)
    # A run whose training finished (even by early stopping) but failed later, e.g. at export,
    # must not train again when it is resumed.
    finished = model_dir / CHECKPOINT_DIR / "TRAINING_FINISHED"
    done_before = resume_dir is not None and (resume_dir / CHECKPOINT_DIR / "TRAINING_FINISHED").is_file()
    if cfg.train.epochs > 0 and not done_before:
        # Keras' own epoch line would repeat DevSelection's (one line per epoch, with dev BLEU-4).
        with (_keras_multi_worker(model, train_ds.element_spec) if cfg.train.distribute == "multi_worker"
              else contextlib.nullcontext()):
            model.fit(train_ds, validation_data=dev_ds if cfg.train.dev_loss else None, epochs=cfg.train.epochs,
                      callbacks=callbacks, verbose=0)
    finished.parent.mkdir(parents=True, exist_ok=True)
    finished.write_text(f"{len(tracker.history())} epochs\n")
    best = model_dir / CHECKPOINT_DIR / "best.weights.h5"
    if best.is_file():
        model.load_weights(str(best))
    rows = [r for r in tracker.history() if r.get("phase") in (None, "", "xe")]
    key, sign = SELECTION_KEYS[cfg.train.select_metric]
    if rows:
        chosen = max(rows, key=lambda r: sign * float(r[key]))
        # selected_epoch becomes SCST's when SCST improves on it; xe_selected_epoch stays.
        tracker.extra["selected_epoch"] = tracker.extra["xe_selected_epoch"] = int(chosen["epoch"])
        tracker.log_final_metrics(**{f"selected_{key}": chosen[key]})
    if cfg.scst.enabled and cfg.scst.epochs > 0:
        from captioner.scst import train_scst, training_references

        with tracker.time("scst"):
            summary = train_scst(model, cfg, train, dev, dataset.split_captions("dev"),
                                 training_references(dataset, train.images), tokenizer, model_dir, tracker,
                                 first_epoch=len(rows), strategy=strategy, progress=progress)
        tracker.extra["scst"] = summary
        if summary["selected_epoch"]:
            tracker.extra["selected_epoch"] = len(rows) + summary["selected_epoch"]
        tracker.log_final_metrics(selected_dev_cider=summary["selected_dev_cider"])
    save_trained(model, tokenizer, spec, model_dir)
    return model, spec
