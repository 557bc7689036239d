"""The steps of a training run, each usable alone (the pipeline's components wrap them) or chained by
``run_training`` (``captioner train``): data -> tokenize -> extract -> train -> evaluate -> export."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from captioner import constants as C
from captioner.config import Config, with_overrides
from captioner.data.readers import CaptionDataset, read_dataset
from captioner.data.tokenizer import Tokenizer
from captioner.errors import CaptionerError
from captioner.features.extract import FLIP_SUFFIX, FeatureStore, cache_key, extract_features
from captioner.io_utils import atomic_write_json
from captioner.tracking import ExperimentTracker

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
                            length_penalty=cfg.decode.length_penalty)
        seconds = time.perf_counter() - start
        scores = coco_scores(references, hyps, meteor=cfg.eval.meteor)
        scores.update({"beam_size": beam, "decode_seconds": round(seconds, 3)})
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


def decode_split(model, tokenizer: Tokenizer, store: FeatureStore, images: list[str], *, beam_size: int,
                 max_length: int, length_penalty: float, batch_size: int = 128) -> dict[str, str]:
    """Captions for ``images`` from cached features: ``{image: caption}``."""
    import tensorflow as tf

    from captioner.model.decoding import decode

    run = tf.function(lambda f: decode(model, model.encode(f), beam_size=beam_size, max_length=max_length,
                                       length_penalty=length_penalty))
    hyps: dict[str, str] = {}
    for offset in range(0, len(images), batch_size):
        batch = images[offset:offset + batch_size]
        out = run(tf.constant(store.load(batch)))
        for image, ids in zip(batch, out["tokens"][:, 0].numpy(), strict=True):
            hyps[image] = tokenizer.decode(ids)
    return hyps


def tune_length_penalty(model, tokenizer: Tokenizer, store: FeatureStore, dataset: CaptionDataset, cfg: Config,
                        progress: bool = True) -> tuple[float, dict[str, float]]:
    """Dev BLEU-4 of beam search for each length penalty of the grid; returns the best and all scores."""
    from captioner.config import LENGTH_PENALTY_GRID
    from captioner.evaluate import quick_bleu4

    references = dataset.split_captions("dev")
    scores = {}
    for alpha in LENGTH_PENALTY_GRID:
        hyps = decode_split(model, tokenizer, store, dataset.splits["dev"], beam_size=cfg.decode.beam_size,
                            max_length=cfg.decode.max_length, length_penalty=alpha)
        scores[str(alpha)] = quick_bleu4(references, hyps)
        if progress:
            print(f"dev beam {cfg.decode.beam_size} length_penalty {alpha}: BLEU-4 {scores[str(alpha)]:.4f}",
                  flush=True)
    best = max(LENGTH_PENALTY_GRID, key=lambda a: scores[str(a)])
    return best, scores


def fit_and_tune(cfg: Config, dataset: CaptionDataset, tokenizer: Tokenizer, store: FeatureStore,
                 model_dir: Path, tracker: ExperimentTracker | None = None, progress: bool = True):
    """Train (selecting the epoch on dev), then, if asked, pick the length penalty on dev.

    Returns ``(model, cfg)`` where ``cfg`` carries the chosen decoding settings; they are also saved
    in the model folder's ``model.json`` so that evaluation and export use them.
    """
    from captioner.train import MODEL_JSON, train_model

    tracker = tracker or ExperimentTracker(model_dir, seed=cfg.train.seed)
    with tracker.time("train"):
        model, _ = train_model(cfg, dataset, tokenizer, store, model_dir, tracker, progress)
    if cfg.decode.tune_length_penalty:
        with tracker.time("tune_decoding"):
            alpha, grid = tune_length_penalty(model, tokenizer, store, dataset, cfg, progress)
        cfg = with_overrides(cfg, {"decode": {"length_penalty": alpha}})
        tracker.extra["decode_tuning"] = {"split": "dev", "metric": "bleu4", "length_penalty": grid,
                                          "chosen": alpha}
        spec = json.loads((model_dir / MODEL_JSON).read_text())
        spec["config"] = cfg.to_dict()
        atomic_write_json(model_dir / MODEL_JSON, spec)
    return model, cfg


def _check_fresh(output: Path, resume: bool) -> None:
    if (output / C.RUN_SUMMARY).is_file():
        raise CaptionerError(f"{output} already holds a complete run; choose a new --output "
                             "(or delete it) to train again", path=str(output / C.RUN_SUMMARY))
    if not resume and (output / C.METRICS_CSV).is_file():
        raise CaptionerError("an interrupted run is here; rerun without --no-resume to continue it",
                             path=str(output))


def run_training(cfg: Config, output: Path | str, *, resume: bool = True, progress: bool = True) -> dict:
    """``captioner train``: the whole run into ``output`` (see README for the layout)."""
    from captioner.export import export_saved_model
    from captioner.features.backbones import build_backbone
    output = Path(output)
    _check_fresh(output, resume)
    tracker = ExperimentTracker(output, seed=cfg.train.seed)
    tracker.log_config(cfg)
    try:
        with tracker.time("data"):
            dataset = load_data(cfg)
        tracker.extra["dataset"] = {"name": dataset.name, "fingerprint": dataset.fingerprint(),
                                    "images": {s: len(v) for s, v in dataset.splits.items()},
                                    "missing_images": dataset.missing_images}
        with tracker.time("tokenize"):
            tokenizer = tokenize_step(cfg, dataset, output)
        with tracker.time("extract"):
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



def evaluate_and_gate(cfg: Config, model_dir: Path | str, store: FeatureStore, *, model_repo: str, model_name: str,
                      bleu4_floor: float, tolerance: float, report_html: Path | str | None = None,
                      progress: bool = True) -> tuple[dict[str, Any], Any]:
    """Evaluate a trained model on the test split, write the HTML report, and decide the gate
    against the champion in ``model_repo``. Returns ``(evaluation report, GateDecision)``."""
    from captioner.registry import ModelRepository, gate
    from captioner.reports import attention_example, evaluation_html
    from captioner.train import load_trained

    model_dir = Path(model_dir)
    model, tokenizer, spec = load_trained(model_dir)
    cfg = with_overrides(cfg, {"decode": spec.full_config.to_dict()["decode"]})
    dataset = load_data(cfg)
    report = evaluate_model(model, tokenizer, store, dataset, cfg, progress=progress)
    champion_version, champion = ModelRepository(model_repo).champion(model_name)
    champion_bleu4 = (champion or {}).get("metrics", {}).get("bleu4")
    decision = gate(float(report["bleu4"]), champion_bleu4, floor=bleu4_floor, tolerance=tolerance,
                    champion_version=champion_version)
    report["gate"] = decision.to_dict()
    if report_html:
        test = dataset.splits[report["split"]]
        paths = {image: dataset.image_path(image) for image in test[: cfg.eval.num_samples]}
        example = attention_example(model, tokenizer, store, test[0], dataset.image_path(test[0]), cfg)
        history = ExperimentTracker(model_dir).history()
        Path(report_html).parent.mkdir(parents=True, exist_ok=True)
        Path(report_html).write_text(evaluation_html(report, history, paths, cfg.features.image_size, example),
                                     encoding="utf-8")
    return report, decision


def register_model(model_dir: Path | str, model_repo: str, model_name: str, evaluation: dict[str, Any],
                   **metadata: Any) -> tuple[int, bool]:
    """Publish ``model_dir/saved_model`` as the next version, with metrics, config and lineage.

    Returns ``(version, created)``: a SavedModel already in the repository (same content, e.g. a
    rerun whose steps all came from the cache) is not registered twice.
    """
    from captioner.registry import ModelRepository, content_digest
    from captioner.tracking import git_commit
    from captioner.train import ModelSpec

    model_dir = Path(model_dir)
    repository = ModelRepository(model_repo)
    existing = repository.find_by_content(model_name, content_digest(model_dir / C.SAVED_MODEL_DIR))
    if existing is not None:
        return existing, False
    spec = ModelSpec(**json.loads((model_dir / "model.json").read_text()))
    metrics = {k: evaluation.get(k) for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")}
    record = {"metrics": metrics, "greedy_metrics": evaluation.get("greedy"), "config": spec.config,
              "git_commit": git_commit(), "framework": "tensorflow", **metadata}
    return repository.publish(model_name, model_dir / C.SAVED_MODEL_DIR, record), True
