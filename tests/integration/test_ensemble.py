"""`captioner ensemble`: checkpoints or runs decoded as one model, evaluated and exported like a run."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from captioner import constants as C
from captioner.cli import cli
from captioner.data.images import load_image
from captioner.errors import CaptionerError
from captioner.model.decoding import decode
from captioner.train import load_trained, save_ensemble
from captioner.workflow import load_data

pytestmark = pytest.mark.integration


def _features(cfg, count=6):
    from captioner.features.backbones import build_backbone

    data = load_data(cfg)
    paths = [data.image_path(i) for i in data.splits["test"][:count]]
    backbone = build_backbone(cfg.features.backbone, cfg.features.weights, cfg.features.image_size)
    pixels = np.stack([load_image(p, cfg.features.image_size) for p in paths]).astype(np.float32)
    return paths, backbone(pixels)


def test_one_member_ensemble_decodes_as_the_member(smoke_run, tmp_path):
    run, cfg = smoke_run
    save_ensemble([run], tmp_path / "one")
    single, tokenizer, _ = load_trained(run)
    ensemble, ens_tokenizer, spec = load_trained(tmp_path / "one")
    assert spec.ensemble["combine"] == "prob" and ens_tokenizer.tokens == tokenizer.tokens
    _, features = _features(cfg)
    for beam in (1, cfg.decode.beam_size):
        a = decode(single, single.encode(features), beam_size=beam, max_length=cfg.decode.max_length)
        b = decode(ensemble, ensemble.encode(features), beam_size=beam, max_length=cfg.decode.max_length)
        np.testing.assert_array_equal(a["tokens"].numpy(), b["tokens"].numpy())
        np.testing.assert_allclose(a["scores"].numpy(), b["scores"].numpy(), atol=1e-5)


@pytest.mark.parametrize("combine", ["prob", "log_prob"])
def test_step_combines_the_members_distributions(smoke_run, tmp_path, combine):
    """A checkpoint ensemble (the run's final weights and its best cross-entropy checkpoint): each
    step's distribution is the members' combined by hand, and every member keeps its own state."""
    run, cfg = smoke_run
    result = CliRunner().invoke(cli, ["ensemble", "--member", str(run), "--member",
                                      str(run / "checkpoints" / "best.weights.h5"), "--combine", combine,
                                      "--output", str(tmp_path / "two")])
    assert result.exit_code == 0, result.output
    ensemble, _, _ = load_trained(tmp_path / "two")
    a, b = ensemble.members
    assert not all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a.weights, b.weights, strict=True))
    _, features = _features(cfg, 4)
    tokens = tf.fill([4], C.START_ID)
    state = ensemble.initial_state(4, cfg.decode.max_length)
    cross = ensemble.cross_memory(ensemble.encode(features))
    for t in range(3):
        log_probs, attention, state = ensemble.step(cross, tokens, state, t)
        if t == 0:
            outs = [m.step(m.cross_memory(m.encode(features)), tokens, m.initial_state(4, cfg.decode.max_length), 0)
                    for m in (a, b)]
            pa, pb = (np.exp(o[0].numpy().astype(np.float64)) for o in outs)
            if combine == "prob":
                expected = np.log((pa + pb) / 2)
            else:
                mean = (np.log(pa) + np.log(pb)) / 2
                expected = mean - np.log(np.exp(mean).sum(-1, keepdims=True))
            np.testing.assert_allclose(log_probs.numpy(), expected, atol=1e-4)
            np.testing.assert_allclose(attention.numpy(), (outs[0][1].numpy() + outs[1][1].numpy()) / 2, atol=1e-6)
            np.testing.assert_allclose(state.numpy(), np.concatenate([outs[0][2].numpy(), outs[1][2].numpy()], 1),
                                       atol=1e-6)
        np.testing.assert_allclose(np.exp(log_probs.numpy()).sum(-1), 1.0, atol=1e-4)
        tokens = tf.argmax(log_probs, -1, output_type=tf.int32)


def test_ensemble_exports_one_savedmodel_whose_signatures_equal_the_library(smoke_run, tmp_path):
    from captioner.predictor import SavedModelCaptioner, results_from_decode

    run, cfg = smoke_run
    folder = save_ensemble([run, run / "checkpoints" / "best.weights.h5"], tmp_path / "ens")
    result = CliRunner().invoke(cli, ["export", "--model", str(folder), "--output", str(tmp_path / "sm")])
    assert result.exit_code == 0, result.output
    metadata = json.loads((tmp_path / "sm" / "assets.extra" / C.METADATA_JSON).read_text())
    assert metadata["num_layers"] == 2 * cfg.model.num_layers
    assert metadata["state_shape"][1] == 4 * cfg.model.num_layers

    ensemble, tokenizer, _ = load_trained(folder)
    paths, features = _features(cfg)
    library = decode(ensemble, ensemble.encode(features), beam_size=cfg.decode.beam_size,
                     max_length=cfg.decode.max_length, length_penalty=cfg.decode.length_penalty,
                     no_repeat_ngram_size=cfg.decode.no_repeat_ngram_size)
    expected = [r.caption for r in results_from_decode(library, tokenizer.tokens)]
    runner = SavedModelCaptioner(tmp_path / "sm")
    served = runner.loaded.signatures[C.SIG_SERVING](image_bytes=tf.constant([p.read_bytes() for p in paths]))
    assert [c.decode() for c in served[C.OUT_CAPTIONS].numpy()] == expected
    # encode + decode_step, stepped outside the graph (the gateway's path), give the same captions.
    assert [r.caption for r in runner.caption_files(paths, beam_size=cfg.decode.beam_size)] == expected
    # TensorFlow Serving's session loader resolves variables by name: two members' must not clash.
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        tf.compat.v1.saved_model.loader.load(sess, [C.SERVE_TAG], str(tmp_path / "sm"))


def test_members_must_share_the_vocabulary_and_a_users_folder_is_not_replaced(smoke_run, tmp_path):
    run, _ = smoke_run
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("saved_model", "logs", "checkpoints"))
    vocab = json.loads((other / C.VOCAB_JSON).read_text())
    vocab["tokens"] = vocab["tokens"][:-1] + ["zebra-unseen"]
    (other / C.VOCAB_JSON).write_text(json.dumps(vocab))
    with pytest.raises(CaptionerError, match="another vocabulary"):
        save_ensemble([run, other], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(CaptionerError):
        save_ensemble([run], mine)
    assert (mine / "notes.txt").read_text() == "keep" and len(list(mine.iterdir())) == 1
    stray = tmp_path / "x.weights.h5"
    stray.write_bytes(b"")
    with pytest.raises(CaptionerError, match="weights file outside"):
        save_ensemble([stray], tmp_path / "none")


def test_train_step_trains_the_members_and_ships_them_as_one_model(tmp_path):
    """``ensemble.members`` in the config: ``captioner train`` trains each member (its own run
    folder, cross-entropy then SCST), tunes, evaluates and exports the ensemble as one SavedModel
    whose captions are the library's, and draws every member's curves in the report; run again,
    it trains nothing twice; --restart's cleanup removes what it wrote and nothing else."""
    from captioner.predictor import SavedModelCaptioner, results_from_decode
    from captioner.reports import evaluation_html
    from captioner.workflow import remove_run_files, training_history

    out = tmp_path / "run"
    args = ["train", "--config", "smoke", "--set", "train.epochs=1", "--set", "scst.epochs=1",
            "--set", "ensemble.members=[{}, {model: {encoder_layers: 1},"
                                         " train: {group_by_image: true, dev_loss: false}}]",
            "--output", str(out), "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    model, tokenizer, spec = load_trained(out)
    assert spec.ensemble["combine"] == "log_prob" and [m.cfg.encoder_layers for m in model.members] == [0, 1]
    summary = json.loads((out / C.RUN_SUMMARY).read_text())
    members = summary["ensemble"]["members"]
    assert [m["folder"] for m in members] == ["members/member-0", "members/member-1"]
    assert [m["seed"] for m in members] == [42, 43]  # the run's seed + index: two members never coincide
    assert {"member_0", "member_1", "evaluate", "export"} <= set(summary["timings_seconds"])
    history = training_history(out)
    assert list(history) == ["member 0", "member 1"]
    assert [[r["phase"] for r in rows] for rows in history.values()] == [["xe", "scst"]] * 2
    # Member 1 skips the dev loss pass (train.dev_loss): its row leaves val_loss out, timings stay.
    xe_rows = [rows[0] for rows in history.values()]
    assert isinstance(xe_rows[0]["val_loss"], float) and xe_rows[1].get("val_loss", "") == ""
    assert all(0 < r["dev_seconds"] < r["epoch_seconds"] for r in xe_rows)
    page = evaluation_html(json.loads((out / C.EVALUATION_JSON).read_text()), history, {}, 64)
    assert page.count("<svg") >= 6 and "member 1" in page

    cfg = spec.full_config  # the tuned length penalty included
    paths, features = _features(cfg, 4)
    library = decode(model, model.encode(features), beam_size=cfg.decode.beam_size,
                     max_length=cfg.decode.max_length, length_penalty=cfg.decode.length_penalty,
                     no_repeat_ngram_size=cfg.decode.no_repeat_ngram_size)
    expected = [r.caption for r in results_from_decode(library, tokenizer.tokens)]
    runner = SavedModelCaptioner(out / C.SAVED_MODEL_DIR)
    served = runner.loaded.signatures[C.SIG_SERVING](image_bytes=tf.constant([p.read_bytes() for p in paths]))
    assert [c.decode() for c in served[C.OUT_CAPTIONS].numpy()] == expected

    # Interrupted after its members finished (before the ensemble was written): resumed, it trains
    # neither member again.
    # (Each member's model.weights.h5 is written again from its selected checkpoint; the checkpoints
    # and the metrics show whether anything trained.)
    trained = {p: p.stat().st_mtime_ns for p in (out / "members").glob("*/checkpoints/**/*")
               if p.name.endswith(".weights.h5") or p.name.startswith("ckpt-")}
    assert len(trained) >= 4
    for name in (C.RUN_SUMMARY, "model.json", "member-0.weights.h5", "member-1.weights.h5"):
        (out / name).unlink()
    shutil.rmtree(out / C.SAVED_MODEL_DIR)
    again = CliRunner().invoke(cli, [*args, "--set", "export.enabled=false"])  # (a resumable change)
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in trained} == trained  # no member trained again
    assert [len(rows) for rows in training_history(out).values()] == [2, 2]
    assert load_trained(out)[2].ensemble["combine"] == "log_prob"
    assert json.loads((out / C.RUN_SUMMARY).read_text())["status"] == "complete"

    # What --restart removes: the members' run files and folders, not a user's file among them.
    (out / "members" / "notes.txt").write_text("mine")
    remove_run_files(out)
    assert sorted(p.name for p in (out / "members").iterdir()) == ["notes.txt"]
    assert not list(out.glob("member-*.weights.h5")) and not (out / "model.json").exists()
