"""Speed ratios of issue #2, measured in one run on this machine.

1. Feature extraction: files -> cached features, vs the bare backbone on in-memory batches.
2. Training input pipeline: steps/s fed by ``input_pipeline`` vs by tensors already in memory.
3. Caption latency for one image: beam-3 vs greedy, through the exported SavedModel.

    python benchmarks/bench_speed.py --config flickr8k --set data.root=../shared/data/flickr8k \
        --saved-model runs/f8k/saved_model

Prints the figures and saves them to benchmarks/results/speed-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def bench_extraction(cfg, dataset, count: int, rounds: int = 3) -> dict:
    """Bare backbone on in-memory batches vs files -> cached features, alternated ``rounds`` times
    (the median ratio is reported: one round on this shared machine varies by about 5%)."""
    import numpy as np
    import tensorflow as tf

    from captioner.data.images import load_image
    from captioner.features.backbones import build_backbone
    from captioner.features.extract import extract_features

    images = dataset.splits["train"][:count]
    backbone = build_backbone(cfg.features.backbone, cfg.features.weights, cfg.features.image_size)

    # The bare backbone, float32 out: extraction's own compiled call also casts to float16.
    @tf.function(reduce_retracing=True)
    def bare(pixels):
        return backbone(tf.cast(pixels, tf.float32), training=False)

    def run(pixels):
        return bare(pixels).numpy()

    pixels = np.stack([load_image(dataset.image_path(i), cfg.features.image_size) for i in images])
    run(pixels[: cfg.features.batch_size])  # trace and warm up
    warm = Path(tempfile.mkdtemp(prefix="bench-features-"))
    try:  # traces extraction's compiled call outside the timed rounds
        extract_features(dataset, images[:64], cfg.features, warm, progress=False, backbone=backbone)
    finally:
        shutil.rmtree(warm, ignore_errors=True)
    bare_rates, file_rates = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for offset in range(0, len(pixels), cfg.features.batch_size):
            run(pixels[offset:offset + cfg.features.batch_size])
        bare_rates.append(len(pixels) / (time.perf_counter() - start))
        cache = Path(tempfile.mkdtemp(prefix="bench-features-"))
        try:
            start = time.perf_counter()
            extract_features(dataset, images, cfg.features, cache, progress=False, backbone=backbone)
            file_rates.append(len(images) / (time.perf_counter() - start))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    ratios = [f / b for f, b in zip(file_rates, bare_rates, strict=True)]
    return {"images": len(images), "rounds": rounds,
            "bare_backbone_img_per_s": [round(r, 1) for r in bare_rates],
            "files_to_cache_img_per_s": [round(r, 1) for r in file_rates],
            "ratios": [round(r, 3) for r in ratios], "ratio": round(statistics.median(ratios), 3)}


def bench_input_pipeline(cfg, dataset, steps: int) -> dict:
    import math

    import tensorflow as tf

    from captioner.model.captioner import build_model
    from captioner.train import caption_pairs, compile_model, input_pipeline
    from captioner.workflow import extract_step, tokenize_step

    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        tokenizer = tokenize_step(cfg, dataset, scratch)
        store = extract_step(cfg, dataset, progress=False)
        pairs = caption_pairs(dataset, "train", tokenizer, store, cfg.tokenizer.max_length)
        regions, dim = pairs.features.shape[1:]
        model = build_model(tokenizer.vocab_size, regions, dim, cfg.model)
        compile_model(model, cfg, math.ceil(len(pairs.image_index) / cfg.train.batch_size))
        pipeline = input_pipeline(pairs, cfg.train.batch_size, shuffle=True, seed=0)
        batch = next(iter(pipeline))
        in_memory = tf.data.Dataset.from_tensors(batch).repeat()

        def rate(dataset) -> float:
            model.fit(dataset.take(5), epochs=1, verbose=0)  # warm up (tracing)
            start = time.perf_counter()
            model.fit(dataset.take(steps), epochs=1, verbose=0)
            return steps / (time.perf_counter() - start)

        memory_rate = rate(in_memory)
        pipeline_rate = rate(pipeline.repeat())
        memory_rate = (memory_rate + rate(in_memory)) / 2  # bracket the pipeline run against drift
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"steps": steps, "batch_size": cfg.train.batch_size,
            "in_memory_steps_per_s": round(memory_rate, 3), "pipeline_steps_per_s": round(pipeline_rate, 3),
            "ratio": round(pipeline_rate / memory_rate, 3)}


def bench_latency(saved_model: Path, image: Path, repeats: int) -> dict:
    from captioner.data.images import load_image
    from captioner.predictor import SavedModelCaptioner

    runner = SavedModelCaptioner(saved_model)
    pixels = load_image(image, runner.image_size)[None]

    for beam in (1, 3, 1, 3):  # trace both, warm up
        runner.caption_pixels(pixels, beam_size=beam)
    times: dict[int, list[float]] = {1: [], 3: []}
    for _ in range(repeats):  # interleaved, so that drift in the machine's speed hits both alike
        for beam in (1, 3):
            start = time.perf_counter()
            runner.caption_pixels(pixels, beam_size=beam)
            times[beam].append((time.perf_counter() - start) * 1000)
    greedy, beam = statistics.median(times[1]), statistics.median(times[3])
    return {"image": image.name, "repeats": repeats, "greedy_ms_p50": round(greedy, 2),
            "beam3_ms_p50": round(beam, 2), "ratio": round(beam / greedy, 3),
            "caption_greedy": runner.caption_pixels(pixels, beam_size=1)[0].caption,
            "caption_beam3": runner.caption_pixels(pixels, beam_size=3)[0].caption}


def main() -> None:
    from captioner.config import load_config
    from captioner.workflow import load_data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="flickr8k")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--saved-model", type=Path, default=None, help="exported model for the latency figure")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--only", choices=["extraction", "pipeline", "latency"], action="append")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    dataset = load_data(cfg)
    only = set(args.only or ["extraction", "pipeline", "latency"])
    results: dict = {"date": time.strftime("%Y-%m-%d"), "config": args.config, "overrides": args.overrides,
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version()}}
    if "extraction" in only:
        results["extraction"] = bench_extraction(cfg, dataset, args.images)
        print("extraction", json.dumps(results["extraction"]), flush=True)
    if "pipeline" in only:
        results["input_pipeline"] = bench_input_pipeline(cfg, dataset, args.steps)
        print("input pipeline", json.dumps(results["input_pipeline"]), flush=True)
    if "latency" in only and args.saved_model:
        image = dataset.image_path(dataset.splits["test"][0])
        results["latency"] = bench_latency(args.saved_model, image, args.repeats)
        print("latency", json.dumps(results["latency"]), flush=True)
    out = Path(__file__).resolve().parent / "results" / f"speed-{args.config}-{results['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
