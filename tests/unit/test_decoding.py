import math

import numpy as np
import pytest
import tensorflow as tf

from captioner.config import ModelConfig
from captioner.model.captioner import build_model
from captioner.model.decoding import beam_search, decode, greedy_search

pytestmark = pytest.mark.unit

# A Markov "model": the next-token distribution depends on the last token only.
# Words are ids 4.. (0-3 are <pad>, <start>, <end>, <unk>: never generated, <end> not first).
# Greedy takes 4 (0.5) then <end> (0.4) = 0.20; the better caption is 5 (0.4) then <end> (0.9) = 0.36.
TABLE = np.full((7, 7), 1e-9)
TABLE[1, [4, 5, 2]] = [0.5, 0.4, 0.1]
TABLE[4, [6, 5, 2]] = [0.3, 0.3, 0.4]
TABLE[5, [2, 6]] = [0.9, 0.1]
TABLE[6, [2]] = [1.0]
LOG = tf.constant(np.log(TABLE / TABLE.sum(1, keepdims=True)), tf.float32)


def markov_step(tokens, state, t=None):
    rows = tf.shape(tokens)[0]
    attention = tf.one_hot(tf.fill([rows], 0), 4)
    return tf.gather(LOG, tokens), attention, state


def test_beam_finds_the_better_caption_greedy_misses():
    state = tf.zeros([2, 1])
    greedy = greedy_search(markov_step, state[:1], 1, 10, 4)
    assert greedy["tokens"].numpy().tolist() == [[4, 2]]
    assert greedy["scores"].numpy()[0] == pytest.approx(math.log(0.2), abs=1e-4)
    beam = beam_search(markov_step, state, 1, 2, 10, 4, length_penalty=0.0)
    assert beam["tokens"].numpy()[0, 0].tolist() == [5, 2]
    assert beam["scores"].numpy()[0].tolist() == pytest.approx([math.log(0.36), math.log(0.2)], abs=1e-4)
    assert beam["attention"].shape == (1, 2, 2, 4)


def test_beam_runs_in_graph_mode_too():
    run = tf.function(lambda s: beam_search(markov_step, s, 1, 2, 10, 4, length_penalty=0.0))
    assert run(tf.zeros([2, 1]))["tokens"].numpy()[0, 0].tolist() == [5, 2]


def test_max_length_cuts_unfinished_captions():
    out = greedy_search(markov_step, tf.zeros([1, 1]), 1, 1, 4)
    assert out["tokens"].numpy().tolist() == [[4]] and out["lengths"].numpy().tolist() == [1]
    assert out["finished"].numpy().tolist() == [False]
    assert greedy_search(markov_step, tf.zeros([1, 1]), 1, 10, 4)["finished"].numpy().tolist() == [True]


# Toy tables for beam search: next-token probabilities given the last token; any pair not listed
# gets 1e-9. The state is each row's table index, so one batch can hold images with different tables.
PAD, START, END = 0, 1, 2
A, B, C, D, E, F, G, H, L, M, N, S, X, Y, Z = range(4, 19)  # after <unk> (3)
VOCAB = 19


def table(rows):
    probs = np.full((VOCAB, VOCAB), 1e-9)
    for prev, nxt in rows.items():
        for token, p in nxt.items():
            probs[prev, token] = p
    return np.log(probs / probs.sum(1, keepdims=True))


# Eviction: A <end> (0.2) finishes at t=1, then B C E and B C H (0.234, 0.216) both outscore it on raw
# log-probability, so a search without a finished pool drops it and answers B C E <end> (0.1872).
EVICT = table({START: {B: .5, A: .4, F: .1}, A: {END: .5, D: .4, G: .1}, B: {C: .9, F: .1},
               C: {E: .52, H: .48}, E: {END: .8, F: .2}, H: {END: .6, E: .4}, D: {END: 1.0},
               F: {END: 1.0}, G: {END: 1.0}})
# A cheap loop: L and M follow each other with 0.98 and end with 0.02, so two looping beams always lead
# every caption that ends; the only good caption is A <end> (0.18).
LOOP = table({START: {L: .6, A: .3, B: .1}, A: {END: .6, L: .4}, L: {L: .5, M: .48, END: .02},
              M: {M: .5, L: .48, END: .02}, B: {END: 1.0}})
# Length penalty decides: S <end> (0.28, 2 tokens), L M Y <end> (0.2738, 4), L N Z <end> (0.2184, 4);
# S <end> is outscored at t=1 by L M and L N (0.338, 0.312).
PENALTY = table({START: {L: .65, S: .35}, S: {END: .8, X: .2}, X: {END: 1.0}, L: {M: .52, N: .48},
                 M: {Y: .9, END: .1}, Y: {END: .9, X: .1}, N: {END: .3, Z: .7}, Z: {END: 1.0}})
# <end> never makes the best 2k candidates: nothing finishes.
NO_END = table({START: {L: .7, M: .3}, L: {L: .6, M: .4}, M: {L: .4, M: .6}})
TABLES = tf.constant(np.stack([EVICT, LOOP, PENALTY, NO_END]), tf.float32)
EVICT_ID, LOOP_ID, PENALTY_ID, NO_END_ID = range(4)


def table_step(tokens, state, t):
    log_probs = tf.gather_nd(TABLES, tf.stack([state[:, 0], tokens], axis=-1))
    return log_probs, tf.one_hot(tokens % 4, 4), state


def beams(tables, k=2, max_length=12, alpha=0.0):
    state = tf.repeat(tf.constant(tables, tf.int32)[:, None], k, axis=0)
    out = beam_search(table_step, state, len(tables), k, max_length, 4, length_penalty=alpha)
    return {key: value.numpy() for key, value in out.items()}


def caption(out, b, k):
    """Tokens of result k of image b up to and including <end>."""
    ids = out["tokens"][b, k].tolist()
    return ids[: ids.index(END) + 1] if END in ids else [i for i in ids if i != PAD]


def lp(length, alpha):
    return ((5 + length) / 6) ** alpha


def test_a_finished_caption_is_never_evicted_by_live_beams():
    out = beams([EVICT_ID])
    assert [caption(out, 0, 0), caption(out, 0, 1)] == [[A, END], [B, C, E, END]]
    assert out["scores"][0] == pytest.approx([math.log(.2), math.log(.5 * .9 * .52 * .8)], abs=1e-4)
    assert out["finished"][0].tolist() == [True, True]
    assert out["lengths"][0].tolist() == [2, 4]
    # The padded tail of the shorter caption is <pad> with no attention.
    assert out["tokens"][0, 0, 2:].tolist() == [PAD] * (out["tokens"].shape[2] - 2)
    assert not out["attention"][0, 0, 2:].any() and out["attention"][0, 0, :2].sum() == pytest.approx(2)


def test_a_cheap_loop_does_not_beat_a_finished_caption():
    out = beams([LOOP_ID], max_length=12)
    assert caption(out, 0, 0) == [A, END] and out["finished"][0].tolist() == [True, False]
    assert out["scores"][0, 0] == pytest.approx(math.log(.18), abs=1e-4)
    # Fewer than k finished: the place left is the best unfinished loop, cut at max_length.
    assert out["tokens"][0, 1].tolist() == [L] * 12 and out["lengths"][0].tolist() == [2, 12]
    assert out["scores"][0, 1] == pytest.approx(math.log(.6 * .5 ** 11), abs=1e-3)


@pytest.mark.parametrize("alpha, expected", [
    (0.0, [([S, END], .28, 2), ([L, M, Y, END], .65 * .52 * .9 * .9, 4)]),
    (0.6, [([L, M, Y, END], .65 * .52 * .9 * .9, 4), ([S, END], .28, 2)]),
    (1.0, [([L, M, Y, END], .65 * .52 * .9 * .9, 4), ([L, N, Z, END], .65 * .48 * .7, 4)]),
])
def test_length_penalty_ranks_finished_captions(alpha, expected):
    # Normalised (alpha 0.6): S <end> -1.160, L M Y <end> -1.016, L N Z <end> -1.193;
    # (alpha 1.0): -1.091, -0.864, -1.014.
    out = beams([PENALTY_ID], alpha=alpha)
    assert [caption(out, 0, k) for k in range(2)] == [e[0] for e in expected]
    assert out["scores"][0] == pytest.approx([math.log(p) / lp(n, alpha) for _, p, n in expected], abs=1e-4)
    assert out["log_probs"][0] == pytest.approx([math.log(p) for _, p, _ in expected], abs=1e-4)
    assert out["finished"][0].all()


def test_nothing_finished_returns_unfinished_captions_marked():
    out = beams([NO_END_ID], max_length=5, alpha=0.6)
    assert out["tokens"][0].tolist() == [[L] * 5, [L] * 4 + [M]]
    assert out["finished"][0].tolist() == [False, False] and out["lengths"][0].tolist() == [5, 5]
    assert out["scores"][0] == pytest.approx(
        [math.log(.7 * .6 ** 4) / lp(5, .6), math.log(.7 * .6 ** 3 * .4) / lp(5, .6)], abs=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_batched_tables_equal_one_image_at_a_time(alpha):
    images = [EVICT_ID, LOOP_ID, PENALTY_ID, NO_END_ID]
    batched = beams(images, alpha=alpha)
    if alpha == 0.0:
        assert caption(batched, 0, 0) == [A, END]
    for b, image in enumerate(images):
        single = beams([image], alpha=alpha)
        steps = single["tokens"].shape[2]
        np.testing.assert_array_equal(batched["tokens"][b, :, :steps], single["tokens"][0])
        assert not batched["tokens"][b, :, steps:].any() and not batched["attention"][b, :, steps:].any()
        np.testing.assert_array_equal(batched["attention"][b, :, :steps], single["attention"][0])
        for key in ("finished", "lengths"):
            np.testing.assert_array_equal(batched[key][b], single[key][0])
        for key in ("scores", "log_probs"):
            np.testing.assert_allclose(batched[key][b], single[key][0], atol=1e-5)


def test_beam_search_in_graph_mode_equals_eager():
    images = [EVICT_ID, LOOP_ID, PENALTY_ID, NO_END_ID]
    state = tf.repeat(tf.constant(images, tf.int32)[:, None], 2, axis=0)
    run = tf.function(lambda s, n: beam_search(table_step, s, n, 2, 12, 4, length_penalty=0.6),
                      input_signature=[tf.TensorSpec([None, 1], tf.int32), tf.TensorSpec([], tf.int32)])
    graph = {key: value.numpy() for key, value in run(state, tf.constant(len(images))).items()}
    eager = beams(images, alpha=0.6)
    assert set(graph) == set(eager) == {"tokens", "scores", "log_probs", "lengths", "attention", "finished"}
    for key in graph:
        np.testing.assert_allclose(graph[key], eager[key], atol=1e-5)
    assert graph["finished"].tolist() == [[True, True], [True, False], [True, True], [False, False]]


def test_results_carry_only_finished_captions_and_mark_unfinished_ones():
    from captioner.predictor import results_from_decode

    vocab = ["<pad>", "<start>", "<end>", "<unk>", *"abcdefghlmnsxyz"]
    loop, no_end = results_from_decode(beams([LOOP_ID, NO_END_ID], max_length=5), vocab, with_attention=True)
    # The loop image: one caption finished, so the unfinished runner-up is not in the n-best list.
    assert (loop.caption, loop.finished, [c for c, _ in loop.nbest]) == ("a", True, ["a"])
    assert loop.attention.shape == (1, 4) and loop.to_dict()["finished"] is True
    assert (no_end.caption, no_end.finished) == ("l l l l l", False)
    assert [c for c, _ in no_end.nbest] == ["l l l l l", "l l l l m"]
    assert no_end.to_dict()["finished"] is False


@pytest.fixture(scope="module")
def model():
    tf.random.set_seed(1)
    return build_model(40, 9, 12, ModelConfig(d_model=32, num_layers=2, num_heads=4, ff_dim=64, dropout=0.0,
                                              feature_dropout=0.0))


def test_step_by_step_equals_teacher_forcing(model):
    features = tf.constant(np.random.default_rng(1).normal(size=(2, 9, 12)), tf.float32)
    memory = model.encode(features)
    tokens = tf.constant([[1, 7, 9, 11, 13], [1, 4, 5, 6, 8]])
    full = tf.nn.log_softmax(model.decode(memory, tokens), axis=-1)
    state, cross = model.initial_state(2, 8), model.cross_memory(memory)  # 3 slots never written
    for t in range(tokens.shape[1]):
        log_probs, attention, state = model.step(cross, tokens[:, t], state, tf.fill([2], t))
        np.testing.assert_allclose(log_probs.numpy(), full[:, t].numpy(), atol=1e-4)
        np.testing.assert_allclose(attention.numpy().sum(-1), 1.0, atol=1e-5)
    assert state.shape == (2, 4, 8, 32)


def test_batched_beams_equal_one_image_at_a_time(model):
    memory = model.encode(tf.constant(np.random.default_rng(2).normal(size=(3, 9, 12)), tf.float32))
    batched = decode(model, memory, beam_size=3, max_length=8)
    for i in range(3):
        single = decode(model, memory[i:i + 1], beam_size=3, max_length=8)
        steps = single["tokens"].shape[2]
        np.testing.assert_array_equal(single["tokens"][0].numpy(), batched["tokens"][i, :, :steps].numpy())
        np.testing.assert_allclose(single["scores"][0].numpy(), batched["scores"][i].numpy(), atol=1e-4)


def test_a_beam_of_one_follows_greedy_and_keeps_the_best_ending(model):
    """With one beam, the live beam is greedy's path (while greedy does not end), and the pool keeps the
    best caption that ended on the way: greedy's own or that path cut short by <end>."""
    memory = model.encode(tf.constant(np.random.default_rng(3).normal(size=(3, 9, 12)), tf.float32))
    greedy = {k: v.numpy()[:, 0] for k, v in decode(model, memory, beam_size=1, max_length=8).items()}
    cross = model.cross_memory(memory)
    one = beam_search(lambda tok, st, t: model.step(cross, tok, st, t), model.initial_state(3), 3, 1, 8, 9,
                      length_penalty=0.0)
    one = {k: v.numpy()[:, 0] for k, v in one.items()}
    for b in range(3):
        path = greedy["tokens"][b, : greedy["lengths"][b]].tolist()
        mine = one["tokens"][b, : one["lengths"][b]].tolist()
        if mine != path:
            assert one["finished"][b] and mine[-1] == END and mine[:-1] == path[: len(mine) - 1]
        if greedy["finished"][b]:
            assert one["finished"][b] and one["log_probs"][b] >= greedy["log_probs"][b] - 1e-5
    assert decode(model, memory, beam_size=2, max_length=8)["tokens"].shape[:2] == (3, 2)
    assert greedy["finished"].shape == (3,)


def test_mixed_precision_model_decodes_in_float32():
    import keras

    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        mp = build_model(30, 9, 12, ModelConfig(d_model=32, num_layers=1, num_heads=4, ff_dim=64))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert mp.project.compute_dtype == "float16"
    memory = mp.encode(tf.random.normal([2, 9, 12]))
    log_probs, attention, state = mp.step(mp.cross_memory(memory), tf.constant([1, 1]), mp.initial_state(2))
    assert log_probs.dtype == tf.float32 and np.isfinite(log_probs.numpy()).all()


# Randomised check against exhaustive search: 3 words and <end> after the special ids the search masks
# (<pad>, <start> and <unk> never generated, <end> not first). With max_length 4 there are 3 + 9 + 27 = 39
# finished captions; a beam of 64 is exact: at the last step its best 2k = 128 candidates hold all
# 27 x 4 continuations and endings, and no earlier step has more than 27 live prefixes to keep.
RANDOM_WORDS = (4, 5, 6)  # captioner.constants: PAD, START, END, UNK = 0..3, none of them a word
RANDOM_VOCAB, RANDOM_MAX_LENGTH, RANDOM_BEAM = 7, 4, 64


def random_markov_tables(count: int, seed: int) -> np.ndarray:
    """``count`` tables of next-token log-probabilities given the last token; <end> is drawn rarer than the
    words (Dirichlet 0.2 against 1) so that with this seed the best caption has 1, 2 or 3 words in
    different tables. <pad> and <start> get 1e-9, as in ``table``."""
    from captioner.constants import END_ID

    rng = np.random.default_rng(seed)
    probs = np.full((count, RANDOM_VOCAB, RANDOM_VOCAB), 1e-9)
    allowed = [END_ID, *RANDOM_WORDS]
    probs[:, :, allowed] = rng.dirichlet([0.2, 1.0, 1.0, 1.0], size=(count, RANDOM_VOCAB))
    return np.log(probs / probs.sum(-1, keepdims=True))


def exhaustive_finished(log_table: np.ndarray, alpha: float) -> dict[tuple[int, ...], float]:
    """Every finished caption (1 to max_length - 1 words, then <end>) with its length-normalised score."""
    import itertools

    from captioner.constants import END_ID, START_ID
    from captioner.model.decoding import length_normalizer

    scores = {}
    for words in range(1, RANDOM_MAX_LENGTH):
        for prefix in itertools.product(RANDOM_WORDS, repeat=words):
            caption = (*prefix, END_ID)
            path = (START_ID, *caption)
            raw = sum(float(log_table[a, b]) for a, b in zip(path[:-1], path[1:], strict=True))
            scores[caption] = raw / float(length_normalizer(len(caption), alpha))
    return scores


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_equals_exhaustive_search_on_random_tables(alpha):
    tables = random_markov_tables(20, seed=2024)
    lookup = tf.constant(tables, tf.float32)

    def step(tokens, state, t):
        log_probs = tf.gather_nd(lookup, tf.stack([state[:, 0], tokens], axis=-1))
        return log_probs, tf.one_hot(tokens % 4, 4), state

    state = tf.repeat(tf.range(len(tables), dtype=tf.int32)[:, None], RANDOM_BEAM, axis=0)
    out = beam_search(step, state, len(tables), RANDOM_BEAM, RANDOM_MAX_LENGTH, 4, length_penalty=alpha)
    out = {key: value.numpy() for key, value in out.items()}
    for b, log_table in enumerate(tables):
        exhaustive = exhaustive_finished(log_table, alpha)
        ranked = sorted(exhaustive.values(), reverse=True)
        best = max(exhaustive, key=exhaustive.get)
        found = tuple(caption(out, b, 0))
        assert out["finished"][b, 0], b
        assert out["scores"][b, 0] == pytest.approx(ranked[0], abs=1e-4), (b, found, best)
        # float32 against float64: on a near-tie either caption is a right answer.
        if ranked[0] - ranked[1] > 1e-4:
            assert found == best, (b, found, best, ranked[:2])
        else:
            assert exhaustive[found] == pytest.approx(ranked[0], abs=1e-4), (b, found, best)
        # An exact beam also ranks every finished caption: all 39 come first, best first.
        n = len(exhaustive)
        assert out["finished"][b, :n].all() and not out["finished"][b, n:].any(), b
        assert {tuple(caption(out, b, k)) for k in range(n)} == set(exhaustive), b
        np.testing.assert_allclose(out["scores"][b, :n], ranked, atol=1e-4)


def test_unknown_token_is_never_generated():
    """<unk> is the likeliest first token here, and after the first word; neither search emits it, and
    greedy's score compares with beam's (both length-normalised)."""
    from captioner.constants import UNK_ID

    probs = np.full((7, 7), 1e-9)
    probs[1, [UNK_ID, 4, 5]] = [0.7, 0.2, 0.1]
    probs[4, [UNK_ID, 2]] = [0.6, 0.4]
    probs[5, [2]] = [1.0]
    log = tf.constant(np.log(probs / probs.sum(1, keepdims=True)), tf.float32)

    def step(tokens, state, t=None):
        return tf.gather(log, tokens), tf.one_hot(tf.zeros_like(tokens), 4), state

    greedy = greedy_search(step, tf.zeros([1, 1]), 1, 10, 4, length_penalty=0.6)
    assert greedy["tokens"].numpy().tolist() == [[4, 2]]
    assert greedy["log_probs"].numpy()[0] == pytest.approx(math.log(0.2 * 0.4), abs=1e-4)
    assert greedy["scores"].numpy()[0] == pytest.approx(math.log(0.2 * 0.4) / ((5 + 2) / 6) ** 0.6, abs=1e-4)
    beam = beam_search(step, tf.zeros([3, 1]), 1, 3, 10, 4, length_penalty=0.6)
    assert UNK_ID not in beam["tokens"].numpy().ravel().tolist()
    # Beam finds "5 <end>" (0.1 against greedy's 0.08); greedy's caption is its runner-up, with the same score.
    assert beam["tokens"].numpy()[0, :2, :2].tolist() == [[5, 2], [4, 2]]
    assert beam["scores"].numpy()[0, 0] == pytest.approx(math.log(0.1) / ((5 + 2) / 6) ** 0.6, abs=1e-4)
    assert beam["scores"].numpy()[0, 1] == pytest.approx(greedy["scores"].numpy()[0], abs=1e-4)


def test_length_penalties_are_computed_once_and_shared_read_only(monkeypatch):
    """Every request's search needs the penalty table and its result the normalisers: cached (the
    gateway's callers were spending ~7 ms of eager ops per request on them), with the bits of a
    fresh computation, and read-only so that no search can change another's."""
    from captioner.model import decoding as D
    from captioner.predictor import _normalizer

    lengths = np.array([[3, 0, 7], [20, 1, 3]], np.int32)
    for alpha in (0.0, 0.6, 1.2):
        fresh = D.length_normalizer(np.maximum(lengths, 1), alpha).numpy()
        assert _normalizer(lengths, alpha).tobytes() == fresh.tobytes()
        table = D.penalties(20, alpha)
        assert table.tobytes() == np.array([D.length_normalizer(tf.constant(n), alpha).numpy()
                                            for n in range(23)], np.float32).tobytes()
        assert not table.flags.writeable and not _normalizer(lengths, alpha).flags.writeable
    calls = []
    original = D.length_normalizer
    monkeypatch.setattr(D, "length_normalizer", lambda *a: calls.append(a) or original(*a))
    D.penalties(20, 0.6), _normalizer(lengths, 0.6), _normalizer(lengths.copy(), 0.6)
    assert calls == []
    _normalizer(lengths[:1], 0.6)  # another shape: computed on it, as the graph computes it
    assert len(calls) == 1


# -- n-gram blocking ------------------------------------------------------------------------------
def test_repeat_mask_bans_what_would_repeat_an_ngram_hand_checked():
    from captioner.model.decoding import NEG_INF, repeat_mask, repeat_mask_np

    tokens = np.array([[5, 6, 7, 5, 6], [5, 6, 5, 7, 5], [5, 6, 7, 8, 9], [4, 4, 4, 4, 4]], np.int32)
    banned = {2: [[7], [6, 7], [], [4]], 3: [[7], [], [], [4]], 4: [[], [], [], [4]]}
    for n, expected in banned.items():
        graph = repeat_mask(tf.constant(tokens), n, 10).numpy()
        assert [np.flatnonzero(row).tolist() for row in graph] == expected, n
        assert set(np.unique(graph)) <= {0.0, np.float32(NEG_INF)}
        np.testing.assert_array_equal(repeat_mask_np(tokens, np.full([4], 5), n, 10), graph)
    # Shorter histories than n, and an empty one: nothing to repeat yet.
    assert not repeat_mask(tf.constant(tokens[:, :1]), 2, 10).numpy().any()
    assert not repeat_mask(tf.zeros([2, 0], tf.int32), 3, 10).numpy().any()
    assert not repeat_mask(tf.constant(tokens), 0, 10).numpy().any()


def test_repeat_mask_np_reads_each_row_to_its_own_length():
    # The gateway's batched searches keep histories in max_length buffers, each row at its own
    # position: the NumPy mask of a row's first `length` tokens is the graph mask of those tokens.
    from captioner.model.decoding import repeat_mask, repeat_mask_np

    rng = np.random.default_rng(7)
    tokens = rng.integers(4, 8, (40, 12)).astype(np.int32)
    lengths = rng.integers(0, 13, 40)
    for n in (1, 2, 3):
        mine = repeat_mask_np(tokens, lengths, n, 9)
        for row, length in enumerate(lengths):
            graph = repeat_mask(tf.constant(tokens[row:row + 1, :length]), n, 9).numpy()[0]
            np.testing.assert_array_equal(mine[row], graph, err_msg=f"n={n} row={row}")
    assert mine.any()


# A model that loops "a b a b ...": b follows a (0.6), a follows b (0.7); c (0.3 after a) leads to <end>.
LOOP = np.full((7, 7), 1e-9)
LOOP[1, [4]] = [1.0]
LOOP[4, [5, 6, 2]] = [0.6, 0.3, 0.1]
LOOP[5, [4, 2]] = [0.7, 0.3]
LOOP[6, [2]] = [1.0]
LOOP_LOG = tf.constant(np.log(LOOP / LOOP.sum(1, keepdims=True)), tf.float32)


def loop_step(tokens, state, t=None):
    return tf.gather(LOOP_LOG, tokens), tf.one_hot(tf.fill([tf.shape(tokens)[0]], 0), 4), state


def _repeats(ids, n: int) -> bool:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


def test_greedy_and_beam_never_repeat_a_blocked_ngram():
    loose = greedy_search(loop_step, tf.zeros([1, 1]), 1, 9, 4)["tokens"].numpy()[0].tolist()
    assert loose == [4, 5, 4, 5, 4, 5, 4, 5, 4]  # the loop, cut at max_length
    blocked = greedy_search(loop_step, tf.zeros([1, 1]), 1, 9, 4, no_repeat_ngram_size=2)
    assert blocked["tokens"].numpy()[0].tolist() == [4, 5, 4, 6, 2]  # "a b a" then b is banned: c, <end>
    assert blocked["finished"].numpy().tolist() == [True]
    for n in (2, 3):
        beam = beam_search(loop_step, tf.zeros([3, 1]), 1, 3, 12, 4, length_penalty=3.0, no_repeat_ngram_size=n)
        for ids, finished in zip(beam["tokens"].numpy()[0], beam["finished"].numpy()[0], strict=True):
            words = [i for i in ids.tolist() if i not in (0, 2)]
            assert finished and not _repeats(words, n), (n, ids)
    unblocked = beam_search(loop_step, tf.zeros([3, 1]), 1, 3, 12, 4, length_penalty=3.0)
    assert any(_repeats([i for i in ids.tolist() if i not in (0, 2)], 2) for ids in unblocked["tokens"].numpy()[0])
