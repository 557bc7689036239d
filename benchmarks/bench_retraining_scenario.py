"""Retraining follows the data, and the gate compares like with like (issue #7): a recorded scenario.

On a small user data set in the shared layout (synthetic shapes written to a temporary folder, the
``smoke`` model), four local pipeline runs into one fresh model repository:

1. a first run (registers version 1);
2. the same data again (tokenize, extract and train come from the cache; nothing registered);
3. new captions for some training images (tokenize, extract and train run again; extract finds no
   new image content);
4. on that data, a worse candidate (``train.epochs=0``) with a zero floor: rejected by the champion,
   which the gate re-scores on this run's test split.

    python benchmarks/bench_retraining_scenario.py

Prints a table (task statuses, images extracted, gate reason, wall time) and saves it to
benchmarks/results/retraining-scenario-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

READING = ("fingerprint", "tokenize", "extract-features", "train", "evaluate", "register")


def summarise(name: str, record: dict, seconds: float) -> dict:
    features = record["tasks"]["extract-features"].get("outputs", {}).get("artifacts", {}).get("features", {})
    return {"run": name, "seconds": round(seconds, 1),
            "tasks": {t: record["tasks"][t]["status"] for t in READING if t in record["tasks"]},
            "extracted": features.get("metadata", {}).get("extracted"),
            "gate_passed": record["gate"]["passed"], "reason": record["gate"]["reason"],
            "registered_version": record.get("registered_version")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-train", type=int, default=300, help="training images of the synthetic set")
    args = parser.parse_args()

    from captioner.pipelines.local import run_local

    from captioner.config import SyntheticConfig
    from captioner.data.synthetic import generate

    with tempfile.TemporaryDirectory(prefix="captioner-scenario-") as scratch:
        tmp = Path(scratch)
        spec = SyntheticConfig(num_train=args.num_train, num_dev=24, num_test=24, image_size=64, seed=5)
        data = generate(tmp / "data", spec)
        overrides = ["data.format=flickr8k", f"data.root={data}", f"features.cache_dir={tmp / 'features'}"]
        root, repo = tmp / "root", str(tmp / "models")
        rows = []

        def run(name: str, extra: list[str] | None = None, floor: float = 0.0) -> None:
            started = time.perf_counter()
            record = run_local("smoke", [*overrides, *(extra or [])], pipeline_root=root, model_repo=repo,
                               bleu4_floor=floor)
            rows.append(summarise(name, record, time.perf_counter() - started))

        run("first run")
        run("same data")
        train_images = (data / "splits" / "train.txt").read_text().split()[:5]
        with (data / "captions.tsv").open("a", encoding="utf-8") as handle:
            handle.writelines(f"{image}\ta picture with some brand new words\n" for image in train_images)
        run("new captions for 5 train images")
        run("worse candidate (train.epochs=0), floor 0", ["train.epochs=0"])

    for row in rows:
        print(f"{row['run']}: {row['seconds']} s; " + ", ".join(f"{t} {s}" for t, s in row["tasks"].items())
              + f"; extracted {row['extracted']}; registered {row['registered_version']}")
        print(f"    gate: {row['reason']}")
    out = Path(__file__).resolve().parent / "results" / f"retraining-scenario-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
