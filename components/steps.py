"""The pipeline steps as KFP lightweight components, each a thin shell over the library.

The functions below are plain Python; ``build_components(image)`` turns them into KFP components
that run in ``image`` (the component image of ``images/components.Dockerfile``, pinned when the
pipeline is compiled). KFP ships each function's source to the container, so every import is
inside the function. Nothing is pip-installed at run time: the image (or, under ``kfp.local``, the
current environment) already has the library.
"""

# No `from __future__ import annotations`: KFP reads the parameter annotations as types.
from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output


def fingerprint(config: str, overrides: list, image: str) -> str:
    """Fingerprint of the data, code and config (``captioner.fingerprint``); never cached.

    Its output is an input of every step that reads data, so KFP's cache (keyed on inputs) serves
    those steps only while the data stay the same.
    """
    from captioner.pipelines.step_config import load_step_config

    from captioner.fingerprint import run_fingerprint
    from captioner.workflow import load_data

    cfg = load_step_config(config, overrides)
    return run_fingerprint(cfg, load_data(cfg), image)


def tokenize(config: str, overrides: list, fingerprint: str, vocab: Output[Dataset]):
    """Read the data set and fit the vocabulary on the train captions."""
    from captioner.pipelines.step_config import load_step_config

    from captioner.fingerprint import check_unchanged
    from captioner.workflow import load_data, tokenize_step

    cfg = load_step_config(config, overrides)
    dataset = load_data(cfg)
    data_fingerprint = check_unchanged(fingerprint, dataset)
    tokenizer = tokenize_step(cfg, dataset, vocab.path)
    vocab.metadata.update({"vocab_size": tokenizer.vocab_size, "dataset": dataset.name,
                           "fingerprint": data_fingerprint, "run_fingerprint": fingerprint,
                           "images": {s: len(v) for s, v in dataset.splits.items()}})


def extract_features(config: str, overrides: list, fingerprint: str, features: Output[Dataset]):
    """Backbone features of every image into the artifact; only images whose content the feature
    cache (``features.cache_dir``, shared storage on a cluster) lacks go through the backbone."""
    from captioner.pipelines.step_config import load_step_config

    from captioner.fingerprint import check_unchanged
    from captioner.workflow import extract_step, load_data

    cfg = load_step_config(config, overrides)
    dataset = load_data(cfg)
    check_unchanged(fingerprint, dataset)
    store = extract_step(cfg, dataset, progress=False, output=features.path)
    features.metadata.update({"backbone": cfg.features.backbone, "weights": cfg.features.weights,
                              "image_size": cfg.features.image_size, "images": len(store.index),
                              "extracted": len(store.extracted), "run_fingerprint": fingerprint})


def plan_shards(extract_shards: int, fingerprint: str) -> list:
    """One item per shard, ``{"shard_index": i, "fingerprint": ...}``, for ``dsl.ParallelFor`` (a list
    output is what it iterates when the count is a run parameter).

    The fingerprint travels in the items because kfp.local (2.17) hands every task output that
    enters a loop body the loop item instead of its value.
    """
    from captioner.pipelines.fanout import shard_indices

    return [{"shard_index": index, "fingerprint": fingerprint} for index in shard_indices(extract_shards)]


def extract_features_shard(config: str, overrides: list, fingerprint: str, shard_index: int, extract_shards: int,
                           features: Output[Dataset]):
    """Features of one contiguous block of the image list (``shard_images``) into the artifact,
    through the same content-addressed cache as the single-step extraction."""
    from captioner.pipelines.fanout import shard_images
    from captioner.pipelines.step_config import load_step_config

    from captioner.fingerprint import check_unchanged
    from captioner.workflow import extract_step, load_data

    cfg = load_step_config(config, overrides)
    dataset = load_data(cfg)
    check_unchanged(fingerprint, dataset)
    images = shard_images(dataset.all_images(), shard_index, extract_shards)
    store = extract_step(cfg, dataset, images=images, progress=False, output=features.path)
    features.metadata.update({"shard": shard_index, "shards": extract_shards, "images": len(images),
                              "extracted": len(store.extracted), "run_fingerprint": fingerprint})


def collect_features(config: str, overrides: list, fingerprint: str, shards: Input[list[Dataset]],
                     features: Output[Dataset]):
    """The shards' features merged into one artifact, refused unless it holds every image (and
    mirrored copy) of the data set: the same artifact the single extraction step writes."""
    from captioner.pipelines.fanout import collect_stores, expected_names
    from captioner.pipelines.step_config import load_step_config

    from captioner.fingerprint import check_unchanged
    from captioner.workflow import load_data

    cfg = load_step_config(config, overrides)
    dataset = load_data(cfg)
    check_unchanged(fingerprint, dataset)
    images = dataset.all_images()
    flipped = dataset.splits["train"] if cfg.features.flip_train else []
    store = collect_stores([shard.path for shard in shards], features.path, expected_names(images, flipped),
                           cfg.features.shard_size)
    features.metadata.update({"backbone": cfg.features.backbone, "weights": cfg.features.weights,
                              "image_size": cfg.features.image_size, "images": len(store.index),
                              "shards": len(shards),
                              "extracted": sum(int(shard.metadata.get("extracted", 0)) for shard in shards),
                              "run_fingerprint": fingerprint})


def train(config: str, overrides: list, fingerprint: str, vocab: Input[Dataset], features: Input[Dataset],
          model: Output[Model], metrics: Output[Metrics], distribute: str = ""):
    """Train with dev-split model selection, then export the SavedModel into the model artifact.

    ``distribute`` (e.g. ``multi_worker``, set by the multi-replica trainers of
    ``captioner.pipelines.scale``) overrides ``train.distribute``: every replica runs this step,
    with ``TF_CONFIG`` set by Vertex AI or the training operator."""
    import json
    from pathlib import Path

    from captioner.pipelines.step_config import load_step_config

    from captioner.data.tokenizer import Tokenizer
    from captioner.export import export_saved_model
    from captioner.features.backbones import build_backbone
    from captioner.features.extract import FeatureStore
    from captioner.fingerprint import check_unchanged
    from captioner.tracking import ExperimentTracker
    from captioner.workflow import fit_and_tune, load_data, training_history

    cfg = load_step_config(config, [*overrides, *([f"train.distribute={distribute}"] if distribute else [])])
    dataset = load_data(cfg)
    data_fingerprint = check_unchanged(fingerprint, dataset)
    out = Path(model.path)
    tracker = ExperimentTracker(out, seed=cfg.train.seed)
    tracker.log_config(cfg)
    trained, cfg = fit_and_tune(cfg, dataset, Tokenizer.load(vocab.path), FeatureStore(features.path), out,
                                tracker, progress=False)
    backbone = build_backbone(cfg.features.backbone, cfg.features.weights, cfg.features.image_size)
    export_saved_model(backbone, trained, out, out / "saved_model", cfg)
    history = training_history(out)
    # An ensemble's members each have their curves: their metrics are named member0_final_dev_cider, ...
    for prefix, rows in ({"": history} if isinstance(history, list) else
                         {f"member{name.split()[-1]}_": rows for name, rows in history.items()}).items():
        xe = [row for row in rows if row.get("phase") != "scst"]
        scst = [row for row in rows if row.get("phase") == "scst"]
        # SCST's loss is a reward-weighted likelihood: the losses shown are cross-entropy's.
        for key, phase_rows in (("train_loss", xe), ("val_loss", xe), ("dev_bleu4", rows), ("dev_cider", rows),
                                ("train_reward", scst)):
            # A row may lack a value (a metric not measured that epoch, a column added later): the last measured.
            measured = [row[key] for row in phase_rows if isinstance(row.get(key), int | float)]
            if measured:
                metrics.log_metric(f"{prefix}final_{key}", float(measured[-1]))
        metrics.log_metric(f"{prefix}epochs", len(xe))
        if scst:
            metrics.log_metric(f"{prefix}scst_epochs", len(scst))
    # The metrics file must exist: kfp.local treats a cached output whose file is gone as a miss.
    Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics.path).write_text(json.dumps(metrics.metadata, indent=2))
    model.metadata.update({"framework": "tensorflow", "format": "saved_model", "backbone": cfg.features.backbone,
                           "selected_epoch": tracker.extra.get("selected_epoch"),
                           "fingerprint": data_fingerprint, "run_fingerprint": fingerprint})


def evaluate(config: str, overrides: list, fingerprint: str, model: Input[Model], features: Input[Dataset],
             model_repo: str, model_name: str, bleu4_floor: float, tolerance: float, metrics: Output[Metrics],
             report: Output[HTML], evaluation: Output[Artifact], allow_unscorable_champion: bool = False) -> bool:
    """COCO metrics on the test split, the HTML report, and the gate against the champion.

    Returns whether the candidate passed the gate (its single output, so that ``dsl.If`` on it also
    works under ``kfp.local``, whose condition evaluator resolves only ``<task>-Output`` channels);
    BLEU-4 and the reason are in the ``evaluation`` artifact's metadata. Refuses data changed since
    the fingerprint step: the candidate is scored on features of the data the fingerprint describes,
    the champion on the images read now, and the two must be the same.
    """
    import json

    from captioner.pipelines.step_config import load_step_config

    from captioner.features.extract import FeatureStore
    from captioner.workflow import evaluate_and_gate

    cfg = load_step_config(config, overrides)
    # KFP names an output file after the output (`report`); with `.html` a browser, and the KFP UI's
    # HTML viewer, render it instead of showing its source. KFP and kfp.local record the URI set here.
    if not report.uri.endswith(".html"):
        report.uri += ".html"
    result, decision = evaluate_and_gate(cfg, model.path, FeatureStore(features.path), model_repo=model_repo,
                                         model_name=model_name, bleu4_floor=bleu4_floor, tolerance=tolerance,
                                         report_html=report.path, progress=False, fingerprint=fingerprint,
                                         allow_unscorable_champion=allow_unscorable_champion)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"):
        if result.get(key) is not None:
            metrics.log_metric(key, float(result[key]))
            metrics.log_metric(f"greedy_{key}", float(result["greedy"][key]))
    with open(metrics.path, "w") as handle:
        json.dump(metrics.metadata, handle, indent=2)
    with open(evaluation.path, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    evaluation.metadata.update({"gate_passed": decision.passed, "reason": decision.reason,
                                "bleu4": float(result["bleu4"]), "champion_bleu4": decision.champion_bleu4,
                                "champion_version": decision.champion_version})
    return decision.passed


def register(model: Input[Model], evaluation: Input[Artifact], model_repo: str, model_name: str, run_id: str,
             registered: Output[Model]) -> int:
    """Publish the SavedModel as the next version of ``model_name`` in the repository."""
    import json

    from captioner.workflow import register_model

    with open(evaluation.path) as handle:
        result = json.load(handle)
    version, created = register_model(model.path, model_repo, model_name, result, pipeline_run_id=run_id,
                                      dataset_fingerprint=model.metadata.get("fingerprint"),
                                      source_model=model.uri, gate=result.get("gate"))
    registered.uri = f"{model_repo.rstrip('/')}/{model_name}/{version}"
    registered.metadata.update({"version": version, "created": created, "model_name": model_name,
                                "framework": "tensorflow", "bleu4": result.get("bleu4")})
    return version


STEPS = {"fingerprint": fingerprint, "tokenize": tokenize, "extract_features": extract_features,
         "plan_shards": plan_shards, "extract_features_shard": extract_features_shard,
         "collect_features": collect_features, "train": train, "evaluate": evaluate, "register": register}


def build_components(image: str) -> SimpleNamespace:
    """KFP components of the steps, running in ``image`` with nothing installed at run time."""
    return SimpleNamespace(**{name: dsl.component(func, base_image=image, install_kfp_package=False)
                              for name, func in STEPS.items()})
