"""The steps of a training run, each usable alone (the pipeline's components wrap them) or chained by
``run_training`` (``captioner train``): data -> tokenize -> extract -> train -> evaluate -> export."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from captioner import constants as C
from captioner.config import Config, with_overrides
from captioner.data.readers import CaptionDataset, read_dataset
from captioner.data.tokenizer import Tokenizer
from captioner.errors import CaptionerError, ConfigError
from captioner.features.extract import FLIP_SUFFIX, FeatureStore, cache_key, extract_features
from captioner.io_utils import atomic_write_json, exclusive_lock
from captioner.tracking import FAILED_JSON, ExperimentTracker, is_run_folder

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("CAPTIONER_CACHE", Path.home() / ".cache" / "captioner"))


def load_data(cfg: Config) -> CaptionDataset:
    """Read the configured data set (generating the synthetic one first when asked for)."""
    if cfg.data.format == "synthetic":
        from captioner.data.synthetic import generate

        s = cfg.data.synthetic
        root = Path(cfg.data.root) if cfg.data.root else cache_root() / (
            f"synthetic-{s.num_train}-{s.num_dev}-{s.num_test}-{s.image_size}-{s.seed}")
        generate(root, s)
        dataset = read_dataset(root, "flickr8k", cfg.data.on_missing_image)
        dataset.name = "synthetic"
    else:
        dataset = read_dataset(cfg.data.root, cfg.data.format, cfg.data.on_missing_image)
    return dataset.limit(cfg.data.max_images_per_split)


def features_folder(cfg: Config, dataset: CaptionDataset) -> Path:
    """The feature cache for this backbone set-up. Keys are image contents, so one store serves
    every data set (a moved, renamed or grown data folder reuses what was extracted)."""
    base = Path(cfg.features.cache_dir) if cfg.features.cache_dir else cache_root() / "features"
    return base / "by-content" / cache_key(cfg.features)


def tokenize_step(cfg: Config, dataset: CaptionDataset, out_dir: Path | str) -> Tokenizer:
    train_captions = [c for image in dataset.splits["train"] for c in dataset.captions[image]]
    tokenizer = Tokenizer.fit(train_captions, min_count=cfg.tokenizer.min_count, max_size=cfg.tokenizer.max_size)
    tokenizer.save(out_dir)
    return tokenizer


def extract_step(cfg: Config, dataset: CaptionDataset, folder: Path | str | None = None,
                 images: list[str] | None = None, progress: bool = True,
                 output: Path | str | None = None) -> FeatureStore:
    """Features of the data set's images: only images whose content is not in the cache ``folder``
    (default ``features_folder``) go through the backbone. With ``output``, also writes a
    self-contained copy keyed by image name there and returns that (``extracted`` still tells
    how many images the backbone saw)."""
    folder = Path(folder) if folder else features_folder(cfg, dataset)
    images = images if images is not None else dataset.all_images()
    wanted = set(images)
    flip = [i for i in dataset.splits["train"] if i in wanted] if cfg.features.flip_train else []
    store = extract_features(dataset, images, cfg.features, folder, flip=flip, progress=progress)
    if output is None:
        return store
    copy = store.export([*images, *(name + FLIP_SUFFIX for name in flip)], output, cfg.features.shard_size)
    copy.extracted = store.extracted
    return copy


def evaluate_model(model, tokenizer: Tokenizer, store: FeatureStore, dataset: CaptionDataset, cfg: Config,
                   split: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Greedy and beam decoding of a split, scored with the COCO caption metrics."""
    from captioner.evaluate import coco_scores

    split = split or cfg.eval.split
    images = dataset.splits[split]
    references = dataset.split_captions(split)
    report: dict[str, Any] = {"split": split, "images": len(images)}
    samples: dict[str, dict[str, str]] = {}
    for name, beam in (("greedy", 1), ("beam", cfg.decode.beam_size)):
        start = time.perf_counter()
        hyps = decode_split(model, tokenizer, store, images, beam_size=beam, max_length=cfg.decode.max_length,
                            length_penalty=cfg.decode.length_penalty,
                            no_repeat_ngram_size=cfg.decode.no_repeat_ngram_size)
        seconds = time.perf_counter() - start
        scores = coco_scores(references, hyps, meteor=cfg.eval.meteor)
        scores.update({"beam_size": beam, "decode_seconds": round(seconds, 3),
                       "no_repeat_ngram_size": cfg.decode.no_repeat_ngram_size})
        scores.update(caption_shares(hyps.values()))
        if beam > 1:
            scores["length_penalty"] = cfg.decode.length_penalty
        report[name] = scores
        for image in images[: cfg.eval.num_samples]:
            samples.setdefault(image, {})[name] = hyps[image]
        if progress:
            print(f"{split} {name} (beam {beam}): BLEU-4 {scores['bleu4']:.4f} CIDEr {scores['cider']:.4f}",
                  flush=True)
    # Top level: the beam decoder's metrics, as reported in papers; greedy under "greedy".
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "nltk_bleu4", "tokenizer"):
        report[key] = report["beam"][key]
    report["samples"] = [{"image": image, "generated_beam": s["beam"], "generated_greedy": s["greedy"],
                          "references": references[image]} for image, s in samples.items()]
    return report


# Words a finished English caption does not end on; a caption that does stopped mid-phrase.
DANGLING_WORDS = frozenset({"a", "the", "of", "with", "on", "in", "and"})


def caption_shares(captions: Iterable[str]) -> dict[str, float]:
    """Share of captions ending on a dangling word, and of captions containing ``<unk>``."""
    captions = list(captions)
    dangling = sum(1 for c in captions if c.split() and c.split()[-1] in DANGLING_WORDS)
    unknown = sum(1 for c in captions if C.UNK in c.split())
    total = max(len(captions), 1)
    return {"dangling_share": round(dangling / total, 4), "unk_share": round(unknown / total, 4)}


def decode_split(model, tokenizer: Tokenizer, store: FeatureStore, images: list[str], *, beam_size: int,
                 max_length: int, length_penalty: float, no_repeat_ngram_size: int = 0,
                 batch_size: int = 128) -> dict[str, str]:
    """Captions for ``images`` from cached features: ``{image: caption}``."""
    import tensorflow as tf

    from captioner.model.decoding import decode

    run = tf.function(lambda f: decode(model, model.encode(f), beam_size=beam_size, max_length=max_length,
                                       length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size))
    hyps: dict[str, str] = {}
    for offset in range(0, len(images), batch_size):
        batch = images[offset:offset + batch_size]
        out = run(tf.constant(store.load(batch)))
        for image, ids in zip(batch, out["tokens"][:, 0].numpy(), strict=True):
            hyps[image] = tokenizer.decode(ids)
    return hyps


def tune_length_penalty(model, tokenizer: Tokenizer, store: FeatureStore, dataset: CaptionDataset, cfg: Config,
                        progress: bool = True) -> tuple[float, dict[str, float]]:
    """Dev score (``decode.tune_metric``: BLEU-4 or CIDEr-D) of beam search for each length penalty of
    ``decode.length_penalty_grid``; returns the best (the smallest penalty on a tie) and all scores."""
    from captioner.evaluate import quick_bleu4
    from captioner.scst import corpus_cider

    score, label = {"bleu4": (quick_bleu4, "BLEU-4"), "cider": (corpus_cider, "CIDEr-D")}[cfg.decode.tune_metric]
    references = dataset.split_captions("dev")
    scores = {}
    grid = sorted({float(a) for a in cfg.decode.length_penalty_grid})
    for alpha in grid:
        hyps = decode_split(model, tokenizer, store, dataset.splits["dev"], beam_size=cfg.decode.beam_size,
                            max_length=cfg.decode.max_length, length_penalty=alpha,
                            no_repeat_ngram_size=cfg.decode.no_repeat_ngram_size)
        scores[str(alpha)] = score(references, hyps)
        if progress:
            print(f"dev beam {cfg.decode.beam_size} length_penalty {alpha}: {label} {scores[str(alpha)]:.4f}",
                  flush=True)
    best = max(grid, key=lambda a: scores[str(a)])
    return best, scores


def fit_and_tune(cfg: Config, dataset: CaptionDataset, tokenizer: Tokenizer, store: FeatureStore,
                 model_dir: Path, tracker: ExperimentTracker | None = None, progress: bool = True):
    """Train (selecting the epoch on dev), then, if asked, pick the length penalty on dev.

    Returns ``(model, cfg)`` where ``cfg`` carries the chosen decoding settings; they are also saved
    in the model folder's ``model.json`` so that evaluation and export use them.
    """
    from captioner.train import MODEL_JSON, train_ensemble, train_model, worker_role

    tracker = tracker or ExperimentTracker(model_dir, seed=cfg.train.seed)
    with tracker.time("train"):
        if cfg.ensemble.members:
            model, _ = train_ensemble(cfg, dataset, tokenizer, store, model_dir, tracker, progress)
        else:
            model, _ = train_model(cfg, dataset, tokenizer, store, model_dir, tracker, progress)
    if not worker_role(cfg.train.distribute).chief:
        return model, cfg  # the chief tunes decoding and writes model.json; this worker's part is done
    if cfg.decode.tune_length_penalty:
        with tracker.time("tune_decoding"):
            alpha, grid = tune_length_penalty(model, tokenizer, store, dataset, cfg, progress)
        cfg = with_overrides(cfg, {"decode": {"length_penalty": alpha}})
        tracker.extra["decode_tuning"] = {"split": "dev", "metric": cfg.decode.tune_metric, "length_penalty": grid,
                                          "chosen": alpha}
        spec = json.loads((model_dir / MODEL_JSON).read_text())
        spec["config"] = cfg.to_dict()
        atomic_write_json(model_dir / MODEL_JSON, spec)
    return model, cfg


# Fields that may differ when an interrupted run is continued. They do not change what is trained:
# how long it trains (epochs, patience), how (distribution strategy, extraction batch and cache
# location), where the data lives (data.root, only if the data there is the same: checked against
# the fingerprint recorded when the run started), and the post-training stages (decoding for the
# test evaluation and export, evaluation, export). Every other field, including any added later, is
# part of what the run is: changing it means a new run (--restart or a new --output).
RESUMABLE_FIELDS = ("name", "train.epochs", "train.early_stopping_patience", "train.distribute",
                    "features.batch_size", "features.shard_size", "features.cache_dir", "data.root",
                    "scst.epochs", "scst.patience", "decode.beam_size", "decode.length_penalty",
                    "decode.tune_length_penalty", "decode.tune_metric", "decode.length_penalty_grid",
                    "decode.no_repeat_ngram_size",
                    "train.dev_loss", "eval.", "export.")
class ResumeError(ConfigError):
    """The command asks to continue a run as something it is not (other config or data)."""


RUN_STATE = "run_state.json"  # in checkpoints/: the data set's fingerprint and the resumes with changes
# What `train` writes into its --output: the only things --restart removes (a user's file there stays).
RUN_FILES = (C.CONFIG_SNAPSHOT, C.METRICS_CSV, C.RUN_SUMMARY, FAILED_JSON, C.EVALUATION_JSON, C.VOCAB_JSON,
             C.VOCAB_TXT, "model.json", "model.weights.h5")
CHECKPOINT_FILES = ("best.weights.h5", ".best-tmp.weights.h5", "TRAINING_FINISHED", RUN_STATE, "scst-best.weights.h5",
                    ".scst-best-tmp.weights.h5", "SCST_FINISHED", "scst_state.json")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: dict[str, Any], new: Config) -> dict[str, tuple[Any, Any]]:
    """``{field: (old, new)}`` for every field of ``new`` that differs from the saved config ``old``."""
    from captioner.config import config_from_dict

    with contextlib.suppress(ConfigError):
        old = config_from_dict(old).to_dict()  # fills fields added since the run started with defaults
    before, after = _flat(old), _flat(new.to_dict())
    missing = object()
    return {name: (before.get(name), after.get(name)) for name in sorted(set(before) | set(after))
            if before.get(name, missing) != after.get(name, missing)}


def _resumable(name: str) -> bool:
    return any(name == f or (f.endswith(".") and name.startswith(f)) for f in RESUMABLE_FIELDS)


def _show(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{name} {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}"
                     for name, (a, b) in changes.items())


def _run_state(output: Path) -> dict[str, Any]:
    path = output / C.CHECKPOINT_DIR / RUN_STATE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        raise CaptionerError("damaged run state; use --restart to start this run over", path=str(path)) from None


def remove_run_files(output: Path) -> None:
    """Delete what a run wrote into ``output`` (--restart), and nothing else that is there."""
    import shutil

    from captioner.export import is_captioner_export

    for name in RUN_FILES:
        (output / name).unlink(missing_ok=True)
    for leftover in output.glob(".tmp-*.weights.h5"):  # save_trained's temporary name
        leftover.unlink()
    for weights in output.glob("member-*.weights.h5"):  # an ensemble run's copies of its members' weights
        if re.fullmatch(r"member-\d+\.weights\.h5", weights.name):
            weights.unlink()
    members = output / C.MEMBERS_DIR
    for member in sorted(members.glob("member-*")) if members.is_dir() else ():
        if re.fullmatch(r"member-\d+", member.name) and is_run_folder(member):
            remove_run_files(member)
            with contextlib.suppress(OSError):  # left in place when a user's file is inside
                member.rmdir()
    with contextlib.suppress(OSError):
        members.rmdir()
    if is_captioner_export(output / C.SAVED_MODEL_DIR):
        shutil.rmtree(output / C.SAVED_MODEL_DIR)
    checkpoints = output / C.CHECKPOINT_DIR
    for name in CHECKPOINT_FILES:
        (checkpoints / name).unlink(missing_ok=True)
    # Keras's BackupAndRestore folder and TensorBoard's event files are ours by construction.
    shutil.rmtree(checkpoints / "backup", ignore_errors=True)
    scst = checkpoints / "scst"  # tf.train.CheckpointManager's files (SCST): "checkpoint", "ckpt-N.*"
    ours = re.compile(r"ckpt-\d+\.(index|data-\d{5}-of-\d{5})")  # what tf.train.Checkpoint writes
    for name in (*(p for p in scst.glob("ckpt-*") if ours.fullmatch(p.name)), scst / "checkpoint") \
            if scst.is_dir() else ():
        name.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        scst.rmdir()
    logs = output / C.LOG_DIR
    for events in logs.rglob("events.out.tfevents.*") if logs.is_dir() else ():
        events.unlink()
    for folder in (*sorted((p for p in logs.rglob("*") if p.is_dir()), reverse=True), logs, checkpoints):
        with contextlib.suppress(OSError):  # left in place when a user's file is inside
            folder.rmdir()


def training_history(model_dir: Path | str) -> list[dict[str, Any]] | dict[str, list[dict[str, Any]]]:
    """The rows of ``metrics.csv``: the run's, or for a run that trained an ensemble, each member's
    (``{"member 0": rows, ...}``)."""
    model_dir = Path(model_dir)
    members = sorted((p for p in (model_dir / C.MEMBERS_DIR).glob("member-*") if re.fullmatch(r"member-\d+", p.name)),
                     key=lambda p: int(p.name.split("-")[1])) if (model_dir / C.MEMBERS_DIR).is_dir() else []
    if members and not (model_dir / C.METRICS_CSV).is_file():
        return {f"member {p.name.split('-')[1]}": ExperimentTracker(p).history() for p in members}
    return ExperimentTracker(model_dir).history()


def _check_fresh(output: Path, cfg: Config, restart: bool = False) -> dict[str, Any] | None:
    """What ``train --output`` may do with ``output``; returns the saved config of a run to resume.

    A new or empty folder starts a run. A run folder (our ``config_snapshot.json``, ``run_summary.json``
    or ``FAILED.json``) is continued if its config matches (see RESUMABLE_FIELDS), or started over
    with ``restart`` (removing only the run's own files). Anything else is refused untouched.
    """
    from captioner.export import is_captioner_export
    from captioner.io_utils import check_replaceable

    if not is_run_folder(output):
        check_replaceable(output, hint=" for --output: it holds no captioner run to resume")
        return None
    if cfg.export.enabled:
        check_replaceable(output / C.SAVED_MODEL_DIR, is_captioner_export,
                          hint=" (the run's SavedModel is exported there)")
    if restart:
        remove_run_files(output)
        return None
    if (output / C.RUN_SUMMARY).is_file():
        raise CaptionerError(f"{output} already holds a complete run; choose a new --output, or --restart "
                             "to train it again from scratch", path=str(output / C.RUN_SUMMARY))
    snapshot = output / C.CONFIG_SNAPSHOT
    if not snapshot.is_file():
        return None  # failed before its config was saved: nothing to resume
    try:
        previous = json.loads(snapshot.read_text())
    except ValueError:
        raise ResumeError("damaged config snapshot: this run cannot be checked, so it is not continued; use "
                          "--restart or a new --output", path=str(snapshot)) from None
    if not isinstance(previous, dict):
        raise ResumeError("not a config snapshot; use --restart or a new --output", path=str(snapshot))
    changes = config_changes(previous, cfg)
    fixed = {name: change for name, change in changes.items() if not _resumable(name)}
    if fixed:
        raise ResumeError(f"cannot resume this run with a different configuration: {_show(fixed)}. "
                          "Give the run's own config and --set values to continue it, --restart to train it "
                          "from scratch, or a new --output", path=str(snapshot), field=next(iter(fixed)))
    finished = output / C.CHECKPOINT_DIR / "TRAINING_FINISHED"
    trained = len(ExperimentTracker(output).history())
    longer = {k: v for k, v in changes.items() if k in ("train.epochs", "train.early_stopping_patience")}
    if longer and finished.is_file():
        raise ResumeError(f"this run's training already finished ({trained} epochs): {_show(longer)} would not "
                          "train it further; use --restart or a new --output", path=str(snapshot),
                          field=next(iter(longer)))
    if "train.epochs" in changes and cfg.train.epochs < trained:
        raise ResumeError(f"train.epochs={cfg.train.epochs} is fewer than the {trained} epochs this run has "
                          "trained already", path=str(snapshot), field="train.epochs")
    return previous


def _check_same_data(output: Path, dataset: CaptionDataset, cfg: Config, previous: dict[str, Any] | None,
                     record: bool = True) -> None:
    """On resume, the data must be what the run started on; records it on a first start (``record``:
    a worker that is not the chief only checks)."""
    state = _run_state(output)
    fingerprint = dataset.fingerprint()
    recorded = state.get("dataset", {}).get("fingerprint")
    changes = config_changes(previous, cfg) if previous is not None else {}
    if previous is not None and recorded is None and "data.root" in changes:
        raise ResumeError(f"cannot resume with a different data.root ({_show({'data.root': changes['data.root']})}): "
                          "this run recorded no fingerprint of its data to compare with; use the run's "
                          "data.root, --restart, or a new --output", field="data.root", path=str(output))
    if recorded is not None and recorded != fingerprint:
        moved = f" ({_show({'data.root': changes['data.root']})})" if "data.root" in changes else ""
        raise ResumeError(f"the data set differs from the one this run started on{moved}: fingerprint "
                          f"{recorded} -> {fingerprint}; use the run's data, --restart, or a new --output",
                          field="data.root", path=str(output))
    if not record:
        return
    state.setdefault("dataset", {"name": dataset.name, "fingerprint": fingerprint})
    if changes:
        state.setdefault("resumes", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                "changed": {k: list(v) for k, v in changes.items()}})
    atomic_write_json(output / C.CHECKPOINT_DIR / RUN_STATE, state)


def run_training(cfg: Config, output: Path | str, *, resume: bool = True, restart: bool = False,
                 progress: bool = True) -> dict:
    """``captioner train``: the whole run into ``output`` (see README for the layout).

    ``restart`` (or ``resume=False``) starts an existing run in ``output`` over; otherwise it is
    continued, which needs the same config (up to RESUMABLE_FIELDS) and the same data.
    """
    from captioner.export import export_saved_model
    from captioner.features.backbones import build_backbone
    from captioner.train import check_distribute, make_strategy, worker_role

    output = Path(output)
    check_distribute(cfg)
    role = worker_role(cfg.train.distribute)
    if cfg.train.distribute == "multi_worker":
        make_strategy(cfg.train.distribute)  # TensorFlow configures collective ops only before any other op
    if not role.chief:
        return _run_worker(cfg, output, role, fresh=restart or not resume, progress=progress)
    previous = _check_fresh(output, cfg, restart=restart or not resume)
    tracker = ExperimentTracker(output, seed=cfg.train.seed)
    if previous is None:
        tracker.log_config(cfg)
    else:
        tracker.config = cfg.to_dict()  # saved once the data is known to be the run's own
    try:
        with tracker.time("data"), _prepare_lock(cfg):
            dataset = load_data(cfg)
        _check_same_data(output, dataset, cfg, previous)
    except ResumeError:
        raise  # the resumed run is left exactly as it was
    except BaseException as exc:
        tracker.fail(exc)
        raise
    try:
        tracker.log_config(cfg)
        state = _run_state(output)
        resumes = state.get("resumes")
        if resumes:
            tracker.extra["resumed_with_changes"] = resumes
        # _check_same_data has just recorded (or matched) it: hashing the data set again is wasted time.
        fingerprint = state.get("dataset", {}).get("fingerprint") or dataset.fingerprint()
        tracker.extra["dataset"] = {"name": dataset.name, "fingerprint": fingerprint,
                                    "images": {s: len(v) for s, v in dataset.splits.items()},
                                    "missing_images": dataset.missing_images}
        with tracker.time("tokenize"):
            tokenizer = tokenize_step(cfg, dataset, output)
        with tracker.time("extract"), _prepare_lock(cfg):
            store = extract_step(cfg, dataset, progress=progress)
        model, cfg = fit_and_tune(cfg, dataset, tokenizer, store, output, tracker, progress)
        with tracker.time("evaluate"):
            report = evaluate_model(model, tokenizer, store, dataset, cfg, progress=progress)
        atomic_write_json(output / C.EVALUATION_JSON, report)
        metrics = {k: report[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")}
        tracker.log_bleu_scores(**{k: metrics[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4")})
        tracker.log_final_metrics(**metrics, greedy_bleu4=report["greedy"]["bleu4"])
        if cfg.export.enabled:
            with tracker.time("export"):
                backbone = build_backbone(cfg.features.backbone, cfg.features.weights, cfg.features.image_size)
                export_saved_model(backbone, model, output, output / C.SAVED_MODEL_DIR, cfg, metrics)
        tracker.finalize()
    except BaseException as exc:
        tracker.fail(exc)
        raise
    return tracker.summary()


@contextlib.contextmanager
def _prepare_lock(cfg: Config):
    """Under multi_worker, workers sharing this machine's cache read (or generate) the data and extract
    features one at a time: the second finds them ready instead of generating the synthetic data set
    again under the first one's feet. Workers on other machines, with their own cache, do not wait."""
    if cfg.train.distribute != "multi_worker":
        yield
        return
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / ".multi-worker-prepare.lock", "preparing data"):
        yield


def _run_worker(cfg: Config, output: Path, role, *, fresh: bool, progress: bool) -> dict:
    """A multi-worker task that is not the chief: it trains in step with the chief (resuming from the
    chief's checkpoint in ``output``, which every worker must see, unless ``fresh``) and writes nothing
    there; evaluation, export and the run's files are the chief's. It checks what the chief checks
    first, so that a run the chief refuses fails here too rather than wait for the chief forever."""
    from captioner.train import train_model

    previous = None if fresh or not is_run_folder(output) else _check_fresh(output, cfg)
    with _prepare_lock(cfg):
        dataset = load_data(cfg)
        if previous is not None:
            _check_same_data(output, dataset, cfg, previous, record=False)
        captions = [c for image in dataset.splits["train"] for c in dataset.captions[image]]
        tokenizer = Tokenizer.fit(captions, min_count=cfg.tokenizer.min_count, max_size=cfg.tokenizer.max_size)
        store = extract_step(cfg, dataset, progress=progress)
    train_model(cfg, dataset, tokenizer, store, output, progress=progress, fresh=fresh)
    if progress:
        print(f"{role.task}: training done; the chief writes the run into {output}", flush=True)
    return {"status": "worker", "task": role.task, "run_dir": str(output), "final_metrics": {}}



def evaluate_and_gate(cfg: Config, model_dir: Path | str, store: FeatureStore, *, model_repo: str, model_name: str,
                      bleu4_floor: float, tolerance: float, report_html: Path | str | None = None,
                      progress: bool = True, fingerprint: str | None = None,
                      allow_unscorable_champion: bool = False) -> tuple[dict[str, Any], Any]:
    """Evaluate a trained model on the test split, write the HTML report, and decide the gate
    against the champion in ``model_repo``. Returns ``(evaluation report, GateDecision)``.

    Like with like, as TFX's Evaluator does with its baseline: the champion (``stable``, else the
    newest version) is re-scored through its own SavedModel on this candidate's test images, with
    the candidate's beam size and maximum length (capped at what the champion's export can decode)
    and the same COCO scorer; the BLEU-4 it stored at its own registration was measured on its own
    data and only goes on the record. The re-score is cached in the repository per (champion
    content, split fingerprint, decoding, scorer).

    ``fingerprint`` (the pipeline's run fingerprint) makes this refuse data that changed since the
    fingerprint step: the candidate's features were extracted from the data it describes. A
    champion that cannot be re-scored rejects the candidate unless ``allow_unscorable_champion``,
    which judges the candidate on the floor alone (never on the champion's stored number)."""
    from captioner.evaluate import java_available, score_saved_model, split_fingerprint
    from captioner.fingerprint import check_unchanged
    from captioner.registry import ModelRepository, content_digest, gate
    from captioner.reports import attention_example, evaluation_html
    from captioner.train import load_trained

    model_dir = Path(model_dir)
    dataset = load_data(cfg)  # decoding settings (applied below) do not change which data are read
    if fingerprint is not None:
        check_unchanged(fingerprint, dataset)
    model, tokenizer, spec = load_trained(model_dir)
    cfg = with_overrides(cfg, {"decode": spec.full_config.to_dict()["decode"]})
    report = evaluate_model(model, tokenizer, store, dataset, cfg, progress=progress)
    split = split_fingerprint(dataset, report["split"])
    report["split_fingerprint"] = split
    decode = {"beam_size": cfg.decode.beam_size, "max_length": cfg.decode.max_length}
    repository = ModelRepository(model_repo)
    champion_version, champion = repository.champion(model_name)
    champion_bleu4 = stored_bleu4 = scored = champion_error = champion_max_length = None
    if champion is not None:
        stored_bleu4 = (champion.get("metrics") or {}).get("bleu4")
        candidate_digest = (content_digest(model_dir / C.SAVED_MODEL_DIR)
                            if (model_dir / C.SAVED_MODEL_DIR).is_dir() else None)
        if candidate_digest and candidate_digest in (champion.get("content_sha256"), champion.get("source_sha256")):
            champion_bleu4, scored = float(report["bleu4"]), "same model"
        else:
            scorer = {"meteor": cfg.eval.meteor, "tokenizer": "ptb" if java_available() else "captioner.normalize"}
            # The key names the decoding asked for: the cap below is a function of the champion's content.
            key = {"champion_sha256": champion.get("content_sha256"), "split": split, "decode": decode,
                   "scorer": scorer}
            scores, scored = repository.cached_scores(model_name, key), "cached"
            if scores is None:
                try:
                    with repository.local_copy(model_name, champion_version) as path:
                        limit = _export_decode_limit(path) or decode["max_length"]
                        champion_decode = dict(decode, max_length=min(decode["max_length"], limit))
                        scores = score_saved_model(path, dataset, report["split"], meteor=cfg.eval.meteor,
                                                   **champion_decode)
                except Exception as exc:  # a champion that cannot be re-scored must not pass anything by default
                    log.error("champion v%s could not be re-scored: %s", champion_version, exc)
                    champion_error = f"{type(exc).__name__}: {exc}"
                    report["champion_error"] = champion_error
                    scored = "unscorable"
                else:
                    repository.save_scores(model_name, key, scores)
                    scored = "rescored"
            champion_bleu4 = float(scores["bleu4"]) if scores else None
            if scores and int(scores.get("max_length", decode["max_length"])) < decode["max_length"]:
                champion_max_length = int(scores["max_length"])
            report["champion_scores"] = scores
    decision = gate(float(report["bleu4"]), champion_bleu4, floor=bleu4_floor, tolerance=tolerance,
                    champion_version=champion_version, split=split, champion_stored_bleu4=stored_bleu4,
                    champion_scored=scored, decode=decode, champion_max_length=champion_max_length,
                    champion_error=champion_error, allow_unscorable_champion=allow_unscorable_champion)
    report["gate"] = decision.to_dict()
    if progress:
        print(f"gate: {'passed' if decision.passed else 'rejected'}: {decision.reason}", flush=True)
    if report_html:
        test = dataset.splits[report["split"]]
        paths = {image: dataset.image_path(image) for image in test[: cfg.eval.num_samples]}
        example = attention_example(model, tokenizer, store, test[0], dataset.image_path(test[0]), cfg)
        history = training_history(model_dir)
        Path(report_html).parent.mkdir(parents=True, exist_ok=True)
        Path(report_html).write_text(evaluation_html(report, history, paths, cfg.features.image_size, example),
                                     encoding="utf-8")
    return report, decision


def _export_decode_limit(saved_model: Path) -> int | None:
    """The longest caption a SavedModel's decode state holds (``export.max_decode_length``), or None
    when its metadata does not say (the scorer then reports what it cannot do)."""
    from captioner.export import read_metadata

    try:
        return int(read_metadata(saved_model)["max_decode_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def register_model(model_dir: Path | str, model_repo: str, model_name: str, evaluation: dict[str, Any],
                   **metadata: Any) -> tuple[int, bool]:
    """Publish ``model_dir/saved_model`` as the next version, with metrics, config and lineage.

    Returns ``(version, created)``: a SavedModel already in the repository (same content, e.g. a
    rerun whose steps all came from the cache) is not registered twice.

    The metrics go into the version's ``metadata.json`` and into the SavedModel itself (its
    ``metadata`` signature and ``assets.extra/metadata.json``, which the gateway's ``/model/info``
    shows with either backend, TF Serving included): a SavedModel exported before it was evaluated
    (the pipeline's train step) is exported again from the same trained weights, with the metrics,
    and ``source_sha256`` keeps the digest of the evaluated export for de-duplication.
    """
    import tempfile

    from captioner.export import export_saved_model, read_metadata
    from captioner.features.backbones import build_backbone
    from captioner.registry import ModelRepository, content_digest
    from captioner.tracking import git_commit
    from captioner.train import ModelSpec, load_trained

    model_dir = Path(model_dir)
    saved_model = model_dir / C.SAVED_MODEL_DIR
    repository = ModelRepository(model_repo)
    source_digest = content_digest(saved_model)
    existing = repository.find_by_content(model_name, source_digest)
    if existing is not None:
        return existing, False
    spec = ModelSpec(**json.loads((model_dir / "model.json").read_text()))
    metrics = {k: evaluation.get(k) for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")}
    record = {"metrics": metrics, "greedy_metrics": evaluation.get("greedy"), "config": spec.config,
              "evaluation_split": evaluation.get("split_fingerprint"), "source_sha256": source_digest,
              "git_commit": git_commit(), "framework": "tensorflow", **metadata}
    if read_metadata(saved_model).get("metrics") == metrics:
        return repository.publish(model_name, saved_model, record), True
    with tempfile.TemporaryDirectory(prefix="captioner-register-") as scratch:
        model, _, spec = load_trained(model_dir)
        cfg = spec.full_config
        backbone = build_backbone(cfg.features.backbone, cfg.features.weights, cfg.features.image_size)
        export_saved_model(backbone, model, model_dir, Path(scratch) / C.SAVED_MODEL_DIR, cfg, metrics,
                           read_metadata(saved_model).get("model_name", model_name))
        return repository.publish(model_name, Path(scratch) / C.SAVED_MODEL_DIR, record), True
