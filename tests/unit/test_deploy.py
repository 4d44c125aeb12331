"""The deployment assets under deploy/: they parse, agree with each other and with the gateway.

Offline and fast. External checkers run where installed and skip with the reason otherwise:
promtool (Debian: `apt-get install prometheus`), kubectl or kustomize, and the Python packages
kubernetes-validate (Kubernetes schemas) and check-jsonschema (the compose specification).
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.config import Settings, load_settings, parse_settings
from gateway.process.shutdown import MARGIN_SECONDS
from gateway.telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gateway.json"
COMPOSE_CONFIG = DEPLOY / "compose" / "config.yaml"

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
_SELECTOR = re.compile(r"\b(gateway_[a-z_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')


# ---------------------------------------------------------------- helpers


def yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_docs(path):
            if "kind" in doc and "metadata" in doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def gateway_container() -> dict[str, Any]:
    pod = k8s_objects()[("Deployment", "gateway")]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "gateway")


def k8s_config_text() -> str:
    text = k8s_objects()[("ConfigMap", "gateway-config")]["data"]["config.yaml"]
    assert isinstance(text, str)
    return text


def required_env(config_text: str) -> set[str]:
    """`${VAR}` references without a default: the process must be given these."""
    return {m.group(1) for m in _ENV_REF.finditer(config_text) if m.group(2) is None}


def deployment_env() -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in gateway_container().get("env", [])}


def k8s_settings() -> Settings:
    environ = dict.fromkeys(deployment_env(), "test-value")
    environ["REDIS_URL"] = "redis://redis:6379/0"
    return parse_settings(k8s_config_text(), "deploy/k8s/configmap.yaml", environ=environ)


def compose() -> dict[str, Any]:
    doc = yaml_docs(DEPLOY / "compose.yaml")[0]
    assert isinstance(doc, dict)
    return doc


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line of deploy/Dockerfile."""
    instructions, current = [], ""
    for line in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            current = ""
    return instructions


def docker_exec_form(keyword: str) -> list[str]:
    values = [rest for kw, rest in dockerfile() if kw == keyword]
    assert values, f"deploy/Dockerfile has no {keyword}"
    form = json.loads(values[-1])
    assert isinstance(form, list)
    return form


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml_docs(PROMETHEUS / "alerts.yml")[0]["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of the dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    return path


# ---------------------------------------------------------------- everything parses

YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def test_deploy_has_yaml_files() -> None:
    assert len(YAML_FILES) >= 15, YAML_FILES


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert docs and all(isinstance(doc, dict) for doc in docs if doc is not None), path


def test_dashboard_json_parses_with_the_provisioned_datasource() -> None:
    text = DASHBOARD.read_text(encoding="utf-8")
    assert "${DS_" not in text, "import-time datasource inputs do not resolve when provisioned"
    board = json.loads(text)
    datasource = yaml_docs(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")[0]["datasources"][0]
    uids = {p["datasource"]["uid"] for p in board["panels"] if p["type"] != "row"}
    uids |= {t["datasource"]["uid"] for p in board["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}


# ---------------------------------------------------------------- shipped gateway configurations


def test_compose_config_validates_with_the_mock_defaults() -> None:
    settings = load_settings(COMPOSE_CONFIG, environ={})
    assert settings.server.host == "0.0.0.0"
    assert settings.store.backend == "redis"
    assert settings.tenants and settings.routes


def test_compose_stops_the_gateway_no_sooner_than_its_shutdown_bound() -> None:
    server = load_settings(COMPOSE_CONFIG, environ={}).server
    stop_grace = compose()["services"]["gateway"]["stop_grace_period"]
    assert stop_grace.endswith("s")
    exits_within = server.drain_delay_seconds + server.shutdown_grace_seconds + MARGIN_SECONDS
    assert float(stop_grace[:-1]) >= exits_within


def test_k8s_config_validates_and_reads_secrets_from_the_environment() -> None:
    settings = k8s_settings()
    assert settings.server.host == "0.0.0.0"
    assert settings.store.backend == "redis"
    assert settings.upstreams["openai"].api_key.get_secret_value() == "test-value"


@pytest.mark.parametrize("which", ["compose", "k8s"])
def test_shipped_configs_build_a_runtime(which: str) -> None:
    try:
        from gateway.runtime import Runtime
    except ImportError as exc:
        pytest.skip(f"gateway.runtime is not importable yet ({exc}): routes and catalog not validated")
    settings = load_settings(COMPOSE_CONFIG, environ={}) if which == "compose" else k8s_settings()
    Runtime.build(settings)


@pytest.mark.parametrize("which", ["compose", "k8s"])
def test_each_tenants_share_of_a_pool_holds_its_concurrent_requests(which: str) -> None:
    """An admitted request never waits for its tenant's share of a pool (the share is per process,
    concurrent_requests counts across them all), and each pool holds every tenant's at once."""
    settings = load_settings(COMPOSE_CONFIG, environ={}) if which == "compose" else k8s_settings()
    held: dict[str, int] = dict.fromkeys(settings.upstreams, 0)
    for tenant, tenant_settings in settings.tenants.items():
        concurrent = tenant_settings.limits.concurrent_requests
        assert concurrent is not None, f"{tenant}: a shipped tenant has a concurrent_requests limit"
        upstreams = {
            target.upstream
            for model in settings.models_for(tenant)
            for target in settings.routes[model].all_targets
        }
        for name in upstreams:
            share = settings.upstreams[name].tenant_connections
            assert share >= concurrent, (
                f"{tenant} at {name}: a share of {share} < concurrent_requests {concurrent}"
            )
            held[name] += concurrent
    for name, upstream in settings.upstreams.items():
        assert upstream.max_connections >= held[name], name


def test_every_required_variable_of_the_k8s_config_is_set_by_the_deployment() -> None:
    missing = required_env(k8s_config_text()) - set(deployment_env())
    assert not missing, f"the pod would fail at start-up: {sorted(missing)} not in the Deployment's env"


def test_every_required_variable_of_the_compose_config_is_passed_by_compose() -> None:
    environment = compose()["services"]["gateway"].get("environment", [])
    names = {item.partition("=")[0] for item in environment}
    missing = required_env(COMPOSE_CONFIG.read_text(encoding="utf-8")) - names
    assert not missing, sorted(missing)


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    instructions = dockerfile()
    args = dict(rest.split("=", 1) for kw, rest in instructions if kw == "ARG" and "=" in rest)
    bases = [
        rest.split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
        for kw, rest in instructions
        if kw == "FROM"
    ]
    assert len(bases) >= 2 and set(bases) == {"python:3.11-slim"}, bases
    user = [rest for kw, rest in instructions if kw == "USER"][-1]
    assert user.split(":")[0] not in {"0", "root"}
    assert [rest for kw, rest in instructions if kw == "EXPOSE"] == ["8080 9464"]


def test_entrypoint_and_cmd_are_the_documented_serve_command() -> None:
    command = docker_exec_form("ENTRYPOINT") + docker_exec_form("CMD")
    assert command[:3] == ["gateway", "serve", "--config"], command
    assert " ".join(command) in (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert compose()["services"]["gateway"]["command"] == docker_exec_form("CMD")
    assert gateway_container()["args"] == docker_exec_form("CMD")


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    rules = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "the context should start from nothing"
    kept = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    for kw, rest in dockerfile():
        if kw == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert source in kept, f"COPY {source} but the dockerignore leaves it out"
                assert (ROOT / source).exists(), source


def _healthcheck_code() -> str:
    form = json.loads(next(rest for kw, rest in dockerfile() if kw == "HEALTHCHECK").split("CMD", 1)[1])
    assert form[:2] == ["python", "-c"], "slim has no curl: the check runs with python"
    return str(form[2])


def _healthcheck_url() -> str:
    env = " ".join(rest for kw, rest in dockerfile() if kw == "ENV")
    match = re.search(r"GATEWAY_HEALTHCHECK_URL=(\S+)", env)
    assert match, "the image sets a default GATEWAY_HEALTHCHECK_URL"
    return match.group(1)


@pytest.fixture
def health_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_healthcheck_passes_on_healthz_and_fails_otherwise(health_server: str) -> None:
    assert urlparse(_healthcheck_url()).path == "/healthz"
    code = _healthcheck_code()

    def run(url: str) -> int:
        env = {"GATEWAY_HEALTHCHECK_URL": url, "PATH": "/usr/bin:/bin"}
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, timeout=20
        ).returncode

    assert run(f"{health_server}/healthz") == 0
    assert run(f"{health_server}/readyz") != 0
    assert run("http://127.0.0.1:9/healthz") != 0


# ---------------------------------------------------------------- compose


def test_compose_services_and_the_files_they_reference() -> None:
    doc = compose()
    services = doc["services"]
    assert {"gateway", "redis", "prometheus", "grafana", "mock-upstream"} <= set(services)
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context == ROOT and (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in doc.get("volumes", {}), f"{name}: undeclared volume {source}"
        is_mock = name.startswith("mock-upstream")
        assert (service.get("profiles") == ["mock"]) is is_mock, name
        assert (service.get("profiles") == ["tracing"]) is (name == "jaeger"), name
    assert services["mock-upstream"]["command"] == ["mock-upstream", "--host", "0.0.0.0", "--port", "9090"]


def test_compose_gateway_mounts_its_config_where_the_command_reads_it() -> None:
    gateway = compose()["services"]["gateway"]
    config_path = gateway["command"][gateway["command"].index("--config") + 1]
    assert f"./compose/config.yaml:{config_path}:ro" in gateway["volumes"]
    settings = load_settings(COMPOSE_CONFIG, environ={})
    published = [port.rsplit(":", 1)[1] for port in gateway["ports"]]
    assert str(settings.server.port) in published


def test_compose_mock_upstreams_are_where_the_config_points_by_default() -> None:
    services = compose()["services"]
    settings = load_settings(COMPOSE_CONFIG, environ={})
    for upstream in settings.upstreams.values():
        url = urlparse(upstream.base_url)
        assert url.hostname in services, f"{upstream.base_url}: no such compose service"
        command = services[url.hostname]["command"]
        assert command[command.index("--port") + 1] == str(url.port)
        flavor = command[command.index("--flavor") + 1] if "--flavor" in command else "openai"
        assert upstream.flavor in (None, flavor)


def test_compose_prometheus_and_grafana_wiring() -> None:
    services = compose()["services"]
    prometheus = yaml_docs(PROMETHEUS / "prometheus.yml")[0]
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "gateway")
    targets = [t for c in job["static_configs"] for t in c["targets"]]
    port = load_settings(COMPOSE_CONFIG, environ={}).server.ops_port
    assert targets == [f"gateway:{port}"]  # the operations port: /metrics is not on the tenant port
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("."))
    config_target = Path(mounts["./prometheus/prometheus.yml"])
    for rule_file in prometheus["rule_files"]:  # resolved relative to the config file
        assert str(config_target.parent / rule_file) in mounts.values(), rule_file

    grafana = services["grafana"]
    assert "GF_AUTH_ANONYMOUS_ENABLED=true" in grafana["environment"]
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE=Viewer" in grafana["environment"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    provider = yaml_docs(DEPLOY / "grafana/provisioning/dashboards/gateway.yaml")[0]["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    datasource = yaml_docs(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")[0]["datasources"][0]
    assert urlparse(datasource["url"]).hostname in services


def test_compose_tracing_profile_receives_what_the_documented_endpoint_sends() -> None:
    doc = compose()
    jaeger, gateway = doc["services"]["jaeger"], doc["services"]["gateway"]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in gateway["environment"]  # passed through when set
    usage = "OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318"
    assert usage in (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    settings = load_settings(COMPOSE_CONFIG, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"})
    url = urlparse(settings.telemetry.url)
    assert (url.hostname, url.path) == ("jaeger", "/v1/traces")
    assert str(url.port) in jaeger["expose"]
    assert f"receivers.otlp.protocols.http.endpoint=0.0.0.0:{url.port}" in jaeger["command"]
    assert "127.0.0.1:16686:16686" in jaeger["ports"]  # the UI, on loopback only
    assert not load_settings(COMPOSE_CONFIG, environ={}).telemetry.active  # off by default


def test_compose_file_matches_the_compose_specification() -> None:
    pytest.importorskip(
        "check_jsonschema", reason="check-jsonschema not installed (it vendors the compose spec)"
    )
    import check_jsonschema
    import jsonschema

    schema_path = Path(check_jsonschema.__file__).parent / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    jsonschema.validate(compose(), schema)


# ---------------------------------------------------------------- Kubernetes


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kustomization = yaml_docs(K8S / "kustomization.yaml")[0]
    resources = set(kustomization["resources"])
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert resources == manifests - {"secret.example.yaml"}
    assert all((K8S / r).is_file() for r in resources)


def test_deployment_probes_ports_and_service_agree_with_the_config() -> None:
    objects = k8s_objects()
    settings = k8s_settings()
    container = gateway_container()
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert port_number(container, container[probe]["httpGet"]["port"]) == settings.server.port
    service = objects[("Service", "gateway")]
    assert [port_number(container, p["targetPort"]) for p in service["spec"]["ports"]] == [
        settings.server.port
    ]
    pod = objects[("Deployment", "gateway")]["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.server.ops_port) != str(settings.server.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    ops = objects[("Service", "gateway-ops")]
    assert [port_number(container, p["targetPort"]) for p in ops["spec"]["ports"]] == [
        settings.server.ops_port
    ]
    assert ops["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_deployment_mounts_the_configmap_where_the_command_reads_it() -> None:
    objects = k8s_objects()
    container = gateway_container()
    pod = objects[("Deployment", "gateway")]["spec"]["template"]["spec"]
    config_path = Path(container["args"][container["args"].index("--config") + 1])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = objects[("ConfigMap", volume["configMap"]["name"])]
    assert config_path.name in configmap["data"]


def test_deployment_security_and_shutdown() -> None:
    pod = k8s_objects()[("Deployment", "gateway")]["spec"]["template"]["spec"]
    container = gateway_container()
    image_uid = [rest for kw, rest in dockerfile() if kw == "USER"][-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == image_uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, "a read-only root needs a /tmp"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_seconds = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    server = k8s_settings().server
    # SIGKILL must not come before the gateway's own bound (gateway/process/shutdown.py).
    exits_within = server.drain_delay_seconds + server.shutdown_grace_seconds + MARGIN_SECONDS
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_seconds + exits_within


def test_deployment_secret_references_exist_in_the_example_secret() -> None:
    secret = yaml_docs(K8S / "secret.example.yaml")[0]
    keys = set(secret["stringData"])
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for e in deployment_env().values()
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert refs
    for ref in refs:
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in keys, f"{ref['key']} is not in secret.example.yaml"
    assert not any(value.startswith("sk-") for value in secret["stringData"].values()), "example values only"


def test_redis_url_of_the_example_secret_reaches_the_redis_service() -> None:
    objects = k8s_objects()
    url = urlparse(yaml_docs(K8S / "secret.example.yaml")[0]["stringData"]["REDIS_URL"])
    service = objects[("Service", str(url.hostname).split(".")[0])]
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    redis = objects[("StatefulSet", "redis")]["spec"]["template"]
    assert service["spec"]["selector"].items() <= redis["metadata"]["labels"].items()


def test_hpa_and_pdb_target_the_gateway() -> None:
    objects = k8s_objects()
    hpa = objects[("HorizontalPodAutoscaler", "gateway")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    labels = objects[("Deployment", "gateway")]["spec"]["template"]["metadata"]["labels"]
    pdb = objects[("PodDisruptionBudget", "gateway")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_kustomize_builds() -> None:
    if shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(K8S)]
    elif shutil.which("kustomize"):
        command = ["kustomize", "build", str(K8S)]
    else:
        pytest.skip("neither kubectl nor kustomize is on PATH")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert {d["kind"] for d in built} >= {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
    }
    assert {d["metadata"].get("namespace") for d in built if d["kind"] != "Namespace"} == {"image-gateway"}


def test_manifests_match_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed"
    )
    for (kind, name), doc in k8s_objects().items():
        try:
            kubernetes_validate.validate(doc, "1.29.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}/{name}: {exc}")


# ---------------------------------------------------------------- Prometheus


def test_every_alert_has_severity_summary_description_and_a_runbook_section() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", readme, re.MULTILINE)}
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) >= 10
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == "deploy/README.md" and anchor in anchors, f"{rule['alert']}: no section #{anchor}"
        assert rule["alert"] in readme


def test_promtool_checks_the_scrape_config(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_rules(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(PROMETHEUS / "alerts.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    rules = []
    for index, (title, expr) in enumerate(dashboard_targets()):
        concrete = re.sub(r"\$__\w+", "5m", expr).replace("$tenant", ".*")
        rules.append({"record": f"dashboard:query_{index}", "expr": concrete, "labels": {"panel": title}})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- Grafana dashboard


def test_dashboard_panels_cover_the_issue() -> None:
    exprs = " ".join(expr for _, expr in dashboard_targets())
    for metric in (
        "gateway_requests_total",
        "gateway_policy_decisions_total",
        "gateway_ratelimit_decisions_total",
        "gateway_tokens_total",
        "gateway_spend_usd_total",
        "gateway_budget_remaining",
        "gateway_in_flight_requests",
        "gateway_open_streams",
        "gateway_store_up",
        "gateway_store_errors_total",
        "gateway_store_latency_seconds_bucket",
        "gateway_store_degraded_decisions_total",
        "gateway_upstream_errors_total",
        "gateway_reservation_drift_tokens_bucket",
        "gateway_usage_missing_total",
    ):
        assert metric in exprs, f"no panel queries {metric}"
    for histogram in (
        "gateway_request_duration_seconds",
        "gateway_upstream_ttfb_seconds",
        "gateway_stream_first_event_seconds",
    ):
        for quantile in ("0.5", "0.95", "0.99"):
            assert re.search(rf"histogram_quantile\({quantile},[^;]*{histogram}_bucket", exprs), (
                histogram,
                quantile,
            )


def test_dashboard_layout_and_tenant_variable() -> None:
    board = dashboard()
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["title"] and panel.get("targets"), panel["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert "gateway_" in variables["tenant"]["definition"] and variables["tenant"]["includeAll"]


def test_dashboard_filters_every_tenant_labelled_metric_by_the_tenant_variable() -> None:
    metrics = Metrics(CollectorRegistry())
    tenant_metrics = {
        m._name + ("_total" if m._type == "counter" else "")
        for m in vars(metrics).values()
        if "tenant" in getattr(m, "_labelnames", ())
    }
    assert tenant_metrics
    for title, expr in dashboard_targets():
        for match in _SELECTOR.finditer(expr):
            name = re.sub(r"_(bucket|count|sum)$", "", match.group(1))
            if name in tenant_metrics or match.group(1) in tenant_metrics:
                assert 'tenant=~"$tenant"' in (match.group(2) or ""), f"{title}: {match.group(0)}"
                assert "tenant" in _MATCHER.findall(match.group(2) or "")


def test_the_durable_outbox_has_a_writable_volume_where_the_shipped_configurations_put_it() -> None:
    """store.outbox_path under a read-only root: Kubernetes mounts an emptyDir there (it survives
    a container restart in the pod), compose a named volume; the image creates the directory."""
    path = k8s_settings().store.outbox_path
    assert path
    mounts = {m["mountPath"]: m["name"] for m in gateway_container()["volumeMounts"]}
    pod = k8s_objects()[("Deployment", "gateway")]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[path]]
    compose_config = load_settings(COMPOSE_CONFIG, environ={})
    assert compose_config.store.outbox_path == path
    gateway_volumes = [v.split(":") for v in compose()["services"]["gateway"]["volumes"]]
    [named] = [v for v in gateway_volumes if v[1] == path]
    assert named[0] in compose()["volumes"]
    assert any(kw == "RUN" and f"mkdir -p {path}" in rest for kw, rest in dockerfile())


def test_tracing_on_kubernetes_is_turned_on_by_an_optional_configmap_of_otel_variables() -> None:
    """Off by default (the ConfigMap is optional and not shipped); its OTEL_* variables, once
    created, reach the gateway's environment, which the config loader reads."""
    [source] = [s for s in gateway_container().get("envFrom", []) if "configMapRef" in s]
    assert source["configMapRef"] == {"name": "gateway-tracing", "optional": True}
    assert ("ConfigMap", "gateway-tracing") not in k8s_objects()
    assert not k8s_settings().telemetry.active
    environ = {**dict.fromkeys(deployment_env(), "test-value"), "REDIS_URL": "redis://redis:6379/0"}
    environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://otel-collector.observability:4318"
    traced = parse_settings(k8s_config_text(), "deploy/k8s/configmap.yaml", environ=environ)
    assert traced.telemetry.active
    assert traced.telemetry.url == "http://otel-collector.observability:4318/v1/traces"
