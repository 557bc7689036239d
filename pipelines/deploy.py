"""Submit and schedule the compiled pipeline on Kubeflow Pipelines or Vertex AI Pipelines.

Everything that can be checked on this machine is, before a client is created: the config and its
overrides (resolved, then sent as JSON: a cluster cannot read a YAML file that exists only here),
the cron expression, the package. The clients are passed in (``client=``/``aiplatform=``) so tests
can check what is sent without a cluster; by default they are ``kfp.Client(host)`` and
``google.cloud.aiplatform``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from captioner.pipelines.fanout import check_shards
from captioner.pipelines.pipeline import DEFAULT_IMAGE, PIPELINE_NAME, compile_pipeline
from captioner.pipelines.scale import TrainScale
from captioner.pipelines.step_config import config_label, embed_config, is_embedded

from captioner.config import load_config
from captioner.errors import CaptionerError

# None, not True: both clients apply a run-level True to EVERY task, overriding the compiled
# per-task options, so the fingerprint and evaluate steps (never cached) would be answered from the
# cache and a scheduled run over new data would retrain nothing. None keeps the compiled options.
COMPILED_CACHING = None


def pipeline_parameters(config: str, overrides: list[str], model_repo: str, model_name: str = "captioner",
                        bleu4_floor: float = 0.1, tolerance: float = 0.005, accelerator_type: str | None = None,
                        accelerator_count: int | None = None,
                        allow_unscorable_champion: bool = False, extract_shards: int | None = None) -> dict[str, Any]:
    """The run's parameters, with the config resolved and validated HERE (ConfigError names the field).

    The cluster cannot read a YAML file of this machine, so ``config`` carries the resolved config
    as JSON (overrides applied, hence ``overrides`` is empty); the steps rebuild it from that.
    """
    cfg = load_config(config, list(overrides))
    params: dict[str, Any] = {"config": embed_config(cfg), "overrides": [], "model_repo": model_repo,
                              "model_name": model_name, "bleu4_floor": bleu4_floor, "tolerance": tolerance,
                              "allow_unscorable_champion": allow_unscorable_champion}
    if accelerator_type is not None:
        params["accelerator_type"] = accelerator_type
    if accelerator_count is not None:
        if accelerator_count < 0:
            raise CaptionerError(f"--accelerator-count {accelerator_count}: must be >= 0", field="accelerator_count")
        params["accelerator_count"] = accelerator_count
    if extract_shards is not None:
        params["extract_shards"] = check_shards(extract_shards)
    return params


def train_scale(trainer: str | None, replicas: int = 1, *, vertex: bool | None = None,
                machine_type: str | None = None, accelerator_type: str | None = None,
                accelerator_count: int | None = None, package: str | Path | None = None) -> TrainScale | None:
    """The compile-time shape of the train step, checked against where it runs (``vertex``: True for
    Vertex AI, False for Kubeflow Pipelines, None when only compiling). None: the plain step.

    Several replicas without ``--trainer`` mean the target's own kind: a custom job on Vertex AI, a
    TFJob on Kubeflow."""
    if trainer is None and replicas > 1 and vertex is not None:
        trainer = "vertex-custom-job" if vertex else "tfjob"
    extra = {"machine_type": machine_type, "accelerator_type": accelerator_type,
             "accelerator_count": accelerator_count}
    if trainer in (None, "step") and replicas == 1 and not any(v for v in extra.values()):
        return None
    scale = TrainScale(trainer=trainer or "step", replicas=replicas,
                       **{k: v for k, v in extra.items() if v is not None})
    if scale.trainer == "step":
        raise CaptionerError("--train-machine-type/--train-accelerator-* shape a multi-machine trainer: add "
                             "--trainer vertex-custom-job or tfjob", field="trainer")
    if vertex is True and scale.trainer == "tfjob":
        raise CaptionerError("--trainer tfjob runs on Kubeflow (--host), not on Vertex AI (use vertex-custom-job)",
                             field="trainer")
    if vertex is False and scale.trainer == "vertex-custom-job":
        raise CaptionerError("--trainer vertex-custom-job runs on Vertex AI (--vertex), not on Kubeflow Pipelines "
                             "(use tfjob)", field="trainer")
    if package:
        raise CaptionerError(f"--trainer/--train-replicas are fixed when the pipeline is compiled; {package} is "
                             "compiled already (compile it with them, or leave out --package)", path=str(package))
    return scale


def _run_label(params: dict[str, Any]) -> str:
    return f"{PIPELINE_NAME}-{config_label(str(params['config']))}"


def check_package(package: str | Path, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a compiled pipeline package; refuse what a KFP backend or Vertex would refuse later:
    not a file, not YAML, not a pipeline spec, or parameters it does not declare."""
    path = Path(package)
    if not path.is_file():
        raise CaptionerError("compiled pipeline not found (run `captioner pipeline compile`)", path=str(path))
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CaptionerError(f"not a compiled pipeline (invalid YAML: {exc})", path=str(path)) from None
    if not isinstance(spec, dict) or "pipelineInfo" not in spec or "root" not in spec:
        raise CaptionerError("not a compiled KFP pipeline (no pipelineInfo/root; run `captioner pipeline "
                             "compile`)", path=str(path))
    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    unknown = sorted(set(params or {}) - set(declared))
    if unknown:
        raise CaptionerError(f"the package does not declare the parameters {', '.join(unknown)} (compiled by "
                             "another release? run `captioner pipeline compile`)", path=str(path))
    # Steps compiled before the config was embedded would take the JSON for a preset name and fail
    # on the cluster; their source (inlined in the package) tells.
    if params and is_embedded(str(params.get("config", ""))) and "load_step_config" not in json.dumps(
            spec.get("deploymentSpec", {})):
        raise CaptionerError("the package's steps predate embedded configs (compiled by an older release): "
                             "run `captioner pipeline compile` again", path=str(path))
    return spec


def package_images(spec: dict[str, Any]) -> set[str]:
    executors = spec.get("deploymentSpec", {}).get("executors", {})
    return {e.get("container", {}).get("image", "") for e in executors.values()} - {""}


def placeholder_image_warning(image: str | None, package: str | Path | None) -> str | None:
    """What to tell the user when the run would use the placeholder component image nobody built
    (or when ``--image`` would be ignored)."""
    if image and package:
        return f"warning: --image {image} is ignored: {package} is already compiled with its images"
    if image:
        return None
    if package:
        if DEFAULT_IMAGE not in package_images(check_package(package)):
            return None
        where = f"{package} names"
    else:
        where = "compiling now with"
    return (f"warning: no --image: {where} the placeholder component image {DEFAULT_IMAGE}; the cluster must be "
            "able to pull it (build and push images/components.Dockerfile, then pass --image REF@sha256:...)")


def _package(package: str | Path | None, image: str, params: dict[str, Any] | None = None,
             scale: TrainScale | None = None) -> str:
    if package:
        check_package(package, params)
        return str(package)
    return compile_pipeline(Path(tempfile.mkdtemp(prefix="captioner-pipeline-")) / "pipeline.yaml", image, scale)


_CRON_FIELDS = {  # name: (low, high, names)
    "second": (0, 59, ()), "minute": (0, 59, ()), "hour": (0, 23, ()), "day of month": (1, 31, ()),
    "month": (1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
    "day of week": (0, 7, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
}


def _cron_value(text: str, low: int, high: int, names: tuple[str, ...]) -> int | None:
    if text.upper() in names:
        return names.index(text.upper()) + (1 if low == 1 else 0)
    if text.isdigit() and low <= int(text) <= high:
        return int(text)
    return None


def _check_cron_field(text: str, name: str, expression: str) -> None:
    low, high, names = _CRON_FIELDS[name]
    bad = CaptionerError(f"--cron {expression!r}: {name} field {text!r} is not valid (allowed: *, ?, "
                         f"{low}-{high}{', ' + '-'.join((names[0], names[-1])) if names else ''}, ranges a-b, "
                         "lists a,b and steps */n)", field="cron")
    for part in text.split(","):
        base, _, step = part.partition("/")
        if step and not (step.isdigit() and int(step) > 0):
            raise bad
        if base in ("*", "?") and (base == "*" or name in ("day of month", "day of week")):
            continue
        start, _, stop = base.partition("-")
        first = _cron_value(start, low, high, names)
        last = _cron_value(stop, low, high, names) if stop else first
        if first is None or last is None or first > last:
            raise bad


def validate_cron(expression: str, *, vertex: bool = False) -> str:
    """Check a cron expression as the scheduler would, before anything is sent.

    Vertex AI takes unix cron (5 fields), optionally after ``TZ=<zone>`` or ``CRON_TZ=<zone>``;
    Kubeflow Pipelines takes 6 fields (seconds first), and the 5-field form gets ``0`` seconds.
    Returns the expression for the chosen scheduler.
    """
    text = " ".join(expression.split())
    zone = ""
    if text.startswith(("TZ=", "CRON_TZ=")):
        if not vertex:
            raise CaptionerError(f"--cron {expression!r}: a time zone prefix is for --vertex only; Kubeflow "
                                 "Pipelines schedules in the cluster's time zone", field="cron")
        zone, _, text = text.partition(" ")
        zone += " "
    fields = text.split()
    names = list(_CRON_FIELDS)
    if len(fields) == 5:
        names = names[1:]
    elif len(fields) != 6 or vertex:
        expected = "5 fields (minute hour day-of-month month day-of-week)" if vertex else \
            "5 fields (minute hour day-of-month month day-of-week) or 6 (seconds first)"
        raise CaptionerError(f"--cron {expression!r}: expected {expected}, e.g. '0 3 * * 1' (Mondays 03:00); "
                             f"got {len(fields)}", field="cron")
    for field_text, name in zip(fields, names, strict=True):
        _check_cron_field(field_text, name, expression)
    if vertex:
        return zone + text
    return text if len(fields) == 6 else "0 " + text


def kfp_cron(expression: str) -> str:
    """KFP recurring runs take 6-field cron (seconds first); accept the usual 5-field form too."""
    return validate_cron(expression)


def submit_kfp(host: str, params: dict[str, Any], *, experiment: str = "captioner", run_name: str | None = None,
               package: str | Path | None = None, image: str = DEFAULT_IMAGE, client=None,
               scale: TrainScale | None = None) -> str:
    template = _package(package, image, params, scale)  # checked before a client talks to the host
    if client is None:
        import kfp

        client = kfp.Client(host=host)
    run = client.create_run_from_pipeline_package(
        template, arguments=params, run_name=run_name or _run_label(params),
        experiment_name=experiment, enable_caching=COMPILED_CACHING)
    return run.run_id


def schedule_kfp(host: str, cron: str, params: dict[str, Any], *, experiment: str = "captioner",
                 name: str = "captioner-retraining", package: str | Path | None = None, image: str = DEFAULT_IMAGE,
                 client=None, scale: TrainScale | None = None) -> str:
    cron_expression = kfp_cron(cron)
    template = _package(package, image, params, scale)
    if client is None:
        import kfp

        client = kfp.Client(host=host)
    experiment_id = client.create_experiment(name=experiment).experiment_id
    job = client.create_recurring_run(
        experiment_id=experiment_id, job_name=name, cron_expression=cron_expression, max_concurrency=1,
        pipeline_package_path=template, params=params, enable_caching=COMPILED_CACHING)
    return job.recurring_run_id


def check_pipeline_root(pipeline_root: str) -> None:
    if not pipeline_root.startswith("gs://"):
        raise CaptionerError("Vertex AI Pipelines needs a gs:// --pipeline-root", field="pipeline_root")


def _vertex_job(aiplatform, project: str, region: str, pipeline_root: str, params: dict[str, Any],
                template: str, display_name: str):
    aiplatform.init(project=project, location=region)
    return aiplatform.PipelineJob(display_name=display_name, template_path=template,
                                  pipeline_root=pipeline_root, parameter_values=params,
                                  enable_caching=COMPILED_CACHING,
                                  project=project, location=region)


def submit_vertex(project: str, region: str, pipeline_root: str, params: dict[str, Any], *,
                  experiment: str | None = "captioner", service_account: str | None = None,
                  package: str | Path | None = None, image: str = DEFAULT_IMAGE, aiplatform=None,
                  scale: TrainScale | None = None) -> str:
    check_pipeline_root(pipeline_root)
    template = _package(package, image, params, scale)
    if aiplatform is None:
        from google.cloud import aiplatform
    job = _vertex_job(aiplatform, project, region, pipeline_root, params, template, _run_label(params))
    job.submit(service_account=service_account, experiment=experiment)
    return job.resource_name


def schedule_vertex(project: str, region: str, pipeline_root: str, cron: str, params: dict[str, Any], *,
                    name: str = "captioner-retraining", service_account: str | None = None,
                    package: str | Path | None = None, image: str = DEFAULT_IMAGE, aiplatform=None,
                    scale: TrainScale | None = None) -> str:
    cron = validate_cron(cron, vertex=True)
    check_pipeline_root(pipeline_root)
    template = _package(package, image, params, scale)
    if aiplatform is None:
        from google.cloud import aiplatform
    job = _vertex_job(aiplatform, project, region, pipeline_root, params, template, name)
    schedule = job.create_schedule(display_name=name, cron=cron, max_concurrent_run_count=1,
                                   service_account=service_account)
    return schedule.resource_name
