"""Milliseconds per ``decode_step`` call of a SavedModel (issue #11: the gateway's shared decode loop is
bound by this call), at the row counts the batching gateway runs it with.

Each row sits at its own position (drawn once, seeded, below the model's ``max_length``, as in the
gateway where merged requests are at different words), so the step attends over a realistic prefix
of the fixed-size cache. Every input is the same for every SavedModel. SavedModels and row counts
are interleaved within each round and the median of the rounds' means is reported, so slow spells
of a shared machine spread over all of them. Also timed: the ``tf.gather`` of the state by a beam
reorder (what serving/batching.py does after most steps), a yardstick for the state's size.

Compare versions of the code on the same model by exporting it with each (``captioner export``
with ``PYTHONPATH`` at each checkout's ``src``) and timing them in one run:

    python benchmarks/bench_decode_step.py --saved-model before=/tmp/old-export after=runs/f8k-export

Saves benchmarks/results/decode-step-<label>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _time(call, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        out = call()
    _ = [t.numpy() for t in out] if isinstance(out, (tuple, list)) else out.numpy()  # work is done
    return (time.perf_counter() - started) / calls * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saved-model", nargs="+", required=True, metavar="[NAME=]PATH",
                        help="SavedModel folder(s) written by `captioner export` (of the same model)")
    parser.add_argument("--rows", type=int, nargs="+", default=[3, 12, 48, 96])
    parser.add_argument("--calls", type=int, default=30, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--label", default="run", help="names the result file")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args()

    import tensorflow as tf

    from captioner import constants as C

    models = {}
    for spec in args.saved_model:
        name, _, path = spec.rpartition("=")
        loaded = tf.saved_model.load(path)
        meta = json.loads(loaded.signatures[C.SIG_METADATA](**{C.IN_ROWS: tf.constant([0], tf.int32)})
                          [C.OUT_METADATA].numpy()[0])
        models[name or path] = {"path": path, "step": loaded.signatures[C.SIG_DECODE_STEP], "meta": meta,
                                "loaded": loaded}
    meta = next(iter(models.values()))["meta"]
    for m in models.values():
        if m["meta"]["state_shape"] != meta["state_shape"] or m["meta"]["feature_dim"] != meta["feature_dim"]:
            raise SystemExit(f"{m['path']}: another model's shapes than {next(iter(models))}'s; compare one model")
    _, pairs, slots, d = meta["state_shape"]
    regions, feature_dim, vocab = meta["num_regions"], meta["feature_dim"], meta["vocab_size"]
    rng = np.random.default_rng(0)
    cases = {}
    for rows in args.rows:
        position = rng.integers(0, meta["max_length"], rows).astype(np.int32)
        position[0] = meta["max_length"] - 1  # every call attends over the same prefix length
        inputs = {C.IN_FEATURES: tf.constant(rng.normal(size=(rows, regions, feature_dim)), tf.float32),
                  C.IN_TOKENS: tf.constant(rng.integers(4, vocab, rows), tf.int32),
                  C.IN_STATE: tf.constant(rng.normal(size=(rows, pairs, slots, d)), tf.float32),
                  C.IN_POSITION: tf.constant(position)}
        cases[rows] = (inputs, tf.constant(rng.permutation(rows)))
        for m in models.values():
            for _ in range(5):  # the first calls at a new batch size are slow
                m["step"](**inputs)
    timings = {(name, rows): [] for name in [*models, "gather"] for rows in args.rows}
    for _ in range(args.rounds):
        for rows, (inputs, reorder) in cases.items():
            for name, m in models.items():
                timings[name, rows].append(
                    _time(lambda step=m["step"], inputs=inputs: step(**inputs)[C.OUT_STATE], args.calls))
            state = inputs[C.IN_STATE]
            timings["gather", rows].append(
                _time(lambda state=state, reorder=reorder: tf.gather(state, reorder), args.calls))
    results = []
    for rows in args.rows:
        row = {"rows": rows, "state_mb": rows * pairs * slots * d * 4 / 1e6,
               "gather_ms": statistics.median(timings["gather", rows]), "decode_step_ms": {},
               "decode_step_ms_min": {}, "rounds_ms": {}}
        line = f"rows {rows:3d}  state {row['state_mb']:5.1f} MB "
        for name in models:
            t = timings[name, rows]
            row["decode_step_ms"][name], row["decode_step_ms_min"][name] = statistics.median(t), min(t)
            row["rounds_ms"][name] = t
            line += f" {name} {statistics.median(t):6.2f} ms (min {min(t):6.2f})"
        results.append(row)
        print(line + f"  gather {row['gather_ms']:5.2f} ms", flush=True)
    out = args.output or (Path(__file__).parent / "results" /
                          f"decode-step-{args.label}-{time.strftime('%Y-%m-%d-%H%M')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "decode_step", "label": args.label,
               "saved_models": {name: {"path": m["path"], "git_commit": m["meta"].get("git_commit")}
                                for name, m in models.items()},
               "calls": args.calls, "rounds": args.rounds, "state_shape": meta["state_shape"],
               "max_length": meta["max_length"], "cpus": os.cpu_count(), "load_average": os.getloadavg(),
               "platform": platform.platform(), "tensorflow": tf.__version__, "results": results}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
