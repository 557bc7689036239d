"""SCST variants on dev from one run's best cross-entropy checkpoint (issue #9, "what else moves dev").

Cross-entropy costs ~41 minutes on 2 cores and SCST ~4-5 per epoch, so an SCST setting is compared by
re-running only the SCST phase of a finished run: ``--from-run``'s cross-entropy checkpoints and
history are copied into ``--output`` (the SCST state is left behind), the run's config with the
``--set`` overrides is written as the copy's config, and the copy is continued by ``captioner
train``'s own resume path, so SCST, the length-penalty tuning and the evaluation are exactly the
preset's. The evaluation is on dev (``eval.split=dev``); the test split is not looked at.

The data set's fingerprint is re-recorded from ``--data-root`` (a re-provisioned copy of the same files
has new modification times). As a check that it is the run's data and checkpoint, SCST's starting dev
CIDEr-D must equal the one the run recorded; the script fails otherwise.

    CAPTIONER_CACHE=... python benchmarks/bench_scst.py --from-run runs/f8k_r3 \\
        --data-root ../shared/data/flickr8k --output runs/exp/scst_dropout --set scst.dropout=true

Prints the SCST epochs' dev figures and saves ``<output>/bench_scst.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
COPIED = ("model.json", "vocab.json", "vocab.txt")
COPIED_CHECKPOINTS = ("TRAINING_FINISHED", "best.weights.h5", "run_state.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-run", type=Path, required=True, help="a finished run with an SCST phase")
    parser.add_argument("--data-root", default=None, help="the data set the run was trained on (default: the run's)")
    parser.add_argument("--output", type=Path, required=True, help="a new folder for the variant")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override for the SCST phase, e.g. scst.dropout=true (repeatable)")
    args = parser.parse_args()

    from captioner import workflow
    from captioner.config import config_from_dict, parse_overrides, with_overrides
    from captioner.constants import CHECKPOINT_DIR, CONFIG_SNAPSHOT

    source = args.from_run
    summary = json.loads((source / "run_summary.json").read_text())
    recorded = summary.get("scst", {}).get("xe_dev_cider")
    if recorded is None or not (source / CHECKPOINT_DIR / "TRAINING_FINISHED").is_file():
        raise SystemExit(f"{source}: not a finished run with an SCST phase (run_summary.json has no scst)")
    if args.output.exists():
        raise SystemExit(f"{args.output} exists: give a new folder")
    cfg = with_overrides(config_from_dict(json.loads((source / CONFIG_SNAPSHOT).read_text())),
                         parse_overrides(args.overrides))
    data = {"data": {"root": args.data_root}} if args.data_root else {}
    cfg = with_overrides(cfg, {"eval": {"split": "dev"}, **data})
    # A fresh hidden folder beside --output, renamed into place once complete (never a user's path).
    args.output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{args.output.name}.", dir=args.output.parent))
    try:
        _copy_run(source, scratch, cfg)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)  # our own mkdtemp folder, never anything else
        raise
    scratch.rename(args.output)

    started = time.perf_counter()
    result = workflow.run_training(cfg, args.output, progress=True)
    wall = time.perf_counter() - started
    start = result["scst"]["xe_dev_cider"]
    if abs(start - recorded) > 1e-3:
        raise SystemExit(f"SCST started from dev CIDEr-D {start}, the run recorded {recorded}: not the run's "
                         "data or checkpoint")
    with open(args.output / "metrics.csv", newline="") as f:
        epochs = [{k: r[k] for k in ("epoch", "dev_cider", "dev_bleu4", "train_reward", "epoch_seconds")}
                  for r in csv.DictReader(f) if r["phase"] == "scst"]
    out = {"from_run": str(source), "overrides": args.overrides, "xe_dev_cider": start, "scst_epochs": epochs,
           "scst": result["scst"], "dev_beam": result.get("final_metrics"), "wall_seconds": round(wall, 1),
           "machine": {"cpus": os.cpu_count(), "machine": platform.machine()},
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (args.output / "bench_scst.json").write_text(json.dumps(out, indent=2))
    for row in epochs:
        print(f"SCST epoch {row['epoch']}: dev CIDEr-D {float(row['dev_cider']):.4f} "
              f"BLEU-4 {float(row['dev_bleu4']):.4f} reward {float(row['train_reward']):.4f}")
    print(json.dumps({"selected": result["scst"]["selected_epoch"], "dev_beam": out["dev_beam"]}, indent=1))


def _copy_run(source: Path, scratch: Path, cfg) -> None:
    """``source``'s cross-entropy state, history and vocabulary into ``scratch``, with ``cfg`` as its config."""
    from captioner import workflow
    from captioner.constants import CHECKPOINT_DIR, CONFIG_SNAPSHOT

    scratch.chmod(0o755)  # mkdtemp's 0700 would follow the folder into place
    (scratch / CHECKPOINT_DIR).mkdir()
    for name in COPIED:
        shutil.copy2(source / name, scratch / name)
    for name in COPIED_CHECKPOINTS:
        shutil.copy2(source / CHECKPOINT_DIR / name, scratch / CHECKPOINT_DIR / name)
    shutil.copytree(source / CHECKPOINT_DIR / "backup", scratch / CHECKPOINT_DIR / "backup")
    with open(source / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    xe = [r for r in rows if r.get("phase") in ("", "xe", None)]
    with open(scratch / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(xe)
    (scratch / CONFIG_SNAPSHOT).write_text(json.dumps(cfg.to_dict(), indent=2))
    state_path = scratch / CHECKPOINT_DIR / "run_state.json"
    state = json.loads(state_path.read_text())
    state["dataset"]["fingerprint"] = workflow.load_data(cfg).fingerprint()
    state_path.write_text(json.dumps(state, indent=2))


if __name__ == "__main__":
    main()
