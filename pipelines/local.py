"""Run the pipeline on one machine with ``kfp.local`` and keep a record of each run.

``kfp.local`` runs every component in a subprocess of the current environment (no containers, no
pip installs) and caches task outputs by their inputs. It keeps no run history of its own, so
``run_local`` writes ``<pipeline_root>/captioner-runs/<run_id>.json`` with each task's status,
duration and outputs; ``captioner runs list|show`` read those records.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from captioner.pipelines.fanout import check_shards
from captioner.pipelines.pipeline import DEFAULT_IMAGE, PIPELINE_NAME, create_pipeline
from captioner.pipelines.step_config import QUIET_STEPS_ENV

from captioner.errors import CaptionerError
from captioner.io_utils import atomic_write_json

RUNS_DIR = "captioner-runs"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _TaskEvents(logging.Filter):
    """Reads kfp.local's log lines for task start, cache hits and completion (it logs on the root
    logger and replaces its handlers, so a logger-level filter is what sees every line)."""

    def __init__(self, echo=None):
        super().__init__()
        self.echo = echo  # called with a one-line summary of each task's start and end
        self.tasks: dict[str, dict[str, Any]] = {}
        # A task inside dsl.ParallelFor logs under the same name once per iteration: counted here.
        self.counts: dict[str, dict[str, int]] = {}

    def _event(self, name: str, status: str, now: float, **extra) -> None:
        # Over a task's iterations: failed if any failed, else succeeded if any ran, else cached.
        task = self.tasks.setdefault(name, {"started": now})
        task.setdefault("started", now)
        if _RANK[status] >= _RANK.get(task.get("status", "cached"), 0):
            task.update(status=status, **extra)
        task["finished"] = now
        counts = self.counts.setdefault(name, {})
        counts[status] = counts.get(status, 0) + 1

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", str(record.getMessage()))
        now = record.created
        if m := re.match(r"Executing task '?([\w-]+)'?", message):
            self.tasks.setdefault(m[1], {}).setdefault("started", now)
            self._echo(f"step {m[1]}: running")
        elif m := re.match(r"Task '?([\w-]+)'? cache hit \(key=(\w+)\)", message):
            self._event(m[1], "cached", now, cache_key=m[2])
            self._echo(f"step {m[1]}: cached")
        elif m := re.match(r"Task '?([\w-]+)'? finished with status (\w+)", message):
            self._event(m[1], "succeeded" if m[2] == "SUCCESS" else "failed", now)
            started = self.tasks[m[1]].get("started", now)
            self._echo(f"step {m[1]}: {self.tasks[m[1]]['status']} ({now - started:.1f}s)")
        return True

    def _echo(self, line: str) -> None:
        if self.echo is not None:
            self.echo(line)


_RANK = {"cached": 0, "succeeded": 1, "failed": 2}


def _outputs_from_executor(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    out: dict[str, Any] = {"parameters": data.get("parameterValues", {}), "artifacts": {}}
    for name, group in data.get("artifacts", {}).items():
        for artifact in group.get("artifacts", []):
            out["artifacts"][name] = {"uri": artifact.get("uri"), "metadata": artifact.get("metadata", {})}
    return out


def _outputs_from_cache(cache_root: Path, key_prefix: str) -> dict[str, Any]:
    matches = glob.glob(str(cache_root / f"{key_prefix}*.json"))
    if not matches:
        return {}
    data = json.loads(Path(matches[0]).read_text())
    out: dict[str, Any] = {"parameters": {}, "artifacts": {}}
    for name, value in data.items():
        if isinstance(value, dict) and value.get("__kfp_artifact__"):
            out["artifacts"][name] = {"uri": value.get("uri"), "metadata": value.get("metadata", {})}
        else:
            out["parameters"][name] = value
    return out


def run_local(config: str = "synthetic", overrides: list[str] | None = None, *, pipeline_root: str | Path,
              model_repo: str, model_name: str = "captioner", bleu4_floor: float = 0.1, tolerance: float = 0.005,
              image: str = DEFAULT_IMAGE, cache: bool = True, serving_base_path: str | None = None,
              allow_unscorable_champion: bool = False, extract_shards: int = 1) -> dict[str, Any]:
    """Run the whole DAG locally; returns (and saves) the run record. Raises CaptionerError on a failed step.

    ``extract_shards`` is how many extraction tasks the image list is split over (kfp.local runs
    two at a time); the features are the same for any count.

    ``serving_base_path`` (e.g. ``/models``, where a TF Serving container mounts the repository) is
    stored in the repository, so models.config names it from this run's registration on.
    ``allow_unscorable_champion`` lets the floor alone decide when the champion cannot be re-scored."""
    from kfp import local

    from captioner.registry import ModelRepository

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    if not str(model_repo).startswith("gs://"):
        model_repo = str(Path(model_repo).resolve())
    if serving_base_path is not None:
        ModelRepository(model_repo, serving_base_path=serving_base_path)
    before = {p.name for p in pipeline_root.glob(f"{PIPELINE_NAME}-*")}
    if not os.environ.get("CAPTIONER_VERBOSE"):
        # The steps run in subprocesses that inherit this: they keep TensorFlow's start-up chatter off
        # the terminal as the CLI does (captioner.pipelines.step_config). On a cluster, logs stay whole.
        os.environ[QUIET_STEPS_ENV] = "1"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               enable_caching=cache, raise_on_error=True)
    verbose = bool(os.environ.get("CAPTIONER_VERBOSE"))
    events = _TaskEvents(echo=None if verbose else lambda line: print(line, file=sys.stderr, flush=True))
    (pipeline_root / RUNS_DIR).mkdir(exist_ok=True)
    partial_log = pipeline_root / RUNS_DIR / f".{os.getpid()}-{time.time_ns()}.log.partial"
    root_logger = logging.getLogger()
    root_logger.addFilter(events)
    # kfp.local logs cache hits outside its own logging context: let INFO records through to the filter.
    level = root_logger.level
    root_logger.setLevel(logging.INFO)
    params = {"config": config, "overrides": list(overrides or []), "model_repo": model_repo,
              "model_name": model_name, "bleu4_floor": bleu4_floor, "tolerance": tolerance,
              "allow_unscorable_champion": allow_unscorable_champion,
              "extract_shards": check_shards(extract_shards)}
    started = time.time()
    error = None
    try:
        with contextlib.nullcontext() if verbose else _kfp_output_to(partial_log):
            create_pipeline(image)(**params)
    except Exception as exc:  # a failed step: recorded below, then reported in one line
        error = exc
    finally:
        root_logger.removeFilter(events)
        root_logger.setLevel(level)
    new = sorted({p.name for p in pipeline_root.glob(f"{PIPELINE_NAME}-*")} - before)
    run_id = new[-1] if new else f"{PIPELINE_NAME}-{time.strftime('%Y-%m-%d-%H-%M-%S')}"
    record = _record(run_id, pipeline_root, params, _fold_fanout(events), started, error)
    if partial_log.is_file():
        log = pipeline_root / RUNS_DIR / f"{run_id}.log"
        os.replace(partial_log, log)
        record["log"] = str(log)
    atomic_write_json(pipeline_root / RUNS_DIR / f"{run_id}.json", record)
    if error is not None:
        failed = [name for name, task in record["tasks"].items() if task["status"] == "failed"]
        if not failed and "for-loop" in str(error):  # the loop failed before its task started: extraction's
            failed = ["extract-features"]
        raise CaptionerError(f"pipeline run {run_id} failed at step {', '.join(failed) or '?'}: "
                             f"{str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__}; "
                             f"nothing was registered (record: {pipeline_root / RUNS_DIR / (run_id + '.json')}"
                             + (f"; the steps' output: {record['log']})" if "log" in record else ")"))
    return record


@contextlib.contextmanager
def _kfp_output_to(path: Path) -> Iterator[None]:
    """Send what kfp.local prints (each step's executor input, streamed output and outputs, on
    stdout) and warns (options the local runner ignores) to ``path``: the terminal gets one line per
    step instead; the file keeps everything for a failed step. ``--verbose`` leaves both on screen."""
    with path.open("w", encoding="utf-8", buffering=1) as handle, contextlib.redirect_stdout(handle), \
            warnings.catch_warnings():
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: handle.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        yield


# The fanned-out extraction's tasks, shown as the one "extract-features" step of the run record.
FANOUT_TASKS = ("plan-shards", "extract-features-shard", "collect-features")


def _fold_fanout(events: _TaskEvents) -> dict[str, dict[str, Any]]:
    """The task events with plan, shards and collect folded into "extract-features": its outputs are
    collect's; failed when any part failed, cached only when every part was; ``shards`` counts the
    shard tasks by status."""
    tasks = {name: dict(event) for name, event in events.tasks.items() if name not in FANOUT_TASKS}
    parts = {name: events.tasks[name] for name in FANOUT_TASKS if name in events.tasks}
    if not parts:
        return tasks
    folded = dict(parts.get("collect-features", {}))
    statuses = {part.get("status") for part in parts.values()}
    if "failed" in statuses:
        folded["status"] = "failed"
    elif folded.get("status") == "cached" and statuses != {"cached"}:
        folded["status"] = "succeeded"
    folded["started"] = min(part["started"] for part in parts.values() if "started" in part)
    finished = [part["finished"] for part in parts.values() if "finished" in part]
    if finished:
        folded["finished"] = max(finished)
    folded["shards"] = dict(events.counts.get("extract-features-shard", {}))
    tasks["extract-features"] = folded
    return tasks


def _record(run_id: str, root: Path, params: dict, events: dict, started: float, error) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for name in ("fingerprint", "tokenize", "extract-features", "train", "evaluate", "register"):
        event = events.get(name, {})
        task: dict[str, Any] = {"status": event.get("status", "not run" if error else "skipped")}
        if "started" in event and "finished" in event:
            task["seconds"] = round(event["finished"] - event["started"], 3)
        if "shards" in event:
            task["shards"] = event["shards"]
        if event.get("status") == "cached":
            task["outputs"] = _outputs_from_cache(root / ".kfp_cache", event["cache_key"])
        else:
            executor = root / run_id / ("collect-features" if name == "extract-features" else name) / \
                "executor_output.json"
            if executor.is_file():
                task["outputs"] = _outputs_from_executor(executor)
        tasks[name] = task
    evaluation = tasks["evaluate"].get("outputs", {})
    gate = evaluation.get("artifacts", {}).get("evaluation", {}).get("metadata", {})
    report = evaluation.get("artifacts", {}).get("report", {}).get("uri")
    register = tasks["register"].get("outputs", {})
    registered = register.get("parameters", {}).get("Output")
    created = register.get("artifacts", {}).get("registered", {}).get("metadata", {}).get("created")
    return {"run_id": run_id, "pipeline": PIPELINE_NAME, "status": "failed" if error else "succeeded",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 3), "parameters": params,
            "fingerprint": tasks["fingerprint"].get("outputs", {}).get("parameters", {}).get("Output"),
            "tasks": tasks,
            "gate": {"passed": gate.get("gate_passed"), "reason": gate.get("reason"), "bleu4": gate.get("bleu4")},
            "registered_version": int(registered) if registered is not None and created else None,
            "already_registered_as": int(registered) if registered is not None and not created else None,
            "report": report, "error": str(error).strip().splitlines()[-1] if error and str(error).strip() else None}


def list_runs(pipeline_root: str | Path) -> list[dict[str, Any]]:
    folder = Path(pipeline_root) / RUNS_DIR
    records = [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.is_dir() else []
    return sorted(records, key=lambda r: r["run_id"])


def get_run(pipeline_root: str | Path, run_id: str) -> dict[str, Any]:
    """The run whose id is ``run_id``, or the only one it begins, or the newest for ``latest``."""
    runs = list_runs(pipeline_root)
    where = str(Path(pipeline_root) / RUNS_DIR)
    if not runs:
        raise CaptionerError("no runs recorded here (run `captioner pipeline run --local` first)", path=where)
    if run_id == "latest":
        return runs[-1]
    exact = [r for r in runs if r["run_id"] == run_id]
    found = exact or [r for r in runs if r["run_id"].startswith(run_id)]
    if len(found) == 1:
        return found[0]
    if not found:
        newest = ", ".join(r["run_id"] for r in runs[-3:])
        raise CaptionerError(f"no run id is or begins with {run_id!r}; the newest: {newest} (all: `captioner runs "
                             "list`)", path=where)
    shown = ", ".join(r["run_id"] for r in found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
    raise CaptionerError(f"{run_id!r} begins {len(found)} run ids: {shown}; give more of the id", path=where)


def report_url(report: str | None) -> str | None:
    """The evaluation report as a URL a browser opens: ``file://`` for a local path, else as recorded."""
    if not report:
        return None
    if "://" in report:
        return report
    return Path(report).resolve().as_uri()


# What a task's single return value means: KFP records it under the name "Output".
RESULT_NAMES = {"fingerprint": "fingerprint", "evaluate": "gate passed", "register": "version"}
TASK_ORDER = ("fingerprint", "tokenize", "extract-features", "train", "evaluate", "register")
