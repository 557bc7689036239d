"""Incremental feature extraction (issue #7): 100 images added to a Flickr8k-sized set cost 100 extractions.

Builds a data set in the user layout (``captions.tsv``, ``splits/``, ``images/``) in a temporary
folder, its images symbolic links to the Flickr8k photos (nothing is copied, nothing lands in the
repository), with ``--hold-back`` training images left out. Then, each with a fresh feature cache in
the temporary folder:

1. extracts features for the whole set (every image goes through the backbone),
2. adds the held-back images (links, captions, train split) and extracts again,
3. extracts once more with nothing changed.

Each step is timed as a pipeline's extract step would spend it (``extract_step``: read the data,
hash new files, build the backbone when there is work, run it, write shards); the data fingerprint
is timed too. TensorFlow is imported before the clock starts.

    python benchmarks/bench_incremental_extract.py --data ../shared/data/flickr8k
    python benchmarks/bench_incremental_extract.py --data ../shared/data/flickr8k --limit 50 --hold-back 10

Prints the figures and saves them to benchmarks/results/incremental-extract-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_user_dataset(source, root: Path, limit: int, hold_back: int) -> tuple[list[str], dict[str, list[str]]]:
    """Write the user-layout data set to ``root``; returns the held-back train images and the splits."""
    splits = {split: list(images) for split, images in source.splits.items()}
    if limit:
        small = max(1, limit // 10)
        splits = {"train": splits["train"][:limit], "dev": splits["dev"][:small], "test": splits["test"][:small]}
    if not 0 < hold_back < len(splits["train"]):
        raise SystemExit(f"--hold-back must be between 1 and {len(splits['train']) - 1} (train images), "
                         f"got {hold_back}")
    held = splits["train"][-hold_back:]
    splits["train"] = splits["train"][:-hold_back]
    (root / "images").mkdir(parents=True)
    (root / "splits").mkdir()
    add_images(source, root, [image for images in splits.values() for image in images])
    for split, images in splits.items():
        (root / "splits" / f"{split}.txt").write_text("".join(f"{image}\n" for image in images))
    return held, splits


def add_images(source, root: Path, images: list[str], split: str | None = None) -> None:
    """Link ``images`` into the data set and append their captions (and, with ``split``, the split)."""
    for image in images:
        (root / "images" / image).symlink_to(source.image_path(image).resolve())
    with (root / "captions.tsv").open("a", encoding="utf-8") as handle:
        handle.writelines(f"{image}\t{caption}\n" for image in images for caption in source.captions[image])
    if split:
        with (root / "splits" / f"{split}.txt").open("a", encoding="utf-8") as handle:
            handle.writelines(f"{image}\n" for image in images)


def timed_extraction(cfg, progress: bool) -> dict:
    from captioner.workflow import extract_step, load_data

    start = time.perf_counter()
    dataset = load_data(cfg)
    read = time.perf_counter() - start
    start = time.perf_counter()
    fingerprint = dataset.fingerprint()
    fingerprint_seconds = time.perf_counter() - start
    start = time.perf_counter()
    store = extract_step(cfg, dataset, progress=progress)
    seconds = time.perf_counter() - start
    return {"images": len(dataset.all_images()), "extracted": len(store.extracted),
            "extraction_seconds": round(seconds, 3), "read_seconds": round(read, 3),
            "fingerprint": fingerprint, "fingerprint_seconds": round(fingerprint_seconds, 3)}


def main() -> None:
    from captioner.config import load_config
    from captioner.data.readers import read_dataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Flickr8k in the shared layout (read only)")
    parser.add_argument("--config", default="flickr8k")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--hold-back", type=int, default=100, help="train images added in the second run")
    parser.add_argument("--limit", type=int, default=0, help="use only this many train images (a quick check)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    args = parser.parse_args()

    import tensorflow as tf  # noqa: F401 - imported before the clock starts, as a running step has it

    source = read_dataset(args.data, "flickr8k")
    scratch = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    try:
        root = scratch / "data"
        held, splits = build_user_dataset(source, root, args.limit, args.hold_back)
        cfg = load_config(args.config, [*args.overrides, "data.format=flickr8k", f"data.root={root}",
                                        f"features.cache_dir={scratch / 'features'}"])
        results: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": args.config,
                         "overrides": args.overrides, "limit": args.limit, "held_back": len(held),
                         "backbone": cfg.features.backbone, "weights": cfg.features.weights,
                         "image_size": cfg.features.image_size, "flip_train": cfg.features.flip_train,
                         "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                     "python": platform.python_version()}}
        results["initial"] = timed_extraction(cfg, args.progress)
        print("initial", json.dumps(results["initial"]), flush=True)
        add_images(source, root, held, split="train")
        results["after_adding"] = timed_extraction(cfg, args.progress)
        print("after adding", json.dumps(results["after_adding"]), flush=True)
        results["unchanged"] = timed_extraction(cfg, args.progress)
        print("unchanged", json.dumps(results["unchanged"]), flush=True)
        expected = len(held) * (2 if cfg.features.flip_train else 1)
        results["ok"] = (results["after_adding"]["extracted"] == expected and results["unchanged"]["extracted"] == 0
                         and results["initial"]["fingerprint"] != results["after_adding"]["fingerprint"]
                         == results["unchanged"]["fingerprint"])
        print(f"{len(held)} images added to {results['initial']['images']}: {results['after_adding']['extracted']} "
              f"extracted in {results['after_adding']['extraction_seconds']} s (the first extraction: "
              f"{results['initial']['extracted']} in {results['initial']['extraction_seconds']} s)")
        out = Path(__file__).resolve().parent / "results" / (
            f"incremental-extract-{args.config}{'-limit' + str(args.limit) if args.limit else ''}-"
            f"{time.strftime('%Y-%m-%d')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"saved {out}")
        if not results["ok"]:
            raise SystemExit("unexpected counts: see the figures above")
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
