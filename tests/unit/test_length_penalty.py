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


# The default grid, and decode.length_penalty_grid given unsorted, past the default's top.
@pytest.mark.parametrize(("metric", "grid_setting"), [("bleu4", None), ("cider", [2.1, 0.0, 1.2])])
def test_tune_length_penalty_picks_the_best_dev_score(smoke_run, metric, grid_setting):
    out, cfg = smoke_run
    # With the smoke config's 2 beams every penalty gives the same captions; with 5 they differ
    # (dev BLEU-4 0.260 at 0.0, 0.284 at 0.3, 0.284 from 0.6 on when this was written).
    decode_settings = {"beam_size": 5, "tune_metric": metric}
    if grid_setting is not None:
        decode_settings["length_penalty_grid"] = grid_setting
    cfg = with_overrides(cfg, {"decode": decode_settings})
    candidates = sorted(grid_setting) if grid_setting is not None else list(LENGTH_PENALTY_GRID)
    model, tokenizer, _ = load_trained(out)
    data = load_data(cfg)
    store = extract_step(cfg, data, progress=False)

    alpha, grid = tune_length_penalty(model, tokenizer, store, data, cfg, progress=False)

    # Each candidate's dev BLEU-4, decoded here without the workflow's batching and tf.function.
    dev = data.splits["dev"]
    features = tf.constant(store.load(dev))
    expected = {}
    for candidate in candidates:
        tokens = decode(model, model.encode(features), beam_size=cfg.decode.beam_size,
                        max_length=cfg.decode.max_length, length_penalty=candidate,
                        no_repeat_ngram_size=cfg.decode.no_repeat_ngram_size)["tokens"][:, 0].numpy()
        hyps = {image: tokenizer.decode(ids) for image, ids in zip(dev, tokens, strict=True)}
        score = quick_bleu4 if metric == "bleu4" else corpus_cider
        expected[candidate] = score(data.split_captions("dev"), hyps)
    assert grid == pytest.approx({str(float(a)): v for a, v in expected.items()}, abs=1e-9)
    assert len(set(expected.values())) > 1  # the penalty changes this score, so the choice is tested
    assert alpha in candidates and grid[str(float(alpha))] == max(expected.values())
    # On ties the first (smallest) penalty of the grid wins, so the choice is reproducible.
    assert alpha == next(a for a in candidates if expected[a] == max(expected.values()))
