"""Where a training step's time goes on Flickr8k (issue #9): cross-entropy steps per architecture,
with and without ``train.group_by_image``, and the parts of an SCST step.

1. ``xe``: seconds per cross-entropy step of ``model.fit`` fed by ``input_pipeline`` (the preset's
   settings, length buckets on, features from the cache), for the default decoder and the one with
   a region encoder (``model.encoder_layers=1``), each grouped by image or not; the settings take
   turns in every round so that they share the machine's drift. Extrapolated to an epoch's steps.
2. ``scst``: one SCST step of the preset (32 images x 5 samples) cut into its parts: drawing the
   samples, their CIDEr-D rewards, and the gradient update; timed over ``--scst-steps`` steps.

    CAPTIONER_CACHE=/work/runs/cache-f8k-r3 .venv/bin/python benchmarks/bench_train_step.py \\
        --data-root ../shared/data/flickr8k --from-run runs/f8k

Prints and writes JSON into benchmarks/results/. Figures, not a test: the step's time depends on the
machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(data_root: str):
    from captioner.config import load_config
    from captioner.train import caption_pairs
    from captioner.workflow import extract_step, load_data, tokenize_step

    cfg = load_config("flickr8k", [f"data.root={data_root}"])
    dataset = load_data(cfg)
    scratch = Path(tempfile.mkdtemp(prefix="bench-train-step-"))
    try:
        tokenizer = tokenize_step(cfg, dataset, scratch)
        store = extract_step(cfg, dataset, progress=False)
        pairs = caption_pairs(dataset, "train", tokenizer, store, cfg.tokenizer.max_length)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return cfg, dataset, tokenizer, pairs


def bench_xe(cfg, tokenizer, pairs, steps: int, rounds: int) -> dict:
    import keras

    from captioner.config import with_overrides
    from captioner.model.captioner import build_model
    from captioner.tracking import set_global_seed
    from captioner.train import compile_model, input_pipeline

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    regions, dim = pairs.features.shape[1:]
    per_epoch = -(-len(pairs.image_index) // cfg.train.batch_size)
    settings = [(encoder, grouped) for encoder in (0, 1) for grouped in (False, True)]
    seconds: dict[str, list[float]] = {}
    for _ in range(rounds):
        for encoder, grouped in settings:
            name = f"encoder_layers={encoder} group_by_image={str(grouped).lower()}"
            run_cfg = with_overrides(cfg, {"model": {"encoder_layers": encoder}})
            set_global_seed(cfg.train.seed)
            model = build_model(tokenizer.vocab_size, regions, dim, run_cfg.model)
            compile_model(model, run_cfg, per_epoch)
            data = input_pipeline(pairs, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                                  length_buckets=cfg.train.length_buckets, group_by_image=grouped)
            clock, warm = Clock(), 5
            model.fit(data.take(steps + warm), epochs=1, verbose=0, callbacks=[clock])
            seconds.setdefault(name, []).append((clock.times[-1] - clock.times[warm - 1]) / steps)
            print(f"xe {name}: {seconds[name][-1] * 1e3:.0f} ms/step", flush=True)
    return {"steps": steps, "rounds": rounds, "batch_size": cfg.train.batch_size, "steps_per_epoch": per_epoch,
            "length_buckets": cfg.train.length_buckets,
            "ms_per_step": {k: [round(s * 1e3, 1) for s in v] for k, v in seconds.items()},
            "train_seconds_per_epoch": {k: round(statistics.median(v) * per_epoch, 1) for k, v in seconds.items()}}


def bench_scst(cfg, dataset, tokenizer, pairs, steps: int, from_run: Path | None) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from captioner.model.captioner import build_model
    from captioner.scst import (
        RewardFunction,
        sampler,
        self_critical_advantages,
        sequence_log_probs,
        teacher_forcing_rows,
        training_references,
    )

    sc = cfg.scst
    max_length = sc.max_length or cfg.decode.max_length
    regions, dim = pairs.features.shape[1:]
    if from_run is not None:  # a trained model draws captions of realistic length
        from captioner.train import load_trained

        model, tokenizer, _ = load_trained(from_run)
    else:
        model = build_model(tokenizer.vocab_size, regions, dim, cfg.model)
    reward_fn = RewardFunction(training_references(dataset, pairs.images), tokenizer, max_length)
    sample = sampler(model, sc.samples, max_length)
    optimizer = keras.optimizers.Adam(learning_rate=sc.learning_rate, global_clipnorm=cfg.train.clip_norm or None)
    optimizer.build(model.trainable_variables)

    @tf.function(reduce_retracing=True)
    def update(features, inputs, targets, advantages):
        with tf.GradientTape() as tape:
            log_probs = sequence_log_probs(model, features, inputs, targets, repeats=sc.samples)
            tokens = tf.reduce_sum(tf.cast(tf.not_equal(targets, 0), tf.float32))
            loss = -tf.reduce_sum(log_probs * advantages[:, None]) / tokens
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    order = np.random.default_rng(0).permutation(len(pairs.images))
    parts = {"sample": 0.0, "reward": 0.0, "update": 0.0}
    warm = 3
    for step in range(steps + warm):
        if step == warm:
            parts = dict.fromkeys(parts, 0.0)
        index = order[step * sc.batch_images:(step + 1) * sc.batch_images]
        features = tf.constant(pairs.features[index])
        start = time.perf_counter()
        drawn = sample(features, tf.constant([1, step])).numpy()
        parts["sample"] += time.perf_counter() - start
        start = time.perf_counter()
        advantages = self_critical_advantages(reward_fn(index, drawn)).reshape(-1).astype(np.float32)
        parts["reward"] += time.perf_counter() - start
        start = time.perf_counter()
        inputs, targets = teacher_forcing_rows(drawn)
        float(update(features, tf.constant(inputs), tf.constant(targets), tf.constant(advantages)))
        parts["update"] += time.perf_counter() - start
    per_epoch = -(-len(pairs.images) // sc.batch_images)
    return {"steps": steps, "batch_images": sc.batch_images, "samples": sc.samples, "steps_per_epoch": per_epoch,
            "ms_per_step": {k: round(v / steps * 1e3, 1) for k, v in parts.items()},
            "seconds_per_epoch": {k: round(v / steps * per_epoch, 1) for k, v in parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    parser.add_argument("--steps", type=int, default=60, help="timed cross-entropy steps per setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scst-steps", type=int, default=30)
    parser.add_argument("--from-run", type=Path, default=None,
                        help="a trained run of the preset (its vocabulary) for the SCST part; default: a new model")
    parser.add_argument("--only", choices=("xe", "scst"))
    args = parser.parse_args()
    if not Path(args.data_root).is_dir():
        sys.exit(f"no data at {args.data_root}: pass --data-root")
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    results: dict = {"cache": os.environ.get("CAPTIONER_CACHE"), "started": stamp}
    cfg, dataset, tokenizer, pairs = load(args.data_root)
    if args.only in (None, "xe"):
        results["xe"] = bench_xe(cfg, tokenizer, pairs, args.steps, args.rounds)
    if args.only in (None, "scst"):
        results["scst"] = bench_scst(cfg, dataset, tokenizer, pairs, args.scst_steps, args.from_run)
        results["scst"]["from_run"] = str(args.from_run) if args.from_run else None
    print(json.dumps(results, indent=2))
    out = ROOT / "benchmarks" / "results" / f"train-step-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
