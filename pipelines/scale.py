"""The train step on more than one machine: a Vertex AI custom job or a Kubeflow TFJob.

Both run the train component's own image and command on every replica, with
``train.distribute=multi_worker`` (the step's ``distribute`` input) and ``TF_CONFIG`` set by the
platform, never by us: Vertex AI writes it for each replica of a custom job (pool 0 is the chief),
the Kubeflow training operator for each replica of a TFJob (``Chief`` and ``Worker``).

**Vertex AI.** google-cloud-pipeline-components (gcpc) would wrap the component with
``create_custom_training_job_from_component``. Every gcpc release that supports kfp 2.x
(2.22.0 included) requires ``google-cloud-aiplatform<2``, and this stack pins
``google-cloud-aiplatform==2.7.0`` (``pip install --dry-run`` resolves gcpc 2.22.0 with kfp 2.17.3
only by going back to aiplatform 1.x), so ``vertex_custom_job`` builds the same component
itself: the worker pool specs gcpc builds, run by gcpc's CustomJob launcher image (which brings its
own gcpc; nothing of it is installed here), with the wrapped component's inputs and outputs.

**Kubeflow.** ``tfjob_component`` gives a step with the train component's inputs and outputs whose
container (the component image) creates a TFJob from ``tfjob_manifest`` and waits for it. The
replicas read the inputs and the outputs where the executor input says (the library lets only the
chief write them), so the pipeline root must be a ``gs://`` bucket that the replicas mount at
``/gcs/<bucket>`` (GKE's Cloud Storage FUSE CSI driver, as KFP names local paths); the launcher then
downloads the outputs into its own output paths for KFP to record, with the chief's executor output.
"""

# No `from __future__ import annotations`: KFP reads the launcher component's annotations as types.
import copy
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.errors import CaptionerError

TRAINERS = ("step", "vertex-custom-job", "tfjob")
# The CustomJob launcher that gcpc's wrapper runs; pinned to the gcpc release whose wrapper this follows.
GCPC_VERSION = "2.22.0"
GCPC_LAUNCHER_IMAGE = f"gcr.io/ml-pipeline/google-cloud-pipeline-components:{GCPC_VERSION}"
DEFAULT_MACHINE_TYPE = "n1-standard-8"
EXECUTOR_INPUT = "{{$}}"
# gcpc embeds the executor input in the job payload (itself a JSON string), so it must be JSON-escaped.
JSON_ESCAPED_EXECUTOR_INPUT = "{{$.json_escape[1]}}"
TFJOB_LAUNCHER_MODULE = "captioner.pipelines.scale"
# Kubernetes resources of each TFJob replica (what the single train step requests).
TFJOB_CPU, TFJOB_MEMORY = "4", "16G"


@dataclass(frozen=True)
class TrainScale:
    """How the pipeline's train step runs: ``step`` (one container, the default), or
    ``vertex-custom-job`` / ``tfjob`` with ``replicas`` machines (one chief, the rest workers)."""

    trainer: str = "step"
    replicas: int = 1
    machine_type: str = DEFAULT_MACHINE_TYPE
    accelerator_type: str = ""
    accelerator_count: int = 0

    def __post_init__(self):
        if self.trainer not in TRAINERS:
            raise CaptionerError(f"--trainer {self.trainer!r}: expected one of {', '.join(TRAINERS)}",
                                 field="trainer")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise CaptionerError(f"--train-replicas {self.replicas!r}: must be >= 1", field="train_replicas")
        if self.trainer == "step" and self.replicas > 1:
            raise CaptionerError(f"--train-replicas {self.replicas} needs --trainer vertex-custom-job or tfjob (the "
                                 "plain step runs one container)", field="train_replicas")
        if self.accelerator_count < 0:
            raise CaptionerError(f"--train-accelerator-count {self.accelerator_count}: must be >= 0",
                                 field="train_accelerator_count")
        if self.accelerator_count and not self.accelerator_type:
            raise CaptionerError("--train-accelerator-count needs --train-accelerator-type (e.g. NVIDIA_TESLA_T4)",
                                 field="train_accelerator_type")

    @property
    def distributed(self) -> bool:
        return self.trainer != "step"

    @property
    def gpus(self) -> int:
        """GPUs per replica: one when a type is named without a count (as gcpc does)."""
        return (self.accelerator_count or 1) if self.accelerator_type else 0


def _component_dict(component) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(component.pipeline_spec)


def component_container(component) -> dict[str, Any]:
    """The container (image, command, args) of a single-container component."""
    executors = _component_dict(component)["deploymentSpec"]["executors"]
    if len(executors) != 1:
        raise CaptionerError(f"expected a single-container component, got {len(executors)} executors")
    return next(iter(executors.values()))["container"]


# -- Vertex AI custom job ------------------------------------------------------------------------
def vertex_worker_pool_specs(component, scale: TrainScale) -> list[dict[str, Any]]:
    """The CustomJob worker pools gcpc's ``create_custom_training_job_from_component`` builds:
    pool 0 is the chief (one replica), pool 1 the other ``replicas - 1``, both the same machine."""
    container = component_container(component)

    def escaped(parts: list[str]) -> list[str]:
        return [JSON_ESCAPED_EXECUTOR_INPUT if part == EXECUTOR_INPUT else part for part in parts]

    pool: dict[str, Any] = {
        "machine_spec": {"machine_type": scale.machine_type},
        "replica_count": 1,
        "container_spec": {"image_uri": container["image"], "command": escaped(container.get("command", [])),
                           "args": escaped(container.get("args", [])), "env": []},
        "disk_spec": {"boot_disk_type": "pd-ssd", "boot_disk_size_gb": 100},
    }
    if scale.accelerator_type:
        pool["machine_spec"].update(accelerator_type=scale.accelerator_type, accelerator_count=scale.gpus)
    pools = [pool]
    if scale.replicas > 1:
        workers = copy.deepcopy(pool)
        workers["replica_count"] = scale.replicas - 1
        pools.append(workers)
    return pools


def _payload_json(payload: dict[str, Any]) -> str:
    """JSON with KFP placeholders in it; a non-string input's placeholder loses its quotes so that
    the backend puts the value itself there (gcpc's ``container_component_dumps``)."""
    from kfp.dsl import placeholders

    unquoted: list[str] = []

    def walk(value):
        if isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, placeholders.InputValuePlaceholder) and value._ir_type != "STRING":
            unquoted.append(value.input_name)

    def encode(value):
        if isinstance(value, placeholders.Placeholder):
            return str(value)
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    walk(payload)
    text = json.dumps(payload, default=encode)
    for name in unquoted:
        text = re.sub(rf"\"\{{\{{\$\.inputs\.parameters\['{name}'\]\}}\}}\"",
                      f"{{{{$.inputs.parameters['{name}']}}}}", text)
    return text


def _custom_job_launcher():
    """gcpc's ``custom_training_job`` component: its launcher creates the CustomJob and waits."""
    from kfp import dsl

    @dsl.container_component
    def custom_training_job(
        display_name: str,
        gcp_resources: dsl.OutputPath(str),
        location: str = "{{$.pipeline_google_cloud_location}}",
        worker_pool_specs: list = [],  # noqa: B006 - a KFP input's default
        timeout: str = "604800s",
        restart_job_on_worker_restart: bool = False,
        service_account: str = "",
        base_output_directory: str = "",
        project: str = "{{$.pipeline_google_cloud_project_id}}",
    ):
        payload = {"display_name": display_name,
                   "job_spec": {"worker_pool_specs": worker_pool_specs,
                                "scheduling": {"timeout": timeout,
                                               "restart_job_on_worker_restart": restart_job_on_worker_restart},
                                "service_account": service_account,
                                "base_output_directory": {"output_uri_prefix": base_output_directory}}}
        return dsl.ContainerSpec(
            image=GCPC_LAUNCHER_IMAGE,
            command=["python3", "-u", "-m", "google_cloud_pipeline_components.container.v1.custom_job.launcher"],
            args=["--type", "CustomJob", "--payload", _payload_json(payload), "--project", project,
                  "--location", location, "--gcp_resources", gcp_resources])

    return custom_training_job


def vertex_custom_job(component, scale: TrainScale, display_name: str = "", timeout: str = "604800s"):
    """``component`` as a Vertex AI custom job over ``scale.replicas`` machines, with the inputs and
    outputs of ``component`` (the merge gcpc's wrapper does, for its launcher above)."""
    from kfp import components

    job = _component_dict(_custom_job_launcher())
    user = _component_dict(component)
    job_spec = next(iter(job["components"].values()))
    user_spec = next(iter(user["components"].values()))
    defaults = {"display_name": display_name or component.component_spec.name,
                "worker_pool_specs": vertex_worker_pool_specs(component, scale), "timeout": timeout}
    for name, value in defaults.items():
        job_spec["inputDefinitions"]["parameters"][name]["defaultValue"] = value
    job_spec["inputDefinitions"]["parameters"].update(user_spec.get("inputDefinitions", {}).get("parameters", {}))
    job_spec["outputDefinitions"]["parameters"].update(user_spec.get("outputDefinitions", {}).get("parameters", {}))
    job_spec["inputDefinitions"]["artifacts"] = user_spec.get("inputDefinitions", {}).get("artifacts", {})
    job_spec["outputDefinitions"]["artifacts"] = user_spec.get("outputDefinitions", {}).get("artifacts", {})
    job["root"]["inputDefinitions"] = copy.deepcopy(job_spec["inputDefinitions"])
    job["root"]["outputDefinitions"] = copy.deepcopy(job_spec["outputDefinitions"])
    job_task = next(iter(job["root"]["dag"]["tasks"].values()))
    job_task["inputs"].update(next(iter(user["root"]["dag"]["tasks"].values())).get("inputs", {}))
    import yaml

    wrapped = components.load_component_from_text(yaml.safe_dump(job))
    wrapped.component_spec.name = component.component_spec.name
    return wrapped


# -- Kubeflow TFJob ------------------------------------------------------------------------------
def tfjob_manifest(name: str, namespace: str, image: str, command: list[str], chief_args: list[str],
                   worker_args: list[str], scale: TrainScale, bucket: str) -> dict[str, Any]:
    """A ``kubeflow.org/v1`` TFJob: one ``Chief`` and ``replicas - 1`` ``Worker`` replicas of the
    component's container; the training operator sets ``TF_CONFIG`` in each. ``bucket`` (the
    pipeline root's) is mounted at ``/gcs/<bucket>``, where the executor input names the artifacts."""

    def replica(count: int, args: list[str]) -> dict[str, Any]:
        resources: dict[str, Any] = {"requests": {"cpu": TFJOB_CPU, "memory": TFJOB_MEMORY}}
        if scale.gpus:
            resources["limits"] = {"nvidia.com/gpu": scale.gpus}
        pod: dict[str, Any] = {
            "metadata": {"annotations": {"gke-gcsfuse/volumes": "true"}},
            "spec": {
                # The training operator finds the TensorFlow container by this name.
                "containers": [{"name": "tensorflow", "image": image, "command": list(command), "args": args,
                                "resources": resources,
                                "volumeMounts": [{"name": "pipeline-root", "mountPath": f"/gcs/{bucket}"}]}],
                "volumes": [{"name": "pipeline-root",
                             "csi": {"driver": "gcsfuse.csi.storage.gke.io",
                                     "volumeAttributes": {"bucketName": bucket, "mountOptions": "implicit-dirs"}}}],
            },
        }
        if scale.accelerator_type:
            # GKE's node label for a GPU model: NVIDIA_TESLA_T4 -> nvidia-tesla-t4.
            pod["spec"]["nodeSelector"] = {
                "cloud.google.com/gke-accelerator": scale.accelerator_type.lower().replace("_", "-")}
        return {"replicas": count, "restartPolicy": "OnFailure", "template": pod}

    specs = {"Chief": replica(1, chief_args)}
    if scale.replicas > 1:
        specs["Worker"] = replica(scale.replicas - 1, worker_args)
    return {"apiVersion": "kubeflow.org/v1", "kind": "TFJob",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": "captioner-train"}},
            "spec": {"runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3}, "tfReplicaSpecs": specs}}


def _local_path(uri: str) -> str:
    """Where a KFP container sees an artifact (gs://b/x -> /gcs/b/x)."""
    if not uri.startswith("gs://"):
        raise CaptionerError(f"--trainer tfjob needs a gs:// pipeline root (mounted by the replicas at /gcs); "
                             f"got the artifact URI {uri!r}", field="pipeline_root")
    return "/gcs/" + uri[len("gs://"):]


def replica_executor_inputs(executor_input: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The executor inputs of the chief and of the workers, and the bucket they use.

    Every replica sees the same artifacts (their ``gs://`` URIs, at ``/gcs``), as on Vertex AI: the
    library lets only the chief write the run there (``train.distribute=multi_worker``), and the
    workers resume from its checkpoints. The chief writes its executor output next to the first
    output artifact, for the launcher to read; the workers' goes under ``/tmp``.
    """
    artifacts = [a for group in executor_input.get("inputs", {}).get("artifacts", {}).values()
                 for a in group.get("artifacts", [])]
    outputs = executor_input.get("outputs", {})
    produced = [a for group in outputs.get("artifacts", {}).values() for a in group.get("artifacts", [])]
    for artifact in [*artifacts, *produced]:
        _local_path(artifact["uri"])
    if not produced:
        raise CaptionerError("the trained step has no output artifact to write next to")
    bucket = produced[0]["uri"][len("gs://"):].split("/", 1)[0]
    chief = copy.deepcopy(executor_input)
    chief["outputs"]["outputFile"] = _local_path(produced[0]["uri"]) + ".executor_output.json"
    workers = copy.deepcopy(executor_input)
    for name, parameter in workers["outputs"].get("parameters", {}).items():
        parameter["outputFile"] = f"/tmp/captioner-worker/parameters/{name}"
    workers["outputs"]["outputFile"] = "/tmp/captioner-worker/executor_output.json"
    return chief, workers, bucket


def _tfjob_launcher_container(component, scale: TrainScale) -> dict[str, Any]:
    container = component_container(component)
    spec = {"image": container["image"], "command": container.get("command", []), "args": container.get("args", []),
            "trainer": {"replicas": scale.replicas, "machine_type": scale.machine_type,
                        "accelerator_type": scale.accelerator_type, "accelerator_count": scale.accelerator_count}}
    return {"image": container["image"], "command": ["python3", "-u", "-m", TFJOB_LAUNCHER_MODULE, "launch-tfjob"],
            "args": ["--executor-input", EXECUTOR_INPUT, "--spec", json.dumps(spec, sort_keys=True)]}


def tfjob_component(component, scale: TrainScale):
    """A step with ``component``'s inputs and outputs that runs it as a TFJob (see the module doc)."""
    import yaml
    from kfp import components

    spec = _component_dict(component)
    executor = next(iter(spec["deploymentSpec"]["executors"].values()))
    resources = executor["container"].get("resources")
    executor["container"] = _tfjob_launcher_container(component, scale)
    if resources:
        executor["container"]["resources"] = resources
    wrapped = components.load_component_from_text(yaml.safe_dump(spec))
    wrapped.component_spec.name = component.component_spec.name
    return wrapped


def _run_tfjob(executor_input: dict[str, Any], spec: dict[str, Any], poll_seconds: float = 30.0) -> None:
    """In the launcher container: create the TFJob, wait for it, then copy the chief's outputs into
    this container's output paths (KFP uploads those) and its executor output into ours."""
    from google.cloud import storage
    from kubernetes import client, config

    scale = TrainScale(trainer="tfjob", **spec["trainer"])
    chief, workers, bucket = replica_executor_inputs(executor_input)

    def args(replica_input):
        return [json.dumps(replica_input) if part == EXECUTOR_INPUT else part for part in spec["args"]]

    namespace = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
    name = f"captioner-train-{int(time.time())}"
    manifest = tfjob_manifest(name, namespace, spec["image"], spec["command"], args(chief), args(workers), scale,
                              bucket)
    config.load_incluster_config()
    api = client.CustomObjectsApi()
    api.create_namespaced_custom_object("kubeflow.org", "v1", namespace, "tfjobs", manifest)
    print(f"TFJob {namespace}/{name}: {scale.replicas} replica(s)", flush=True)
    while True:
        time.sleep(poll_seconds)
        status = api.get_namespaced_custom_object("kubeflow.org", "v1", namespace, "tfjobs", name).get("status", {})
        done = {c["type"]: c for c in status.get("conditions", []) if c.get("status") == "True"}
        if "Succeeded" in done:
            break
        if "Failed" in done:
            raise CaptionerError(f"TFJob {namespace}/{name} failed: {done['Failed'].get('message', '')}")
    gcs = storage.Client()
    for group in executor_input["outputs"].get("artifacts", {}).values():
        for artifact in group.get("artifacts", []):
            prefix = artifact["uri"][len(f"gs://{bucket}/"):]
            local = Path(_local_path(artifact["uri"]))
            for blob in gcs.list_blobs(bucket, prefix=prefix):
                if blob.name.endswith("/"):
                    continue
                rest = blob.name[len(prefix):].lstrip("/")
                target = local / rest if rest else local
                target.parent.mkdir(parents=True, exist_ok=True)
                blob.download_to_filename(str(target))
    result = gcs.bucket(bucket).blob(chief["outputs"]["outputFile"][len(f"/gcs/{bucket}/"):]).download_as_text()
    out = Path(executor_input["outputs"]["outputFile"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 5 or argv[0] != "launch-tfjob" or argv[1] != "--executor-input" or argv[3] != "--spec":
        raise SystemExit("usage: python -m captioner.pipelines.scale launch-tfjob --executor-input JSON --spec JSON")
    _run_tfjob(json.loads(argv[2]), json.loads(argv[4]))


if __name__ == "__main__":
    main()
