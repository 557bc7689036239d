"""Feature extraction against the limit that JPEG decoding on the same cores sets (issue #11).

On a machine with few cores, decoding JPEGs and running the backbone compete for the same CPU, so
files -> cached features cannot beat

    limit = 1 / (1/decode + 1/backbone + 1/write)

where ``decode`` is read+decode alone over the same files with the pipeline's threads, ``backbone``
is the bare backbone on in-memory batches (both using every core) and ``write`` is streaming the
float16 features to a shard file. (An overlap can only beat it when one of the stages leaves a core
idle.) One run measures, in alternating rounds:

  (a)  decode: the pipeline's decoding (``decode_file`` in its thread pool, batched and stacked);
       also the old double decode (``load_image``) and TensorFlow's ``decode_jpeg`` in tf.data with
       the same parallelism, for reference;
  (b)  the bare backbone (float32 out, as before the cast moved into the graph) on in-memory batches;
  (w)  writing the features of all images to a shard file;
  (c)  files -> cache through ``captioner.features.extract.extract_features`` (hashing included),
       with the pipeline's decode threads (and one thread, for comparison);

and prints the rates, the limit, (c)/limit and (c)/(b) per round and their medians.

    python benchmarks/bench_extract_limit.py --set data.root=../shared/data/flickr8k

Saves benchmarks/results/extract-limit-<config>-<date>.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _rate(count: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def _decode_all(decode, paths: list[Path], size: int, batch_size: int, workers: int) -> None:
    """Decode ``paths`` as the pipeline does: ``workers`` threads, a batch at a time, stacked."""
    import numpy as np

    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), batch_size):
            np.stack(list(pool.map(lambda p: decode(p, size), paths[start:start + batch_size])))


def _tf_decode_all(paths: list[Path], batch_size: int, workers: int) -> None:
    import tensorflow as tf

    ds = (tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
          .map(lambda p: tf.io.decode_jpeg(tf.io.read_file(p), channels=3, dct_method="INTEGER_ACCURATE"),
               num_parallel_calls=workers)
          .batch(batch_size).prefetch(2))
    for _ in ds:
        pass


def main() -> None:
    import numpy as np
    import tensorflow as tf

    from captioner.config import load_config
    from captioner.data.images import load_image
    from captioner.features import extract
    from captioner.features.backbones import build_backbone
    from captioner.workflow import load_data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="flickr8k")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="decode threads (the pipeline's default: 2)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/...)")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    fc = cfg.features
    dataset = load_data(cfg)
    images = dataset.splits["train"][:args.images]
    paths = [dataset.image_path(name) for name in images]
    n, size, batch = len(images), fc.image_size, fc.batch_size
    # Older versions of the library decoded every file with load_image and had no decode_workers.
    decode = getattr(extract, "decode_file", lambda path, size: load_image(path, size))
    takes_workers = "decode_workers" in inspect.signature(extract.extract_features).parameters

    backbone = build_backbone(fc.backbone, fc.weights, fc.image_size)

    @tf.function(reduce_retracing=True)
    def bare(pixels):
        return backbone(tf.cast(pixels, tf.float32), training=False)

    pixels = np.stack([decode(path, size) for path in paths])  # also warms the page cache
    features = bare(pixels[:batch]).numpy().astype(np.float16)
    row_shape = features.shape[1:]
    all_features = np.resize(features, (n, *row_shape))
    scratch = Path(tempfile.mkdtemp(prefix="bench-extract-limit-"))

    def run_bare() -> None:
        for start in range(0, n, batch):
            bare(pixels[start:start + batch]).numpy()

    def write_shard() -> None:
        with extract.ShardFile(scratch / "w.npy", 0, n, row_shape) as shard:
            for start in range(0, n, batch):
                shard.write(all_features[start:start + batch])

    def files_to_cache(workers: int | None, names: list[str] = images) -> float:
        cache = scratch / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        kwargs = {"decode_workers": workers} if takes_workers and workers else {}
        try:
            return _rate(len(names), lambda: extract.extract_features(dataset, names, fc, cache, progress=False,
                                                                      backbone=backbone, **kwargs))
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    has_writer = hasattr(extract, "ShardFile")
    load_image(paths[0], size)  # traces the TensorFlow decoder that load_image keeps
    files_to_cache(None, images[:2 * batch])  # warm up: traces the extraction's compiled backbone
    run_bare()
    rounds = []
    try:
        for number in range(args.rounds):
            r = {"decode": _rate(n, lambda: _decode_all(decode, paths, size, batch, args.workers)),
                 "backbone": _rate(n, run_bare)}
            r["write"] = _rate(n, write_shard) if has_writer else None
            r["files_to_cache"] = files_to_cache(args.workers)
            r["decode_load_image"] = _rate(n, lambda: _decode_all(load_image, paths, size, batch, args.workers))
            r["decode_tf_data"] = _rate(n, lambda: _tf_decode_all(paths, batch, args.workers))
            if takes_workers:
                r["files_to_cache_1_thread"] = files_to_cache(1)
            r["limit"] = 1 / (1 / r["decode"] + 1 / r["backbone"] + (1 / r["write"] if r["write"] else 0))
            r["limit_without_write"] = 1 / (1 / r["decode"] + 1 / r["backbone"])
            r["ratio_to_limit"] = r["files_to_cache"] / r["limit"]
            r["ratio_to_backbone"] = r["files_to_cache"] / r["backbone"]
            r["limit_to_backbone"] = r["limit"] / r["backbone"]
            rounds.append(r)
            print(f"round {number + 1}: " + ", ".join(f"{k} {v:.3f}" if k.startswith(("ratio", "limit_to"))
                                                      else f"{k} {v:.1f}" for k, v in r.items() if v is not None),
                  flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    median = {key: round(statistics.median(r[key] for r in rounds), 3)
              for key in rounds[0] if rounds[0][key] is not None}
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "config": args.config, "overrides": args.overrides,
               "images": n, "image_size": size, "batch_size": batch, "decode_workers": args.workers,
               "rounds": [{k: (round(v, 3) if v is not None else None) for k, v in r.items()} for r in rounds],
               "median": median, "unit": "images per second; ratios are per round, then the median",
               "library": str(Path(extract.__file__).resolve()),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version(), "tensorflow": tf.__version__}}
    print("median", json.dumps(median), flush=True)
    out = args.out or (Path(__file__).resolve().parent / "results"
                       / f"extract-limit-{args.config}-{time.strftime('%Y-%m-%d')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
