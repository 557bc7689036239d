"""Typed, layered configuration: dataclass defaults -> preset YAML -> ``--set`` overrides -> validate.

A preset is a YAML file shipped in ``captioner/configs``; a user YAML may name one with
``extends: <preset>`` and override a subset of fields. Every error names the field.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from captioner.errors import ConfigError

DataFormat = Literal["auto", "flickr8k", "flickr8k_original", "coco", "synthetic"]
Backbone = Literal["mobilenet_v1_075", "efficientnet_b0", "mobilenet_v3_large", "inception_v3", "patches"]
Weights = Literal["imagenet", "none"]
Strategy = Literal["default", "mirrored", "multi_worker"]
SelectMetric = Literal["bleu4", "cider", "val_loss"]


@dataclass(frozen=True)
class SyntheticConfig:
    num_train: int = 1500
    num_dev: int = 200
    num_test: int = 200
    image_size: int = 96
    seed: int = 7


@dataclass(frozen=True)
class DataConfig:
    format: DataFormat = "auto"
    root: str = ""
    # Limit images per split (0 = all): for quick experiments on a real data set.
    max_images_per_split: int = 0
    # A captioned image missing from the image folder: fail ("error") or leave it out with a warning.
    on_missing_image: Literal["error", "skip"] = "error"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class TokenizerConfig:
    min_count: int = 5
    max_size: int = 10000
    # Longest training caption in tokens, <start> and <end> included; longer ones are cut.
    max_length: int = 24


@dataclass(frozen=True)
class FeaturesConfig:
    backbone: Backbone = "mobilenet_v1_075"
    weights: Weights = "imagenet"
    image_size: int = 224
    batch_size: int = 32
    shard_size: int = 2048
    # Root of the feature caches: features go to <root>/by-content/<cache_key> (one store per backbone,
    # weights, image size and preprocessing version); "" = <CAPTIONER_CACHE or ~/.cache/captioner>/features.
    cache_dir: str = ""
    # Also extract features of horizontally flipped training images (augmentation).
    flip_train: bool = False


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 256
    num_layers: int = 2
    num_heads: int = 8
    ff_dim: int = 1024
    dropout: float = 0.3
    # Dropout on the image-feature vectors before projection.
    feature_dropout: float = 0.1
    # Self-attention layers over the image features before the decoder (0 = projection only).
    encoder_layers: int = 0
    tie_embeddings: bool = True


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    # Exponential moving average of the weights (0 = off, e.g. 0.999); dev selection and the
    # saved model use the averaged weights.
    ema_momentum: float = 0.0
    early_stopping_patience: int = 3
    select_metric: SelectMetric = "bleu4"
    distribute: Strategy = "default"
    mixed_precision: bool = False
    seed: int = 42
    # Batch captions of similar length and cut each batch to its longest: the decoder skips padding.
    # Off by default (and for runs saved before it existed) until its effect on quality is measured.
    length_buckets: bool = False
    # Batch whole images, all their captions, and encode each image once for them (the
    # self-critical code bases' "captions per image"). It pays with a region encoder
    # (model.encoder_layers: a Flickr8k epoch's training 169 -> 115 s); the default decoder's grouped batches
    # carry more padding, which eats its saving (BENCHMARKS.md).
    group_by_image: bool = False
    # The dev loss after every epoch (a pass over the dev captions). Selection uses it only with
    # select_metric=val_loss; off, a Flickr8k epoch was 6-15 s shorter on the eighth session's machine
    # (BENCHMARKS.md).
    dev_loss: bool = True


@dataclass(frozen=True)
class ScstConfig:
    """Self-critical sequence training after cross-entropy (``captioner.scst``). It starts from the
    best cross-entropy checkpoint once cross-entropy stops (``train.early_stopping_patience`` epochs
    without a better dev score, or ``train.epochs``)."""

    enabled: bool = False
    # Most SCST epochs; SCST also stops after ``patience`` epochs without a better dev CIDEr-D.
    epochs: int = 10
    patience: int = 2
    learning_rate: float = 2e-5
    # Captions drawn per image; each one's baseline is the mean reward of the others.
    samples: int = 5
    # Images per update (rows per update: batch_images x samples).
    batch_images: int = 32
    # Longest sampled caption in tokens (<end> included); 0 = decode.max_length.
    max_length: int = 0
    # Dropout (model.dropout, model.feature_dropout) in the gradient pass, as the self-critical code
    # bases train (their model stays in train mode); sampling always draws from the model without it.
    # Keras keeps the dropout seed state out of checkpoints, so a resumed run draws other masks.
    dropout: bool = False
    # Mirror half of each update's images (needs features.flip_train, whose mirrored features it uses).
    mirror: bool = False


LENGTH_PENALTY_GRID = (0.0, 0.3, 0.6, 0.9, 1.2, 1.5)


@dataclass(frozen=True)
class DecodeConfig:
    beam_size: int = 3
    max_length: int = 20
    length_penalty: float = 0.6
    # Pick length_penalty on the dev split from length_penalty_grid before testing/export, by dev
    # BLEU-4 or CIDEr-D (tune_metric; the length that suits one metric need not suit the other).
    tune_length_penalty: bool = False
    tune_metric: Literal["bleu4", "cider"] = "bleu4"
    # The penalties tune_length_penalty tries (each one beam search over the dev split).
    length_penalty_grid: list = field(default_factory=lambda: list(LENGTH_PENALTY_GRID))
    # Greedy and beam search never emit a token that repeats an n-gram of this size already in the
    # caption (0: off). In the export's metadata, so the gateway decodes as serving_default does.
    no_repeat_ngram_size: int = 0


@dataclass(frozen=True)
class EvalConfig:
    split: Literal["test", "dev"] = "test"
    meteor: Literal["auto", "on", "off"] = "auto"
    num_samples: int = 12


@dataclass(frozen=True)
class ExportConfig:
    enabled: bool = True
    warmup: bool = True
    # Decoding positions the exported decode_step's fixed-size state holds ([B, 2L, T, d]): the
    # longest caption a client of encode/decode_step (the gateway) can ask for.
    max_decode_length: int = 40


# The sections an ensemble member may change: how its decoder is built and trained. The data, the
# vocabulary, the image features, decoding and export are the run's, shared by every member.
MEMBER_SECTIONS = ("model", "train", "scst")


@dataclass(frozen=True)
class EnsembleConfig:
    """Train several decoders in turn, then decode them as one model (``captioner.model.ensemble``:
    the members' next-word distributions combined at every step; one SavedModel). Each member is a
    mapping of overrides of the run's ``model``, ``train`` and ``scst`` sections (``{}``: the run's
    own settings; a member that does not set ``train.seed`` gets the run's seed + its index). No
    members: one model."""

    members: list = field(default_factory=list)
    combine: Literal["prob", "log_prob"] = "log_prob"


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def validate(self) -> Config:
        _validate(self, "")
        checks = [
            (self.model.d_model % self.model.num_heads == 0, "model.d_model",
             f"must be divisible by model.num_heads ({self.model.num_heads})"),
            (self.decode.beam_size >= 1, "decode.beam_size", "must be >= 1"),
            (self.decode.max_length >= 2, "decode.max_length", "must be >= 2"),
            (self.export.max_decode_length >= self.decode.max_length, "export.max_decode_length",
             f"must be >= decode.max_length ({self.decode.max_length}): the state holds every position"),
            (self.decode.length_penalty >= 0, "decode.length_penalty", "must be >= 0"),
            (self.decode.no_repeat_ngram_size >= 0, "decode.no_repeat_ngram_size",
             "must be >= 0 (0: repeats allowed; 2: no word pair twice)"),
            (isinstance(self.decode.length_penalty_grid, list) and len(self.decode.length_penalty_grid) > 0
             and all(isinstance(a, int | float) and not isinstance(a, bool) and a >= 0
                     for a in self.decode.length_penalty_grid),
             "decode.length_penalty_grid", "must be a non-empty list of penalties >= 0, e.g. [0.9, 1.5, 2.1]"),
            (self.train.dev_loss or self.train.select_metric != "val_loss", "train.dev_loss",
             "must be true when train.select_metric=val_loss"),
            (self.tokenizer.max_length >= 3, "tokenizer.max_length", "must be >= 3"),
            (self.tokenizer.min_count >= 1, "tokenizer.min_count", "must be >= 1"),
            (self.tokenizer.max_size > 4, "tokenizer.max_size", "must be > 4 (the special tokens)"),
            (self.train.epochs >= 0, "train.epochs", "must be >= 0"),
            (self.train.batch_size >= 1, "train.batch_size", "must be >= 1"),
            (0 <= self.model.dropout < 1, "model.dropout", "must be in [0, 1)"),
            (0 <= self.model.feature_dropout < 1, "model.feature_dropout", "must be in [0, 1)"),
            (0 <= self.train.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)"),
            (0 <= self.train.ema_momentum < 1, "train.ema_momentum", "must be in [0, 1)"),
            (self.features.image_size >= 32, "features.image_size", "must be >= 32"),
            (self.scst.samples >= 2, "scst.samples", "must be >= 2 (the baseline is the other samples' mean)"),
            (self.scst.epochs >= 0, "scst.epochs", "must be >= 0"),
            (self.scst.patience >= 1, "scst.patience", "must be >= 1"),
            (self.scst.batch_images >= 1, "scst.batch_images", "must be >= 1"),
            (self.scst.learning_rate > 0, "scst.learning_rate", "must be > 0"),
            (self.scst.max_length == 0 or 2 <= self.scst.max_length <= self.export.max_decode_length,
             "scst.max_length", f"must be 0 (decode.max_length) or in [2, {self.export.max_decode_length}]"),
            (not self.scst.mirror or self.features.flip_train, "scst.mirror",
             "needs features.flip_train=true (the mirrored features it draws from)"),
            (self.data.format == "synthetic" or self.data.root != "", "data.root",
             "is required unless data.format=synthetic (e.g. --set data.root=../shared/data/flickr8k)"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ConfigError(f"{name} {message}", field=name)
        self._validate_ensemble()
        return self

    def _validate_ensemble(self) -> None:
        members = self.ensemble.members
        if not isinstance(members, list) or len(members) == 1:
            raise ConfigError("ensemble.members must be a list of two or more members (mappings of model/train/"
                              "scst overrides, {} for the run's own settings), or empty for one model",
                              field="ensemble.members")
        if members and self.train.distribute == "multi_worker":
            raise ConfigError("ensemble.members cannot be trained with train.distribute=multi_worker yet: train "
                              "the members as separate runs and combine them with `captioner ensemble`",
                              field="ensemble.members")
        d_models = set()
        for i in range(len(members)):
            d_models.add(member_config(self, i).model.d_model)
        if len(d_models) > 1:
            raise ConfigError(f"ensemble members need one model.d_model (the packed decoding state), got "
                              f"{sorted(d_models)}", field="ensemble.members")


def member_config(cfg: Config, index: int) -> Config:
    """The config ensemble member ``index`` of ``cfg`` trains with: the run's, with the member's
    overrides, no ensemble of its own, and (unless the member sets one) the run's seed + ``index``."""
    overrides = cfg.ensemble.members[index]
    label = f"ensemble.members[{index}]"
    if not isinstance(overrides, dict):
        raise ConfigError(f"{label} must be a mapping of model/train/scst overrides, got {overrides!r}", field=label)
    for key, value in overrides.items():
        if key not in MEMBER_SECTIONS:
            raise ConfigError(f"{label}.{key}: a member may change only {', '.join(MEMBER_SECTIONS)} (the data, "
                              f"features, vocabulary, decoding and export are the run's)", field=f"{label}.{key}")
        if not isinstance(value, dict):
            raise ConfigError(f"{label}.{key} must be a mapping, got {value!r}", field=f"{label}.{key}")
    data = _merge(cfg.to_dict(), overrides)
    data["ensemble"] = {"members": [], "combine": cfg.ensemble.combine}
    if "seed" not in overrides.get("train", {}):
        data["train"]["seed"] = cfg.train.seed + index
    try:
        return _build(Config, data, "").validate()
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}", field=f"{label}.{exc.field}" if getattr(exc, "field", None)
                          else label) from None


def _validate(obj: Any, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(value):
            _validate(value, name + ".")
        elif get_origin(hint) is Literal and value not in get_args(hint):
            allowed = ", ".join(map(str, get_args(hint)))
            raise ConfigError(f"{name}={value!r} is not allowed; allowed values: {allowed}", field=name)


def preset_names() -> list[str]:
    folder = resources.files("captioner") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: Path | Any, label: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{label}, line {mark.line + 1}" if mark else label
        raise ConfigError(f"{where}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _preset_dict(name: str) -> dict[str, Any]:
    path = resources.files("captioner") / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown preset {name!r}; presets: {', '.join(preset_names())} (or give a path to a YAML file)",
            field="config",
        )
    data = _read_yaml(path, f"preset {name}")
    data.setdefault("name", name)
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices and isinstance(value, str):
            for choice in choices:
                if str(choice) == value:
                    return choice
        return value  # validate() reports it with the allowed values
    if origin in (types.UnionType, typing.Union):
        return value
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a valid {hint.__name__}", field=name) from None
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(f"unknown field {name!r}; fields here: {allowed}", field=name)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a mapping, got {value!r}", field=name)
            kwargs[key] = _build(hint, value, name + ".")
        else:
            kwargs[key] = _coerce(value, hint, name)
    return cls(**kwargs)


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn ``["train.epochs=3", ...]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. train.epochs=3", field=pair)
        key, raw = pair.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part!r} is not a section", field=key)
        node[parts[-1]] = value
    return out


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a preset name or YAML path plus ``key=value`` overrides into a validated Config."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}", field="config")
        data = _read_yaml(path, str(path))
        data.setdefault("name", path.stem)
        base = data.pop("extends", None)
        if base:
            data = _merge(_preset_dict(str(base)), data)
    else:
        data = _preset_dict(name_or_path)
    data = _merge(data, parse_overrides(overrides))
    return _build(Config, data, "").validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "").validate()


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    return config_from_dict(_merge(cfg.to_dict(), overrides))
