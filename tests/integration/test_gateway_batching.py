"""Batching across requests in the local backend (serving/batching.py): requests encoded together,
their searches advanced in one shared decode loop that they join and leave, each caption the one the
request gets alone."""

import io
import threading

import numpy as np
import pytest
import tensorflow as tf
from captioner.serving.app import create_app
from captioner.serving.batching import BatchScheduler, _move_rows, in_place_supported
from captioner.serving.settings import Settings
from PIL import Image

from captioner.model import decoding as D
from captioner.predictor import SavedModelCaptioner, SearchGroup, StepwiseSearch, _top_k, results_from_decode

pytestmark = pytest.mark.integration


# -- the NumPy update equals the in-graph one, bit for bit ---------------------------------------
def _random_log_probs(rng, rows: int, vocab: int) -> np.ndarray:
    # Few distinct values, so that top-k meets ties (broken by the lower index in both).
    logits = rng.integers(0, 6, (rows, vocab)).astype(np.float32)
    return tf.nn.log_softmax(logits).numpy()


def _same(tf_search: dict, np_search: dict) -> None:
    for name, value in tf_search.items():
        np.testing.assert_array_equal(np.asarray(value), np_search[name], err_msg=name)


@pytest.mark.parametrize("ngram", [0, 2, 3])
@pytest.mark.parametrize("beam_size,alpha,max_length", [(3, 0.6, 9), (4, 0.0, 6), (2, 1.0, 12), (5, -0.5, 7)])
def test_numpy_beam_update_equals_the_graph_update(beam_size, alpha, max_length, ngram):
    rng = np.random.default_rng(beam_size)
    images, vocab, regions = 3, 11, 4
    search = D.beam_start(images, beam_size, regions)
    mine = {k: v.numpy() for k, v in search.items()}
    penalty = D.penalties(max_length, alpha)
    blocked = 0
    for t in range(max_length):
        log_probs = _random_log_probs(rng, images * beam_size, vocab)
        attention = rng.random((images * beam_size, regions)).astype(np.float32)
        blocked += int(D.repeat_mask_np(mine["tokens"], np.full([images * beam_size], t), ngram, vocab).any())
        token, source, search = D.beam_advance(search, log_probs, attention, t, beam_size, max_length, alpha,
                                               ngram)
        my_token, my_source, mine = D.beam_advance_np(mine, log_probs, attention, t, beam_size, max_length,
                                                      penalty, ngram)
        np.testing.assert_array_equal(token.numpy(), my_token)
        np.testing.assert_array_equal(source.numpy(), my_source)
        _same(search, mine)
    assert (blocked > 0) == (ngram > 0)  # with 7 words the random searches do repeat themselves


def test_numpy_beam_top_k_breaks_ties_by_index_on_a_large_vocabulary():
    # Past 4k candidates the NumPy top-k partitions first: ties at the threshold must still go to
    # the lower index, as tf.math.top_k gives them.
    x = np.zeros([2, 500], np.float32)
    x[0, [7, 300, 400]] = 1.0
    np.testing.assert_array_equal(D._np_top_k(x, 6), tf.math.top_k(x, 6).indices.numpy())


def test_search_group_top_k_equals_the_row_by_row_one():
    # Rows without a tie at the k-th value in one go, the others row by row: the same indices.
    rng = np.random.default_rng(3)
    x = rng.random((40, 300)).astype(np.float32)
    x[::3] = rng.integers(0, 4, (14, 300)).astype(np.float32)   # ties at the threshold and above
    x[1, [5, 9]] = x[1].max()                                    # a tie among the largest
    np.testing.assert_array_equal(_top_k(x, 6), D._np_top_k(x, 6))
    np.testing.assert_array_equal(_top_k(x, 6), tf.math.top_k(x, 6).indices.numpy())


@pytest.mark.parametrize("ngram", [0, 1, 2])
def test_numpy_greedy_update_equals_the_graph_update(ngram):
    rng = np.random.default_rng(0)
    search = D.greedy_start(4, 3)
    mine = {k: v.numpy() for k, v in search.items()}
    for t in range(6):
        log_probs = _random_log_probs(rng, 4, 9)
        attention = rng.random((4, 3)).astype(np.float32)
        token, search = D.greedy_advance(search, log_probs, attention, t, ngram)
        my_token, mine = D.greedy_advance_np(mine, log_probs, attention, t, ngram)
        np.testing.assert_array_equal(token.numpy(), my_token)
        _same(search, mine)


@pytest.mark.parametrize("beam_size,alpha,ngram", [(1, 0.6, 0), (3, 1.2, 2), (4, 0.0, 0), (2, -0.5, 3), (1, 0.6, 2)])
def test_stepwise_search_start_and_result_equal_the_graph_ones(beam_size, alpha, ngram):
    # StepwiseSearch builds its start and its result in NumPy (the batch scheduler's threads must
    # not spend milliseconds on eager ops): the same bits as decoding's, at every position.
    rng = np.random.default_rng(beam_size)
    images, vocab, regions, max_length = 3, 11, 4, 8
    search = StepwiseSearch(np.zeros([images, regions, 2], np.float32), beam_size=beam_size,
                            max_length=max_length, length_penalty=alpha, num_regions=regions,
                            no_repeat_ngram_size=ngram)
    start = D.greedy_start(images, regions) if beam_size == 1 else D.beam_start(images, beam_size, regions)
    for name, value in start.items():
        assert search._search[name].dtype == value.dtype.as_numpy_dtype, name
    _same(start, search._search)
    while True:
        graph = {k: tf.constant(v) for k, v in search._search.items()}
        if beam_size == 1:
            expected = {k: v.numpy()[:, None] for k, v in D.greedy_result(graph, alpha).items()}
        else:
            expected = D.beam_result(graph, beam_size, alpha)
        mine = search.result()
        assert mine.keys() == expected.keys()
        _same(expected, mine)
        if search.done:
            break
        search.advance(_random_log_probs(rng, search.rows, vocab),
                       rng.random((search.rows, regions)).astype(np.float32))


@pytest.mark.parametrize("beam_size,alpha,max_length,ngram",
                         [(1, 0.6, 7, 0), (3, 1.2, 9, 0), (4, 0.0, 6, 0), (2, -0.5, 8, 0), (1, 0.6, 8, 2),
                          (3, 1.2, 9, 2), (2, 0.0, 9, 3)])
def test_search_group_steps_each_search_as_it_steps_alone(beam_size, alpha, max_length, ngram):
    # The scheduler advances all searches of one kind in one NumPy update, each image at its own
    # position: every search must see the tokens, state reordering and result it gets alone.
    rng = np.random.default_rng(10 + beam_size)
    vocab, regions = 9, 4
    group = SearchGroup(beam_size, max_length, alpha, regions, ngram)

    def fresh(images):
        return StepwiseSearch(np.zeros([images, regions, 2], np.float32), beam_size=beam_size,
                              max_length=max_length, length_penalty=alpha, num_regions=regions,
                              no_repeat_ngram_size=ngram)

    arrivals = {0: [2, 1], 2: [3], 3: [1], 5: [2, 1]}   # step -> images of the searches joining then
    alone: dict[int, StepwiseSearch] = {}
    finished_count, mixed, step = 0, False, 0
    while step <= max(arrivals) or group.members:
        for images in arrivals.get(step, []):
            search = fresh(images)
            group.add(search)
            alone[id(search)] = fresh(images)
        step += 1
        if not group.members:
            continue
        twins = [alone[id(s)] for s in group.members]
        np.testing.assert_array_equal(group.tokens, np.concatenate([t.tokens for t in twins]))
        np.testing.assert_array_equal(group.position, np.concatenate([t.position for t in twins]))
        mixed |= len(set(group.position.tolist())) > 1
        log_probs = _random_log_probs(rng, group.rows, vocab)
        attention = rng.random((group.rows, regions)).astype(np.float32)
        expected_source, offset = [], 0
        for twin in twins:
            rows = slice(offset, offset + twin.rows)
            source = twin.advance(log_probs[rows], attention[rows])
            if not twin.done:
                expected_source.append(source + offset)
            offset += twin.rows
        members = list(group.members)
        source, finished = group.advance(log_probs, attention)
        assert [id(s) for s in finished] == [id(s) for s, t in zip(members, twins, strict=True) if t.done]
        np.testing.assert_array_equal(source, np.concatenate(expected_source) if expected_source else [])
        for search in finished:
            twin = alone[id(search)]
            assert search.done and search.t == twin.t
            _same(twin.result(), search.result())
        finished_count += len(finished)
    assert finished_count == sum(len(v) for v in arrivals.values()) and mixed


# -- the scheduler over the smoke run's SavedModel ---------------------------------------------
class Recording:
    """The real model, with the positions of every decode_step call kept."""

    def __init__(self, model: SavedModelCaptioner):
        self.model, self.positions, self.encoded = model, [], []
        self.metadata, self.path = model.metadata, model.path

    def encode(self, pixels):
        self.encoded.append(len(pixels))
        return self.model.encode(pixels)

    def decode_step(self, features, tokens, state, position):
        self.positions.append(np.asarray(position).copy())
        return self.model.decode_step(features, tokens, state, position)

    def decode_pixels(self, *args, **kwargs):
        return self.model.decode_pixels(*args, **kwargs)


@pytest.fixture(scope="module")
def model(smoke_run):
    out, _ = smoke_run
    return SavedModelCaptioner(out / "saved_model")


def _pixels(model, images: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (images, model.image_size, model.image_size, 3), dtype=np.uint8)


# (images, beam size, max length): greedy and beam, different widths and lengths in one batch.
FIRST = [(1, 3, 12), (2, 1, 10), (1, 2, 4)]
LATER = [(3, 4, 20), (1, 1, 3), (2, 5, 8), (1, 3, 12)]


@pytest.mark.parametrize("in_place,host_view", [(True, True), (False, True), (True, False)],
                         ids=["rows-moved-in-place", "rows-gathered", "no-writable-host-view"])
def test_requests_batched_and_joining_mid_flight_get_the_captions_they_get_alone(model, in_place, host_view,
                                                                                 monkeypatch):
    alpha = float(model.metadata["length_penalty"])
    recording = Recording(model)
    if not host_view:  # as for tensors in GPU memory: the scheduler must fall back to gathering
        monkeypatch.setattr("captioner.serving.batching._writable_view", lambda tensor: None)
    # A long batch timeout: the first wave is surely encoded in one call.
    scheduler = BatchScheduler(recording, max_batch_size=128, timeout_seconds=0.5, in_place=in_place)
    requests = [(_pixels(model, n, seed), k, length) for seed, (n, k, length) in enumerate(FIRST + LATER)]
    results: dict[int, tuple] = {}

    def run(i):
        pixels, k, length = requests[i]
        results[i] = scheduler.decode(pixels, beam_size=k, max_length=length, length_penalty=alpha)

    first = [threading.Thread(target=run, args=(i,)) for i in range(len(FIRST))]
    later = [threading.Thread(target=run, args=(i,)) for i in range(len(FIRST), len(requests))]
    joined = threading.Event()

    def on_batch(signature, rows):
        # After the first shared step, the later requests are encoded (by the encoder thread, while
        # the decoder waits here) and join the loop at the next step.
        if signature == "decode_step" and not joined.is_set():
            joined.set()
            for thread in later:
                thread.start()
            while len(scheduler._ready) < len(later):
                threading.Event().wait(0.001)

    scheduler.on_batch = on_batch
    for thread in first:
        thread.start()
    for thread in first + later:
        thread.join(120)
    assert len(results) == len(requests)

    # Batching happened: the first wave shared one encode call, and some decode_step call held rows
    # at different positions (requests that joined while others were decoding).
    assert recording.encoded[0] == sum(n for n, _, _ in FIRST)
    assert any(len(set(p.tolist())) > 1 for p in recording.positions)
    assert max(len(p) for p in recording.positions) > max(n * k for n, k, _ in FIRST + LATER)

    assert scheduler.in_place == (in_place and host_view)
    for i, (pixels, k, length) in enumerate(requests):
        alone = model.decode_pixels(pixels, beam_size=k, max_length=length)
        batched, steps = results[i]
        assert steps == alone["tokens"].shape[-1]
        for key in ("tokens", "finished", "lengths"):
            np.testing.assert_array_equal(batched[key], alone[key], err_msg=f"request {i}: {key}")
        # Scores may differ in the last bits: a matrix product over more rows may round differently.
        np.testing.assert_allclose(batched["scores"], alone["scores"], atol=1e-5, err_msg=f"request {i}")
        assert ([[text for text, _ in c.nbest] for c in results_from_decode(batched, model.vocab)]
                == [[text for text, _ in c.nbest] for c in results_from_decode(alone, model.vocab)])


def test_rows_moved_in_place_equal_the_gathered_rows():
    # The decode loop reorders beams and drops finished requests' rows inside the state tensor's own
    # memory, copying only the rows that move and, for the state, only the slots written so far.
    assert in_place_supported(), "this TensorFlow gives no writable view: the gateway gathers instead"
    rng = np.random.default_rng(5)
    rows, pairs, slots, width, visible = 9, 4, 10, 6, 4
    state = rng.standard_normal((rows, pairs, slots, width)).astype(np.float32)
    state[:, :, visible:] = 0.0          # as in the loop: nothing past the furthest position written
    index = np.array([1, 0, 2, 2, 6, 7, 8])   # two beams swap, one is copied, rows 3-5 leave
    expected = tf.gather(tf.constant(state), index).numpy()
    tensor = tf.identity(tf.constant(state))
    address = tensor._numpy().ctypes.data
    moved = _move_rows(tensor, index, prefix=visible)
    np.testing.assert_array_equal(moved.numpy(), expected)
    assert moved._numpy().ctypes.data == address            # the same memory, no new tensor
    np.testing.assert_array_equal(_move_rows(tf.identity(tf.constant(state)), index).numpy(), expected)
    # Nothing moves: the tensor itself comes back.
    same = tf.identity(tf.constant(state))
    assert _move_rows(same, np.arange(rows), prefix=visible) is same


def test_requests_arriving_while_others_decode_wait_to_be_encoded_together(model):
    # While a request decodes, the next ones wait (up to encode_wait_seconds from the first's
    # arrival) to share one encode call: the backbone costs less per image in a batch.
    recording = Recording(model)
    scheduler = BatchScheduler(recording, timeout_seconds=0.0, alone_when_idle=False, encode_wait_seconds=30.0)
    alpha = float(model.metadata["length_penalty"])
    results: dict[int, tuple] = {}

    def run(i):
        results[i] = scheduler.decode(_pixels(model, 1, 70 + i), beam_size=2, max_length=6, length_penalty=alpha)

    later = [threading.Thread(target=run, args=(i,)) for i in (1, 2)]
    released = threading.Event()

    def on_batch(signature, rows):
        # The first request's decoder waits here until both later ones are encoded (the encoder
        # takes them once they fill the batch's rows: 30 s would fail the test by its timeout).
        if signature == "decode_step" and not released.is_set():
            released.set()
            for thread in later:
                thread.start()
            while len(scheduler._ready) < 2:
                threading.Event().wait(0.001)

    scheduler.max_batch_size = 2 + 2 * 2    # the first request's rows and the two later ones'
    scheduler.on_batch = on_batch
    run(0)
    for thread in later:
        thread.join(120)
    assert recording.encoded == [1, 2]
    for i in range(3):
        alone = model.decode_pixels(_pixels(model, 1, 70 + i), beam_size=2, max_length=6)
        np.testing.assert_array_equal(results[i][0]["tokens"], alone["tokens"])


def test_a_request_alone_decodes_exactly_as_without_batching(model):
    # Stepped one position at a time (no batch to share), the search gives the in-graph loop's bits.
    scheduler = BatchScheduler(model, timeout_seconds=0.0, alone_when_idle=False)
    for k in (1, 3):
        pixels = _pixels(model, 2, 40 + k)
        alone = model.decode_pixels(pixels, beam_size=k, max_length=12)
        stepped, _ = scheduler.decode(pixels, beam_size=k, max_length=12,
                                      length_penalty=float(model.metadata["length_penalty"]))
        for key, value in alone.items():
            np.testing.assert_array_equal(stepped[key], value, err_msg=key)


def test_a_request_past_the_decode_state_is_refused_without_harming_others(model):
    from captioner.errors import ModelError

    scheduler = BatchScheduler(model, alone_when_idle=False)
    with pytest.raises(ModelError, match="decode state"):
        scheduler.decode(_pixels(model, 1, 0), beam_size=2, max_length=model.max_decode_length + 1,
                         length_penalty=0.6)
    out, _ = scheduler.decode(_pixels(model, 1, 0), beam_size=2, max_length=5, length_penalty=0.6)
    assert out["tokens"].shape[:2] == (1, 2)


# -- the gateway ----------------------------------------------------------------------------------
def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _concurrent_predictions(client, forms: list[dict]) -> list[dict]:
    answers: list = [None] * len(forms)
    start = threading.Barrier(len(forms))

    def post(i):
        start.wait()
        answers[i] = client.post("/predict", data={"file": (io.BytesIO(_png(i)), "x.png"), **forms[i]},
                                 content_type="multipart/form-data").get_json()

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(forms))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers


def _samples(client, name: str) -> float:
    text = client.get("/metrics").data.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


BATCH_SAMPLES = ("captioner_batch_rows_count", "captioner_batch_queue_seconds_count")


def test_gateway_answers_the_same_with_batching_on_and_off(client, repo):
    # The session's gateway does not batch (the default); the same repository served with batching on.
    off = client
    client = create_app(Settings(model_repo=str(repo), poll_seconds=0, log_requests=False, api_key="",
                                 batching=True)).test_client()
    # Greedy and the default beam at the export's length: few new traces, so the test stays cheap.
    forms = [{"algorithm": "greedy"} if i % 3 == 0 else {"algorithm": "beam"} for i in range(8)]
    before = [_samples(client, name) for name in BATCH_SAMPLES]
    batched = _concurrent_predictions(client, forms)
    calls, queued = (_samples(client, name) - b for name, b in zip(BATCH_SAMPLES, before, strict=True))
    # The batch sizes formed and the time queued are in /metrics (how many requests merge depends
    # on when they arrive: the scheduler test above checks the merging itself).
    assert queued == len(forms) and calls >= 1
    alone = _concurrent_predictions(off, forms)
    assert _samples(off, "captioner_batch_queue_seconds_count") == 0
    for on, by_itself in zip(batched, alone, strict=True):
        assert on["caption"] == by_itself["caption"] and on["finished"] == by_itself["finished"]
        assert [n["caption"] for n in on["nbest"]] == [n["caption"] for n in by_itself["nbest"]]
        assert on["score"] == pytest.approx(by_itself["score"], abs=1e-5)


def test_batching_settings_come_from_the_environment():
    settings = Settings.from_env({"CAPTIONER_BATCHING": "off", "CAPTIONER_BATCH_MAX_SIZE": "64",
                                  "CAPTIONER_BATCH_TIMEOUT_MS": "2.5", "CAPTIONER_BATCH_ENCODE_WAIT_MS": "7"})
    assert (settings.batching, settings.batch_max_size, settings.batch_timeout_ms,
            settings.batch_encode_wait_ms) == (False, 64, 2.5, 7.0)
    assert Settings.from_env({}).batching is False
    with pytest.raises(ValueError, match="CAPTIONER_BATCHING='of'"):
        Settings.from_env({"CAPTIONER_BATCHING": "of"})
    with pytest.raises(ValueError, match="CAPTIONER_BATCH_MAX_SIZE"):
        Settings.from_env({"CAPTIONER_BATCH_MAX_SIZE": "0"})
    with pytest.raises(ValueError, match="CAPTIONER_BATCH_TIMEOUT_MS"):
        Settings.from_env({"CAPTIONER_BATCH_TIMEOUT_MS": "-1"})
    with pytest.raises(ValueError, match="CAPTIONER_BATCH_ENCODE_WAIT_MS"):
        Settings.from_env({"CAPTIONER_BATCH_ENCODE_WAIT_MS": "-1"})


_THREADS_PROBE = """
import tensorflow as tf
from captioner.serving.backends import make_backend
from captioner.serving.settings import Settings
backend = make_backend(Settings.from_env(model_repo={repo!r}, poll_seconds=0)).start()
print("threads", tf.config.threading.get_intra_op_parallelism_threads(), backend.ready()[0])
"""


@pytest.mark.parametrize("env,expected", [({}, 1), ({"CAPTIONER_INTRA_OP_THREADS": "2"}, 2),
                                          ({"CAPTIONER_INTRA_OP_THREADS": "0"}, 0)])
def test_intra_op_threads_reach_tensorflow_before_its_runtime_starts(tmp_path, env, expected):
    # A fresh gateway process (as each `captioner serve` worker is): the setting is applied before
    # the model loads; 0 leaves TensorFlow's default (reported as 0).
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    out = subprocess.run([sys.executable, "-c", _THREADS_PROBE.format(repo=str(tmp_path))], capture_output=True,
                         text=True, env={**environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"threads {expected} False" in out.stdout    # (no model in the repository: not ready)


def test_intra_op_threads_cannot_change_a_running_runtime(caplog):
    from captioner.serving.backends import set_intra_op_threads

    tf.constant(1.0) + 1.0     # this test process's runtime runs
    current = tf.config.threading.get_intra_op_parallelism_threads()
    with caplog.at_level("WARNING"):
        assert set_intra_op_threads(current + 3) == current
    assert "not applied" in caplog.text
    assert tf.config.threading.get_intra_op_parallelism_threads() == current
    with pytest.raises(ValueError, match="CAPTIONER_INTRA_OP_THREADS"):
        Settings.from_env({"CAPTIONER_INTRA_OP_THREADS": "-1"})
