"""``captioner``: the command line over the library. Each command parses arguments and calls it."""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import click

from captioner import constants as C
from captioner.errors import CaptionerError
from captioner.io_utils import read_json_dict

CONFIG_HELP = "A preset name (smoke, synthetic, flickr8k) or a YAML file."
SET_HELP = "Override a config field, e.g. --set data.root=../shared/data/flickr8k (repeatable)."


def _config(name: str, overrides: tuple[str, ...]):
    from captioner.config import load_config

    return load_config(name, overrides)


#: What TensorFlow's C++ side prints while it loads, whatever TF_CPP_MIN_LOG_LEVEL says: absl's notice
#: that logging is not initialised, and absl-style (``I0000 00:00:...  123 port.cc:153] ...``) or older
#: (``2026-01-01 00:00:00.000: I tensorflow/...``) log lines below FATAL (oneDNN, CUDA, cuInit, AVX).
_TF_LOAD_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$"
    r"|[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w./-]+:\d+\] "
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] \S+:\d+\] ")


def _without_load_noise():
    """The body's stderr without ``_TF_LOAD_NOISE`` lines (see ``io_utils.filtered_stderr``)."""
    from captioner.io_utils import filtered_stderr

    return filtered_stderr(_TF_LOAD_NOISE)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Runs the first ``import tensorflow`` (wherever it happens: Keras, the library, a gunicorn worker
    forked from this process) inside :func:`_without_load_noise`, and leaves every other import alone."""

    def __init__(self) -> None:
        self.done = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow" or self.done:
            return None
        self.done = True  # also keeps the lookup below from landing here again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module  # this spec's own loader object: patching it touches nothing else

        def exec_module(module) -> None:
            with _without_load_noise():
                load(module)
            # absl's Python logger exists only now (TensorFlow imports it); creating it earlier would
            # keep absl from installing its own logger class.
            logging.getLogger("absl").setLevel(logging.ERROR)

        spec.loader.exec_module = exec_module
        return spec


def _quiet_tensorflow() -> None:
    """Keep TensorFlow's and Keras' start-up chatter off the terminal; ``captioner --verbose`` skips this.

    It has to run before TensorFlow is first imported: the C++ side reads TF_CPP_MIN_LOG_LEVEL once,
    when it loads, and what it prints while loading ignores that level, so the first import runs with
    stderr filtered. Nothing here imports TensorFlow, so commands that never need it stay fast. A level
    the user set in the environment is kept.
    """
    # 3 also hides the ERROR-level lines printed later, on first use: "failed call to cuInit" on a
    # machine without a GPU, and oneDNN's "supports DT_UINT8 only on platforms with AVX-512".
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # Keras and TensorFlow warn about their own internals, e.g. "Your input ran out of data;
    # interrupting training" at the end of every epoch of a finite data set, which reads like a bug.
    warnings.filterwarnings("ignore", module=r"(keras|tensorflow|tf_keras|absl)(\.|$)")
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="captioner")
@click.option("--verbose", is_flag=True, envvar="CAPTIONER_VERBOSE",
              help="Show TensorFlow's and Keras' own logs and warnings (hidden by default). "
                   "Also CAPTIONER_VERBOSE=1.")
def cli(verbose: bool) -> None:
    """Train, evaluate, export and run attention-based image-captioning models."""
    if verbose:
        os.environ["CAPTIONER_VERBOSE"] = "1"  # the library's own quieting (e.g. the PTB tokenizer) reads it
    else:
        _quiet_tensorflow()


@cli.command(epilog="""\b
Example:
  captioner train --config synthetic --output runs/demo
  captioner train --config flickr8k --set data.root=../shared/data/flickr8k --set train.epochs=20 --output runs/f8k""")
@click.option("--config", "config_name", default="synthetic", show_default=True, help=CONFIG_HELP)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run folder: metrics, checkpoints, evaluation and the SavedModel go here.")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--restart", "--no-resume", "restart", is_flag=True,
              help="Start the run in --output over: remove its own files (checkpoints, logs, metrics, weights, "
                   "vocabulary, SavedModel, summaries), never anything else there. Without it an interrupted "
                   "run is continued, with the same config (see README).")
@click.option("--quiet", is_flag=True, help="No progress output.")
def train(config_name: str, output: Path, overrides: tuple[str, ...], restart: bool, quiet: bool) -> None:
    """Extract features (cached), train, evaluate (on the test split unless eval.split says dev) and
    export a SavedModel."""
    from captioner.workflow import run_training

    cfg = _config(config_name, overrides)
    summary = run_training(cfg, output, restart=restart, progress=not quiet)
    metrics = summary["final_metrics"]
    click.echo(f"run complete: {output}  {cfg.eval.split} BLEU-4 {metrics.get('bleu4', float('nan')):.4f} (beam), "
               f"{metrics.get('greedy_bleu4', float('nan')):.4f} (greedy); "
               f"SavedModel: {output / 'saved_model' if cfg.export.enabled else 'not exported'}")


MODEL_HELP = ("A model repository (its version labelled stable, else the newest), a model folder (REPO/NAME), "
              "a version folder (REPO/NAME/3), a SavedModel or a run folder (`captioner train --output`).")


def _resolve_model(path: Path, kind: str):
    """The model ``--model`` names (see ``captioner.registry.resolve_model``), said on stderr."""
    from captioner.registry import resolve_model

    resolved = resolve_model(path, kind)
    click.echo(f"model: {resolved.description}", err=True)
    return resolved


@cli.command(epilog="""\b
Example:
  captioner caption --model models photo.jpg other.png
  captioner caption --model runs/f8k --beam-size 5 --json photos/""")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True, help=MODEL_HELP)
@click.option("--beam-size", type=click.IntRange(C.MIN_BEAM_SIZE, C.MAX_BEAM_SIZE), default=None,
              help="1 = greedy; default: the model's.")
@click.option("--max-length", type=click.IntRange(C.MIN_CAPTION_LENGTH, C.MAX_CAPTION_LENGTH), default=None,
              help="Longest caption in tokens; default: the model's (at most its export.max_decode_length).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image (with n-best and scores).")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
def caption(model_dir: Path, beam_size: int | None, max_length: int | None, as_json: bool,
            images: tuple[Path, ...]) -> None:
    """Print a caption for each IMAGE (a file, or a folder: the images in it, sorted by name).

    An image that cannot be read is named on stderr with the reason (`path: reason`) and the others
    are still captioned; the exit code is then 1.
    """
    from captioner.predictor import SavedModelCaptioner, expand_image_paths

    paths, notes = expand_image_paths(images)
    for note in notes:
        click.echo(note, err=True)
    if not paths:
        raise click.UsageError("no image to caption (the folders given hold no image files)")
    captioner = SavedModelCaptioner(_resolve_model(model_dir, "saved_model").path)
    results = captioner.caption_each(paths, beam_size=beam_size, max_length=max_length)
    failed = 0
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, CaptionerError):
            failed += 1
            click.echo(str(result), err=True)  # the error names the file: "path: reason"
        elif as_json:
            click.echo(json.dumps({"image": str(path), **result.to_dict()}))
        else:
            click.echo(f"{path}\t{result.caption}")
    if failed:
        click.echo(f"{failed} of {len(paths)} images could not be captioned", err=True)
        # Not a click or captioner error: the captions above are the answer, only the code says some failed.
        raise SystemExit(1)


def _check_vocab_output(folder: Path) -> None:
    """``tokenize`` rewrites vocab.json and vocab.txt in ``folder``: only if they are ours."""
    from captioner.constants import VOCAB_JSON, VOCAB_TXT

    ours = (read_json_dict(folder / VOCAB_JSON) or {}).get("format") == "captioner-vocab"
    for name in (VOCAB_JSON, VOCAB_TXT):
        if (folder / name).exists() and not ours:
            raise CaptionerError(f"{name} is here and was not written by captioner; refusing to overwrite it "
                                 "(choose another --output)", path=str(folder / name))


def _check_feature_cache(folder: Path) -> None:
    """``extract --cache`` writes a feature store's files into ``folder``: a new or empty folder, or a store."""
    from captioner.constants import FEATURES_INDEX
    from captioner.io_utils import check_replaceable

    def is_store(path: Path) -> bool:
        index, backbone = read_json_dict(path / FEATURES_INDEX), read_json_dict(path / "backbone.json")
        foreign = ((path / FEATURES_INDEX).exists() and (index is None or "rows" not in index)) or (
            (path / "backbone.json").exists() and (backbone is None or "backbone" not in backbone))
        return not foreign and (index is not None or backbone is not None)

    check_replaceable(folder, is_store, hint=" (--cache: it is not a captioner feature cache)")


def _check_report_output(path: Path) -> None:
    """``evaluate --output`` replaces an evaluation report of ours, never another file."""
    report = read_json_dict(path) if path.is_file() else None
    if path.exists() and not (report is not None and {"split", "greedy", "beam"} <= set(report)):
        raise CaptionerError("exists and is not a captioner evaluation report; refusing to overwrite it "
                             "(choose another --output)", path=str(path))


@cli.command(epilog="""\b
Example:
  captioner tokenize --config flickr8k --set data.root=../shared/data/flickr8k --output runs/vocab""")
@click.option("--config", "config_name", default="synthetic", show_default=True, help=CONFIG_HELP)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for vocab.json and vocab.txt (new, or one whose vocabulary captioner wrote).")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
def tokenize(config_name: str, output: Path, overrides: tuple[str, ...]) -> None:
    """Fit the vocabulary on the train captions; write vocab.json and vocab.txt to OUTPUT."""
    from captioner.workflow import load_data, tokenize_step

    cfg = _config(config_name, overrides)
    _check_vocab_output(output)
    tokenizer = tokenize_step(cfg, load_data(cfg), output)
    click.echo(f"vocabulary: {tokenizer.vocab_size} tokens -> {output}")


@cli.command(epilog="""\b
Example:
  captioner extract --config flickr8k --set data.root=../shared/data/flickr8k
  captioner extract --config synthetic --cache /mnt/shared/features --quiet""")
@click.option("--config", "config_name", default="synthetic", show_default=True, help=CONFIG_HELP)
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Feature cache folder (default: under $CAPTIONER_CACHE).")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--quiet", is_flag=True, help="No progress output.")
def extract(config_name: str, cache: Path | None, overrides: tuple[str, ...], quiet: bool) -> None:
    """Extract (and cache) backbone features for every image of every split."""
    from captioner.workflow import extract_step, load_data

    cfg = _config(config_name, overrides)
    if cache is not None:
        _check_feature_cache(cache)
    store = extract_step(cfg, load_data(cfg), cache, progress=not quiet)
    click.echo(f"features: {len(store.index)} cached in {store.folder}")


TRAINED_MODEL_HELP = ("A run folder (`captioner train --output`), or a repository, model or version folder whose "
                      "SavedModel was registered from a run folder still on this machine (its stable version, "
                      "else the newest).")


@cli.command(epilog="""\b
Example:
  captioner evaluate --model runs/f8k --split dev
  captioner evaluate --model models --output runs/eval.json""")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True, help=TRAINED_MODEL_HELP)
@click.option("--config", "config_name", default=None,
              help="Evaluate on this config's data (default: the config the model was trained with).")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--split", type=click.Choice(["test", "dev"]), default=None,
              help="Which split to score (default: the config's eval.split, usually test).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report (JSON, with sample captions) here (default: print the scores).")
def evaluate(model_dir: Path, config_name: str | None, overrides: tuple[str, ...], split: str | None,
             output: Path | None) -> None:
    """Score a trained model with BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (greedy and beam)."""
    from captioner.config import parse_overrides, with_overrides
    from captioner.io_utils import atomic_write_json
    from captioner.train import load_trained
    from captioner.workflow import evaluate_model, extract_step, load_data

    if output is not None:
        _check_report_output(output)
    model, tokenizer, spec = load_trained(_resolve_model(model_dir, "trained").path)
    cfg = _config(config_name, overrides) if config_name else with_overrides(spec.full_config,
                                                                             parse_overrides(overrides))
    dataset = load_data(cfg)
    store = extract_step(cfg, dataset)
    report = evaluate_model(model, tokenizer, store, dataset, cfg, split=split)
    if output:
        atomic_write_json(output, report)
    else:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))


@cli.command(epilog="""\b
Example:
  captioner export --model runs/f8k --output runs/f8k-export""")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), required=True, help=TRAINED_MODEL_HELP)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where the SavedModel folder is written (atomically).")
@click.option("--name", "model_name", default="captioner", show_default=True,
              help="Model name recorded in the SavedModel's metadata (what TF Serving and the gateway call it).")
def export(model_dir: Path, output: Path, model_name: str) -> None:
    """Export a trained model as a TF Serving SavedModel.

    OUTPUT must be new, empty, or a SavedModel exported by captioner before (which is replaced in one
    rename); any other folder, a run folder included, is refused and left as it is.
    """
    from captioner.export import export_saved_model, is_captioner_export
    from captioner.features.backbones import build_backbone
    from captioner.io_utils import check_replaceable
    from captioner.train import load_trained

    check_replaceable(output, is_captioner_export, hint=" (--output: only a SavedModel that captioner exported "
                                                        "is replaced)")
    model_dir = _resolve_model(model_dir, "trained").path
    model, _, spec = load_trained(model_dir)
    cfg = spec.full_config
    metrics = {}
    evaluation = model_dir / "evaluation.json"
    if evaluation.is_file():
        report = json.loads(evaluation.read_text())
        metrics = {k: report.get(k) for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")}
    backbone = build_backbone(cfg.features.backbone, cfg.features.weights, cfg.features.image_size)
    export_saved_model(backbone, model, model_dir, output, cfg, metrics, model_name)
    click.echo(f"SavedModel: {output}")


@cli.command(epilog="""\b
Example:
  captioner ensemble --member runs/f8k --member runs/f8k-seed2 --output runs/f8k-ens
  captioner ensemble --member runs/f8k --member runs/f8k/checkpoints/best.weights.h5 --output runs/f8k-ckpt-ens
  captioner evaluate --model runs/f8k-ens --split dev""")
@click.option("--member", "members", type=click.Path(exists=True, path_type=Path), multiple=True, required=True,
              help="A run folder (its final weights) or a .weights.h5 checkpoint inside one; repeat for each member.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The ensemble's folder (new, empty, or an ensemble written before).")
@click.option("--combine", type=click.Choice(["prob", "log_prob"]), default="prob", show_default=True,
              help="How each step's next-word distributions are combined: the mean of the probabilities, or "
                   "of the log-probabilities (renormalised).")
def ensemble(members: tuple[Path, ...], output: Path, combine: str) -> None:
    """Combine trained models that share a vocabulary into one model.

    The ensemble folder is a trained model like a run folder: `evaluate`, `export` (one SavedModel
    with the usual signatures) and `serve` take it. Its config, decoding settings included, is the
    first member's.
    """
    from captioner.train import save_ensemble

    save_ensemble(list(members), output, combine)
    click.echo(f"ensemble of {len(members)} ({combine}): {output}")


# -- data ----------------------------------------------------------------------------------------
@cli.group(epilog="""\b
Example:
  captioner data samples --config synthetic -n 3""")
def data() -> None:
    """Look at a config's data: where its images are."""


@data.command("samples", epilog="""\b
Example:
  captioner data samples --config synthetic --split test -n 3
  captioner caption --model models $(captioner data samples --config synthetic -n 3)
  captioner data samples --config flickr8k --set data.root=../shared/data/flickr8k --folder""")
@click.option("--config", "config_name", default="synthetic", show_default=True, help=CONFIG_HELP)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--split", type=click.Choice(["train", "dev", "test"]), default="test", show_default=True,
              help="Which split's images.")
@click.option("-n", "--count", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many image paths to print (the split's first ones).")
@click.option("--folder", "folder_only", is_flag=True, help="Print only the folder that holds the images.")
def data_samples(config_name: str, overrides: tuple[str, ...], split: str, count: int, folder_only: bool) -> None:
    """Print the paths of a few images of a config's data, one a line.

    The synthetic data are generated on first use (as `train` does) into the cache folder
    ($CAPTIONER_CACHE, default ~/.cache/captioner); the folder is said on stderr.
    """
    from captioner.workflow import load_data

    dataset = load_data(_config(config_name, overrides))
    images = dataset.splits.get(split, [])
    if folder_only:
        click.echo(str(dataset.images_dir.absolute()))
        return
    if not images:
        raise CaptionerError(f"the {split} split has no images", path=str(dataset.images_dir))
    click.echo(f"{dataset.name} {split} images: {dataset.images_dir.absolute()} ({len(images)}; first "
               f"{min(count, len(images))} below)", err=True)
    for image in images[:count]:
        click.echo(str(dataset.image_path(image).absolute()))


# -- pipeline ------------------------------------------------------------------------------------
@cli.group(epilog="""\b
Example:
  captioner pipeline run --local --config synthetic --model-repo models""")
def pipeline() -> None:
    """Compile, run (locally), submit and schedule the Kubeflow pipeline."""


def _pipeline_options(func):
    options = [
        click.option("--config", "config_name", default="synthetic", show_default=True, help=CONFIG_HELP),
        click.option("--set", "overrides", multiple=True, help=SET_HELP),
        click.option("--model-repo", required=True, help="Model repository: a folder or gs:// URI."),
        click.option("--model-name", default="captioner", show_default=True,
                     help="The model's name in the repository."),
        click.option("--bleu4-floor", type=float, default=0.1, show_default=True,
                     help="Gate: the lowest test BLEU-4 a model may have to be registered."),
        click.option("--tolerance", type=float, default=0.005, show_default=True,
                     help="Gate: how much worse than the champion's BLEU-4 a candidate may be."),
        click.option("--allow-unscorable-champion", is_flag=True,
                     help="Gate: when the champion cannot be re-scored on the candidate's test split (e.g. "
                          "exported by an older release), judge the candidate on the floor alone instead of "
                          "rejecting it. Its stored BLEU-4 is never used."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _cloud_options(func):
    options = [
        click.option("--host", default=None, help="Kubeflow Pipelines endpoint (kfp.Client host)."),
        click.option("--vertex", is_flag=True, help="Vertex AI Pipelines instead of Kubeflow Pipelines."),
        click.option("--project", default=None, help="Vertex: Google Cloud project."),
        click.option("--region", default=None, help="Vertex: region, e.g. us-central1."),
        click.option("--pipeline-root", default=None, help="Vertex: gs:// folder for run artifacts."),
        click.option("--service-account", default=None,
                     help="Vertex: the service account the run's steps use (default: the Compute Engine one)."),
        click.option("--experiment", default="captioner", show_default=True,
                     help="The experiment the run is filed under."),
        click.option("--package", type=click.Path(dir_okay=False), default=None,
                     help="A compiled pipeline.yaml (default: compile now)."),
        click.option("--image", default=None,
                     help="Component image to pin when compiling, e.g. REF@sha256:... (default: a placeholder "
                          "name, with a warning)."),
        click.option("--accelerator-type", default=None, help="e.g. NVIDIA_TESLA_T4 (Vertex) or nvidia.com/gpu."),
        click.option("--accelerator-count", type=click.IntRange(min=0), default=None,
                     help="GPUs of the (single-container) training step (default: the pipeline's, 1); "
                          "extraction shards run on CPUs."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


TRAINER_HELP = ("How the train step runs: step (one container), vertex-custom-job (a Vertex AI custom job over "
                "--train-replicas machines) or tfjob (a Kubeflow TFJob: one chief, the rest workers); fixed when the "
                "pipeline is compiled. Default: step, or with --train-replicas > 1 the target's own kind "
                "(vertex-custom-job with --vertex, tfjob with --host).")
EXTRACT_SHARDS_HELP = ("How many parallel tasks feature extraction is split over (the image list in contiguous "
                       "shards, collected into one artifact; default: the pipeline's, 1).")


def _scale_options(func):
    options = [
        click.option("--trainer", type=click.Choice(["step", "vertex-custom-job", "tfjob"]), default=None,
                     help=TRAINER_HELP),
        click.option("--train-replicas", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Machines the train step runs on, with tf.distribute.MultiWorkerMirroredStrategy "
                          "(TF_CONFIG is set by Vertex AI or the training operator)."),
        click.option("--train-machine-type", default=None,
                     help="Machine type of each training replica on Vertex AI (default: n1-standard-8)."),
        click.option("--train-accelerator-type", default=None,
                     help="GPU of each training replica, e.g. NVIDIA_TESLA_T4 (a TFJob selects GKE nodes with it)."),
        click.option("--train-accelerator-count", type=click.IntRange(min=0), default=None,
                     help="GPUs per training replica (default: 1 when a type is given)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _train_scale(options: dict, *, vertex: bool | None = None, package=None):
    from captioner.pipelines.deploy import train_scale

    return train_scale(options["trainer"], options["train_replicas"], vertex=vertex,
                       machine_type=options["train_machine_type"], accelerator_type=options["train_accelerator_type"],
                       accelerator_count=options["train_accelerator_count"], package=package)


def _check_cloud(host, vertex, project, region, pipeline_root, *, config_name, overrides, model_repo, model_name,
                 bleu4_floor, tolerance, accelerator_type, accelerator_count, allow_unscorable_champion, package,
                 image, cron=None, extract_shards=None) -> dict:
    """Check here all that can be checked (options, cron, config, overrides, package) before any client
    talks to a host, so a typo is reported as what and where, not as a connection error; returns the
    run's parameters (the resolved config embedded) and warns about the placeholder image."""
    from captioner.pipelines import deploy

    if vertex and not (project and region and pipeline_root):
        raise click.UsageError("--vertex needs --project, --region and --pipeline-root gs://...")
    if not vertex and not host:
        raise click.UsageError("give --host URL (Kubeflow Pipelines) or --vertex")
    if vertex:
        deploy.check_pipeline_root(pipeline_root)
    if cron is not None:
        deploy.validate_cron(cron, vertex=vertex)
    params = deploy.pipeline_parameters(config_name, list(overrides), model_repo, model_name, bleu4_floor,
                                        tolerance, accelerator_type, accelerator_count, allow_unscorable_champion,
                                        extract_shards)
    if package:
        deploy.check_package(package, params)
    warning = deploy.placeholder_image_warning(image, package)
    if warning:
        click.echo(warning, err=True)
    return params


@pipeline.command("compile", epilog="""\b
Example:
  captioner pipeline compile --output pipeline.yaml --image REGISTRY/captioner@sha256:DIGEST
  captioner pipeline compile --trainer vertex-custom-job --train-replicas 4 \\
      --train-accelerator-type NVIDIA_TESLA_T4 --output pipeline-4xT4.yaml""")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("pipeline.yaml"),
              show_default=True, help="Where the compiled KFP v2 YAML package is written.")
@click.option("--image", default=None, help="Component image reference to pin (e.g. with a @sha256 digest).")
@_scale_options
def pipeline_compile(output: Path, image: str | None, **scale_options) -> None:
    """Compile the pipeline to a KFP v2 YAML package."""
    from captioner.pipelines.pipeline import DEFAULT_IMAGE, compile_pipeline

    compile_pipeline(str(output), image or DEFAULT_IMAGE, _train_scale(scale_options))
    click.echo(f"compiled: {output}")


@pipeline.command("run", epilog="""\b
Example:
  captioner pipeline run --local --config synthetic --pipeline-root runs/pipeline --model-repo models""")
@click.option("--local", "local_run", is_flag=True, required=True,
              help="Run on this machine with kfp.local (the only way `run` works; see submit).")
@click.option("--pipeline-root", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/pipeline"),
              show_default=True, help="Where task outputs, the cache and run records go.")
@click.option("--no-cache", is_flag=True, help="Run every step even if its inputs are unchanged.")
@click.option("--serving-base-path", default=None,
              help="Where TF Serving sees the model repository (e.g. /models, the docker-compose mount); "
                   "models.config names it. Kept in the repository for later writes.")
@click.option("--extract-shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many extraction tasks the image list is split over (kfp.local runs two at a time).")
@_pipeline_options
def pipeline_run(local_run: bool, pipeline_root: Path, no_cache: bool, serving_base_path: str | None,
                 extract_shards: int, config_name: str, overrides: tuple[str, ...], model_repo: str, model_name: str,
                 bleu4_floor: float, tolerance: float, allow_unscorable_champion: bool) -> None:
    """Run the whole DAG locally; print the run id, the gate decision and the registered version."""
    from captioner.pipelines.local import report_url, run_local

    _config(config_name, overrides)  # fail fast, with the field named, before any step starts
    record = run_local(config_name, list(overrides), pipeline_root=pipeline_root, model_repo=model_repo,
                       model_name=model_name, bleu4_floor=bleu4_floor, tolerance=tolerance, cache=not no_cache,
                       serving_base_path=serving_base_path, allow_unscorable_champion=allow_unscorable_champion,
                       extract_shards=extract_shards)
    gate = record["gate"]
    click.echo(f"run: {record['run_id']} ({record['seconds']:.1f}s)")
    click.echo(f"gate: {'passed' if gate['passed'] else 'rejected'}: {gate['reason']}")
    if record["registered_version"] is not None:
        click.echo(f"registered: {model_repo.rstrip('/')}/{model_name}/{record['registered_version']}")
    elif record.get("already_registered_as") is not None:
        click.echo(f"registered: nothing new (this model is version {record['already_registered_as']})")
    else:
        click.echo("registered: nothing")
    click.echo(f"report: {report_url(record['report'])}")


@pipeline.command("submit", epilog="""\b
Example:
  captioner pipeline submit --host https://kfp.example.com --image REGISTRY/captioner:TAG \\
      --config flickr8k --model-repo gs://BUCKET/models
  captioner pipeline submit --vertex --project PROJECT --region us-central1 --pipeline-root gs://BUCKET/root \\
      --image REGISTRY/captioner:TAG --config my.yaml --model-repo gs://BUCKET/models
  captioner pipeline submit --vertex --project PROJECT --region us-central1 --pipeline-root gs://BUCKET/root \\
      --image REGISTRY/captioner:TAG --train-replicas 4 --extract-shards 8 --model-repo gs://BUCKET/models""")
@_cloud_options
@_pipeline_options
@_scale_options
@click.option("--extract-shards", type=click.IntRange(min=1), default=None, help=EXTRACT_SHARDS_HELP)
def pipeline_submit(host, vertex, project, region, pipeline_root, service_account, experiment, package, image,
                    accelerator_type, accelerator_count, config_name, overrides, model_repo, model_name,
                    bleu4_floor, tolerance, allow_unscorable_champion, extract_shards, **scale_options) -> None:
    """Submit one run to Kubeflow Pipelines (--host) or Vertex AI Pipelines (--vertex)."""
    from captioner.pipelines import deploy
    from captioner.pipelines.pipeline import DEFAULT_IMAGE

    params = _check_cloud(host, vertex, project, region, pipeline_root, config_name=config_name,
                          overrides=overrides, model_repo=model_repo, model_name=model_name, bleu4_floor=bleu4_floor,
                          tolerance=tolerance, accelerator_type=accelerator_type,
                          accelerator_count=accelerator_count, allow_unscorable_champion=allow_unscorable_champion,
                          package=package, image=image, extract_shards=extract_shards)
    scale = _train_scale(scale_options, vertex=vertex, package=package)
    if vertex:
        name = deploy.submit_vertex(project, region, pipeline_root, params, experiment=experiment,
                                    service_account=service_account, package=package, image=image or DEFAULT_IMAGE,
                                    scale=scale)
    else:
        name = deploy.submit_kfp(host, params, experiment=experiment, package=package, image=image or DEFAULT_IMAGE,
                                 scale=scale)
    click.echo(f"submitted: {name}")


@pipeline.command("schedule", epilog="""\b
Example:
  captioner pipeline schedule --cron '0 3 * * 1' --host https://kfp.example.com \\
      --image REGISTRY/captioner:TAG --config flickr8k --model-repo gs://BUCKET/models""")
@click.option("--cron", required=True, help="When to retrain, cron syntax, e.g. '0 3 * * 1' (Mondays 03:00).")
@click.option("--name", "schedule_name", default="captioner-retraining", show_default=True,
              help="Name of the recurring run (KFP) or schedule (Vertex).")
@_cloud_options
@_pipeline_options
@_scale_options
@click.option("--extract-shards", type=click.IntRange(min=1), default=None, help=EXTRACT_SHARDS_HELP)
def pipeline_schedule(cron, schedule_name, host, vertex, project, region, pipeline_root, service_account, experiment,
                      package, image, accelerator_type, accelerator_count, config_name, overrides, model_repo,
                      model_name, bleu4_floor, tolerance, allow_unscorable_champion, extract_shards,
                      **scale_options) -> None:
    """Schedule recurring retraining: a KFP recurring run or a Vertex PipelineJobSchedule."""
    from captioner.pipelines import deploy
    from captioner.pipelines.pipeline import DEFAULT_IMAGE

    params = _check_cloud(host, vertex, project, region, pipeline_root, config_name=config_name,
                          overrides=overrides, model_repo=model_repo, model_name=model_name, bleu4_floor=bleu4_floor,
                          tolerance=tolerance, accelerator_type=accelerator_type,
                          accelerator_count=accelerator_count, allow_unscorable_champion=allow_unscorable_champion,
                          package=package, image=image, cron=cron, extract_shards=extract_shards)
    scale = _train_scale(scale_options, vertex=vertex, package=package)
    if vertex:
        name = deploy.schedule_vertex(project, region, pipeline_root, cron, params, name=schedule_name,
                                      service_account=service_account, package=package,
                                      image=image or DEFAULT_IMAGE, scale=scale)
    else:
        name = deploy.schedule_kfp(host, cron, params, experiment=experiment, name=schedule_name, package=package,
                                   image=image or DEFAULT_IMAGE, scale=scale)
    click.echo(f"scheduled: {name} ({cron})")


# -- runs ------------------------------------------------------------------------------------------
@cli.group(epilog="""\b
Example:
  captioner runs list
  captioner runs show latest""")
def runs() -> None:
    """Inspect local pipeline runs (records under the pipeline root)."""


ROOT_OPTION = click.option("--pipeline-root", type=click.Path(file_okay=False, path_type=Path),
                           default=Path("runs/pipeline"), show_default=True,
                           help="The folder `captioner pipeline run --pipeline-root` wrote the runs to.")


@runs.command("list", epilog="""\b
Example:
  captioner runs list --pipeline-root runs/pipeline""")
@ROOT_OPTION
def runs_list(pipeline_root: Path) -> None:
    """One line per run: id, status, duration, test BLEU-4, gate, registered version."""
    from captioner.pipelines.local import list_runs

    records = list_runs(pipeline_root)
    if not records:
        click.echo(f"no runs under {pipeline_root}")
        return
    click.echo(f"{'run':48} {'status':10} {'seconds':>8} {'bleu4':>7}  gate      registered")
    for r in records:
        bleu4 = r["gate"].get("bleu4")
        registered = r["registered_version"] if r["registered_version"] is not None else "-"
        gate = {True: "passed", False: "rejected"}.get(r["gate"].get("passed"), "-")
        click.echo(f"{r['run_id']:48} {r['status']:10} {r['seconds']:8.1f} "
                   f"{bleu4 if bleu4 is None else f'{bleu4:.4f}':>7}  {gate:9} {registered}")


@runs.command("show", epilog="""\b
Example:
  captioner runs show latest
  captioner runs show captioner-training-2026-11-28 --json""")
@click.argument("run_id")
@ROOT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the whole run record as JSON.")
def runs_show(run_id: str, pipeline_root: Path, as_json: bool) -> None:
    """Each task's status, duration, metrics and artifact paths, and the HTML report's file:// URL.

    RUN_ID is a run id, the beginning of exactly one (see `captioner runs list`), or `latest`.
    """
    from captioner.pipelines.local import RESULT_NAMES, TASK_ORDER, get_run, report_url
    from captioner.pipelines.step_config import config_label, is_embedded

    record = get_run(pipeline_root, run_id)
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    click.echo(f"run {record['run_id']}: {record['status']} in {record['seconds']:.1f}s")
    params = dict(record["parameters"])
    if is_embedded(str(params.get("config", ""))):
        params["config"] = f"{config_label(params['config'])} (embedded)"
    click.echo("parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    for name, task in sorted(record["tasks"].items(), key=lambda item: TASK_ORDER.index(item[0])
                             if item[0] in TASK_ORDER else len(TASK_ORDER)):
        seconds = f"{task['seconds']:.1f}s" if "seconds" in task else "-"
        click.echo(f"  {name:17} {task['status']:10} {seconds:>8}")
        outputs = task.get("outputs", {})
        for key, value in outputs.get("parameters", {}).items():
            # "Output" is KFP's name for a step's return value: say what the value is instead.
            click.echo(f"      {RESULT_NAMES.get(name, 'result') if key == 'Output' else key}: {value}")
        for key, artifact in outputs.get("artifacts", {}).items():
            location = report_url(artifact["uri"]) if key == "report" else artifact["uri"]
            click.echo(f"      {key}: {location}")
            numbers = {k: v for k, v in artifact["metadata"].items() if isinstance(v, int | float)
                       and not isinstance(v, bool)}
            if numbers and key == "metrics":
                click.echo("        " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(numbers.items())))
    gate = record["gate"]
    decision = {True: "passed", False: "rejected"}.get(gate.get("passed"), "not decided")
    click.echo(f"gate: {decision}" + (f" - {gate['reason']}" if gate.get("reason") else ""))
    if record["registered_version"] is not None:
        click.echo(f"registered version: {record['registered_version']}")
    elif record.get("already_registered_as") is not None:
        click.echo(f"registered version: nothing new (this model is version {record['already_registered_as']})")
    else:
        click.echo("registered version: none")
    click.echo(f"HTML report: {report_url(record['report']) or 'none (the evaluate step did not finish)'}")


# -- serve -----------------------------------------------------------------------------------------
def _check_model_source(settings) -> list[str]:
    """Why a local gateway would start with nothing to serve, as warnings naming the path and what is
    missing there (empty when a model is in place). The gateway still starts: it keeps polling, so a
    version published later is picked up, but until then /predict answers 503."""
    from captioner.registry import ModelRepository

    if settings.backend != "local":
        return []
    if settings.model_dir:
        folder = Path(settings.model_dir).resolve()
        if not folder.is_dir():
            return [f"--model-dir {folder} does not exist"]
        if not (folder / "saved_model.pb").is_file():
            return [f"--model-dir {folder} is not a SavedModel folder (no saved_model.pb in it)"]
        return []
    if "://" in settings.model_repo:  # listing a bucket here would delay the start; /ready tells
        return []
    root = Path(settings.model_repo).resolve()
    later = (f"/predict answers 503 until a version is published there (`captioner pipeline run --local "
             f"--model-repo {settings.model_repo}`, or `make demo`)")
    if not root.is_dir():
        return [f"model repository {root} does not exist: {later}"]
    try:
        repo = ModelRepository(str(root))
        if repo.versions(settings.model_name):
            return []
        others = [name for name in repo.models() if name != settings.model_name]
    except (CaptionerError, OSError, ValueError) as exc:
        return [f"model repository {root} cannot be read: {exc}"]
    expected = root / settings.model_name / "<version>" / "saved_model.pb"
    found = f"; it holds {', '.join(repr(n) for n in others)} (--model-name)" if others else ""
    return [f"model repository {root} has no version of {settings.model_name!r} (looked for {expected}){found}: "
            f"{later}"]


def _listen(host: str, port: int):
    """A socket listening on ``host:port``, bound here so that a port in use is a clear error before
    anything starts, and ``--port 0`` has its real port before it is announced."""
    import errno
    import socket

    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise CaptionerError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn does: restarts reuse the port
    try:
        listener.bind(address)
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise CaptionerError(f"port {port} on {host} is already in use (another gateway?): choose another "
                                 "--port, or --port 0 for a free one") from None
        raise CaptionerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listener


def _gateway_url(listener) -> str:
    """The URL a browser on this machine opens for ``listener`` (an any-address bind is reached locally)."""
    import socket

    host, port = listener.getsockname()[:2]
    if listener.family == socket.AF_INET6:
        host = "[::1]" if host == "::" else f"[{host}]"
    elif host == "0.0.0.0":
        host = "127.0.0.1"
    return f"http://{host}:{port}"


@cli.command(epilog="""\b
Example:
  captioner serve --model-repo models --port 8080   # then open http://127.0.0.1:8080/demo
  captioner serve --backend tfserving --tfserving-target localhost:8500""")
@click.option("--model-repo", default=None, help="Model repository to serve from (local backend; default: models).")
@click.option("--model-dir", default=None, help="Serve this SavedModel folder instead of a repository.")
@click.option("--model-name", default=None, help="Model name in the repository / TF Serving (default: captioner).")
@click.option("--backend", type=click.Choice(["local", "tfserving"]), default=None,
              help="local: in-process SavedModel (default); tfserving: TensorFlow Serving over gRPC.")
@click.option("--tfserving-target", default=None, help="host:port of TF Serving's gRPC API (default localhost:8500).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="TCP port; 0 picks a free one (the address is printed once listening).")
@click.option("--workers", type=int, default=1, show_default=True, help="gunicorn worker processes.")
@click.option("--threads", type=int, default=4, show_default=True, help="Threads per worker.")
def serve(model_repo, model_dir, model_name, backend, tfserving_target, host, port, workers, threads) -> None:
    """Run the REST gateway with the demo page at http://HOST:PORT/demo.

    gunicorn worker processes whose connections waitress reads: a request is handed to one of the
    THREADS only once it is complete, so slow or stalled clients never hold a thread.
    Settings not given as flags come from CAPTIONER_* environment variables (see README).
    Warns at start when there is no model to serve; a port in use is an error.
    """
    import socket

    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter
    from gunicorn.sock import TCP6Socket, TCPSocket

    from captioner.serving.server import worker_class
    from captioner.serving.settings import Settings

    settings = Settings.from_env(model_repo=model_repo, model_dir=model_dir, model_name=model_name,
                                 backend=backend, tfserving_target=tfserving_target)
    for warning in _check_model_source(settings):
        click.echo(f"warning: {warning}", err=True)
    listener = _listen(host, port)
    url = _gateway_url(listener)
    bound_host, bound_port = listener.getsockname()[:2]
    bind = f"[{bound_host}]:{bound_port}" if listener.family == socket.AF_INET6 else f"{bound_host}:{bound_port}"
    if workers > 1:
        # Prometheus samples of all workers are aggregated through this folder.
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="captioner-prometheus-"))

    def _child_exit(server, worker):
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid)  # drop a dead worker's live gauges

    def _when_ready(server):
        click.echo(f"serving {settings.model_name} ({settings.backend}) at {url}/  demo page: {url}/demo  "
                   f"(listening on {bind}; /ready says when the model is loaded)")

    class Gateway(BaseApplication):
        def load_config(self):
            # Bodies up to twice the upload limit are read in full, so that the app's 413 reaches a
            # client that writes its whole upload before reading (closing on unread bytes resets the
            # connection); larger ones are refused without reading.
            worker = worker_class(header_timeout=settings.header_timeout_seconds,
                                  client_timeout=settings.client_timeout_seconds,
                                  max_body_bytes=2 * settings.max_upload_bytes,
                                  max_connections=settings.max_connections)
            for key, value in {"bind": bind, "workers": workers, "threads": threads,
                               "worker_class": worker, "timeout": 120, "accesslog": None,
                               "graceful_timeout": 30, "child_exit": _child_exit, "when_ready": _when_ready,
                               # gunicorn's control socket is one path per user (~/.gunicorn): a second
                               # gateway would take it over; nothing here uses it.
                               "control_socket_disable": True}.items():
                self.cfg.set(key, value)

        def load(self):
            import logging

            logging.basicConfig(level=logging.INFO, format="%(message)s")
            from captioner.serving.app import create_app

            return create_app(settings)

        def run(self):
            # gunicorn serves the socket bound above instead of binding its own (it would retry a
            # port in use for seconds, then exit with a log line).
            arbiter = Arbiter(self)
            socket_type = TCP6Socket if listener.family == socket.AF_INET6 else TCPSocket
            arbiter.LISTENERS = [socket_type(bind, self.cfg, arbiter.log, fd=listener.detach())]
            arbiter.run()

    Gateway().run()


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="captioner", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except CaptionerError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # one line for users; CAPTIONER_DEBUG=1 shows the traceback
        if os.environ.get("CAPTIONER_DEBUG"):
            raise
        click.echo(f"error: {type(exc).__name__}: {exc} (CAPTIONER_DEBUG=1 for the traceback)", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
