"""Experiment tracking and seeding, with the seed system's public API.

    set_global_seed(42)
    tracker = ExperimentTracker("experiments/run_001", seed=42)
    tracker.log_config(config_dict)
    tracker.log_metrics(epoch=1, train_loss=2.5, val_loss=2.8)
    tracker.log_bleu_scores(bleu1=0.65, bleu2=0.45, bleu3=0.35, bleu4=0.25)
    tracker.finalize()

Writes ``config_snapshot.json`` (at ``log_config``), ``metrics.csv`` (one row per epoch, appended as
training goes, so a resumed run continues the file), ``logs/`` (TensorBoard's folder) and, at
``finalize``, ``run_summary.json`` (config, seed, git commit, timings, final metrics). A run that
fails gets ``FAILED.json`` instead, so it never looks complete.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import platform
import random
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from captioner.constants import CONFIG_SNAPSHOT, LOG_DIR, METRICS_CSV, RUN_SUMMARY
from captioner.io_utils import atomic_write_json, atomic_write_text, read_json_dict

FAILED_JSON = "FAILED.json"


def is_run_folder(folder: Path | str) -> bool:
    """True if a tracker wrote into ``folder``: our config snapshot, run summary or failure record
    (checked by content, so that a user's file of the same name does not make a folder ours)."""
    folder = Path(folder)
    snapshot = read_json_dict(folder / CONFIG_SNAPSHOT)
    if snapshot is not None and {"model", "train"} <= set(snapshot):
        return True
    return any((record := read_json_dict(folder / name)) is not None and {"status", "run_dir"} <= set(record)
               for name in (RUN_SUMMARY, FAILED_JSON))


def set_global_seed(seed: int) -> None:
    """Seed Python, NumPy, TensorFlow and Keras (and make hashing deterministic in children)."""
    import numpy as np

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    try:
        import keras

        keras.utils.set_random_seed(seed)
    except ImportError:  # the tracker is usable without TensorFlow
        pass


def git_commit(path: Path | str | None = None) -> str | None:
    folder = Path(path or Path(__file__).resolve().parent)
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("CAPTIONER_GIT_COMMIT")


class ExperimentTracker:
    def __init__(self, run_dir: Path | str, seed: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / LOG_DIR).mkdir(exist_ok=True)
        self.seed = seed
        self.config: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.final_metrics: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.started = time.time()
        self._metrics_path = self.run_dir / METRICS_CSV

    @property
    def log_dir(self) -> Path:
        return self.run_dir / LOG_DIR

    def log_config(self, config: Any) -> None:
        if dataclasses.is_dataclass(config):
            config = dataclasses.asdict(config)
        self.config = dict(config)
        atomic_write_json(self.run_dir / CONFIG_SNAPSHOT, self.config)

    def history(self) -> list[dict[str, Any]]:
        """Rows of metrics.csv so far (numbers parsed), e.g. to resume early stopping."""
        if not self._metrics_path.is_file():
            return []
        with self._metrics_path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        return [{k: _number(v) for k, v in row.items()} for row in rows]

    def log_metrics(self, epoch: int, **metrics: float) -> None:
        """Append one row; a rerun of an epoch (after a resume) replaces that epoch's row."""
        rows = [row for row in self.history() if row.get("epoch") != epoch]
        rows.append({"epoch": epoch, **metrics})
        columns: list[str] = []
        for row in rows:
            columns += [key for key in row if key not in columns]
        lines = [",".join(columns)]
        for row in sorted(rows, key=lambda r: r["epoch"]):
            lines.append(",".join(_format(row.get(column, "")) for column in columns))
        atomic_write_text(self._metrics_path, "\n".join(lines) + "\n")

    def log_bleu_scores(self, **scores: float) -> None:
        self.final_metrics.update(scores)

    def log_final_metrics(self, **metrics: Any) -> None:
        self.final_metrics.update(metrics)

    @contextmanager
    def time(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - start, 3)

    def summary(self, status: str = "complete") -> dict[str, Any]:
        return {
            "status": status,
            "run_dir": str(self.run_dir),
            "seed": self.seed,
            "git_commit": git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_seconds": round(time.time() - self.started, 3),
            "timings_seconds": self.timings,
            "final_metrics": self.final_metrics,
            "epochs": len(self.history()),
            "host": {"python": platform.python_version(), "machine": platform.machine(),
                     "cpus": os.cpu_count()},
            "config": self.config,
            **self.extra,
        }

    def finalize(self) -> Path:
        (self.run_dir / FAILED_JSON).unlink(missing_ok=True)
        return atomic_write_json(self.run_dir / RUN_SUMMARY, self.summary())

    def fail(self, error: BaseException) -> Path:
        (self.run_dir / RUN_SUMMARY).unlink(missing_ok=True)
        summary = self.summary(status="failed")
        summary["error"] = f"{type(error).__name__}: {error}"
        return atomic_write_json(self.run_dir / FAILED_JSON, summary)


def _number(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except (TypeError, ValueError):
            continue
    return value


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


__all__ = ["ExperimentTracker", "set_global_seed", "git_commit", "is_run_folder"]
