"""Ensembles on dev (issue #9, "what else moves dev"): trained runs and checkpoints decoded as one model.

Each ``--row NAME=MEMBER[,MEMBER...]`` (a run folder, or a ``.weights.h5`` checkpoint inside one) is
combined with ``captioner.train.save_ensemble`` under each ``--combine`` rule (a one-member row is the
model alone) and scored on the dev split with the COCO scorer, greedy and beam, at the first member's
decoding settings (its tuned length penalty, or each of ``--length-penalty``). The test split is not
looked at.

    CAPTIONER_CACHE=... python benchmarks/bench_ensemble.py --data-root ../shared/data/flickr8k \\
        --row "run A=runs/a" --row "A + B=runs/a,runs/b" \\
        --row "A + its cross-entropy checkpoint=runs/a,runs/a/checkpoints/best.weights.h5"

Saves benchmarks/results/ensemble-<date>.json.
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
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "dangling_share", "unk_share")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True, help="the data set the members were trained on")
    parser.add_argument("--row", action="append", required=True, help="NAME=MEMBER[,MEMBER...]")
    parser.add_argument("--combine", nargs="+", default=["prob"], choices=["prob", "log_prob"])
    parser.add_argument("--beam-size", type=int, nargs="+", default=None,
                        help="beam widths to score (default: the first member's)")
    parser.add_argument("--length-penalty", type=float, nargs="+", default=None,
                        help="length penalties to score the beam at (default: the first member's)")
    parser.add_argument("--no-repeat-ngram-size", type=int, nargs="+", default=None,
                        help="n-gram blocking sizes to score greedy and beam at (default: the first member's)")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args()

    from captioner import workflow
    from captioner.config import with_overrides
    from captioner.train import load_trained, save_ensemble

    rows = []
    for spec in args.row:
        name, _, members = spec.partition("=")
        paths = [Path(m) for m in members.split(",") if m]
        for combine in (args.combine if len(paths) > 1 else ["prob"]):
            with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as scratch:
                folder = save_ensemble(paths, Path(scratch) / "ensemble", combine)
                model, tokenizer, model_spec = load_trained(folder)
                cfg = with_overrides(model_spec.full_config, {"data": {"root": args.data_root}})
                dataset = workflow.load_data(cfg)
                store = workflow.extract_step(cfg, dataset, progress=False)
                settings = [(n, b, a) for n in args.no_repeat_ngram_size or [cfg.decode.no_repeat_ngram_size]
                            for b in args.beam_size or [cfg.decode.beam_size]
                            for a in args.length_penalty or [cfg.decode.length_penalty]]
                for i, (ngram, beam_size, penalty) in enumerate(settings):
                    started = time.perf_counter()
                    decode = {"beam_size": beam_size, "length_penalty": penalty, "no_repeat_ngram_size": ngram}
                    report = workflow.evaluate_model(model, tokenizer, store, dataset,
                                                     with_overrides(cfg, {"decode": decode}),
                                                     split="dev", progress=False)
                    first = i == 0 or ngram != settings[i - 1][0]
                    for decoder in ("greedy", "beam") if first else ("beam",):  # greedy: the same per n
                        scores = report[decoder]
                        row = {"name": name, "members": [str(p) for p in paths],
                               "combine": combine if len(paths) > 1 else None, "decoder": decoder,
                               "beam_size": scores["beam_size"], "length_penalty": scores.get("length_penalty"),
                               "no_repeat_ngram_size": ngram,
                               **{k: scores[k] for k in METRICS}, "seconds": round(time.perf_counter() - started, 1)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)

    result = {"date": time.strftime("%Y-%m-%d"), "split": "dev",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only", "rows": rows}
    out = args.output or Path(__file__).parent / "results" / f"ensemble-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
