"""Submit and schedule the compiled pipeline on Kubeflow Pipelines or Vertex AI Pipelines.

The clients are passed in (``client=``/``aiplatform=``) so tests can check what is sent without a
cluster; by default they are ``kfp.Client(host)`` and ``google.cloud.aiplatform``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from captioner.pipelines.pipeline import DEFAULT_IMAGE, PIPELINE_NAME, compile_pipeline

from captioner.errors import CaptionerError

# None, not True: both clients apply a run-level True to EVERY task, overriding the compiled
# per-task options, so the fingerprint and evaluate steps (never cached) would be answered from the
# cache and a scheduled run over new data would retrain nothing. None keeps the compiled options.
COMPILED_CACHING = None


def pipeline_parameters(config: str, overrides: list[str], model_repo: str, model_name: str = "captioner",
                        bleu4_floor: float = 0.1, tolerance: float = 0.005, accelerator_type: str | None = None,
                        accelerator_count: int | None = None,
                        allow_unscorable_champion: bool = False) -> dict[str, Any]:
    params: dict[str, Any] = {"config": config, "overrides": list(overrides), "model_repo": model_repo,
                              "model_name": model_name, "bleu4_floor": bleu4_floor, "tolerance": tolerance,
                              "allow_unscorable_champion": allow_unscorable_champion}
    if accelerator_type is not None:
        params["accelerator_type"] = accelerator_type
    if accelerator_count is not None:
        params["accelerator_count"] = accelerator_count
    return params


def _package(package: str | Path | None, image: str) -> str:
    if package:
        if not Path(package).is_file():
            raise CaptionerError("compiled pipeline not found (run `captioner pipeline compile`)", path=str(package))
        return str(package)
    return compile_pipeline(Path(tempfile.mkdtemp(prefix="captioner-pipeline-")) / "pipeline.yaml", image)


def kfp_cron(expression: str) -> str:
    """KFP recurring runs take 6-field cron (seconds first); accept the usual 5-field form too."""
    fields = expression.split()
    if len(fields) == 5:
        return "0 " + expression
    if len(fields) == 6:
        return expression
    raise CaptionerError(f"--cron {expression!r}: expected 5 fields (min hour day month weekday)", field="cron")


def submit_kfp(host: str, params: dict[str, Any], *, experiment: str = "captioner", run_name: str | None = None,
               package: str | Path | None = None, image: str = DEFAULT_IMAGE, client=None) -> str:
    if client is None:
        import kfp

        client = kfp.Client(host=host)
    run = client.create_run_from_pipeline_package(
        _package(package, image), arguments=params, run_name=run_name or f"{PIPELINE_NAME}-{params['config']}",
        experiment_name=experiment, enable_caching=COMPILED_CACHING)
    return run.run_id


def schedule_kfp(host: str, cron: str, params: dict[str, Any], *, experiment: str = "captioner",
                 name: str = "captioner-retraining", package: str | Path | None = None, image: str = DEFAULT_IMAGE,
                 client=None) -> str:
    if client is None:
        import kfp

        client = kfp.Client(host=host)
    experiment_id = client.create_experiment(name=experiment).experiment_id
    job = client.create_recurring_run(
        experiment_id=experiment_id, job_name=name, cron_expression=kfp_cron(cron), max_concurrency=1,
        pipeline_package_path=_package(package, image), params=params, enable_caching=COMPILED_CACHING)
    return job.recurring_run_id


def _vertex_job(aiplatform, project: str, region: str, pipeline_root: str, params: dict[str, Any],
                package: str | Path | None, image: str, display_name: str):
    if not pipeline_root.startswith("gs://"):
        raise CaptionerError("Vertex AI Pipelines needs a gs:// --pipeline-root", field="pipeline_root")
    aiplatform.init(project=project, location=region)
    return aiplatform.PipelineJob(display_name=display_name, template_path=_package(package, image),
                                  pipeline_root=pipeline_root, parameter_values=params,
                                  enable_caching=COMPILED_CACHING,
                                  project=project, location=region)


def submit_vertex(project: str, region: str, pipeline_root: str, params: dict[str, Any], *,
                  experiment: str | None = "captioner", service_account: str | None = None,
                  package: str | Path | None = None, image: str = DEFAULT_IMAGE, aiplatform=None) -> str:
    if aiplatform is None:
        from google.cloud import aiplatform
    job = _vertex_job(aiplatform, project, region, pipeline_root, params, package, image,
                      f"{PIPELINE_NAME}-{params['config']}")
    job.submit(service_account=service_account, experiment=experiment)
    return job.resource_name


def schedule_vertex(project: str, region: str, pipeline_root: str, cron: str, params: dict[str, Any], *,
                    name: str = "captioner-retraining", service_account: str | None = None,
                    package: str | Path | None = None, image: str = DEFAULT_IMAGE, aiplatform=None) -> str:
    if aiplatform is None:
        from google.cloud import aiplatform
    if len(cron.split()) != 5 and not cron.startswith(("TZ=", "CRON_TZ=")):
        raise CaptionerError(f"--cron {cron!r}: expected 5 fields (min hour day month weekday)", field="cron")
    job = _vertex_job(aiplatform, project, region, pipeline_root, params, package, image, name)
    schedule = job.create_schedule(display_name=name, cron=cron, max_concurrent_run_count=1,
                                   service_account=service_account)
    return schedule.resource_name
