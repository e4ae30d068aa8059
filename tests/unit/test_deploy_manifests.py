"""The deployment files: Kubernetes manifests against the Kubernetes schemas
(kubernetes-validate, offline) and KEDA's ScaledObject CRD schema, the compose
file against the Compose Specification, names against the pipeline table, and
every metric a Grafana panel queries against the metrics contract.

Vendored schemas (tests/schemas/README.md says where each comes from)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from consumers.pipeline import PIPELINE, STAGES
from infra.kafka.topics import Topics
from infra.metrics import CONTRACT_METRICS
from kbstream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = ROOT / "tests" / "schemas"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "kbstream.json"
# a release every managed Kubernetes still runs; kubernetes-validate ships its schemas
K8S_VERSION = "1.32"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_generate", DEPLOY / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [
        doc
        for name in kustomization["resources"]
        for doc in yaml.safe_load_all((K8S / name).read_text())
    ]


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    """Resources of one kind by their stage (component label)."""
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in manifests()
        if d["kind"] == kind
    }


def config() -> dict[str, str]:
    (cm,) = (d for d in manifests() if d["kind"] == "ConfigMap")
    data: dict[str, str] = cm["data"]
    return data


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


# --- generated files ----------------------------------------------------------


def test_generated_files_are_current() -> None:
    for path, text in load_generator().rendered().items():
        assert path.read_text() == text, (
            f"{path.relative_to(ROOT)} is stale: run `.venv/bin/python deploy/generate.py`"
        )


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(on_disk)


# --- Kubernetes -----------------------------------------------------------------


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    kinds = []
    for doc in manifests():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: below
        # strict: an unknown (misspelt) field is an error, as the API server's is
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION
        kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(["ConfigMap"] + ["Deployment"] * len(STAGES))


def test_kubernetes_validation_rejects_a_broken_deployment() -> None:
    broken = copy.deepcopy(of_kind("Deployment")["embed"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def keda_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / "keda-scaledobject.json").read_text())
    return jsonschema.Draft7Validator(schema)


def test_scaled_objects_validate_against_the_keda_crd() -> None:
    validator = keda_validator()
    scaled = of_kind("ScaledObject")
    assert sorted(scaled) == sorted(STAGES)
    for so in scaled.values():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        validator.validate(so)


def test_keda_schema_rejects_a_broken_scaled_object() -> None:
    validator = keda_validator()
    missing_target = copy.deepcopy(of_kind("ScaledObject")["embed"])
    del missing_target["spec"]["scaleTargetRef"]
    assert not validator.is_valid(missing_target)
    numeric_metadata = copy.deepcopy(of_kind("ScaledObject")["embed"])
    numeric_metadata["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 20  # KEDA wants strings
    assert not validator.is_valid(numeric_metadata)


def test_every_stage_scales_on_its_own_group_and_input_topic() -> None:
    settings = Settings(topic_prefix=config()["KBSTREAM_TOPIC_PREFIX"])
    topics = Topics(settings.topic_prefix)
    deployments, scaled = of_kind("Deployment"), of_kind("ScaledObject")
    for spec in PIPELINE:
        deployment, so = deployments[spec.name], scaled[spec.name]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["kbstream", "worker", spec.name]
        assert so["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert "replicas" not in deployment["spec"], "the ScaledObject's HPA owns replicas"
        partitions = int(config()["KBSTREAM_PARTITIONS"])
        assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"] <= partitions
        triggers = so["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"kafka"}
        assert sorted(t["metadata"]["topic"] for t in triggers) == sorted(
            topics.name(t) for t in spec.inputs
        )
        for t in triggers:
            assert t["metadata"]["consumerGroup"] == settings.group(spec.group)
            assert t["metadata"]["bootstrapServers"] == config()["KBSTREAM_BROKERS"]
            assert int(t["metadata"]["lagThreshold"]) > 0


def test_stage_pods_expose_metrics_probes_and_resources() -> None:
    port = int(config()["KBSTREAM_METRICS_PORT"])
    requests = {}
    for stage, deployment in of_kind("Deployment").items():
        pod = deployment["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        (container,) = pod["spec"]["containers"]
        assert container["envFrom"] == [{"configMapRef": {"name": "kbstream-config"}}]
        env = {e["name"]: e for e in container["env"]}
        assert "secretKeyRef" in env["KBSTREAM_DATABASE_URL"]["valueFrom"]
        assert "KBSTREAM_DATABASE_URL" not in config(), "credentials belong in the Secret"
        (metrics,) = container["ports"]
        assert metrics["containerPort"] == port
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        res = container["resources"]
        assert set(res) == {"requests", "limits"} and set(res["requests"]) == {"cpu", "memory"}
        requests[stage] = res["requests"]
    assert set(requests) == set(STAGES)
    # the model is the heaviest part of the pipeline
    assert requests["embed"] == max(requests.values(), key=lambda r: _cpu(r["cpu"]))
    assert requests["embed"] == max(requests.values(), key=lambda r: _bytes(r["memory"]))


def _cpu(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(q[:-2]) * units[q[-2:]] if q[-2:] in units else int(q)


# --- docker compose -------------------------------------------------------------


def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


def test_compose_file_validates_against_the_compose_specification() -> None:
    compose_validator().validate(compose())


def test_compose_specification_rejects_a_broken_service() -> None:
    broken = compose()
    broken["services"]["embed"]["replica"] = 2  # not a service key
    assert not compose_validator().is_valid(broken)


def test_stage_services_check_readiness_on_their_metrics_port() -> None:
    services = compose()["services"]
    for stage in STAGES:
        svc = services[stage]
        assert int(svc["environment"]["KBSTREAM_METRICS_PORT"]) > 0
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"] and "/readyz" in test[3], stage


class _Readiness(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def readiness_server() -> Iterator[tuple[int, type[_Readiness]]]:
    handler = type("Handler", (_Readiness,), {})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


def test_compose_healthcheck_command_follows_readyz(
    readiness_server: tuple[int, type[_Readiness]],
) -> None:
    """The one-liner itself, run as Docker would, against a /readyz that says
    ready and then not ready."""
    port, handler = readiness_server
    code = compose()["services"]["embed"]["healthcheck"]["test"][3]
    env = {**os.environ, "KBSTREAM_METRICS_PORT": str(port)}

    def check() -> int:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode

    assert check() == 0
    handler.status = 503
    assert check() != 0
    with socket.socket() as s:  # nothing listening: unhealthy too
        s.bind(("127.0.0.1", 0))
        env["KBSTREAM_METRICS_PORT"] = str(s.getsockname()[1])
    assert check() != 0


def test_prometheus_scrapes_every_stage_service() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    services = compose()["services"]
    targets = {}
    for job in prom["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            for name in sd["names"]:
                targets[name] = sd["port"]
    assert set(targets) == set(STAGES)
    for stage, port in targets.items():
        assert port == int(services[stage]["environment"]["KBSTREAM_METRICS_PORT"])
    mounts = services["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_is_provisioned_with_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            assert (ROOT / source).exists(), source
            mounts[target] = ROOT / source
    provisioning = mounts["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "kbstream.yml").read_text())[
        "providers"
    ]
    dashboards = mounts[provider["options"]["path"]]
    assert (dashboards / DASHBOARD.name).read_text() == DASHBOARD.read_text()
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert mounts[str(home.parent)] / home.name == dashboards / DASHBOARD.name
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]


# --- the dashboard against the metrics contract --------------------------------

_METRIC = re.compile(r"\bkbstream_[A-Za-z0-9_:]+")
_SERIES_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def queried_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression; a histogram's series name its family."""
    return {_SERIES_SUFFIX.sub("", m) for m in _METRIC.findall(expr)}


def dashboard_metrics() -> dict[str, set[str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {
        p["title"]: set().union(*(queried_metrics(t["expr"]) for t in p["targets"])) for p in panels
    }


def test_queried_metrics_parses_histograms_and_counters() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, stage) (rate(kbstream_batch_seconds_bucket[5m])))"
        " / sum(rate(kbstream_events_total[1m]))"
    )
    assert queried_metrics(expr) == {"kbstream_batch_seconds", "kbstream_events_total"}


def test_every_panel_queries_only_contract_metrics() -> None:
    for title, names in dashboard_metrics().items():
        assert names, f"panel {title!r} queries no kbstream metric"
        assert names <= set(CONTRACT_METRICS), (title, names - set(CONTRACT_METRICS))


def test_every_contract_metric_is_on_the_dashboard() -> None:
    shown = set().union(*dashboard_metrics().values())
    assert set(CONTRACT_METRICS) <= shown, set(CONTRACT_METRICS) - shown


# --- a secured Kafka: SASL settings and ACLs (docs/security.md) ---------------

KAFKA_ENV = (
    "KBSTREAM_KAFKA_SECURITY_PROTOCOL",
    "KBSTREAM_KAFKA_SASL_MECHANISM",
    "KBSTREAM_KAFKA_SASL_USERNAME",
    "KBSTREAM_KAFKA_SASL_PASSWORD",
)


def test_kafka_settings_named_by_the_deployment_files_exist() -> None:
    fields = {f"KBSTREAM_{name.upper()}" for name in Settings.model_fields}
    assert set(KAFKA_ENV) <= fields


def test_stage_pods_may_take_sasl_settings_from_an_optional_secret() -> None:
    for stage, deployment in of_kind("Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        for name in KAFKA_ENV:
            ref = env[name]["valueFrom"]["secretKeyRef"]
            # without the Secret the pod starts in plaintext, as before
            assert (ref["name"], ref["optional"]) == ("kbstream-kafka", True), (stage, name)
        assert not set(KAFKA_ENV) & set(config()), "credentials belong in the Secret"


def test_the_sasl_overlay_gives_keda_the_same_credentials() -> None:
    overlay = yaml.safe_load((K8S / "sasl" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["..", "trigger-authentication.yaml"]
    (auth,) = yaml.safe_load_all((K8S / "sasl" / "trigger-authentication.yaml").read_text())
    assert auth["kind"] == "TriggerAuthentication"
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"sasl", "username", "password", "tls"}
    assert {r["name"] for r in refs.values()} == {"kbstream-kafka"}
    patched = {}
    for patch in overlay["patches"]:
        ops = json.loads(patch["patch"])
        patched[patch["target"]["name"]] = {
            (op["op"], op["path"], op["value"]["name"]) for op in ops
        }
    for so in of_kind("ScaledObject").values():
        n = len(so["spec"]["triggers"])
        assert patched[so["metadata"]["name"]] == {
            ("add", f"/spec/triggers/{i}/authenticationRef", auth["metadata"]["name"])
            for i in range(n)
        }


def acl_lines(prefix: str = "kbstream.") -> list[tuple[str, str, set[str]]]:
    """(principal, topic, operations) of each topic ACL in deploy/kafka/acls.sh."""
    script = (DEPLOY / "kafka" / "acls.sh").read_text()
    principals = {"$KB": "User:kbstream", "$PRODUCER": "User:producer"}
    out = []
    for line in script.splitlines():
        m = re.match(r'acl --allow-principal "(\$\w+)" --topic "([^"]+)" (.*)', line)
        if m:
            ops = set(re.findall(r"--operation (\w+)", m[3]))
            out.append((principals[m[1]], m[2].replace("${P}", prefix), ops))
    return out


def test_only_kbstream_writes_the_internal_topics_producers_the_lifecycle_topic() -> None:
    topics = Topics("kbstream.")
    writers: dict[str, set[str]] = {}
    for principal, topic, ops in acl_lines():
        if "Write" in ops:
            writers.setdefault(topic, set()).add(principal)
    assert set(writers) == set(topics.all())
    for topic, who in writers.items():
        allowed = (
            {"User:kbstream", "User:producer"} if topic == topics.lifecycle else {"User:kbstream"}
        )
        assert who == allowed, topic
    script = (DEPLOY / "kafka" / "acls.sh").read_text()
    # kbstream's groups (<prefix><stage>, dlq tools) by prefix
    assert re.search(
        r'acl --allow-principal "\$KB" --group "\$P" --resource-pattern-type prefixed', script
    )


def sasl_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.sasl.yml").read_text())
    return data


def test_the_sasl_compose_override_validates_and_secures_every_stage() -> None:
    override = sasl_compose()
    compose_validator().validate(override)
    services = override["services"]
    assert set(STAGES) | {"cli"} <= set(services)
    admin = (DEPLOY / "kafka" / "admin.properties").read_text()
    for name in [*STAGES, "cli"]:
        env = {**compose()["services"][name]["environment"], **services[name]["environment"]}
        settings = Settings(
            **{
                k[len("KBSTREAM_") :].lower(): v
                for k, v in env.items()
                if k.startswith("KBSTREAM_KAFKA_")
            }
        )
        props = settings.kafka_client_properties()
        assert (
            props["security.protocol"] == "SASL_PLAINTEXT" and props["sasl.username"] == "kbstream"
        )
        assert f'password="{props["sasl.password"]}"' in admin
        assert services[name]["depends_on"]["kafka-acls"]["condition"] == (
            "service_completed_successfully"
        )
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_SUPER_USERS"] == "User:kbstream"
    assert kafka["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert kafka["KAFKA_AUTHORIZER_CLASS_NAME"].endswith("StandardAuthorizer")
    jaas = kafka["KAFKA_LISTENER_NAME_SASL_PLAIN_SASL_JAAS_CONFIG"]
    assert 'user_kbstream="kbstream-secret"' in jaas and 'user_producer="' in jaas
    acls = services["kafka-acls"]
    assert acls["entrypoint"] == ["sh", "/etc/kbstream-kafka/acls.sh"]
    assert "./deploy/kafka:/etc/kbstream-kafka:ro" in acls["volumes"]
