"""What TF Serving with --enable_batching demands of the export, and the gRPC stand-in that applies it.

TF Serving's BatchingSession wraps every signature: a Run() without an input fails, concurrent
requests are concatenated along axis 0 (so every other axis must be equal), and outputs are split
back along axis 0.
"""

import numpy as np
import pytest
import tensorflow as tf

from captioner import constants as C

pytestmark = pytest.mark.integration


def _signature_defs(saved_model):
    """The SignatureDefs as TF Serving reads them from saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString((saved_model / "saved_model.pb").read_bytes())
    meta = next(m for m in proto.meta_graphs if C.SERVE_TAG in m.meta_info_def.tags)
    return {k: v for k, v in meta.signature_def.items() if not k.startswith("__")}


def test_every_signature_is_batchable_without_padding(smoke_run):
    out, _ = smoke_run
    signatures = _signature_defs(out / "saved_model")
    assert set(signatures) == {C.SIG_SERVING, C.SIG_ENCODE, C.SIG_DECODE_STEP, C.SIG_METADATA}
    for name, sig in signatures.items():
        assert sig.inputs, f"{name}: no input ('Batching Run() must have at least one input tensor')"
        for key, info in list(sig.inputs.items()) + list(sig.outputs.items()):
            dims = [d.size for d in info.tensor_shape.dim]
            assert not info.tensor_shape.unknown_rank and dims, f"{name}.{key}: needs a batch axis"
            assert dims[0] == -1, f"{name}.{key}: axis 0 must be the batch, got {dims}"
            if key in sig.inputs:
                assert all(d > 0 for d in dims[1:]), f"{name}.{key}: axes after 0 must be fixed, got {dims}"


def _step(runner, features, tokens, state, position):
    out = runner._step(**{C.IN_FEATURES: tf.constant(features), C.IN_TOKENS: tf.constant(tokens, tf.int32),
                          C.IN_STATE: tf.constant(state), C.IN_POSITION: tf.constant(position, tf.int32)})
    return {k: v.numpy() for k, v in out.items()}


def test_rows_at_different_positions_share_one_decode_step(smoke_run):
    """Two requests, one at position 3 and one at position 1, concatenated as BatchingSession does,
    give each the answer it gets alone."""
    from captioner.predictor import SavedModelCaptioner

    out, cfg = smoke_run
    runner = SavedModelCaptioner(out / "saved_model")
    size = runner.image_size
    pixels = np.random.default_rng(0).integers(0, 255, (2, size, size, 3), dtype=np.uint8)
    features = runner._encode(images=tf.constant(pixels))[C.OUT_FEATURES].numpy()
    shape = runner.metadata["state_shape"]
    states, tokens = [], [[1, 7, 9, 4], [1, 5]]
    for i, sequence in enumerate(tokens):
        state = np.zeros([1, *shape[1:]], np.float32)
        for t, token in enumerate(sequence[:-1]):
            state = _step(runner, features[i:i + 1], [token], state, [t])[C.OUT_STATE]
        states.append(state)
    positions = [len(s) - 1 for s in tokens]
    alone = [_step(runner, features[i:i + 1], [tokens[i][-1]], states[i], [positions[i]]) for i in range(2)]
    merged = _step(runner, features, [s[-1] for s in tokens], np.concatenate(states), positions)
    for i in range(2):
        for key in (C.OUT_LOG_PROBS, C.OUT_ATTENTION, C.OUT_STATE):
            np.testing.assert_allclose(merged[key][i], alone[i][key][0], atol=1e-5, err_msg=key)
    assert merged[C.OUT_STATE].shape == (2, *shape[1:])


def test_positions_past_the_cache_are_refused(smoke_run):
    from captioner.errors import ModelError
    from captioner.predictor import SavedModelCaptioner

    out, cfg = smoke_run
    runner = SavedModelCaptioner(out / "saved_model")
    slots = cfg.export.max_decode_length
    features = np.zeros([1, runner.metadata["num_regions"], runner.metadata["feature_dim"]], np.float32)
    state = np.zeros([1, *runner.metadata["state_shape"][1:]], np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="cache size"):
        _step(runner, features, [1], state, [slots])
    pixels = np.zeros((1, runner.image_size, runner.image_size, 3), np.uint8)
    with pytest.raises(ModelError, match="max_decode_length|holds"):
        runner.caption_pixels(pixels, max_length=slots + 1)


# -- the stand-in's batching follows BatchingSession -----------------------------------------------------
def _concurrently(batcher, requests):
    """Submit every request from its own thread at once; each answer or error, in order."""
    import threading

    results = [None] * len(requests)

    def submit(i):
        try:
            results[i] = batcher.submit(requests[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_batcher_merges_along_axis_0_and_splits_back():
    import threading

    from captioner.serving.grpc_server import Batcher

    runs = []

    def run(feeds):  # a model whose rows are independent: y = 2x, row sums
        runs.append(feeds["x"].shape[0])
        return {"y": feeds["x"] * 2, "total": feeds["x"].sum(axis=1)}

    # A full batch (6 rows) runs at once; the long timeout only matters if a thread is slow to start.
    batcher = Batcher(run, max_batch_size=6, timeout=10.0, threads=threading.Semaphore(1))
    requests = [{"x": np.full((rows, 3), i, np.float32)} for i, rows in enumerate([1, 2, 3])]
    results = _concurrently(batcher, requests)
    assert runs == [6]  # the three requests ran as one batch
    for i, (request, result) in enumerate(zip(requests, results, strict=True)):
        np.testing.assert_array_equal(result["y"], request["x"] * 2)
        assert result["total"].shape == (request["x"].shape[0],) and (result["total"] == 3 * i).all()


def test_batcher_refuses_what_tf_serving_refuses():
    import threading

    import grpc
    from captioner.serving.grpc_server import Batcher, ServingError

    batcher = Batcher(lambda feeds: {"y": feeds["x"]}, max_batch_size=4, timeout=2.0,
                      threads=threading.Semaphore(1))
    with pytest.raises(ServingError, match="at least one input tensor") as info:
        batcher.submit({})
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ServingError, match="at least one dimension"):
        batcher.submit({"x": np.float32(1)})
    with pytest.raises(ServingError, match="equal 0th-dimension size"):
        batcher.submit({"x": np.zeros((2, 3)), "z": np.zeros((1, 3))})
    with pytest.raises(ServingError, match="larger than maximum input batch size 4"):
        batcher.submit({"x": np.zeros((5, 3))})
    # The old decode_step state grew by one position per step: two requests at different positions
    # cannot be concatenated, and the whole batch fails.
    pair = Batcher(lambda feeds: {"y": feeds["x"]}, max_batch_size=2, timeout=10.0, threads=threading.Semaphore(1))
    results = _concurrently(pair, [{"x": np.zeros((1, 2, 3))}, {"x": np.zeros((1, 2, 4))}])
    assert all(isinstance(r, ServingError) and r.code == grpc.StatusCode.FAILED_PRECONDITION
               and "different shapes" in str(r) for r in results)


def test_shipped_batching_config_fits_the_gateway():
    """The Dockerfile and the Kubernetes manifest turn batching on with the same parameters, without
    padding, and a whole gateway request (images x beams rows) fits in one batch."""
    import re
    from pathlib import Path

    import yaml
    from captioner.serving.settings import Settings

    root = Path(__file__).resolve().parents[2]

    def parameters(text: str) -> dict[str, int]:
        text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        return {k: int(v) for k, v in re.findall(r"(\w+)\s*\{\s*value:\s*(\d+)\s*\}", text)}

    shipped = parameters((root / "serving/deploy/batching_parameters.txt").read_text())
    docs = list(yaml.safe_load_all((root / "serving/deploy/k8s/tfserving.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    assert parameters(config_map["data"]["batching_parameters.txt"]) == shipped
    assert "pad_variable_length_inputs" not in shipped and "allowed_batch_sizes" not in shipped
    settings = Settings()
    assert shipped["max_batch_size"] >= settings.max_images * settings.max_beam_size
    container = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    dockerfile = (root / "images/tfserving.Dockerfile").read_text()
    for flags in (" ".join(container["args"]), dockerfile):
        assert "--enable_batching=true" in flags and "--batching_parameters_file=" in flags


def test_cache_shorter_than_the_decode_length_is_a_config_error():
    from captioner.config import load_config
    from captioner.errors import ConfigError

    with pytest.raises(ConfigError, match="export.max_decode_length") as info:
        load_config("smoke", ["export.max_decode_length=8"])  # smoke decodes up to 12 positions
    assert info.value.field == "export.max_decode_length"
    assert load_config("smoke", ["export.max_decode_length=12"]).export.max_decode_length == 12
