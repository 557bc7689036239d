"""Beam width and length penalty on dev (issue #9): which penalty each tuning metric would pick.

For each ``--run`` (a trained run folder) and each ``--beam-size``, decodes the dev split at every
length penalty of ``--penalties`` (default: the grid ``decode.tune_length_penalty`` searches) and
scores it with the same functions the tuning uses (BLEU-4 by ``quick_bleu4``, CIDEr-D by
``corpus_cider``), plus the mean caption length in words. The test split is not looked at. METEOR
needs the Java scorer: take it for a chosen setting with
``captioner evaluate --split dev --set decode.beam_size=B --set decode.length_penalty=A``.

    CAPTIONER_CACHE=... python benchmarks/bench_decoding.py --data-root ../shared/data/flickr8k \\
        --run runs/f8k_r3 --run runs/exp/seed2_lb --beam-size 3 5

Saves benchmarks/results/decoding-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    from captioner.config import LENGTH_PENALTY_GRID

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="the data set the runs were trained on")
    parser.add_argument("--run", action="append", required=True, type=Path, help="a trained run folder")
    parser.add_argument("--beam-size", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--penalties", type=float, nargs="+", default=list(LENGTH_PENALTY_GRID))
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args()

    from captioner import workflow
    from captioner.config import with_overrides
    from captioner.evaluate import quick_bleu4
    from captioner.scst import corpus_cider
    from captioner.train import load_trained

    rows = []
    for run in args.run:
        model, tokenizer, spec = load_trained(run)
        cfg = with_overrides(spec.full_config, {"data": {"root": args.data_root}})
        dataset = workflow.load_data(cfg)
        store = workflow.extract_step(cfg, dataset, progress=False)
        references = dataset.split_captions("dev")
        for beam_size in args.beam_size:
            for alpha in args.penalties:
                started = time.perf_counter()
                hyps = workflow.decode_split(model, tokenizer, store, dataset.splits["dev"], beam_size=beam_size,
                                             max_length=cfg.decode.max_length, length_penalty=alpha)
                row = {"run": str(run), "beam_size": beam_size, "length_penalty": alpha,
                       "bleu4": round(quick_bleu4(references, hyps), 4),
                       "cider": round(corpus_cider(references, hyps), 4),
                       "words": round(sum(len(h.split()) for h in hyps.values()) / len(hyps), 2),
                       "seconds": round(time.perf_counter() - started, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    # What decode.tune_length_penalty would choose (the smallest penalty on a tie, as it does).
    picks = []
    for run in args.run:
        for beam_size in args.beam_size:
            cells = [r for r in rows if r["run"] == str(run) and r["beam_size"] == beam_size]
            for metric in ("bleu4", "cider"):
                best = max(cells, key=lambda r: (r[metric], -r["length_penalty"]))
                picks.append({"run": str(run), "beam_size": beam_size, "tune_metric": metric,
                              "length_penalty": best["length_penalty"], "bleu4": best["bleu4"],
                              "cider": best["cider"], "words": best["words"]})
                print("pick", json.dumps(picks[-1]), flush=True)

    result = {"date": time.strftime("%Y-%m-%d"), "split": "dev",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only", "rows": rows, "picks": picks}
    out = args.output or Path(__file__).parent / "results" / f"decoding-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
