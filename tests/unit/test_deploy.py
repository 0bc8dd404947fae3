"""The deployment files in deploy/: structure and cross-references, checked without a daemon.

Nothing here builds an image or starts a container (CI has no Docker daemon). What is checked:
every YAML file parses; the compose file's services, dependencies, ports, volumes and bind
mounts; the Kubernetes manifests' shape (selectors, probes and Service target ports against
container ports, referenced ConfigMaps/Secrets/PVCs, kustomization entries); Prometheus scrapes
the compose service's API port; every Grafana panel queries metrics the API really exports (and
every exported metric has a panel); the configuration files load with ``load_settings`` and the
example mentions every key; the Dockerfile and systemd units hold what they must. Optional tools
run when present: ``kubectl kustomize`` (offline render), ``systemd-analyze verify`` and
``docker compose config``.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from dicom_ai.config import Settings, load_settings
from tests.peers import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DASHBOARD = DEPLOY / "grafana" / "dicom-ai.json"

# The long-running services the compose file must have.
COMPOSE_SERVICES = {"dicom-ai", "worker", "postgres", "redis", "orthanc", "prometheus", "grafana"}


def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DICOM_AI_* variable of the test run may change what a config file loads as."""
    import os

    for key in list(os.environ):
        if key.startswith("DICOM_AI_"):
            monkeypatch.delenv(key)


# ------------------------------------------------------------------------------------- YAML


def _yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def test_there_are_yaml_files() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in _yaml_files()}
    assert {"compose.yaml", "k8s/kustomization.yaml", "prometheus/prometheus.yml"} <= names


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path: Path) -> None:
    docs = _yaml_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in docs)


# ---------------------------------------------------------------------------------- compose


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


_PORT = re.compile(r"^(?:(?:\d{1,3}\.){3}\d{1,3}:)?(\d{1,5})(?:-\d{1,5})?(?::(\d{1,5})"
                   r"(?:-\d{1,5})?)?(?:/(?:tcp|udp))?$")


def _short_volume(entry: str) -> tuple[str, str]:
    source, _, rest = entry.partition(":")
    return source, rest.split(":")[0]


def test_compose_services() -> None:
    compose = _compose()
    services: dict[str, Any] = compose["services"]
    assert set(services) >= COMPOSE_SERVICES
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, f"{name}: no image or build"
        depends = service.get("depends_on") or []
        for dep in depends:  # a list of names or a mapping name -> condition
            assert dep in services, f"{name} depends on unknown service {dep}"
        if isinstance(depends, dict):
            for dep, spec in depends.items():
                if spec.get("condition") == "service_healthy":
                    assert "healthcheck" in services[dep] or services[dep].get("build"), (
                        f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
        for port in service.get("ports") or []:
            match = _PORT.match(str(port))
            assert match, f"{name}: malformed port {port!r}"
            assert all(int(g) <= 65535 for g in match.groups() if g)
        for volume in service.get("volumes") or []:
            source, target = _short_volume(volume)
            assert target.startswith("/"), f"{name}: {volume!r} has no absolute target"
            if source.startswith((".", "/")):
                assert (DEPLOY / source).resolve().exists(), f"{name}: bind source {source}"
            else:
                assert source in declared_volumes, f"{name}: volume {source} not declared"


def test_compose_dicom_ai_and_worker() -> None:
    services = _compose()["services"]
    serve, worker = services["dicom-ai"], services["worker"]
    assert serve["command"][0] == "serve"
    assert "--no-workers" in serve["command"]
    assert worker["command"][0] == "worker"
    assert worker["healthcheck"] == {"disable": True}  # no HTTP in a worker
    for service in (serve, worker):
        env = service["environment"]
        assert env["DICOM_AI_API__HOST"] == "0.0.0.0"
        url = env["DICOM_AI_STORAGE__DATABASE_URL"]
        assert url.startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in url
        assert env["DICOM_AI_WORKERS__BROKER_URL"] == "redis://redis:6379/0"
        assert "dicom-ai-data:/data" in service["volumes"]
        assert any(v.endswith(":/etc/dicom-ai/config.toml:ro") for v in service["volumes"])
    assert {"11112:11112", "8080:8080"} <= set(serve["ports"])
    # The compose file holds placeholders only, overridable from .env.
    assert "${POSTGRES_PASSWORD:-change_me_local_only}" in services["postgres"]["environment"][
        "POSTGRES_PASSWORD"]


def test_compose_config_loads(clean_env: None) -> None:
    settings = load_settings(DEPLOY / "compose" / "config.toml")
    services = _compose()["services"]
    assert settings.workers.backend == "celery"
    assert settings.workers.broker_url == "redis://redis:6379/0"
    assert settings.storage.database_url is not None
    assert settings.storage.database_url.startswith("postgresql+psycopg://")
    assert settings.api.host == "0.0.0.0"
    assert settings.api.port == 8080
    assert settings.storage.root == Path("/data")
    for kind, host in [*((d.name, d.host) for d in settings.destinations),
                       *((s.name, s.host) for s in settings.sources)]:
        assert host in services, f"{kind}: host {host} is no compose service"


def test_orthanc_knows_dicom_ai(clean_env: None) -> None:
    settings = load_settings(DEPLOY / "compose" / "config.toml")
    orthanc = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    modality = orthanc["DicomModalities"]["dicom-ai"]
    assert modality["AET"] == settings.dicom.ae_title
    assert modality["Host"] == "dicom-ai"
    assert modality["Port"] == settings.dicom.port
    assert modality["AllowMove"]
    assert modality["AllowStore"]
    pacs = next(d for d in settings.destinations if d.name == "pacs")
    assert (pacs.ae_title, pacs.port) == (orthanc["DicomAet"], orthanc["DicomPort"])


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------- Prometheus, Grafana


def test_prometheus_scrapes_the_compose_service(clean_env: None) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    settings = load_settings(DEPLOY / "compose" / "config.toml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "dicom-ai"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"dicom-ai:{settings.api.port}"]
    assert "dicom-ai" in _compose()["services"]
    mounts = _compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


@pytest.fixture(scope="module")
def exported_series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Metric family name -> the series names it exposes, from the API's real registry."""
    from dicom_ai.api.metrics import make_registry
    from dicom_ai.network.counters import ReceiverCounters
    from storage.db import Database

    root = tmp_path_factory.mktemp("metrics")
    db = Database(f"sqlite:///{root / 'index.sqlite3'}")
    db.upgrade()
    try:
        families = list(make_registry(db, root, ReceiverCounters()).collect())
    finally:
        db.dispose()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",)}
    return {f.name: {f.name + s for s in suffixes[f.type]} for f in families}


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def test_grafana_dashboard_panels_query_exported_metrics(
        exported_series: dict[str, set[str]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    series = set().union(*exported_series.values())
    assert len(exported_series) >= 20
    used_families: set[str] = set()
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = re.findall(r"\bdicom_ai_[a-z0-9_]+\b", target["expr"])
            assert names, f"{panel['title']!r}: {target['expr']} names no dicom-ai metric"
            for name in names:
                assert name in series, f"{panel['title']!r}: {name} is not exported"
                used_families |= {f for f, s in exported_series.items() if name in s}
    assert used_families == set(exported_series), (
        f"no panel for {sorted(set(exported_series) - used_families)}")


def test_grafana_provisioning() -> None:
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["uid"] == "prometheus"
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "dicom-ai.yaml").read_text())
    (provider,) = providers["providers"]
    mounts = _compose()["services"]["grafana"]["volumes"]
    dashboard_mount = f"./grafana/dicom-ai.json:{provider['options']['path']}/dicom-ai.json:ro"
    assert dashboard_mount in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# ------------------------------------------------------------------------------- Kubernetes


def _kustomization() -> dict[str, Any]:
    data = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _k8s_docs() -> list[dict[str, Any]]:
    return [doc for name in _kustomization()["resources"] for doc in _yaml_docs(K8S / name)]


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _k8s_docs() if d["kind"] == kind}


def test_kustomization_lists_existing_files() -> None:
    kustomization = _kustomization()
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed)
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "a manifest is not listed in kustomization.yaml (or vice versa)"
    for patch in kustomization.get("patches") or []:
        assert (K8S / patch["path"]).is_file()


def test_k8s_documents_are_well_formed() -> None:
    docs = _k8s_docs()
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "Secret", "Deployment",
                                         "Service", "PersistentVolumeClaim"}
    for doc in docs:
        assert doc.get("apiVersion"), doc
        assert doc.get("kind"), doc
        assert doc["metadata"].get("name"), doc


def _ports(deployment: dict[str, Any]) -> set[str | int]:
    ports: set[str | int] = set()
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        for port in container.get("ports") or []:
            ports |= {port["containerPort"], *([port["name"]] if "name" in port else [])}
    return ports


def test_k8s_deployments() -> None:
    deployments = _of_kind("Deployment")
    assert set(deployments) == {"dicom-ai-receiver", "dicom-ai-worker"}
    configmaps, secrets = _of_kind("ConfigMap"), _of_kind("Secret")
    claims = _of_kind("PersistentVolumeClaim")
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        selector = spec["selector"]["matchLabels"]
        labels = spec["template"]["metadata"]["labels"]
        assert selector, f"{name}: empty selector"
        assert selector.items() <= labels.items(), f"{name}: selector mismatch"
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
        ports = _ports(deployment)
        for container in pod["containers"]:
            assert container.get("image"), f"{name}: container without image"
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe in container:
                    port = container[probe]["httpGet"]["port"]
                    assert port in ports, f"{name}: {probe} port {port} is not a container port"
            for mount in container.get("volumeMounts") or []:
                assert mount["name"] in volumes, f"{name}: mount of unknown volume"
            for source in container.get("envFrom") or []:
                assert source["secretRef"]["name"] in secrets
            assert container["args"][-1] != ""  # args given, the image's ENTRYPOINT is dicom-ai
    receiver = deployments["dicom-ai-receiver"]
    (container,) = receiver["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "serve"
    assert "--no-workers" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {11112, 8080} <= _ports(receiver)
    # Pods share the store: each needs its own node id (its incoming/ folder and clean marker),
    # and a rolling update keeps the old pod receiving until the new one is ready.
    env = {e["name"]: e for e in container["env"]}
    assert env["DICOM_AI_STORAGE__NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert receiver["spec"]["strategy"]["type"] == "RollingUpdate"
    assert receiver["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    worker = deployments["dicom-ai-worker"]
    assert worker["spec"]["template"]["spec"]["containers"][0]["args"][0] == "worker"
    assert "ReadWriteMany" in claims["dicom-ai-data"]["spec"]["accessModes"]


def test_k8s_services_select_deployments() -> None:
    deployments = _of_kind("Deployment")
    services = _of_kind("Service")
    exposed: set[int] = set()
    for name, service in services.items():
        selector = service["spec"]["selector"]
        targets = [d for d in deployments.values()
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"service {name} selects no Deployment"
        for port in service["spec"]["ports"]:
            exposed.add(port["port"])
            target = port.get("targetPort", port["port"])
            assert all(target in _ports(d) for d in targets), f"{name}: target port {target}"
    assert {11112, 8080} <= exposed


def test_k8s_config_and_secrets(clean_env: None, tmp_path: Path) -> None:
    (configmap,) = _of_kind("ConfigMap").values()
    config = tmp_path / "config.toml"
    config.write_text(configmap["data"]["config.toml"])
    settings = load_settings(config)
    assert settings.workers.backend == "celery"
    assert settings.api.host == "0.0.0.0"
    assert settings.storage.root == Path("/data")
    secrets = _of_kind("Secret")
    tls = secrets["dicom-ai-tls"]
    assert tls["type"] == "kubernetes.io/tls"
    assert set(tls["stringData"]) == {"tls.crt", "tls.key"}
    env = secrets["dicom-ai-env"]["stringData"]
    assert set(env) == {"DICOM_AI_STORAGE__DATABASE_URL", "DICOM_AI_WORKERS__BROKER_URL"}
    # Placeholders only: nothing that could be a real secret is committed.
    for value in (*env.values(), *tls["stringData"].values()):
        assert "REPLACE_ME" in value or "PLACEHOLDER" in value
    # The TLS secret is optional for the pod until dicom.tls_cert is set.
    volumes = _of_kind("Deployment")["dicom-ai-receiver"]["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if "secret" in v)["secret"]["optional"] is True


def test_k8s_gpu_patch() -> None:
    (patch,) = _yaml_docs(K8S / "patches" / "worker-gpu.yaml")
    assert patch["kind"] == "Deployment"
    assert patch["metadata"]["name"] == "dicom-ai-worker"
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    worker = _of_kind("Deployment")["dicom-ai-worker"]["spec"]["template"]["spec"]
    assert container["name"] in {c["name"] for c in worker["containers"]}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "#   - path: patches/worker-gpu.yaml" in (K8S / "kustomization.yaml").read_text()


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    return kubectl


def test_kustomize_renders(tmp_path: Path) -> None:
    kubectl = _kubectl()
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(rendered) == len(_k8s_docs())
    assert all(d["metadata"].get("namespace") == "dicom-ai" for d in rendered
               if d["kind"] != "Namespace")
    # With the GPU patch enabled, the worker asks for a GPU.
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    text = (copy / "kustomization.yaml").read_text()
    text = text.replace("# patches:", "patches:").replace("#   - path:", "  - path:")
    (copy / "kustomization.yaml").write_text(text)
    result = subprocess.run([kubectl, "kustomize", str(copy)], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    (worker,) = [d for d in yaml.safe_load_all(result.stdout)
                 if d and d["metadata"]["name"] == "dicom-ai-worker"]
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["memory"] == "8Gi"  # merged, not replaced


# --------------------------------------------------------------------------- example config


def _section_fields() -> dict[str, type[BaseModel]]:
    """Each top-level key of Settings -> the model of its section (or of its list's items)."""
    sections: dict[str, type[BaseModel]] = {}
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        item = getattr(annotation, "__args__", (annotation,))[0]
        assert isinstance(item, type), name
        assert issubclass(item, BaseModel), name
        sections[name] = item
    return sections


def test_example_config_loads(clean_env: None) -> None:
    settings = load_settings(DEPLOY / "config.example.toml")
    assert settings.destinations
    assert settings.sources
    assert settings.routes


def _example_keys() -> dict[str, set[str]]:
    """Section -> the keys set or shown commented out under its (possibly commented) header."""
    keys: dict[str, set[str]] = {}
    section = None
    for line in (DEPLOY / "config.example.toml").read_text().splitlines():
        header = re.match(r"^#?\s*\[\[?([a-z_]+)\]\]?", line)
        if header:
            section = header.group(1)
            keys.setdefault(section, set())
            continue
        key = re.match(r"^#?\s*([a-z_]+)\s*=", line)
        if key and section is not None:
            keys[section].add(key.group(1))
    return keys


def test_example_config_mentions_every_key() -> None:
    sections = _section_fields()
    assert set(sections) == {"dicom", "query_retrieve", "limits", "storage", "completion", "api",
                             "logging", "workers", "delivery", "retention", "destinations",
                             "sources", "routes"}
    keys = _example_keys()
    missing = [f"{section}.{key}" for section, model in sections.items()
               for key in model.model_fields if key not in keys.get(section, set())]
    assert not missing, f"not in deploy/config.example.toml: {missing}"


# ------------------------------------------------------------------------- Dockerfile, units


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        logical.append(current.strip())
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in logical]


def test_dockerfile() -> None:
    instructions = _dockerfile()
    kinds = [kind for kind, _ in instructions]
    args = {kind: [a for k, a in instructions if k == kind] for kind in kinds}
    assert args["FROM"] == ["python:3.11-slim"]
    users = args["USER"]
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")
    exposed = {p for line in args["EXPOSE"] for p in line.split()}
    assert {"11112", "8080"} <= exposed
    (healthcheck,) = args["HEALTHCHECK"]
    assert "http://127.0.0.1:8080/health" in healthcheck
    assert "curl" not in healthcheck
    assert json.loads(args["ENTRYPOINT"][0]) == ["dicom-ai"]
    assert json.loads(args["CMD"][0]) == ["serve", "--config", "/etc/dicom-ai/config.toml"]
    env = " ".join(args["ENV"])
    assert "DICOM_AI_API__HOST=0.0.0.0" in env
    assert "PIP_NO_CACHE_DIR=1" in env
    assert any("pip install --no-cache-dir ." in run and "-e" not in run.split()
               for run in args["RUN"])
    assert args["WORKDIR"][-1] == "/data"
    assert '"/data"' in args["VOLUME"][0]
    # Every COPY source exists in the build context (the repository root).
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for copy in args["COPY"]:
        for source in copy.split()[:-1]:
            assert (REPO / source).exists(), f"COPY source {source} missing"
            assert source.split("/")[0] not in ignored, f"{source} is in .dockerignore"


def test_dockerfile_gpu_build_uses_the_pinned_versions() -> None:
    """``--build-arg GPU=1`` installs the CUDA builds of exactly the versions pyproject pins."""
    instructions = _dockerfile()
    build_args = dict(a.split("=", 1) for k, a in instructions if k == "ARG")
    assert build_args["GPU"] == "0"
    pins = dict(re.findall(r'"([a-z-]+)==([0-9.]+)"',
                           (REPO / "pyproject.toml").read_text()))
    assert build_args["TENSORFLOW_VERSION"] == pins["tensorflow-cpu"]
    assert build_args["ONNXRUNTIME_VERSION"] == pins["onnxruntime"]
    (install,) = [a for k, a in instructions if k == "RUN" and "pip install" in a]
    assert "pip uninstall -y tensorflow-cpu onnxruntime" in install
    assert '"tensorflow[and-cuda]==${TENSORFLOW_VERSION}"' in install
    assert '"onnxruntime-gpu==${ONNXRUNTIME_VERSION}"' in install
    # The step is valid shell for both values of GPU.
    for gpu in ("0", "1"):
        checked = subprocess.run(["sh", "-n", "-c", install], env={"GPU": gpu},
                                 capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stderr


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / name).read_text())
    return parser


@pytest.mark.parametrize(("name", "command"), [("dicom-ai.service", "serve"),
                                               ("dicom-ai-worker.service", "worker")])
def test_systemd_unit(name: str, command: str, tmp_path: Path) -> None:
    unit = _unit(name)
    service = unit["Service"]
    assert service["User"] == "dicom-ai"
    assert service["Restart"] == "on-failure"
    exec_start = service["ExecStart"].split()
    assert exec_start[:2] == ["/opt/dicom-ai/bin/dicom-ai", command]
    assert exec_start[exec_start.index("--config") + 1] == "/etc/dicom-ai/config.toml"
    assert "/opt/dicom-ai/bin/pip install" in (DEPLOY / "dicom-ai.service").read_text()
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # The venv does not exist here: verify a copy whose ExecStart is an existing program.
    copy = tmp_path / name
    copy.write_text((DEPLOY / name).read_text().replace("/opt/dicom-ai/bin/dicom-ai",
                                                        shutil.which("true") or "/bin/true"))
    result = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True,
                            text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip(), result.stderr  # unknown keys are only warned about
