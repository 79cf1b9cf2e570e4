"""The deployment files agree with the code and scripts they run (parsed, never run: no Docker needed).

Covers infra/docker/Dockerfile and the root .dockerignore, infra/compose.yaml with its helper
scripts and infra/.env.example, and the Kubernetes manifests in infra/k8s/: every script a
command names, every environment variable, port, service name, database, bucket, work pool
and image tag they mention is checked against the repository. The model service's command,
port and health checks are checked against `python -m serving`'s parser, params.yaml's
`serve:` section and the routes of its FastAPI app.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import subprocess
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline.config import PipelineConfig, load_config
from tests.conftest import REPO_ROOT

INFRA = REPO_ROOT / "infra"
COMPOSE_FILE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
WORKSPACE = "/workspace"  # the image's WORKDIR: the project checkout
IMAGE = "image-mlops-pipeline"

# The environment the pipeline itself reads (flow runs in the worker, `make run`, `dvc`):
# name -> whether pipeline/ names it in its source (boto3 and DVC read the AWS credentials).
PIPELINE_ENV = {
    "MLFLOW_TRACKING_URI": True,
    "AWS_ENDPOINT_URL_S3": True,
    "PIPELINE_INGEST_S3_URI": True,
    "PIPELINE_LANDING_S3_URI": True,
    "PIPELINE_DVC_REMOTE_URL": True,
    "AWS_ACCESS_KEY_ID": False,
    "AWS_SECRET_ACCESS_KEY": False,
    "AWS_DEFAULT_REGION": False,
}
# What each server process runs; compose services and Kubernetes Deployments use these names.
SERVICE_SCRIPTS = {
    "mlflow": "mlflow/start-server.sh",
    "prefect-server": "infra/prefect/start-server.sh",
    "prefect-worker": "infra/prefect/start-worker.sh",
}
HEALTH_PATHS = {"mlflow/start-server.sh": "/health", "infra/prefect/start-server.sh": "/api/health"}
# The model service: a compose service and a Deployment of this name run serving/__main__.py.
SERVING = "serving"
SERVING_COMMAND = ["python", "-m", "serving"]
SERVING_CODE = ("pipeline", "serving")  # what `python -m serving` imports
READY_PATH, LIVE_PATH, METRICS_PATH = "/v2/health/ready", "/v2/health/live", "/metrics"
# Standard variables of boto3/botocore; MLFLOW_* and PREFECT_* are the tools' own settings
# (test_tool_variables_are_settings_of_the_installed_tools checks that they exist).
AWS_VARIABLES = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
}
CREDENTIALS = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|BACKEND_STORE_URI|DATABASE_CONNECTION_URL")
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")
LOCAL_SECRET_FILES = ["infra/.env", "mlflow/server.env", "infra/prefect/prefect.env", ".dvc/config.local"]


@dataclass
class Container:
    """One process the deployment files start: where it is declared, what it runs, its environment."""

    where: str
    command: list[str]
    env: dict[str, str]  # values resolved (compose defaults, ConfigMap data); secrets as "secret:NAME/KEY"
    workdir: str | None
    ports: set[int]  # container ports it exposes
    health_urls: list[str]  # URLs its health check fetches, as seen from inside the container


def rel(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


@cache
def text(path: Path) -> str:
    return path.read_text()


@cache
def code_text(folders: tuple[str, ...] = ("pipeline", "flows")) -> str:
    """The source of the project's packages `folders`; by default what a flow run in the worker reads."""
    return "\n".join(text(path) for d in folders for path in sorted((REPO_ROOT / d).rglob("*.py")))


@cache
def params() -> PipelineConfig:
    """params.yaml as the image's checkout has it (the services read it from there)."""
    return load_config(REPO_ROOT / "params.yaml")


def strings(node: object) -> list[str]:
    """Every string in a parsed YAML tree (keys and values), comments excluded."""
    if isinstance(node, dict):
        return [item for key, value in node.items() for item in strings(key) + strings(value)]
    if isinstance(node, list):
        return [item for value in node for item in strings(value)]
    return [node] if isinstance(node, str) else []


def resolve(value: str) -> str:
    """A compose value as `docker compose up` sees it with no infra/.env: every ${VAR:-default} -> default."""
    return INTERPOLATION.sub(lambda match: match.group(2) or "", str(value))


def script_reads(script: str, name: str) -> bool:
    return re.search(rf"\b{name}\b", text(REPO_ROOT / script)) is not None


def required_variables(script: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+):\?", text(REPO_ROOT / script)))


def script_default(script: str, name: str) -> str | None:
    match = re.search(rf"\$\{{{name}:-([^}}]*)\}}", text(REPO_ROOT / script))
    return match.group(1) if match else None


def option_variable(script: str, option: str) -> str | None:
    """The variable a server script passes to `--port` or `--host`."""
    match = re.search(rf'{option} "\$\{{?(\w+)', text(REPO_ROOT / script))
    return match.group(1) if match else None


def own_reads(container: Container, name: str) -> bool:
    """Whether what a container runs names the variable itself: its start script, or Python code
    (the worker's flows run the pipeline; `python -m serving` runs serving/ and pipeline/)."""
    if container.command[:3] == SERVING_COMMAND:
        return name in code_text(SERVING_CODE)
    (script,) = container.command
    if script.endswith("start-worker.sh") and (name in PIPELINE_ENV or name in code_text()):
        return True
    return script_reads(script, name)


def effective(container: Container, script: str, option: str) -> str | None:
    """What a server script passes to `option` in this container: the variable's value, else its default."""
    name = option_variable(script, option)
    if name is None:
        return None
    return container.env.get(name) or script_default(script, name)


# ---- compose -----------------------------------------------------------------------------------


@cache
def compose() -> dict:
    return yaml.safe_load(text(COMPOSE_FILE))


def services() -> dict[str, dict]:
    return compose()["services"]


def compose_env(service: str) -> dict[str, str]:
    """The raw (uninterpolated) environment of a service."""
    env = services()[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def compose_ports(service: str) -> list[tuple[int | None, int]]:
    """(published, container) pairs of a service's `ports`."""
    pairs = []
    for entry in services()[service].get("ports", []):
        parts = resolve(entry).split("/")[0].split(":")
        pairs.append((int(parts[-2]) if len(parts) > 1 else None, int(parts[-1])))
    return pairs


def compose_command(service: str) -> list[str]:
    spec = services()[service]
    return [*spec.get("entrypoint", []), *spec.get("command", [])]


def compose_container(service: str) -> Container:
    spec = services()[service]
    health = spec.get("healthcheck", {}).get("test", [])
    health = health if isinstance(health, str) else " ".join(health)
    return Container(
        where=f"infra/compose.yaml services.{service}",
        command=compose_command(service),
        env={name: resolve(value) for name, value in compose_env(service).items()},
        workdir=spec.get("working_dir"),
        ports={container for _, container in compose_ports(service)},
        health_urls=re.findall(r"https?://[^'\" ]+", health),
    )


def compose_host_path(service: str, path: str) -> Path:
    """The repository file a path in a service's command means: a bind mount or the checkout."""
    for volume in services()[service].get("volumes", []):
        source, target = resolve(volume).split(":")[:2]
        if source.startswith((".", "/")) and path == target:
            return (COMPOSE_FILE.parent / source).resolve()
    if path.startswith(WORKSPACE + "/"):
        return REPO_ROOT / path.removeprefix(WORKSPACE + "/")
    return REPO_ROOT / path


def depends(service: str) -> set[str]:
    """Every service `service` waits for, directly or through others."""
    direct = set(services()[service].get("depends_on") or {})
    return direct.union(*(depends(other) for other in direct))


# ---- Kubernetes --------------------------------------------------------------------------------


@cache
def manifests() -> list[tuple[str, dict]]:
    return [
        (rel(path), document)
        for path in sorted(K8S.glob("*.yaml"))
        for document in yaml.safe_load_all(text(path))
        if document
    ]


def of_kind(kind: str) -> dict[str, tuple[str, dict]]:
    return {d["metadata"]["name"]: (f, d) for f, d in manifests() if d["kind"] == kind}


def pod_specs() -> list[tuple[str, dict]]:
    """Every pod template in the manifests (Deployments and TFJob replicas), with where it is."""
    pods = []
    for file, doc in manifests():
        if doc["kind"] == "Deployment":
            pods.append((f"{file} Deployment {doc['metadata']['name']}", doc["spec"]["template"]))
        elif doc["kind"] == "TFJob":
            for role, replica in doc["spec"]["tfReplicaSpecs"].items():
                pods.append((f"{file} TFJob {role}", replica["template"]))
    return pods


def k8s_env(where: str, container: dict) -> dict[str, str]:
    configmaps = of_kind("ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{where}: envFrom {source} hides its names; use env secretKeyRef"
        name = source["configMapRef"]["name"]
        assert name in configmaps, f"{where}: envFrom names ConfigMap {name}, defined in no infra/k8s file"
        env.update(configmaps[name][1]["data"])
    for item in container.get("env", []):
        ref = item.get("valueFrom", {})
        if "secretKeyRef" in ref:
            env[item["name"]] = f"secret:{ref['secretKeyRef']['name']}/{ref['secretKeyRef']['key']}"
        elif "configMapKeyRef" in ref:
            cm, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
            env[item["name"]] = configmaps[cm][1]["data"][key]
        else:
            env[item["name"]] = str(item["value"])
    return env


def k8s_container(name: str) -> Container:
    file, deployment = of_kind("Deployment")[name]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    where = f"{file} Deployment {name}"
    ports = {p["containerPort"] for p in container.get("ports", [])}
    probes = [container[key]["httpGet"] for key in ("readinessProbe", "livenessProbe") if key in container]
    urls = [f"http://127.0.0.1:{container_port(container, p['port'])}{p['path']}" for p in probes]
    command = container["command"] + container.get("args", [])
    return Container(where, command, k8s_env(where, container), container.get("workingDir"), ports, urls)


def container_port(container: dict, port: int | str) -> int:
    """A port given by number or by name, as the container's port number."""
    for spec in container.get("ports", []):
        if port in (spec["containerPort"], spec.get("name")):
            return spec["containerPort"]
    raise AssertionError(f"container {container['name']} has no port {port!r}")


def service_target(service: str) -> tuple[int, str, int]:
    """(Service port, Deployment it selects, container port it reaches) of a single-port Service."""
    file, svc = of_kind("Service")[service]
    (port,) = svc["spec"]["ports"]
    selector = svc["spec"]["selector"].items()
    chosen = [
        name
        for name, (_, d) in of_kind("Deployment").items()
        if selector <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(chosen) == 1, f"{file} Service {service}: selector {dict(selector)} matches {chosen}"
    (container,) = of_kind("Deployment")[chosen[0]][1]["spec"]["template"]["spec"]["containers"]
    return port["port"], chosen[0], container_port(container, port.get("targetPort", port["port"]))


def k8s_containers() -> list[Container]:
    return [k8s_container(name) for name in SERVICE_SCRIPTS]


def all_containers() -> list[Container]:
    """The servers started by a script, in compose and in Kubernetes."""
    return [compose_container(name) for name in SERVICE_SCRIPTS] + k8s_containers()


# ---- the model service -------------------------------------------------------------------------


def serving_containers() -> list[Container]:
    return [compose_container(SERVING), k8s_container(SERVING)]


def serving_args(container: Container) -> argparse.Namespace:
    """A model service container's flags as `python -m serving` parses them (one it rejects fails)."""
    from serving.__main__ import parse

    assert container.command[:3] == SERVING_COMMAND, f"{container.where}: command should be python -m serving"
    try:
        return parse(container.command[3:])
    except SystemExit:
        raise AssertionError(
            f"{container.where}: python -m serving rejects {container.command[3:]}"
        ) from None


@cache
def served_routes() -> frozenset[str]:
    """The paths the model service's FastAPI app answers (built over a folder source, never started)."""
    from pipeline.config import ServeConfig
    from pipeline.serving.service import ModelService
    from pipeline.serving.sources import FolderSource
    from serving.app import create_app

    service = ModelService(ServeConfig(), 1, FolderSource("model", Path("/nonexistent")))
    return frozenset(route.path for route in create_app(service, 1.0).routes)


# ---- both: scripts, environment, ports -----------------------------------------------------------


def test_each_server_runs_its_start_script_from_the_checkout():
    for name, script in SERVICE_SCRIPTS.items():
        for container in (compose_container(name), k8s_container(name)):
            assert container.command == [script], f"{container.where}: command should be [{script}]"
            assert container.workdir == WORKSPACE, f"{container.where}: working dir should be {WORKSPACE}"


def test_every_script_a_command_names_exists_and_is_executable():
    named = []
    for service in services():
        for token in compose_command(service):
            if token.endswith(".sh"):
                named.append((f"infra/compose.yaml services.{service}", compose_host_path(service, token)))
    for where, pod in pod_specs():
        for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            for token in container.get("command", []) + container.get("args", []):
                if token.endswith(".sh"):
                    named.append((where, REPO_ROOT / token.removeprefix(WORKSPACE + "/")))
    assert len(named) >= 2 * len(SERVICE_SCRIPTS)
    for where, path in named:
        assert path.is_file(), f"{where}: the command names {path}, which does not exist"
        assert path.stat().st_mode & 0o111, f"{where}: {rel(path)} is not executable (chmod +x, git add)"


def test_every_variable_set_for_a_server_is_read_by_its_script_or_its_tool():
    for container in all_containers() + serving_containers():
        program = " ".join(container.command[:3])
        for name in container.env:
            known = (
                own_reads(container, name)
                or name in AWS_VARIABLES
                or name.startswith(("MLFLOW_", "PREFECT_"))
            )
            assert known, f"{container.where}: {name} is read neither by {program} nor by its tool"
    for container in all_containers():
        (script,) = container.command
        missing = required_variables(script) - set(container.env)
        assert not missing, f"{container.where}: {script} requires {sorted(missing)}, not set"


def test_servers_listen_on_all_interfaces_on_the_ports_that_are_exposed():
    checked = []
    for container in all_containers():
        (script,) = container.command
        if script not in HEALTH_PATHS:
            continue
        checked.append(script)
        host, port = effective(container, script, "--host"), effective(container, script, "--port")
        assert host == "0.0.0.0", f"{container.where}: {option_variable(script, '--host')} must be 0.0.0.0"
        assert container.ports == {int(port)}, (
            f"{container.where}: exposes {container.ports}, but {script} listens on {port}"
        )
        assert container.health_urls, f"{container.where}: no health check"
        for url in container.health_urls:
            parts = urlsplit(url)
            assert (parts.port, parts.path) == (int(port), HEALTH_PATHS[script]), (
                f"{container.where}: health check {url}, expected port {port} path {HEALTH_PATHS[script]}"
            )
    # each server with a health path, once in compose and once in Kubernetes
    assert sorted(checked) == sorted(2 * list(HEALTH_PATHS)), checked


def test_the_worker_reaches_mlflow_and_prefect_by_service_name_and_port():
    servers = {"MLFLOW_TRACKING_URI": "mlflow", "PREFECT_API_URL": "prefect-server"}
    compose_worker = compose_container("prefect-worker")
    for variable, server in servers.items():
        url = urlsplit(compose_worker.env[variable])
        script = SERVICE_SCRIPTS[server]
        port = int(effective(compose_container(server), script, "--port"))
        assert (url.hostname, url.port) == (server, port), (
            f"infra/compose.yaml services.prefect-worker: {variable} should be http://{server}:{port}"
        )
    k8s_worker = k8s_container("prefect-worker")
    for variable, server in servers.items():
        url = urlsplit(k8s_worker.env[variable])
        assert url.hostname in of_kind("Service"), f"{k8s_worker.where}: {variable} names no Service"
        service_port, deployment, target = service_target(url.hostname)
        assert deployment == server and url.port == service_port, (
            f"{k8s_worker.where}: {variable}={k8s_worker.env[variable]} should reach Deployment {server}"
        )
        script = SERVICE_SCRIPTS[server]
        assert target == int(effective(k8s_container(server), script, "--port")), (
            f"Service {url.hostname} targets port {target}, not where {script} listens"
        )
    for worker in (compose_worker, k8s_worker):
        assert urlsplit(worker.env["PREFECT_API_URL"]).path == "/api", f"{worker.where}: PREFECT_API_URL"


def test_mlflow_accepts_the_host_headers_its_clients_send():
    compose_clients = [compose_container("prefect-worker"), compose_container(SERVING)]
    k8s_clients = [k8s_container("prefect-worker"), k8s_container(SERVING)]
    for container, clients in [
        (compose_container("mlflow"), [c.env["MLFLOW_TRACKING_URI"] for c in compose_clients]),
        (k8s_container("mlflow"), [c.env["MLFLOW_TRACKING_URI"] for c in k8s_clients]),
    ]:
        allowed = container.env["MLFLOW_ALLOWED_HOSTS"].split(",")
        clients.append(f"http://localhost:{effective(container, SERVICE_SCRIPTS['mlflow'], '--port')}")
        for url in clients:
            host = urlsplit(url).netloc
            assert any(fnmatch.fnmatchcase(host, pattern) for pattern in allowed), (
                f"{container.where}: MLFLOW_ALLOWED_HOSTS rejects Host {host}; "
                "the list replaces MLflow's default one"
            )


def test_pipeline_variables_are_set_for_the_worker_and_read_by_the_pipeline():
    source = "\n".join(text(path) for path in sorted((REPO_ROOT / "pipeline").rglob("*.py")))
    for worker in (compose_container("prefect-worker"), k8s_container("prefect-worker")):
        unknown = {n for n in worker.env if n.startswith("PIPELINE_")} - set(PIPELINE_ENV)
        assert not unknown, f"{worker.where}: {sorted(unknown)} are not in PIPELINE_ENV"
    missing = set(PIPELINE_ENV) - set(compose_container("prefect-worker").env)
    assert not missing, f"infra/compose.yaml services.prefect-worker: {sorted(missing)} not set"
    unread = [
        name for name, own in PIPELINE_ENV.items() if own and not re.search(rf"[\"']{name}[\"']", source)
    ]
    assert not unread, f"pipeline/ names none of {unread} as a string, yet the deployment files set them"


def test_the_worker_polls_the_work_pool_of_params_yaml():
    pool = yaml.safe_load(text(REPO_ROOT / "params.yaml"))["orchestration"]["work_pool"]
    assert pool, "params.yaml: orchestration.work_pool is empty"
    worker = text(REPO_ROOT / SERVICE_SCRIPTS["prefect-worker"])
    assert "load_config().orchestration.work_pool" in worker, "start-worker.sh must take the pool from params"
    pool_type = re.search(r'prefect worker start --pool "\$pool" --type (\w+)', worker)
    created = re.search(
        r'WorkPoolCreate\(name=name, type="(\w+)"\)', text(REPO_ROOT / "flows/deployments.py")
    )
    assert pool_type and created and pool_type.group(1) == created.group(1), (
        "infra/prefect/start-worker.sh --type differs from the pool type flows/deployments.py creates"
    )
    for container in (compose_container("prefect-worker"), k8s_container("prefect-worker")):
        assert "--pool" not in container.command, f"{container.where}: the pool comes from params.yaml"


@pytest.mark.slow
def test_tool_variables_are_settings_of_the_installed_tools():
    from mlflow import environment_variables
    from prefect.settings import Settings

    mlflow_names = set(re.findall(r'"(MLFLOW_\w+)"', Path(environment_variables.__file__).read_text()))
    prefect_names: set[str] = set()

    def collect(node: object) -> None:
        if isinstance(node, dict):
            prefect_names.update(node.get("supported_environment_variables", []))
            for child in node.values():
                collect(child)
        elif isinstance(node, list):
            for child in node:
                collect(child)

    collect(Settings.model_json_schema())
    checked = 0
    for container in all_containers() + serving_containers():
        for name in container.env:
            if own_reads(container, name):
                continue
            checked += name.startswith(("MLFLOW_", "PREFECT_"))
            if name.startswith("MLFLOW_"):
                assert name in mlflow_names, f"{container.where}: {name} is no MLflow setting"
            if name.startswith("PREFECT_"):
                assert name in prefect_names, f"{container.where}: {name} is no Prefect setting"
    assert checked, "no MLFLOW_ or PREFECT_ variable was left to check against the installed tools"


def test_the_model_service_runs_python_m_serving_on_serve_port_on_all_interfaces():
    serve = params().serve
    for container in serving_containers():
        args = serving_args(container)
        assert args.host == "0.0.0.0", f"{container.where}: --host {args.host}; a container needs 0.0.0.0"
        port = serve.port if args.port is None else args.port
        assert port == serve.port, f"{container.where}: --port {port}, params.yaml serve.port {serve.port}"
        assert container.ports == {serve.port}, f"{container.where}: exposes {container.ports}, not {port}"
        assert args.model_dir is None, f"{container.where}: serves the registry's champion, not --model-dir"
        params_file = Path(container.workdir or "/", args.params)
        assert params_file == Path(WORKSPACE, "params.yaml"), (
            f"{container.where}: reads {params_file}, not the checkout's params.yaml"
        )
    assert compose_ports(SERVING) == [(serve.port, serve.port)], (
        f"infra/compose.yaml services.{SERVING}: publish serve.port {serve.port} as itself"
    )


@pytest.mark.slow
def test_the_model_service_health_checks_are_routes_of_its_app_on_serve_port():
    routes, port = served_routes(), params().serve.port
    assert {READY_PATH, LIVE_PATH, METRICS_PATH} <= routes, f"serving/app.py answers {sorted(routes)}"
    for container in serving_containers():
        assert container.health_urls, f"{container.where}: no health check"
        for url in container.health_urls:
            parts = urlsplit(url)
            assert parts.port == port and parts.path in routes, (
                f"{container.where}: health check {url} is not a route of serving/app.py on port {port}"
            )
    compose_health = compose_container(SERVING).health_urls
    assert compose_health == [f"http://127.0.0.1:{port}{READY_PATH}"], (
        f"infra/compose.yaml services.{SERVING}: healthy only once the champion is ready, {READY_PATH}"
    )


def test_the_model_service_reads_the_registry_of_the_mlflow_service_and_waits_for_it():
    mlflow_port = int(effective(compose_container("mlflow"), SERVICE_SCRIPTS["mlflow"], "--port"))
    compose_uri = urlsplit(compose_container(SERVING).env["MLFLOW_TRACKING_URI"])
    assert (compose_uri.hostname, compose_uri.port) == ("mlflow", mlflow_port), (
        f"infra/compose.yaml services.{SERVING}: MLFLOW_TRACKING_URI should be http://mlflow:{mlflow_port}"
    )
    waits = services()[SERVING].get("depends_on") or {}
    assert waits.get("mlflow", {}).get("condition") == "service_healthy", (
        f"infra/compose.yaml services.{SERVING}: depends_on mlflow with condition service_healthy"
    )
    k8s_serving = k8s_container(SERVING)
    uri = urlsplit(k8s_serving.env["MLFLOW_TRACKING_URI"])
    assert uri.hostname in of_kind("Service"), f"{k8s_serving.where}: MLFLOW_TRACKING_URI names no Service"
    service_port, deployment, target = service_target(uri.hostname)
    assert (deployment, uri.port) == ("mlflow", service_port), (
        f"{k8s_serving.where}: MLFLOW_TRACKING_URI should reach Deployment mlflow on port {service_port}"
    )
    assert target == int(effective(k8s_container("mlflow"), SERVICE_SCRIPTS["mlflow"], "--port"))


def test_the_model_service_gets_models_through_the_mlflow_server_and_no_s3_credentials():
    assert re.search(r"^\s*--serve-artifacts$", text(REPO_ROOT / SERVICE_SCRIPTS["mlflow"]), re.M), (
        "mlflow/start-server.sh no longer proxies artifacts: the model service would need S3 access"
    )
    for server in (compose_container("mlflow"), k8s_container("mlflow")):
        assert server.env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://"), f"{server.where}: artifacts"
    for container in serving_containers():
        s3 = sorted(name for name in container.env if name.startswith("AWS_") or CREDENTIALS.search(name))
        assert not s3, (
            f"{container.where}: {s3}; the MLflow server proxies the artifacts, no S3 access needed"
        )


# ---- compose only ------------------------------------------------------------------------------


def test_compose_has_the_backends_and_waits_for_what_each_service_talks_to():
    assert set(services()) == {"postgres", "minio", "minio-init", *SERVICE_SCRIPTS, SERVING}
    for name, spec in services().items():
        for other, condition in (spec.get("depends_on") or {}).items():
            condition = condition["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services()[other], f"services.{name} waits for {other}'s healthcheck"
            if condition == "service_completed_successfully":
                assert "restart" not in services()[other], f"services.{other} is one-shot: no restart"
        urls = re.findall(r"://(?:[^@/]*@)?([\w-]+)[:/]", " ".join(map(resolve, compose_env(name).values())))
        for host in set(urls) & set(services()):
            assert host in depends(name), (
                f"infra/compose.yaml services.{name} talks to {host} but does not wait"
            )
    volumes = set(compose().get("volumes") or {})
    for name, spec in services().items():
        for volume in spec.get("volumes", []):  # short syntax "source:target", or the long mapping
            source = volume["source"] if isinstance(volume, dict) else resolve(volume).split(":")[0]
            assert source.startswith((".", "/")) or source in volumes, f"services.{name}: volume {source}?"


def test_databases_created_by_the_init_script_are_the_ones_the_servers_use():
    init = compose_host_path("postgres", "/docker-entrypoint-initdb.d/databases.sh")
    assert any(
        v.endswith(":/docker-entrypoint-initdb.d/databases.sh:ro") for v in services()["postgres"]["volumes"]
    )
    databases = dict(re.findall(r'^create_database (\w+) "\$\{?(\w+)', text(init), re.M))
    assert databases, f"{rel(init)}: no create_database lines"
    postgres_env = compose_env("postgres")
    prefect_scheme = re.search(
        r"^\s*([\w+]+)://\*\)", text(REPO_ROOT / SERVICE_SCRIPTS["prefect-server"]), re.M
    )
    for service, variable, scheme in [
        ("mlflow", "MLFLOW_BACKEND_STORE_URI", "postgresql"),
        ("prefect-server", "PREFECT_API_DATABASE_CONNECTION_URL", prefect_scheme.group(1)),
    ]:
        raw = compose_env(service)[variable]
        url = urlsplit(resolve(raw))
        where = f"infra/compose.yaml services.{service} {variable}"
        assert url.scheme == scheme, f"{where}: scheme {url.scheme}, expected {scheme}"
        assert (url.hostname, url.port) == ("postgres", 5432), f"{where}: should reach postgres:5432"
        database = url.path.lstrip("/")
        assert database in databases and url.username == database, (
            f"{where}: user/database {url.username}/{database}; {rel(init)} creates {sorted(databases)}"
        )
        password = re.search(r"://[^:]+:(.*)@", raw).group(1)
        assert password == postgres_env.get(databases[database]), (
            f"{where}: password {password} differs from services.postgres {databases[database]}"
        )


def test_the_servers_database_drivers_are_installed():
    pyproject = tomllib.loads(text(REPO_ROOT / "pyproject.toml"))
    direct = {re.split(r"[\[=<>~ ;]", dep)[0].lower() for dep in pyproject["project"]["dependencies"]}
    pinned = dict(re.findall(r"^([\w.-]+)==(\S+)", text(REPO_ROOT / "constraints.txt").lower(), re.M))
    # SQLAlchemy reads a bare postgresql:// as psycopg2 up to 2.0 and as psycopg (3) from 2.1 on.
    sqlalchemy = tuple(int(part) for part in pinned["sqlalchemy"].split(".")[:2])
    drivers = {"psycopg2": {"psycopg2", "psycopg2-binary"}, "psycopg": {"psycopg"}, "asyncpg": {"asyncpg"}}
    for service, variable in [
        ("mlflow", "MLFLOW_BACKEND_STORE_URI"),
        ("prefect-server", "PREFECT_API_DATABASE_CONNECTION_URL"),
    ]:
        scheme = urlsplit(resolve(compose_env(service)[variable])).scheme
        driver = scheme.partition("+")[2] or ("psycopg" if sqlalchemy >= (2, 1) else "psycopg2")
        where = f"infra/compose.yaml services.{service} {variable}"
        assert driver in drivers, f"{where}: unknown PostgreSQL driver {driver}"
        assert drivers[driver] & set(pinned), f"{where} needs {driver}: pin it in constraints.txt"
        if service == "mlflow":  # Prefect brings asyncpg itself; MLflow brings no PostgreSQL driver
            assert drivers[driver] & direct, f"{where} needs {driver}: add it to pyproject.toml dependencies"


def test_minio_init_creates_the_bucket_of_every_s3_uri():
    init = compose_host_path("minio-init", "/minio-init.sh")
    buckets = set(re.findall(r"^mc mb (?:--\S+ )*local/([\w.-]+)", text(init), re.M))
    uris = {
        f"services.{s} {n}": v
        for s in services()
        for n, v in compose_env(s).items()
        if resolve(v).startswith("s3://")
    }
    assert len(uris) >= 4, f"infra/compose.yaml: expected the four s3:// URIs, found {sorted(uris)}"
    prefixes = []
    for where, uri in uris.items():
        url = urlsplit(resolve(uri))
        assert url.netloc in buckets, (
            f"infra/compose.yaml {where}: bucket {url.netloc}; {rel(init)} makes {buckets}"
        )
        prefixes.append(f"{url.netloc}{url.path.rstrip('/')}/")
    for a in set(prefixes):
        for b in set(prefixes) - {a}:
            assert not b.startswith(a), f"infra/compose.yaml: s3://{b} lies inside s3://{a}"


def test_s3_clients_reach_minio_on_its_api_port():
    command = " ".join(services()["minio"]["command"])
    listens = {int(port) for port in re.findall(r"--(?:console-)?address :(\d+)", command)}
    assert {c for _, c in compose_ports("minio")} == listens, (
        f"infra/compose.yaml services.minio: ports differ from the command's addresses {listens}"
    )
    api = "minio:" + re.search(r"--address :(\d+)", command).group(1)
    endpoints = {
        f"services.{service} {name}": value
        for service in services()
        for name, value in compose_env(service).items()
        if name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    }
    init = compose_host_path("minio-init", "/minio-init.sh")
    endpoints[rel(init)] = re.search(r"mc alias set local (\S+)", text(init)).group(1)
    assert {"services.mlflow MLFLOW_S3_ENDPOINT_URL", "services.prefect-worker AWS_ENDPOINT_URL_S3"} <= set(
        endpoints
    )
    for where, endpoint in endpoints.items():
        assert urlsplit(endpoint).netloc == api, f"infra/compose.yaml {where}: {endpoint} is not http://{api}"


def test_compose_publishes_the_ui_ports_the_readme_names():
    published = {c: p for s in services() for p, c in compose_ports(s)}
    serve_port = params().serve.port
    assert {5000, 4200, 9000, 9001, serve_port} <= set(published), (
        f"infra/compose.yaml: published {published}"
    )
    assert all(published[c] == c for c in published), (
        f"infra/compose.yaml: publish each port as itself (infra/README.md's URLs): {published}"
    )
    ui_api = urlsplit(compose_container("prefect-server").env["PREFECT_UI_API_URL"])
    assert ui_api.port in {p for p, _ in compose_ports("prefect-server")}, (
        "infra/compose.yaml services.prefect-server: PREFECT_UI_API_URL names an unpublished port"
    )
    readme = text(INFRA / "README.md")
    for port in (5000, 4200, 9001, serve_port):
        assert f"localhost:{port}" in readme, f"infra/README.md: where to open localhost:{port}"
        assert f"http://localhost:{port}" in text(COMPOSE_FILE), (
            f"infra/compose.yaml: its header names {port}"
        )


def test_compose_credentials_are_interpolated_placeholders_documented_in_env_example():
    documented = dict(re.findall(r"^(\w+)=(.*)$", text(ENV_EXAMPLE), re.M))
    used = {}
    for match in INTERPOLATION.finditer(" ".join(strings(compose()))):
        used.setdefault(match.group(1), set()).add(match.group(2))
        assert match.group(2), f"infra/compose.yaml: ${{{match.group(1)}}} needs a :-default"
    assert set(used) == set(documented), (
        f"infra/.env.example and infra/compose.yaml disagree: {sorted(set(used) ^ set(documented))}"
    )
    for variable, defaults in used.items():
        assert len(defaults) == 1, f"infra/compose.yaml: ${{{variable}}} has several defaults {defaults}"
        if CREDENTIALS.search(variable) or variable.endswith("_USER"):
            (default,) = defaults
            assert "dev" in default, (
                f"infra/compose.yaml: default of {variable} should read as a dev placeholder"
            )
            assert documented[variable].startswith("change-me"), f"infra/.env.example: {variable} placeholder"
    for service in services():
        for name, raw in compose_env(service).items():
            in_url = re.search(r"://[^:/@]+:([^@]*)@", raw)
            if in_url or CREDENTIALS.search(name):
                credential = in_url.group(1) if in_url else raw
                assert INTERPOLATION.fullmatch(credential), (
                    f"infra/compose.yaml services.{service} {name}: literal credential, use ${{VAR:-default}}"
                )


# ---- Kubernetes only ---------------------------------------------------------------------------


def test_k8s_credentials_come_from_secrets_documented_in_the_readme():
    assert "Secret" not in {d["kind"] for _, d in manifests()}, "infra/k8s: no Secret objects in git"
    readme = text(INFRA / "README.md")
    documented = {
        (name, key)
        for name, block in re.findall(
            r"kubectl create secret generic ([\w-]+)((?:[^\n]*\\\n)*[^\n]*)", readme
        )
        for key in re.findall(r"--from-literal=(\w+)=", block)
    }
    for name, (file, configmap) in of_kind("ConfigMap").items():
        for key, value in configmap["data"].items():
            assert isinstance(value, str), f"{file} ConfigMap {name}: {key} must be a quoted string"
            assert not CREDENTIALS.search(key), f"{file} ConfigMap {name}: {key} belongs in a Secret"
    for container in k8s_containers() + [k8s_container(SERVING)]:
        for name, value in container.env.items():
            if CREDENTIALS.search(name):
                assert value.startswith("secret:"), f"{container.where}: {name} must come from a Secret"
            if value.startswith("secret:"):
                secret, key = value.removeprefix("secret:").split("/")
                assert (secret, key) in documented, (
                    f"{container.where}: Secret {secret} key {key} missing from the kubectl create secret "
                    "commands in infra/README.md"
                )


def image_uid() -> int:
    """The image's numeric user (Kubernetes' runAsNonRoot cannot check a user name)."""
    user = re.search(r"^USER (\d+)(?::\d+)?$", text(DOCKERFILE), re.M)
    assert user and int(user.group(1)) > 0, "infra/docker/Dockerfile: USER should be a numeric non-root uid"
    return int(user.group(1))


def test_k8s_worker_runs_in_the_shared_checkout_as_the_image_user():
    uid = image_uid()
    claim = of_kind("PersistentVolumeClaim")["image-pipeline-workspace"][1]
    file, worker = of_kind("Deployment")["prefect-worker"]
    pod = worker["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], f"{file}: claimName"
    for container in pod["containers"]:
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts[volume["name"]] == WORKSPACE, f"{file}: the checkout volume goes at {WORKSPACE}"
    for where, pod in pod_specs():
        security = pod["spec"].get("securityContext", {})
        if "Deployment" in where:
            assert security.get("runAsNonRoot") and security.get("runAsUser") == uid, (
                f"{where}: securityContext should run as the image's user {uid}, non-root"
            )


# ---- the image ---------------------------------------------------------------------------------


def documented_builds(source: str) -> dict[str, str]:
    """tag -> TF_EXTRA of every `docker build ... -t image-mlops-pipeline:TAG .` line in a text."""
    builds = re.findall(
        rf"docker build -f infra/docker/Dockerfile(?: --build-arg TF_EXTRA=(\w+))? -t {IMAGE}:(\w+) \.",
        source,
    )
    return {tag: extra or "cpu" for extra, tag in builds}


def test_the_dockerfile_installs_the_pinned_extras_it_documents():
    dockerfile = text(DOCKERFILE)
    extras = tomllib.loads(text(REPO_ROOT / "pyproject.toml"))["project"]["optional-dependencies"]
    assert re.search(r"^ARG TF_EXTRA=cpu$", dockerfile, re.M), "infra/docker/Dockerfile: ARG TF_EXTRA=cpu"
    builds = documented_builds(dockerfile)
    assert builds == {"cpu": "cpu", "gpu": "gpu"}, f"infra/docker/Dockerfile: documented builds {builds}"
    assert documented_builds(text(INFRA / "README.md")) == builds, "infra/README.md: the same build commands"
    assert set(builds.values()) <= set(extras), (
        f"TF_EXTRA values {builds} are not all extras of pyproject.toml"
    )
    copy = dockerfile.index("constraints.txt")
    install = re.search(r'pip install -c constraints\.txt (?:-e )?"\.\[\$\{TF_EXTRA\}\]"', dockerfile)
    assert install and copy < install.start(), (
        "infra/docker/Dockerfile: pip install -c constraints.txt .[TF_EXTRA]"
    )
    python = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.M).group(1)
    requires = tomllib.loads(text(REPO_ROOT / "pyproject.toml"))["project"]["requires-python"]
    assert f">={python}" in requires, (
        f"infra/docker/Dockerfile: python {python} vs requires-python {requires}"
    )
    assert re.search(r"apt-get install [^\n]*\bgit\b", dockerfile), "git: DVC and tracking.git_commit need it"
    assert re.search(rf"^WORKDIR {WORKSPACE}$", dockerfile, re.M)
    image_uid()
    imports_cv2 = [
        rel(p)
        for d in ("pipeline", "flows")
        for p in (REPO_ROOT / d).rglob("*.py")
        if re.search(r"^\s*(?:import|from) cv2\b", text(p), re.M)
    ]
    assert not imports_cv2, f"{imports_cv2} import OpenCV: add libgl1 and libglib2.0-0 to the Dockerfile"


def test_every_image_of_the_project_is_a_documented_tag():
    tags = set(documented_builds(text(DOCKERFILE)))
    images = {f"infra/compose.yaml services.{s}": resolve(spec["image"]) for s, spec in services().items()}
    for where, pod in pod_specs():
        for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            images[f"{where} {container['name']}"] = container["image"]
    ours = {where: image for where, image in images.items() if image.startswith(IMAGE)}
    assert len(ours) >= 2 * len(SERVICE_SCRIPTS)
    for where, image in ours.items():
        assert image.partition(":")[2] in tags, f"{where}: image {image}, documented tags are {sorted(tags)}"
    for name, spec in services().items():
        if "build" in spec:
            build, where = spec["build"], f"infra/compose.yaml services.{name}"
            assert (COMPOSE_FILE.parent / build["context"]).resolve() == REPO_ROOT, f"{where}: build.context"
            assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
            assert resolve(build["args"]["TF_EXTRA"]) == resolve(spec["image"]).partition(":")[2], (
                f"{where}: image tag and build.args.TF_EXTRA name different variants"
            )


def dockerignored(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` out of the build context (last matching pattern wins)."""
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def test_dockerignore_keeps_the_checkout_clean_and_leaves_out_local_state_and_secrets():
    lines = text(REPO_ROOT / ".dockerignore").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    dropped = [path for path in tracked.stdout.splitlines() if dockerignored(patterns, path)]
    assert not dropped, f".dockerignore leaves out tracked files (the image would be '-dirty'): {dropped[:5]}"
    assert not dockerignored(patterns, ".git/HEAD"), (
        ".dockerignore: .git belongs in the image (DVC, git_commit)"
    )
    local_state = [".venv/bin/python", "data/raw/0/a.png", "models/keras/model.keras", "mlflow.db"]
    local_state += [".dvc/cache/files/md5/ab/cd", "reports/metrics.json"]
    for path in local_state + LOCAL_SECRET_FILES:
        assert dockerignored(patterns, path), f".dockerignore should leave out {path}"


def test_local_secret_files_are_git_ignored():
    result = subprocess.run(
        ["git", "check-ignore", "--verbose", "--non-matching", *LOCAL_SECRET_FILES],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    not_ignored = [line.split("\t")[1] for line in result.stdout.splitlines() if line.startswith("::")]
    assert not not_ignored, (
        f".gitignore: add a line ignoring {not_ignored} (copies of the *.env.example files)"
    )


def test_compose_serving_logs_and_cuts_batches_into_the_workspace_the_drift_check_reads():
    worker_mounts = [str(v) for v in services()["prefect-worker"]["volumes"]]
    assert any(m.endswith("workspace}:/workspace") for m in worker_mounts), worker_mounts
    mounts = services()[SERVING].get("volumes", [])
    for folder in (params().serve.log_dir, params().drift.landing):
        found = [
            m for m in mounts
            if isinstance(m, dict) and PurePosixPath(m["target"]) == PurePosixPath("/workspace") / folder
        ]  # fmt: skip
        assert len(found) == 1, f"compose.yaml serving: {folder} is not mounted at /workspace/{folder}"
        (mount,) = found
        assert mount["source"] == "workspace" and mount["volume"]["subpath"] == str(folder), mount
    assert "prefect-worker" in depends(SERVING)
