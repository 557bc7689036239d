"""One smoke run of `captioner train`, then its outputs and the SavedModel's serving contract."""

import csv
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from captioner import constants as C
from captioner.data.images import load_image
from captioner.workflow import load_data

pytestmark = pytest.mark.integration


def test_run_folder_layout(smoke_run):
    if os.environ.get("CAPTIONER_TEST_RUN"):
        pytest.skip("checks the layout of the smoke preset's run (epochs, data set size), not of CAPTIONER_TEST_RUN")
    out, cfg = smoke_run
    for name in ("run_summary.json", "metrics.csv", "config_snapshot.json", "evaluation.json", "logs",
                 "checkpoints", "saved_model/saved_model.pb", "vocab.json", "model.weights.h5"):
        assert (out / name).exists(), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    xe = [r for r in rows if r["phase"] == "xe"]
    assert [int(r["epoch"]) for r in xe] == list(range(1, cfg.train.epochs + 1))
    assert {"train_loss", "val_loss", "dev_bleu4", "dev_cider", "learning_rate"} <= set(rows[0])
    assert float(xe[-1]["train_loss"]) < float(xe[0]["train_loss"])
    # The smoke preset's SCST phase follows, numbered on, with its reward and dev CIDEr-D.
    scst = [r for r in rows if r["phase"] == "scst"]
    assert [int(r["epoch"]) for r in scst] == [cfg.train.epochs + i for i in range(1, cfg.scst.epochs + 1)]
    assert all(float(r["train_reward"]) > 0 and float(r["dev_cider"]) > 0 for r in scst)
    report = json.loads((out / "evaluation.json").read_text())
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"):
        assert key in report and key in report["greedy"]
    assert report["images"] == cfg.data.synthetic.num_test and report["samples"]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["status"] == "complete"
    assert set(summary["timings_seconds"]) >= {"data", "tokenize", "extract", "train", "scst", "evaluate", "export"}
    assert summary["scst"]["epochs"] == cfg.scst.epochs and "xe_dev_cider" in summary["scst"]
    # The smoke preset selects cross-entropy on dev CIDEr-D: SCST starts from that epoch's weights,
    # whose dev CIDEr-D it measures again.
    assert cfg.train.select_metric == "cider"
    best = max(xe, key=lambda r: float(r["dev_cider"]))
    assert summary["xe_selected_epoch"] == int(best["epoch"])
    assert summary["scst"]["xe_dev_cider"] == pytest.approx(float(best["dev_cider"]), abs=1e-3)
    assert report["beam"]["unk_share"] == 0 and report["greedy"]["unk_share"] == 0
    assert "dangling_share" in report["beam"]
    assert json.loads((out / "config_snapshot.json").read_text())["name"] == "smoke"
    assert list((out / "logs").rglob("events.out.tfevents*")), "TensorBoard logs"


def _session_run(saved_model, signature, feeds):
    """Run a signature through the TF1 session loader, as TensorFlow Serving loads models."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, [C.SERVE_TAG], str(saved_model))
        sig = meta.signature_def[signature]
        fetches = {k: v.name for k, v in sig.outputs.items()}
        feed = {sig.inputs[k].name: v for k, v in feeds.items()}
        return sig, sess.run(fetches, feed_dict=feed)


def test_session_loader_serves_the_library_captions(smoke_run):
    from captioner.features.backbones import build_backbone
    from captioner.model.decoding import decode
    from captioner.predictor import results_from_decode
    from captioner.train import load_trained

    out, cfg = smoke_run
    data = load_data(cfg)
    paths = [data.image_path(i) for i in data.splits["test"][:20]]
    _, served = _session_run(out / "saved_model", C.SIG_SERVING,
                             {C.IN_IMAGE_BYTES: np.array([p.read_bytes() for p in paths], dtype=object)})
    served_captions = [c.decode() for c in served[C.OUT_CAPTIONS]]
    assert served[C.OUT_NBEST].shape == (20, cfg.decode.beam_size)

    model, tokenizer, _ = load_trained(out)
    backbone = build_backbone(cfg.features.backbone, cfg.features.weights, cfg.features.image_size)
    pixels = np.stack([load_image(p, cfg.features.image_size) for p in paths]).astype(np.float32)
    library = decode(model, model.encode(backbone(pixels)), beam_size=cfg.decode.beam_size,
                     max_length=cfg.decode.max_length, length_penalty=cfg.decode.length_penalty,
                     no_repeat_ngram_size=cfg.decode.no_repeat_ngram_size)
    library_captions = [r.caption for r in results_from_decode(library, tokenizer.tokens)]
    assert served_captions == library_captions
    np.testing.assert_allclose(served[C.OUT_SCORES], library["scores"][:, 0].numpy(), atol=1e-3)
    np.testing.assert_array_equal(served[C.OUT_NBEST_FINISHED], library["finished"].numpy())
    np.testing.assert_array_equal(served[C.OUT_FINISHED], library["finished"][:, 0].numpy())


def _regions(run):
    """Image regions the model attends over (8x8 patches for smoke, 7x7 for MobileNet at 224)."""
    return json.loads((run / "model.json").read_text())["num_regions"]


def _decoder_layers(run):
    """Decoder layers the export's features and state pack: an ensemble's members' layers, summed."""
    spec = json.loads((run / "model.json").read_text())
    members = (spec.get("ensemble") or {}).get("members") or [{"model": spec["model"]}]
    return sum(member["model"]["num_layers"] for member in members)


def test_encode_and_decode_step_signatures(smoke_run):
    out, cfg = smoke_run
    size = cfg.features.image_size
    sig, result = _session_run(out / "saved_model", C.SIG_ENCODE,
                               {C.IN_IMAGES: np.zeros((2, size, size, 3), np.uint8)})
    features = result[C.OUT_FEATURES]
    regions, layers = _regions(out), _decoder_layers(out)
    assert features.shape == (2, regions, 2 * layers * cfg.model.d_model)
    slots = cfg.export.max_decode_length
    state = np.zeros((2, 2 * layers, slots, cfg.model.d_model), np.float32)
    _, step = _session_run(out / "saved_model", C.SIG_DECODE_STEP,
                           {C.IN_FEATURES: features, C.IN_TOKENS: np.array([1, 1], np.int32), C.IN_STATE: state,
                            C.IN_POSITION: np.array([0, 0], np.int32)})
    assert step[C.OUT_STATE].shape == state.shape  # fixed size: the cache does not grow
    assert np.abs(step[C.OUT_STATE][:, :, 0]).sum() > 0 and not step[C.OUT_STATE][:, :, 1:].any()
    assert step[C.OUT_ATTENTION].shape == (2, regions)
    np.testing.assert_allclose(np.exp(step[C.OUT_LOG_PROBS]).sum(-1), 1.0, atol=1e-4)
    _, meta = _session_run(out / "saved_model", C.SIG_METADATA, {C.IN_ROWS: np.zeros(3, np.int32)})
    assert meta[C.OUT_METADATA].shape == (3,) and meta[C.OUT_VOCAB].shape[0] == 3
    metadata = json.loads(meta[C.OUT_METADATA][0])
    assert metadata["input_size"] == size and metadata["backbone"] == cfg.features.backbone
    assert metadata["max_decode_length"] == slots and metadata["state_shape"][2] == slots
    assert "bleu4" in metadata["metrics"]
    # The gateway decodes with the export's n-gram blocking, as serving_default does.
    assert metadata.get("no_repeat_ngram_size", 0) == cfg.decode.no_repeat_ngram_size  # absent: exported before


def test_gateway_path_equals_serving_default(smoke_run):
    """The encode/decode_step runner (what the gateway and `captioner caption` use) gives the same
    captions as the in-graph serving_default."""
    from captioner.predictor import SavedModelCaptioner

    out, cfg = smoke_run
    data = load_data(cfg)
    paths = [data.image_path(i) for i in data.splits["test"][:8]]
    runner = SavedModelCaptioner(out / "saved_model")
    results = runner.caption_files(paths, beam_size=cfg.decode.beam_size, with_attention=True)
    served = runner.loaded.signatures[C.SIG_SERVING](image_bytes=tf.constant([p.read_bytes() for p in paths]))
    assert [r.caption for r in results] == [c.decode() for c in served[C.OUT_CAPTIONS].numpy()]
    first = results[0]
    assert first.attention.shape == (len(first.words), _regions(out))
    assert len(first.nbest) == cfg.decode.beam_size
    greedy = runner.caption_files(paths, beam_size=1)
    assert len(greedy[0].nbest) == 1


def test_warmup_record_is_a_prediction_log(smoke_run):
    from tensorflow_serving.apis import prediction_log_pb2

    out, _ = smoke_run
    records = list(tf.data.TFRecordDataset(str(out / "saved_model/assets.extra" / C.WARMUP_FILE)))
    log = prediction_log_pb2.PredictionLog.FromString(records[0].numpy())
    assert log.predict_log.request.model_spec.signature_name == C.SIG_SERVING
    assert C.IN_IMAGE_BYTES in log.predict_log.request.inputs


def test_caption_cli_and_python_api(smoke_run):
    from click.testing import CliRunner

    from captioner import caption_images
    from captioner.cli import cli

    out, cfg = smoke_run
    data = load_data(cfg)
    paths = [str(data.image_path(i)) for i in data.splits["test"][:2]]
    api = caption_images(out / "saved_model", paths, beam_size=2)
    result = CliRunner().invoke(cli, ["caption", "--model", str(out / "saved_model"), "--beam-size", "2",
                                      "--json", *paths])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [line["caption"] for line in lines] == [r.caption for r in api]
    assert len(lines[0]["nbest"]) == 2
