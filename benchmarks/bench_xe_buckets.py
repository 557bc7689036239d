"""Cross-entropy training with and without ``train.length_buckets`` on Flickr8k (issue #9).

Two measurements, each made back to back for both settings so that they share the machine's load:

1. ``steps``: XE steps/s of ``model.fit`` fed by ``input_pipeline`` (features from the cache), in the
   order on, off, on, off (bracketing drift); after a few warm-up steps that include the tracing.
2. ``runs``: ``captioner train --config flickr8k`` for ``--epochs`` epochs with each setting (no
   SCST, no export, evaluation on dev): ``metrics.csv``'s epoch seconds (training, validation loss,
   greedy dev decode), ``val_loss``, dev BLEU-4 / CIDEr-D, and the run's beam evaluation on dev.

    CAPTIONER_CACHE=/work/runs/cache-f8k-r3 .venv/bin/python benchmarks/bench_xe_buckets.py \\
        --data-root ../shared/data/flickr8k

Prints and writes JSON into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPTIONER = Path(sys.executable).parent / "captioner"


def bench_steps(data_root: str, steps: int, rounds: int) -> dict:
    import keras
    import numpy as np

    from captioner.config import load_config
    from captioner.model.captioner import build_model
    from captioner.tracking import set_global_seed
    from captioner.train import caption_lengths, caption_pairs, compile_model, epoch_batches, input_pipeline
    from captioner.workflow import extract_step, load_data, tokenize_step

    cfg = load_config("flickr8k", [f"data.root={data_root}"])
    dataset = load_data(cfg)
    scratch = Path(tempfile.mkdtemp(prefix="bench-xe-buckets-"))
    try:
        tokenizer = tokenize_step(cfg, dataset, scratch)
        store = extract_step(cfg, dataset, progress=False)
        pairs = caption_pairs(dataset, "train", tokenizer, store, cfg.tokenizer.max_length)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    regions, dim = pairs.features.shape[1:]
    per_epoch = -(-len(pairs.image_index) // cfg.train.batch_size)
    lengths = caption_lengths(pairs.tokens)

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    rates: dict[str, list[float]] = {"on": [], "off": []}
    positions: dict[str, float] = {}
    for _ in range(rounds):
        for mode in ("on", "off"):
            set_global_seed(cfg.train.seed)
            model = build_model(tokenizer.vocab_size, regions, dim, cfg.model)
            compile_model(model, cfg, per_epoch)
            data = input_pipeline(pairs, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                                  length_buckets=mode == "on")
            clock = Clock()
            warm = 5
            model.fit(data.take(steps + warm), epochs=1, verbose=0, callbacks=[clock])
            rates[mode].append(steps / (clock.times[-1] - clock.times[warm - 1]))
            batches = epoch_batches(lengths, cfg.train.batch_size, np.random.default_rng([cfg.train.seed, 0]),
                                    mode == "on")
            positions[mode] = float(statistics.mean(
                (lengths[rows].max() if mode == "on" else cfg.tokenizer.max_length) - 1 for rows in batches))
            print(f"steps {mode}: {rates[mode][-1]:.3f} steps/s", flush=True)
    on, off = statistics.mean(rates["on"]), statistics.mean(rates["off"])
    return {"steps": steps, "rounds": rounds, "batch_size": cfg.train.batch_size, "steps_per_epoch": per_epoch,
            "mean_caption_tokens": round(float(lengths.mean()), 2),
            "mean_decoder_positions_per_batch": {k: round(v, 2) for k, v in positions.items()},
            "steps_per_s": {k: [round(r, 3) for r in v] for k, v in rates.items()},
            "train_seconds_per_epoch": {"on": round(per_epoch / on, 1), "off": round(per_epoch / off, 1)},
            "speedup_on_over_off": round(on / off, 3)}


def bench_runs(data_root: str, epochs: int, out_root: Path) -> dict:
    results = {}
    for mode in ("on", "off"):
        output = out_root / f"xe_{mode}"
        if output.exists():  # may be a run of the user's: never removed here
            raise SystemExit(f"{output} exists: remove it or give another --runs-dir")
        command = [str(CAPTIONER), "train", "--config", "flickr8k", "--set", f"data.root={data_root}",
                   "--set", f"train.epochs={epochs}", "--set", "scst.enabled=false", "--set", "eval.split=dev",
                   "--set", "decode.tune_length_penalty=false", "--set", "export.enabled=false",
                   "--set", f"train.length_buckets={'true' if mode == 'on' else 'false'}",
                   "--output", str(output), "--quiet"]
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        wall = time.perf_counter() - start
        with open(output / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        evaluation = json.loads((output / "evaluation.json").read_text())
        results[mode] = {
            "wall_seconds": round(wall, 1),
            "epoch_seconds": [float(r["epoch_seconds"]) for r in rows],
            "train_loss": [round(float(r["train_loss"]), 4) for r in rows],
            "val_loss": [round(float(r["val_loss"]), 4) for r in rows],
            "dev_bleu4_greedy": [round(float(r["dev_bleu4"]), 4) for r in rows],
            "dev_cider_greedy": [round(float(r["dev_cider"]), 4) for r in rows],
            "dev_beam": {k: round(float(evaluation[k]), 4) for k in ("bleu4", "cider") if k in evaluation},
        }
        print(f"run {mode}: {json.dumps(results[mode])}", flush=True)
    on, off = results["on"], results["off"]
    results["epoch_seconds_ratio_on_over_off"] = round(sum(on["epoch_seconds"]) / sum(off["epoch_seconds"]), 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "flickr8k"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--only", choices=("steps", "runs"))
    parser.add_argument("--runs-dir", type=Path, default=None, help="where the runs go (default: a temp folder)")
    args = parser.parse_args()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    results: dict = {"cache": os.environ.get("CAPTIONER_CACHE"), "started": stamp}
    if args.only in (None, "runs"):
        runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="bench-xe-runs-"))
        results["runs"] = bench_runs(args.data_root, args.epochs, runs_dir)
    if args.only in (None, "steps"):
        results["steps"] = bench_steps(args.data_root, args.steps, args.rounds)
        print("steps", json.dumps(results["steps"]), flush=True)
    out = ROOT / "benchmarks" / "results" / f"xe-buckets-{stamp}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(results, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
