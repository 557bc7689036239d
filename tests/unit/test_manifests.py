"""Deployment files: Kubernetes manifests deserialize into the Kubernetes API models and say what
they must; TF Serving's model config parses as its protobuf (the committed one and the registry's)."""

from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from kubernetes import client as k8s
from tensorflow_serving.config import model_server_config_pb2

from captioner.registry import ModelVersionManager

from .test_registry import fake_saved_model

pytestmark = pytest.mark.unit
DEPLOY = Path(__file__).resolve().parents[2] / "serving" / "deploy"
MODELS = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
          ("v1", "ConfigMap"): "V1ConfigMap",
          ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
          ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy"}


def manifests():
    api = k8s.ApiClient()
    out = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kind = MODELS[(doc["apiVersion"], doc["kind"])]
            obj = api._ApiClient__deserialize(doc, kind)  # raises on wrong types / missing required fields
            out[(doc["kind"], doc["metadata"]["name"])] = (doc, obj)
    return out


def test_tfserving_runs_on_gpu_nodes_and_is_ready_only_when_available():
    doc, dep = manifests()[("Deployment", "tfserving")]
    pod = dep.spec.template.spec
    container = pod.containers[0]
    assert container.resources.requests["nvidia.com/gpu"] == "1" and container.resources.limits["nvidia.com/gpu"]
    assert pod.node_selector and any(t.key == "nvidia.com/gpu" for t in pod.tolerations)
    assert "AVAILABLE" in " ".join(container.readiness_probe._exec.command)
    assert any(a.startswith("--model_config_file=gs://") for a in container.args)
    assert any(a.startswith("--batching_parameters_file") for a in container.args)
    assert any(a.startswith("--monitoring_config_file") for a in container.args)


def test_gateway_deployment_service_and_autoscaler():
    objects = manifests()
    _, dep = objects[("Deployment", "captioner-gateway")]
    _, svc = objects[("Service", "captioner-gateway")]
    _, hpa = objects[("HorizontalPodAutoscaler", "captioner-gateway")]
    container = dep.spec.template.spec.containers[0]
    assert container.readiness_probe.http_get.path == "/ready"
    assert container.liveness_probe.http_get.path == "/health"
    env = {e.name: e.value for e in container.env}
    assert env["CAPTIONER_TFSERVING_TARGET"] == "tfserving:8500"
    labels = dep.spec.template.metadata.labels
    assert all(labels[k] == v for k, v in svc.spec.selector.items())
    assert hpa.spec.scale_target_ref.name == "captioner-gateway" and hpa.spec.min_replicas >= 2
    _, tfs = objects[("Service", "tfserving")]
    assert any(p.port == 8500 for p in tfs.spec.ports)


def test_clients_reach_the_gateway_only_through_the_buffering_sidecar():
    objects = manifests()
    _, dep = objects[("Deployment", "captioner-gateway")]
    _, svc = objects[("Service", "captioner-gateway")]
    _, policy = objects[("NetworkPolicy", "captioner-gateway")]
    containers = {c.name: c for c in dep.spec.template.spec.containers}
    sidecar_ports = {p.name: p.container_port for p in containers["nginx"].ports}
    gateway_port = containers["gateway"].ports[0].container_port
    assert [p.target_port for p in svc.spec.ports] == ["http"] and sidecar_ports["http"] == 8080
    assert all(labels.items() <= dep.spec.template.metadata.labels.items()
               for labels in [policy.spec.pod_selector.match_labels])
    open_to_all = [rule for rule in policy.spec.ingress if not rule._from]
    assert [p.port for rule in open_to_all for p in rule.ports] == [8080]
    restricted = [rule for rule in policy.spec.ingress if rule._from]
    assert [p.port for rule in restricted for p in rule.ports] == [gateway_port]
    assert all(peer.pod_selector.match_labels == {"app.kubernetes.io/name": "prometheus"}
               for rule in restricted for peer in rule._from)


def test_model_config_files_parse_as_tf_serving_protos(tmp_path):
    text_format.Parse((DEPLOY / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    manager = ModelVersionManager(tmp_path / "repo")
    manager.register_version(fake_saved_model(tmp_path / "a", "a"))
    manager.register_version(fake_saved_model(tmp_path / "b", "b"))
    manager.promote(1)
    config = text_format.Parse((tmp_path / "repo" / "models.config").read_text(),
                               model_server_config_pb2.ModelServerConfig())
    model = config.model_config_list.config[0]
    assert model.name == "captioner" and model.base_path.endswith("captioner")
    assert list(model.model_version_policy.specific.versions) == [1, 2]
    assert dict(model.version_labels) == {"stable": 1}


def test_batching_and_monitoring_and_compose():
    batching = (DEPLOY / "batching_parameters.txt").read_text()
    assert "max_batch_size" in batching and "pad_variable_length_inputs: true" not in batching
    assert "enable: true" in (DEPLOY / "monitoring.config").read_text()
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    assert set(compose["services"]) == {"tfserving", "gateway"}
    gateway = compose["services"]["gateway"]
    assert (DEPLOY / gateway["build"]["context"] / gateway["build"]["dockerfile"]).is_file()
    assert gateway["environment"]["CAPTIONER_TFSERVING_TARGET"] == "tfserving:8500"
