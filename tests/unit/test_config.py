import pytest

from captioner.config import load_config, parse_overrides, preset_names
from captioner.errors import ConfigError

pytestmark = pytest.mark.unit


def test_presets_ship_and_load():
    assert {"smoke", "synthetic", "flickr8k"} <= set(preset_names())
    assert load_config("smoke").features.backbone == "patches"
    cfg = load_config("flickr8k", ["data.root=/data/f8k"])
    assert cfg.features.backbone == "mobilenet_v1_075" and cfg.data.root == "/data/f8k"


def test_overrides_are_typed():
    cfg = load_config("smoke", ["train.epochs=7", "train.learning_rate=2e-3", "train.mixed_precision=true",
                                "decode.beam_size=5"])
    assert cfg.train.epochs == 7 and cfg.train.learning_rate == pytest.approx(2e-3)
    assert cfg.train.mixed_precision is True and cfg.decode.beam_size == 5
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize("override, field, words", [
    (["train.distribute=tpu"], "train.distribute", "allowed values: default, mirrored, multi_worker"),
    (["train.epochs=three"], "train.epochs", "not a valid int"),
    (["train.nope=1"], "train.nope", "unknown field"),
    (["model.d_model=100", "model.num_heads=3"], "model.d_model", "divisible"),
    (["features.backbone=resnet"], "features.backbone", "mobilenet_v1_075"),
    (["decode.length_penalty_grid=[]"], "decode.length_penalty_grid", "non-empty list"),
    (["decode.length_penalty_grid=[0.9, -1]"], "decode.length_penalty_grid", "penalties >= 0"),
    (["decode.length_penalty_grid=1.5"], "decode.length_penalty_grid", "list"),
    (["decode.no_repeat_ngram_size=-1"], "decode.no_repeat_ngram_size", ">= 0"),
    (["train.dev_loss=false", "train.select_metric=val_loss"], "train.dev_loss", "select_metric=val_loss"),
])
def test_validation_names_the_field(override, field, words):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", override)
    assert err.value.field == field
    assert field in str(err.value) and words in str(err.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*smoke"):
        load_config("nope")


def test_real_data_needs_root():
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config("flickr8k")


def test_yaml_file_extends_a_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: smoke\ntrain:\n  epochs: 9\n")
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.train.epochs == 9 and cfg.features.backbone == "patches"


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml, line \d+"):
        load_config(str(path))


def test_ensemble_members_get_their_overrides_and_distinct_seeds():
    from captioner.config import member_config

    cfg = load_config("smoke", ["ensemble.members=[{}, {model: {encoder_layers: 1}}, {train: {seed: 7}}]"])
    members = [member_config(cfg, i) for i in range(3)]
    assert [m.model.encoder_layers for m in members] == [0, 1, 0]
    assert [m.train.seed for m in members] == [cfg.train.seed, cfg.train.seed + 1, 7]
    assert all(m.ensemble.members == [] for m in members)
    assert members[1].data == cfg.data and members[1].decode == cfg.decode
    assert load_config("smoke").ensemble.members == []


@pytest.mark.parametrize(("members", "extra", "field", "words"), [
    ("[{}]", [], "ensemble.members", "two or more"),
    ("[{}, {decode: {beam_size: 3}}]", [], "ensemble.members[1].decode", "only model, train, scst"),
    ("[{}, {model: {dropout: 2}}]", [], "ensemble.members[1].model.dropout", "must be in [0, 1)"),
    ("[{}, {model: {d_model: 32}}]", [], "ensemble.members", "one model.d_model"),
    ("[{}, {}]", ["train.distribute=multi_worker"], "ensemble.members", "multi_worker"),
    ("[{}, 3]", [], "ensemble.members[1]", "must be a mapping"),
])
def test_bad_ensemble_members_name_the_member(members, extra, field, words):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", [f"ensemble.members={members}", *extra])
    assert err.value.field == field and words in str(err.value)
