"""Choosing the beam search length penalty on dev (``workflow.tune_length_penalty``) with the smoke run's model."""

import pytest
import tensorflow as tf

from captioner.config import LENGTH_PENALTY_GRID, with_overrides
from captioner.evaluate import quick_bleu4
from captioner.model.decoding import decode
from captioner.scst import corpus_cider
from captioner.train import load_trained
from captioner.workflow import extract_step, load_data, tune_length_penalty

# It reuses the session's smoke training run, so it belongs with the tests that drive the CLI.
pytestmark = pytest.mark.integration


@pytest.mark.parametrize("metric", ["bleu4", "cider"])
def test_tune_length_penalty_picks_the_best_dev_score(smoke_run, metric):
    out, cfg = smoke_run
    # With the smoke config's 2 beams every penalty gives the same captions; with 5 they differ
    # (dev BLEU-4 0.260 at 0.0, 0.284 at 0.3, 0.284 from 0.6 on when this was written).
    cfg = with_overrides(cfg, {"decode": {"beam_size": 5, "tune_metric": metric}})
    model, tokenizer, _ = load_trained(out)
    data = load_data(cfg)
    store = extract_step(cfg, data, progress=False)

    alpha, grid = tune_length_penalty(model, tokenizer, store, data, cfg, progress=False)

    # Each candidate's dev BLEU-4, decoded here without the workflow's batching and tf.function.
    dev = data.splits["dev"]
    features = tf.constant(store.load(dev))
    expected = {}
    for candidate in LENGTH_PENALTY_GRID:
        tokens = decode(model, model.encode(features), beam_size=cfg.decode.beam_size,
                        max_length=cfg.decode.max_length, length_penalty=candidate)["tokens"][:, 0].numpy()
        hyps = {image: tokenizer.decode(ids) for image, ids in zip(dev, tokens, strict=True)}
        score = quick_bleu4 if metric == "bleu4" else corpus_cider
        expected[str(candidate)] = score(data.split_captions("dev"), hyps)
    assert grid == pytest.approx(expected, abs=1e-9)
    assert len(set(expected.values())) > 1  # the penalty changes this score, so the choice is tested
    assert alpha in LENGTH_PENALTY_GRID and grid[str(alpha)] == max(expected.values())
    # On ties the first (smallest) penalty of the grid wins, so the choice is reproducible.
    assert alpha == next(a for a in LENGTH_PENALTY_GRID if expected[str(a)] == max(expected.values()))
