"""deploy/kubernetes: every document validates offline against the Kubernetes OpenAPI schemas, and carries
the runbook's names and labels, probes, resource limits and security settings.

The schemas come from the ``kubernetes-validate`` package (JSON schemas of every Kubernetes release,
bundled in the wheel; nothing is downloaded). Strict mode rejects unknown fields, so a misspelt key fails.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from caracald.runtime.config import load_config
from tests.deploytools import DEPLOY

KUBERNETES = DEPLOY / "kubernetes"
#: Validated against the oldest release we support and the newest the package knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version() + ".0")

DAEMONS = ["gateway", "ledger-writer", "metrics-aggregator", "audit-logger"]
NAMES = [f"caracal-{d}" for d in DAEMONS]
HPA_DEPLOYMENTS = {"caracal-gateway", "caracal-ledger-writer"}
SECRET_NAME = "caracal-secrets"
SECRETS_DIR = "/run/secrets/caracal"
#: The consumers' health port and paths (the contract the consumer daemons implement).
CONSUMER_HEALTH_PORT = 8080

Doc = dict[str, Any]


def _documents() -> list[tuple[str, Doc]]:
    out = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def _kind(kind: str) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for _, doc in _documents() if doc["kind"] == kind}


def _container(deployment: Doc) -> Doc:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def _port(container: Doc, name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == name_or_number))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_document_validates_against_the_kubernetes_schemas(version: str) -> None:
    documents = _documents()
    assert len(documents) >= 15
    for filename, doc in documents:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{filename}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}"
            )


def test_the_validator_rejects_a_broken_document() -> None:
    """The offline schemas really are checked (not a validator that accepts anything)."""
    deployment = _kind("Deployment")["caracal-gateway"]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    _container(broken)["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == "caracal"
    files = sorted(p.name for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    assert [image["name"] for image in kustomization["images"]] == ["caracal"]


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the kustomization's file list is checked by the test above")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(built) == len(_documents())
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "caracal", doc["metadata"]["name"]
        if doc["kind"] == "Deployment":
            assert _container(doc)["image"].startswith("caracal:")


def test_deployments_named_and_labelled_as_the_runbook_uses_them() -> None:
    deployments = _kind("Deployment")
    assert set(deployments) == set(NAMES)
    for name, deployment in deployments.items():
        # `kubectl get pods -l app=caracal-gateway`, `kubectl scale deployment/caracal-ledger-writer`.
        assert deployment["metadata"]["labels"]["app"] == name
        assert deployment["spec"]["selector"]["matchLabels"] == {"app": name}
        assert deployment["spec"]["template"]["metadata"]["labels"]["app"] == name
        assert deployment["metadata"]["labels"]["app.kubernetes.io/part-of"] == "caracal"
        container = _container(deployment)
        daemon = name.removeprefix("caracal-")
        assert container["command"] == ["caracald"]
        assert container["args"] == [daemon, "--config", "/etc/caracal/caracal.yaml"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == 9090
    assert _port(_container(deployments["caracal-gateway"]), "http") == 8443
    # Runbook restore: ledger writer 3 (HPA minimum), metrics aggregator 2, audit logger 1.
    assert deployments["caracal-metrics-aggregator"]["spec"]["replicas"] == 2
    assert deployments["caracal-audit-logger"]["spec"]["replicas"] == 1
    for name in HPA_DEPLOYMENTS:
        assert "replicas" not in deployments[name]["spec"], f"{name}: its HPA owns the replica count"


def test_probes_on_the_health_endpoints() -> None:
    deployments = _kind("Deployment")
    gateway = _container(deployments["caracal-gateway"])
    readiness = gateway["readinessProbe"]["httpGet"]
    assert readiness["path"] == "/health"
    assert _port(gateway, readiness["port"]) == 8443
    assert _port(gateway, gateway["livenessProbe"]["tcpSocket"]["port"]) == 8443
    assert _port(gateway, gateway["startupProbe"]["tcpSocket"]["port"]) == 8443
    for name in NAMES[1:]:
        container = _container(deployments[name])
        liveness = container["livenessProbe"]["httpGet"]
        readiness = container["readinessProbe"]["httpGet"]
        assert (liveness["path"], _port(container, liveness["port"])) == ("/healthz", CONSUMER_HEALTH_PORT)
        assert (readiness["path"], _port(container, readiness["port"])) == ("/readyz", CONSUMER_HEALTH_PORT)


def test_resources_and_security() -> None:
    for name, deployment in _kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, (name, kind)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["securityContext"]["runAsUser"] > 0
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert security.get("privileged", False) is False
        assert pod["serviceAccountName"] == "caracal"
        assert pod["automountServiceAccountToken"] is False
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        # A read-only root: /tmp is an emptyDir.
        assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), name
    (account,) = _kind("ServiceAccount").values()
    assert account["metadata"]["name"] == "caracal"
    assert account["automountServiceAccountToken"] is False


def test_a_pod_disruption_budget_per_deployment() -> None:
    budgets = _kind("PodDisruptionBudget")
    assert set(budgets) == set(NAMES)
    for name, budget in budgets.items():
        assert budget["apiVersion"] == "policy/v1"
        assert budget["spec"]["selector"]["matchLabels"] == {"app": name}
        # Never minAvailable equal to the replica count: a single audit logger must still be evictable.
        assert budget["spec"]["maxUnavailable"] == 1


def test_hpas_for_the_gateway_and_the_ledger_writer() -> None:
    hpas = _kind("HorizontalPodAutoscaler")
    assert set(hpas) == HPA_DEPLOYMENTS
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Resource"
        assert metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}


def test_services() -> None:
    services = _kind("Service")
    gateway = services["gateway"]  # the runbook's http://gateway:8443/health and http://gateway:9090/metrics
    assert gateway["spec"]["selector"] == {"app": "caracal-gateway"}
    assert {(p["name"], p["port"], p["targetPort"]) for p in gateway["spec"]["ports"]} == {
        ("http", 8443, "http"),
        ("metrics", 9090, "metrics"),
    }
    for name in NAMES:
        metrics = services[f"{name}-metrics"]
        assert metrics["spec"]["clusterIP"] == "None"
        assert metrics["spec"]["publishNotReadyAddresses"] is True
        assert metrics["spec"]["selector"] == {"app": name}
        assert [(p["port"], p["targetPort"]) for p in metrics["spec"]["ports"]] == [(9090, "metrics")]


def test_secrets_are_referenced_never_included() -> None:
    assert not _kind("Secret"), "secret values do not belong in the repository"
    for name, deployment in _kind("Deployment").items():
        container = _container(deployment)
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        (source,) = volumes["secrets"]["projected"]["sources"]
        assert source["secret"]["name"] == SECRET_NAME
        keys = {item["key"] for item in source["secret"]["items"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["secrets"]["mountPath"] == SECRETS_DIR
        assert mounts["secrets"]["readOnly"] is True
        env = {e["name"]: e for e in container["env"]}
        file_vars = {k: e["value"] for k, e in env.items() if k.endswith("_FILE")}
        # Every key mounted is used, and every *_FILE points at a mounted key.
        assert {Path(v).name for v in file_vars.values()} == keys, name
        assert all(Path(v).parent == Path(SECRETS_DIR) for v in file_vars.values()), name
        assert "database-url" in keys
        assert all("valueFrom" not in e or "secretKeyRef" not in e["valueFrom"] for e in env.values())
    keys_of = {
        name: {
            item["key"]
            for item in next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "secrets")[
                "projected"
            ]["sources"][0]["secret"]["items"]
        }
        for name, d in _kind("Deployment").items()
    }
    assert "openai-api-key" in keys_of["caracal-gateway"]
    assert not any(
        "api-key" in key for name, keys in keys_of.items() if name != "caracal-gateway" for key in keys
    )


def test_the_configmap_is_a_valid_caracal_configuration(tmp_path: Path) -> None:
    """caracal.yaml plus each Deployment's environment loads with the real configuration loader."""
    (configmap,) = _kind("ConfigMap").values()
    config_file = tmp_path / "caracal.yaml"
    config_file.write_text(configmap["data"]["caracal.yaml"])
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, deployment in _kind("Deployment").items():
        container = _container(deployment)
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
        environ: dict[str, str] = {}
        for entry in container["env"]:
            value = entry["value"]
            if value.startswith(SECRETS_DIR + "/"):
                key = Path(value).name
                secret = secrets / key
                secret.write_text(
                    "postgresql://caracal:pw@postgresql:5432/caracal"
                    if key == "database-url"
                    else "redis://redis:6379/0"
                    if key == "redis-url"
                    else "sk-test"
                )
                value = str(secret)
            environ[entry["name"]] = value
        environ["CARACAL_CONFIG"] = str(config_file)
        settings = load_config(environ=environ)
        assert not settings.embedded_mode, name
        assert settings.bus.kind == "kafka"
        assert settings.gateway.port == 8443
        assert settings.gateway.metrics_port == 9090
        if name == "caracal-gateway":
            assert settings.budget.backend == "redis"
            assert settings.redis.url is not None
            api_key = settings.gateway.upstreams["openai"].api_key
            assert api_key is not None and api_key.get_secret_value() == "sk-test"
    text = configmap["data"]["caracal.yaml"]
    for secret_word in ("password:", "api_key:", "postgresql://", "redis://"):
        assert secret_word not in text
