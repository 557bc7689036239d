"""Export a trained model as a TensorFlow Serving SavedModel.

Signatures (names in ``captioner.constants``):

* ``serving_default``: ``image_bytes [B]`` (encoded JPEG/PNG/GIF/BMP) -> ``captions [B]``, ``scores [B]``,
  ``finished [B]``, ``nbest_captions [B, K]``, ``nbest_scores [B, K]``, ``nbest_finished [B, K]``;
  decoding and beam search run in-graph with stock TensorFlow ops only (no ``py_function``, no custom ops).
* ``encode``: ``images [B, S, S, 3]`` uint8 (already preprocessed) -> ``features [B, N, 2Ld]`` (every
  decoder layer's cross-attention keys and values of the image, computed once per image).
* ``decode_step``: ``features [B, N, 2Ld]``, ``tokens [B]`` (previous token), ``state [B, 2L, T, d]``,
  ``position [B]`` (of ``tokens``, per row) -> ``log_probs [B, V]``, ``attention [B, N]``, ``state``; the
  state is a fixed-size cache (``T = export.max_decode_length`` slots, zeros at first).
* ``metadata``: ``rows [B]`` (any int32) -> ``metadata_json [B]`` (input size, vocabulary size,
  backbone, metrics, ...) and ``vocab [B, V]``, the same for every row.

Every signature is batchable by TF Serving's ``--enable_batching`` as it is, without padding: each has
an input, every input and output has the batch on axis 0, and every other axis of an input is fixed
(``BatchingSession`` concatenates concurrent requests along axis 0 and fails on any other mismatch).

The vocabulary is an asset (``vocab.txt``), and ``assets.extra/tf_serving_warmup_requests`` holds a
warm-up request for ``serving_default``. The folder appears in one rename when complete.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from captioner import constants as C
from captioner.config import Config
from captioner.io_utils import atomic_directory, only_tree


def give_variables_unique_names(*models) -> None:
    """Re-create the TF variables under their unique Keras paths.

    Keras 3 names a ``tf.Variable`` by its short name ("embeddings", "kernel"), so two layers can
    share one name. The TF2 loader does not mind, but the session-based loader that TensorFlow
    Serving uses resolves variables by name and fails ("Could not find variable ..._1").
    """
    import tensorflow as tf

    seen: set[str] = set()
    for model in models:
        for variable in model.weights:
            name = variable.path
            while name in seen:
                name += "_"
            seen.add(name)
            value = variable.value
            if value.name.split(":")[0] != name:
                variable._value = tf.Variable(value, name=name, trainable=value.trainable)


class _Holder:
    def __init__(self, **items):
        self.__dict__.update(items)


def build_module(backbone, model, vocab_txt: Path, cfg: Config, metadata: dict[str, Any]):
    vocab_tokens = Path(vocab_txt).read_text(encoding="utf-8").splitlines()
    import tensorflow as tf

    from captioner.data.images import decode_image_tf
    from captioner.data.tokenizer import id_to_token_table, ids_to_text
    from captioner.model.decoding import decode

    size = cfg.features.image_size
    beam, max_length, alpha = cfg.decode.beam_size, cfg.decode.max_length, cfg.decode.length_penalty
    slots = cfg.export.max_decode_length
    d, layers, regions = model.cfg.d_model, model.num_layers, model.num_regions
    metadata_json = json.dumps(metadata, sort_keys=True)

    class CaptionerModule(tf.Module):
        def __init__(self):
            super().__init__(name="captioner")
            # The Keras objects are kept out of the tracked graph (a plain holder); their TF
            # variables are tracked directly, as keras.export.ExportArchive does.
            self._keras = _Holder(backbone=backbone, model=model)
            self.model_variables = [v.value for v in backbone.weights + model.weights]
            self.vocab = tf.saved_model.Asset(str(vocab_txt))
            self.table = id_to_token_table(self.vocab.asset_path)

        def _memory(self, images):
            return self._keras.model.encode(self._keras.backbone(tf.cast(images, tf.float32), training=False))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=C.IN_IMAGE_BYTES)])
        def serve(self, image_bytes):
            images = tf.map_fn(lambda b: decode_image_tf(b, size), image_bytes,
                               fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
            out = decode(self._keras.model, self._memory(images), beam_size=beam, max_length=max_length,
                         length_penalty=alpha, no_repeat_ngram_size=cfg.decode.no_repeat_ngram_size)
            tokens = out["tokens"]
            shape = tf.shape(tokens)
            texts = tf.reshape(ids_to_text(tf.reshape(tokens, [-1, shape[2]]), self.table), shape[:2])
            # The n-best list has a fixed width, so a caption cut at max_length stays in it, marked
            # unfinished; finished ones always rank first.
            return {C.OUT_CAPTIONS: texts[:, 0], C.OUT_SCORES: out["scores"][:, 0],
                    C.OUT_FINISHED: out["finished"][:, 0], C.OUT_NBEST: texts,
                    C.OUT_NBEST_SCORES: out["scores"], C.OUT_NBEST_FINISHED: out["finished"]}

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name=C.IN_IMAGES)])
        def encode(self, images):
            memory = self._memory(images)
            return {C.OUT_FEATURES: tf.cast(self._keras.model.cross_memory(memory), tf.float32)}

        @tf.function(input_signature=[
            tf.TensorSpec([None, regions, 2 * layers * d], tf.float32, name=C.IN_FEATURES),
            tf.TensorSpec([None], tf.int32, name=C.IN_TOKENS),
            tf.TensorSpec([None, 2 * layers, slots, d], tf.float32, name=C.IN_STATE),
            tf.TensorSpec([None], tf.int32, name=C.IN_POSITION)])
        def decode_step(self, features, tokens, state, position):
            log_probs, attention, state = self._keras.model.step(features, tokens, state, position)
            return {C.OUT_LOG_PROBS: log_probs, C.OUT_ATTENTION: tf.cast(attention, tf.float32),
                    C.OUT_STATE: tf.cast(state, tf.float32)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int32, name=C.IN_ROWS)])
        def metadata(self, rows):
            # The vocabulary rides along so that a client of encode/decode_step (the gateway over
            # TF Serving) can turn token ids into words without a copy of its own. One answer per
            # row: a batching TF Serving refuses a Run() without inputs and splits outputs on axis 0.
            batch = tf.shape(rows)[0]
            return {C.OUT_METADATA: tf.fill([batch], metadata_json),
                    C.OUT_VOCAB: tf.tile(tf.constant(vocab_tokens)[None], [batch, 1])}

    return CaptionerModule()


def _warmup_image(size: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_warmup(path: Path, model_name: str, size: int) -> None:
    """One PredictionLog with a serving_default request, as TF Serving's warm-up expects."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=C.SIG_SERVING))
    request.inputs[C.IN_IMAGE_BYTES].CopyFrom(tf.make_tensor_proto([_warmup_image(size)], dtype=tf.string))
    record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(record.SerializeToString())


def export_saved_model(backbone, model, model_dir: Path | str, out_dir: Path | str, cfg: Config,
                       metrics: dict[str, Any] | None = None, model_name: str = "captioner") -> Path:
    """Write the SavedModel for ``model`` (trained folder ``model_dir`` holds its vocab) to ``out_dir``."""
    import tensorflow as tf

    from captioner.data.tokenizer import Tokenizer
    from captioner.tracking import git_commit

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tokenizer = Tokenizer.load(model_dir)
    metadata = {
        "format": "captioner-saved-model", "version": 1, "model_name": model_name,
        "input_size": cfg.features.image_size, "vocab_size": tokenizer.vocab_size,
        "backbone": cfg.features.backbone, "weights": cfg.features.weights,
        "num_regions": model.num_regions, "d_model": model.cfg.d_model, "num_layers": model.num_layers,
        "feature_dim": 2 * model.num_layers * model.cfg.d_model,
        "state_shape": [None, 2 * model.num_layers, cfg.export.max_decode_length, model.cfg.d_model],
        "max_decode_length": cfg.export.max_decode_length,
        "special_tokens": list(C.SPECIAL_TOKENS), "beam_size": cfg.decode.beam_size,
        "max_length": cfg.decode.max_length, "length_penalty": cfg.decode.length_penalty,
        "no_repeat_ngram_size": cfg.decode.no_repeat_ngram_size,
        "metrics": metrics or {}, "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "signatures": [C.SIG_SERVING, C.SIG_ENCODE, C.SIG_DECODE_STEP, C.SIG_METADATA],
    }
    with atomic_directory(out_dir, is_captioner_export) as tmp:
        with tempfile.TemporaryDirectory() as scratch:
            # The asset keeps its base name inside the SavedModel: stage it as plain vocab.txt.
            vocab_txt = Path(scratch) / C.VOCAB_TXT
            shutil.copyfile(model_dir / C.VOCAB_TXT, vocab_txt)
            give_variables_unique_names(backbone, model)
            module = build_module(backbone, model, vocab_txt, cfg, metadata)
            signatures = {C.SIG_SERVING: module.serve, C.SIG_ENCODE: module.encode,
                          C.SIG_DECODE_STEP: module.decode_step, C.SIG_METADATA: module.metadata}
            tf.saved_model.save(module, str(tmp), signatures=signatures)
        extra = tmp / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / C.METADATA_JSON).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        shutil.copyfile(model_dir / C.VOCAB_JSON, extra / C.VOCAB_JSON)
        if cfg.export.warmup:
            write_warmup(extra / C.WARMUP_FILE, model_name, cfg.features.image_size)
    return out_dir


def read_metadata(saved_model_dir: Path | str) -> dict[str, Any]:
    path = Path(saved_model_dir) / "assets.extra" / C.METADATA_JSON
    return json.loads(path.read_text())


def is_captioner_export(folder: Path) -> bool:
    """A SavedModel this project exported (our metadata) with nothing of anyone else's in it, at
    any depth: the only kind of existing folder an export may replace (which removes its whole tree).

    Ours are the files ``tf.saved_model.save`` writes for our module (graph, fingerprint, variable
    checkpoint shards, the vocab.txt asset) and what we add to assets.extra.
    """
    import re

    try:
        ours = read_metadata(folder).get("format") == "captioner-saved-model"
    except (OSError, ValueError, AttributeError):
        return False
    files = {"saved_model.pb", "fingerprint.pb", "variables/variables.index", f"assets/{C.VOCAB_TXT}",
             *(f"assets.extra/{name}" for name in (C.METADATA_JSON, C.VOCAB_JSON, C.WARMUP_FILE))}
    shard = re.compile(r"variables/variables\.data-\d{5}-of-\d{5}")

    def written_by_export(rel: str) -> bool:
        return rel in files or shard.fullmatch(rel) is not None

    return ours and only_tree(Path(folder), written_by_export, {"variables", "assets", "assets.extra"})
