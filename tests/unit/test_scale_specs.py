"""Issue #11: the train step on several machines. The pipeline compiles with the train step as a
Vertex AI custom job (the worker pools gcpc's wrapper would build) and as a Kubeflow TFJob; these
tests read the specs that would be sent (no cluster is reachable here)."""

import json
from pathlib import Path

import pytest
import yaml
from captioner.pipelines.pipeline import DEFAULT_IMAGE, compile_pipeline
from captioner.pipelines.scale import (
    GCPC_LAUNCHER_IMAGE,
    TrainScale,
    replica_executor_inputs,
    tfjob_manifest,
)

from captioner.errors import CaptionerError

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
# The train step's own container, as the single-container pipeline runs it.
STEP = yaml.safe_load((ROOT / "pipeline.yaml").read_text())["deploymentSpec"]["executors"]["exec-train"]["container"]


def _compiled(tmp_path, scale):
    path = compile_pipeline(tmp_path / "pipeline.yaml", scale=scale)
    return yaml.safe_load(Path(path).read_text())


def _train_task(spec):
    task = spec["root"]["dag"]["tasks"]["train"]
    assert task["inputs"]["parameters"]["distribute"] == {"runtimeValue": {"constant": "multi_worker"}}
    return task


def test_vertex_custom_job_worker_pools_on_gpus(tmp_path):
    scale = TrainScale("vertex-custom-job", 3, machine_type="n1-standard-16", accelerator_type="NVIDIA_TESLA_T4",
                       accelerator_count=2)
    spec = _compiled(tmp_path, scale)
    task = _train_task(spec)
    # Same data in as the plain step: the collected features and the vocabulary.
    assert task["inputs"]["artifacts"]["features"]["taskOutputArtifact"]["producerTask"] == "collect-features"
    component = spec["components"]["comp-train"]
    assert set(component["outputDefinitions"]["artifacts"]) == {"model", "metrics"}
    assert {"vocab", "features"} == set(component["inputDefinitions"]["artifacts"])
    pools = component["inputDefinitions"]["parameters"]["worker_pool_specs"]["defaultValue"]
    # Pool 0 is the chief, pool 1 the other workers, on the same machines.
    assert [pool["replica_count"] for pool in pools] == [1, 2]
    for pool in pools:
        assert pool["machine_spec"] == {"machine_type": "n1-standard-16", "accelerator_type": "NVIDIA_TESLA_T4",
                                        "accelerator_count": 2}
        container = pool["container_spec"]
        assert container["image_uri"] == DEFAULT_IMAGE == STEP["image"]
        assert container["command"] == STEP["command"]
        # The executor input goes into a JSON payload, hence the JSON-escaped placeholder.
        assert STEP["args"] == ["--executor_input", "{{$}}", "--function_to_execute", "train"]
        assert container["args"] == ["--executor_input", "{{$.json_escape[1]}}", "--function_to_execute", "train"]
        # Vertex AI writes TF_CONFIG on each replica; a value of ours would be wrong on all but one.
        assert "TF_CONFIG" not in json.dumps(container["env"])
    launcher = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert launcher["image"] == GCPC_LAUNCHER_IMAGE
    assert launcher["command"][-1] == "google_cloud_pipeline_components.container.v1.custom_job.launcher"
    payload = launcher["args"][launcher["args"].index("--payload") + 1]
    # The pools go into the payload as JSON (unquoted), the display name as a string.
    assert '"worker_pool_specs": {{$.inputs.parameters[\'worker_pool_specs\']}}' in payload
    assert '"display_name": "{{$.inputs.parameters[\'display_name\']}}"' in payload
    assert launcher["args"][launcher["args"].index("--project") + 1] == "{{$.inputs.parameters['project']}}"
    # The launcher itself requests no GPU: the machines are in the pools.
    assert "accelerator" not in json.dumps(launcher.get("resources", {}))


def test_vertex_custom_job_on_cpus_and_one_replica(tmp_path):
    pools = _compiled(tmp_path, TrainScale("vertex-custom-job", 1))["components"]["comp-train"][
        "inputDefinitions"]["parameters"]["worker_pool_specs"]["defaultValue"]
    assert len(pools) == 1 and pools[0]["replica_count"] == 1
    assert pools[0]["machine_spec"] == {"machine_type": "n1-standard-8"}


EXECUTOR_INPUT = {
    "inputs": {"parameterValues": {"config": "{}", "overrides": [], "fingerprint": "data=1",
                                   "distribute": "multi_worker"},
               "artifacts": {name: {"artifacts": [{"name": name, "uri": f"gs://bkt/root/run/{step}/{name}"}]}
                             for name, step in (("vocab", "tokenize"), ("features", "collect-features"))}},
    "outputs": {"artifacts": {name: {"artifacts": [{"name": name, "uri": f"gs://bkt/root/run/train/{name}"}]}
                              for name in ("model", "metrics")},
                "outputFile": "/tmp/kfp_outputs/output_metadata.json"},
}


def test_tfjob_step_and_manifest(tmp_path):
    scale = TrainScale("tfjob", 3, accelerator_type="NVIDIA_TESLA_T4", accelerator_count=2)
    spec = _compiled(tmp_path, scale)
    _train_task(spec)
    launcher = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    # The launcher runs in the component image and passes on the train step's own container.
    assert launcher["image"] == DEFAULT_IMAGE
    assert launcher["command"][-2:] == ["captioner.pipelines.scale", "launch-tfjob"]
    assert launcher["args"][:2] == ["--executor-input", "{{$}}"]
    passed = json.loads(launcher["args"][3])
    assert (passed["image"], passed["command"], passed["args"]) == (STEP["image"], STEP["command"], STEP["args"])
    assert passed["trainer"]["replicas"] == 3 and "accelerator" not in json.dumps(launcher["resources"])

    chief, workers, bucket = replica_executor_inputs(EXECUTOR_INPUT)
    assert bucket == "bkt"
    # Every replica sees the same artifacts (gs://, at /gcs; the library lets the chief alone write the
    # run); the chief's executor output goes next to them for the launcher, the workers' to /tmp.
    assert chief["inputs"] == workers["inputs"] == EXECUTOR_INPUT["inputs"]
    assert chief["outputs"]["artifacts"] == workers["outputs"]["artifacts"] == EXECUTOR_INPUT["outputs"]["artifacts"]
    assert chief["outputs"]["outputFile"] == "/gcs/bkt/root/run/train/model.executor_output.json"
    assert workers["outputs"]["outputFile"] == "/tmp/captioner-worker/executor_output.json"

    def args(replica_input):
        return [json.dumps(replica_input) if a == "{{$}}" else a for a in passed["args"]]

    manifest = tfjob_manifest("captioner-train-1", "kubeflow", passed["image"], passed["command"], args(chief),
                              args(workers), scale, bucket)
    assert (manifest["apiVersion"], manifest["kind"]) == ("kubeflow.org/v1", "TFJob")
    replicas = manifest["spec"]["tfReplicaSpecs"]
    assert {name: r["replicas"] for name, r in replicas.items()} == {"Chief": 1, "Worker": 2}
    for name, replica in replicas.items():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "tensorflow"  # what the training operator looks for
        assert (container["image"], container["command"]) == (STEP["image"], STEP["command"])
        executor_input = json.loads(container["args"][1])
        assert executor_input == (chief if name == "Chief" else workers)
        assert executor_input["inputs"]["parameterValues"]["distribute"] == "multi_worker"
        # The training operator sets TF_CONFIG (chief + workers); we set none.
        assert "env" not in container and "\"name\": \"TF_CONFIG\"" not in json.dumps(manifest)
        assert container["resources"]["limits"] == {"nvidia.com/gpu": 2}
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
        assert container["volumeMounts"] == [{"name": "pipeline-root", "mountPath": "/gcs/bkt"}]
        assert pod["volumes"][0]["csi"]["volumeAttributes"]["bucketName"] == "bkt"


def test_tfjob_on_cpus_and_refusals():
    manifest = tfjob_manifest("j", "ns", "img", ["python"], ["a"], ["b"], TrainScale("tfjob", 1), "bkt")
    assert list(manifest["spec"]["tfReplicaSpecs"]) == ["Chief"]
    container = manifest["spec"]["tfReplicaSpecs"]["Chief"]["template"]["spec"]["containers"][0]
    assert "limits" not in container["resources"]
    local = json.loads(json.dumps(EXECUTOR_INPUT).replace("gs://bkt", "minio://mlpipeline"))
    with pytest.raises(CaptionerError, match="needs a gs:// pipeline root"):
        replica_executor_inputs(local)
    with pytest.raises(CaptionerError, match="needs --trainer vertex-custom-job or tfjob"):
        TrainScale("step", 2)
    with pytest.raises(CaptionerError, match="expected one of step, vertex-custom-job, tfjob"):
        TrainScale("slurm", 2)
    with pytest.raises(CaptionerError, match="needs --train-accelerator-type"):
        TrainScale("tfjob", 2, accelerator_count=1)


def test_the_default_pipeline_trains_in_one_container():
    spec = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    assert "distribute" not in spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert STEP["image"] == DEFAULT_IMAGE and "worker_pool_specs" not in json.dumps(spec)
