"""Quality past Show, Attend and Tell (issue #9): the dev ablation and the test figures of a trained run.

Reads a run folder written by ``captioner train`` with SCST (the flickr8k preset; one model or an
ensemble of members) and prints, then saves:

* the dev ablation, every row scored by the COCO scorer on the dev split: the best cross-entropy
  checkpoint (greedy, beam), + SCST (greedy, beam at the preset's length penalty), + the length
  penalty chosen on dev; for an ensemble, each member alone; with the dev grid of length penalties
  the run recorded;
* the test figures of the final recipe, as the run itself scored them (``evaluation.json``; the test
  split is scored once, by the run);
* the share of test captions that end on a dangling word and that contain ``<unk>``, for the
  cross-entropy model and the final one, each decoded with the ``<unk>`` mask and without it (the
  decoders before this release emitted ``<unk>``);
* the wall time of each stage (``run_summary.json``).

    CAPTIONER_CACHE=... python benchmarks/bench_quality.py --run runs/f8k --data-root ../shared/data/flickr8k

Saves benchmarks/results/quality-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def unk_allowed():
    """Decode as the decoders before this release did: <unk> may be generated (traced functions
    built inside read the module's list when they are traced)."""
    from captioner.constants import PAD_ID, START_ID
    from captioner.model import decoding

    saved = decoding.NEVER_GENERATED
    decoding.NEVER_GENERATED = (PAD_ID, START_ID)
    try:
        yield
    finally:
        decoding.NEVER_GENERATED = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder of `captioner train` (with SCST)")
    parser.add_argument("--data-root", required=True, help="the data set the run was trained on")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = parser.parse_args()

    from captioner import workflow
    from captioner.config import config_from_dict, with_overrides
    from captioner.evaluate import coco_scores
    from captioner.train import load_trained

    summary = json.loads((args.run / "run_summary.json").read_text())
    evaluation = json.loads((args.run / "evaluation.json").read_text())
    cfg = with_overrides(config_from_dict(summary["config"]), {"data": {"root": args.data_root}})
    final, tokenizer, spec = load_trained(args.run)
    xe = cross_entropy_model(args.run, spec)
    dataset = workflow.load_data(cfg)
    store = workflow.extract_step(cfg, dataset, progress=False)
    beam, max_length = cfg.decode.beam_size, cfg.decode.max_length
    preset_alpha = 0.6
    # The run tunes the length penalty on dev after training (decode.tune_length_penalty) and records it.
    tuned_alpha = (summary.get("decode_tuning") or {}).get("chosen", cfg.decode.length_penalty)

    def captions(model, split, beam_size, alpha):
        return workflow.decode_split(model, tokenizer, store, dataset.splits[split], beam_size=beam_size,
                                     max_length=max_length, length_penalty=alpha)

    def scored(name, model, beam_size, alpha):
        started = time.perf_counter()
        hyps = captions(model, "dev", beam_size, alpha)
        scores = coco_scores(dataset.split_captions("dev"), hyps, meteor="auto")
        row = {"model": name, "beam_size": beam_size, "length_penalty": alpha if beam_size > 1 else None,
               **{k: scores[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")},
               **workflow.caption_shares(hyps.values()), "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(row), flush=True)
        return row

    ablation = [scored("cross-entropy", xe, 1, preset_alpha), scored("cross-entropy", xe, beam, preset_alpha),
                scored("+ SCST", final, 1, preset_alpha), scored("+ SCST", final, beam, preset_alpha)]
    if tuned_alpha != preset_alpha:
        ablation.append(scored("+ SCST, length penalty tuned on dev", final, beam, tuned_alpha))
    # An ensemble run: what each member scores alone, decoded as the ensemble is.
    for i, member in enumerate(getattr(final, "members", [])):
        ablation.append(scored(f"member {i} alone (+ SCST)", member, beam, tuned_alpha))

    shares = []
    for name, model in (("cross-entropy", xe), ("cross-entropy + SCST (final)", final)):
        for masked in (False, True):
            with contextlib.nullcontext() if masked else unk_allowed():
                for beam_size in (1, beam):
                    hyps = captions(model, "test", beam_size, tuned_alpha)
                    row = {"model": name, "unk_mask": masked, "beam_size": beam_size,
                           **workflow.caption_shares(hyps.values())}
                    shares.append(row)
                    print(json.dumps(row), flush=True)

    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
        "run": str(args.run),
        "dev_ablation": ablation, "dev_length_penalty_grid": summary.get("decode_tuning"),
        "scst": summary.get("scst"), "selected_epoch": summary.get("selected_epoch"),
        "test": {"beam": evaluation["beam"], "greedy": evaluation["greedy"]},
        "test_caption_shares": shares, "stage_seconds": summary.get("timings_seconds"),
        "wall_seconds": summary.get("wall_seconds"), "ensemble": summary.get("ensemble"),
        "history": workflow.training_history(args.run),
    }
    out = args.output or Path(__file__).parent / "results" / f"quality-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"saved {out}")


def cross_entropy_model(run: Path, spec):
    """The run's model as cross-entropy left it: its best cross-entropy checkpoint, or for an ensemble
    run the ensemble of each member's (the members' folders hold their own checkpoints)."""
    from captioner.config import ModelConfig
    from captioner.model.captioner import build_model

    def built(model_config, weights: Path):
        model = build_model(spec.vocab_size, spec.num_regions, spec.feature_dim, model_config)
        model.load_weights(str(weights))
        return model

    if not spec.ensemble:
        return built(spec.model_config, run / "checkpoints" / "best.weights.h5")
    from captioner.model.ensemble import EnsembleModel

    # Each member's "source" is its final weights inside its own run folder (train_ensemble).
    members = [built(ModelConfig(**m["model"]), (run / m["source"]).parent / "checkpoints" / "best.weights.h5")
               for m in spec.ensemble["members"]]
    return EnsembleModel(members, spec.ensemble["combine"])


if __name__ == "__main__":
    main()
