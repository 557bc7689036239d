"""``captioner``: the command line over the library. Each command parses arguments and calls it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from captioner.errors import CaptionerError

CONFIG_HELP = "A preset name (smoke, synthetic, flickr8k) or a YAML file."
SET_HELP = "Override a config field, e.g. --set data.root=../shared/data/flickr8k (repeatable)."


def _config(name: str, overrides: tuple[str, ...]):
    from captioner.config import load_config

    return load_config(name, overrides)


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="captioner")
def cli() -> None:
    """Train, evaluate, export and run attention-based image-captioning models."""
    _quiet_tensorflow()


@cli.command()
@click.option("--config", "config_name", default="synthetic", show_default=True, help=CONFIG_HELP)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run folder: metrics, checkpoints, evaluation and the SavedModel go here.")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--no-resume", is_flag=True, help="Refuse to continue an interrupted run in --output.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def train(config_name: str, output: Path, overrides: tuple[str, ...], no_resume: bool, quiet: bool) -> None:
    """Extract features (cached), train, evaluate on the test split and export a SavedModel."""
    from captioner.workflow import run_training

    cfg = _config(config_name, overrides)
    summary = run_training(cfg, output, resume=not no_resume, progress=not quiet)
    metrics = summary["final_metrics"]
    click.echo(f"run complete: {output}  test BLEU-4 {metrics.get('bleu4', float('nan')):.4f} (beam), "
               f"{metrics.get('greedy_bleu4', float('nan')):.4f} (greedy); "
               f"SavedModel: {output / 'saved_model' if cfg.export.enabled else 'not exported'}")


@cli.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="An exported SavedModel folder (e.g. RUN/saved_model or REPO/captioner/1).")
@click.option("--beam-size", type=click.IntRange(1, 20), default=None, help="1 = greedy; default: the model's.")
@click.option("--max-length", type=click.IntRange(2, 100), default=None)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image (with n-best and scores).")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
def caption(model_dir: Path, beam_size: int | None, max_length: int | None, as_json: bool,
            images: tuple[Path, ...]) -> None:
    """Print a caption for each IMAGE."""
    from captioner.predictor import SavedModelCaptioner

    captioner = SavedModelCaptioner(model_dir)
    results = captioner.caption_files(list(images), beam_size=beam_size, max_length=max_length)
    for path, result in zip(images, results, strict=True):
        if as_json:
            click.echo(json.dumps({"image": str(path), **result.to_dict()}))
        else:
            click.echo(f"{path}\t{result.caption}")


@cli.command()
@click.option("--config", "config_name", default="synthetic", show_default=True, help=CONFIG_HELP)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
def tokenize(config_name: str, output: Path, overrides: tuple[str, ...]) -> None:
    """Fit the vocabulary on the train captions; write vocab.json and vocab.txt to OUTPUT."""
    from captioner.workflow import load_data, tokenize_step

    cfg = _config(config_name, overrides)
    tokenizer = tokenize_step(cfg, load_data(cfg), output)
    click.echo(f"vocabulary: {tokenizer.vocab_size} tokens -> {output}")


@cli.command()
@click.option("--config", "config_name", default="synthetic", show_default=True, help=CONFIG_HELP)
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Feature cache folder (default: under $CAPTIONER_CACHE).")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--quiet", is_flag=True)
def extract(config_name: str, cache: Path | None, overrides: tuple[str, ...], quiet: bool) -> None:
    """Extract (and cache) backbone features for every image of every split."""
    from captioner.workflow import extract_step, load_data

    cfg = _config(config_name, overrides)
    store = extract_step(cfg, load_data(cfg), cache, progress=not quiet)
    click.echo(f"features: {len(store.index)} cached in {store.folder}")


@cli.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A trained-model folder (a `captioner train` output).")
@click.option("--config", "config_name", default=None, help="Default: the config the model was trained with.")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--split", type=click.Choice(["test", "dev"]), default=None)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report here (default: print it).")
def evaluate(model_dir: Path, config_name: str | None, overrides: tuple[str, ...], split: str | None,
             output: Path | None) -> None:
    """Score a trained model with BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (greedy and beam)."""
    from captioner.config import parse_overrides, with_overrides
    from captioner.io_utils import atomic_write_json
    from captioner.train import load_trained
    from captioner.workflow import evaluate_model, extract_step, load_data

    model, tokenizer, spec = load_trained(model_dir)
    cfg = _config(config_name, overrides) if config_name else with_overrides(spec.full_config,
                                                                             parse_overrides(overrides))
    dataset = load_data(cfg)
    store = extract_step(cfg, dataset)
    report = evaluate_model(model, tokenizer, store, dataset, cfg, split=split)
    if output:
        atomic_write_json(output, report)
    else:
        click.echo(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))


@cli.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A trained-model folder (a `captioner train` output).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where the SavedModel folder is written (atomically).")
@click.option("--name", "model_name", default="captioner", show_default=True)
def export(model_dir: Path, output: Path, model_name: str) -> None:
    """Export a trained model as a TF Serving SavedModel."""
    from captioner.export import export_saved_model
    from captioner.features.backbones import build_backbone
    from captioner.train import load_trained

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
