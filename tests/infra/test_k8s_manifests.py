"""The Kubernetes manifests for multi-worker training and for the model service agree with the code
they run (parsed, not applied)."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.infra.test_infra_files import (
    LIVE_PATH,
    METRICS_PATH,
    READY_PATH,
    SERVING,
    container_port,
    params,
    served_routes,
    service_target,
)

K8S = REPO_ROOT / "infra" / "k8s"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def serving() -> dict[str, dict]:
    """The model service's objects in serving.yaml, by kind (one of each)."""
    docs = documents("serving.yaml")
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), f"infra/k8s/serving.yaml: {[d['kind'] for d in docs]}"
    return by_kind


def serving_pod() -> tuple[dict, dict]:
    """The Deployment's pod template and its one container."""
    template = serving()["Deployment"]["spec"]["template"]
    (container,) = template["spec"]["containers"]
    return template, container


def test_tfjob_runs_the_train_stage_as_chief_and_workers_on_shared_storage():
    (job,) = documents("training-tfjob.yaml")
    storage = {d["kind"]: d for d in documents("shared-storage.yaml")}
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "TFJob"
    replicas = job["spec"]["tfReplicaSpecs"]
    assert set(replicas) == {"Chief", "Worker"} and replicas["Chief"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] >= 1
    for spec in replicas.values():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "tensorflow"  # the training operator's required name
        assert container["command"][:4] == ["python", "-m", "pipeline", "train"]
        params = container["command"][container["command"].index("--params") + 1]
        mount = container["volumeMounts"][0]["mountPath"]
        assert container["workingDir"] == mount and params == f"{mount}/params.yaml"
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        (volume,) = pod["volumes"]
        claim = storage["PersistentVolumeClaim"]["metadata"]["name"]
        assert volume["persistentVolumeClaim"]["claimName"] == claim
        assert container["envFrom"][0]["configMapRef"]["name"] == storage["ConfigMap"]["metadata"]["name"]
        assert spec["restartPolicy"] == "OnFailure"  # a preempted pod restarts and resumes
    assert "ReadWriteMany" in storage["PersistentVolumeClaim"]["spec"]["accessModes"]
    assert storage["ConfigMap"]["data"]["MLFLOW_TRACKING_URI"].startswith("http")


def test_the_train_command_in_the_manifest_exists():
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "--params" in result.output and "--workers" in result.output


@pytest.mark.slow
def test_serving_probes_ask_the_app_whether_it_is_live_and_ready():
    _, container = serving_pod()
    routes, port = served_routes(), params().serve.port
    for key, path in [("readinessProbe", READY_PATH), ("livenessProbe", LIVE_PATH)]:
        probe = container[key]["httpGet"]
        assert probe["path"] == path and path in routes, (
            f"serving.yaml {key}: {probe['path']}, expected {path}"
        )
        assert container_port(container, probe["port"]) == port, f"serving.yaml {key}: port {probe['port']}"
    # The port opens only once the tracking server answered (tracking.check_server), after the import.
    liveness = container["livenessProbe"]
    wait = params().mlflow.connect_timeout_seconds
    assert liveness.get("initialDelaySeconds", 0) >= wait, (
        f"serving.yaml livenessProbe: initialDelaySeconds below mlflow.connect_timeout_seconds ({wait:g} s)"
    )
    assert liveness.get("timeoutSeconds", 1) >= 2, "serving.yaml livenessProbe: a busy pod answers slowly"


@pytest.mark.slow
def test_serving_pods_are_scraped_on_the_metrics_route_of_the_serving_port():
    template, container = serving_pod()
    annotations = template["metadata"]["annotations"]
    assert all(isinstance(value, str) for value in annotations.values()), f"strings only: {annotations}"
    assert annotations["prometheus.io/scrape"] == "true"
    port = container_port(container, int(annotations["prometheus.io/port"]))
    assert port == params().serve.port, f"serving.yaml: scraped on {port}, serve.port {params().serve.port}"
    path = annotations["prometheus.io/path"]
    assert path == METRICS_PATH and path in served_routes(), f"serving.yaml: scrapes {path}"


def test_serving_service_selects_the_deployment_and_reaches_its_port():
    port, deployment, target = service_target(SERVING)
    serve_port = params().serve.port
    assert deployment == serving()["Deployment"]["metadata"]["name"], (
        f"Service {SERVING} selects {deployment}"
    )
    assert port == target == serve_port, (
        f"Service {SERVING}: port {port} -> {target}, serve.port {serve_port}"
    )
    (spec,) = serving()["Service"]["spec"]["ports"]
    assert spec["name"] == "http", f"Service {SERVING}: name the port http, not {spec.get('name')}"


def test_serving_autoscaler_scales_the_deployment_on_cpu():
    hpa, deployment = serving()["HorizontalPodAutoscaler"], serving()["Deployment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    ), f"serving.yaml: the autoscaler targets {target}"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    _, container = serving_pod()
    assert "cpu" in container["resources"]["requests"], "CPU utilisation is a share of the CPU request"
    assert "replicas" not in deployment["spec"], "the autoscaler owns replicas; kubectl apply would reset it"


def test_serving_caches_downloaded_models_on_a_pod_volume_at_serve_cache():
    template, container = serving_pod()
    cache = params().serve.cache
    assert not cache.is_absolute(), f"params.yaml serve.cache {cache} lies outside the checkout"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    expected = str(PurePosixPath(container["workingDir"], cache.as_posix()))
    assert expected in mounts, (
        f"serving.yaml: mount a volume at {expected} (serve.cache), not {sorted(mounts)}"
    )
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts[expected]], "serving.yaml: the cache belongs to the pod, not shared"
    assert (
        template["spec"]["securityContext"].get("fsGroup") == template["spec"]["securityContext"]["runAsUser"]
    )


def test_serving_pods_log_and_cut_batches_onto_the_volume_the_drift_check_reads():
    template, container = serving_pod()
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in template["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    worker = documents("prefect-worker.yaml")
    (deployment,) = [d for d in worker if d["kind"] == "Deployment"]
    worker_spec = deployment["spec"]["template"]["spec"]
    worker_claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in worker_spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    (worker_container,) = worker_spec["containers"]
    (worker_mount,) = [m for m in worker_container["volumeMounts"] if m["mountPath"] == "/workspace"]
    shared = worker_claims[worker_mount["name"]]
    workdir = PurePosixPath(container["workingDir"])
    for folder in (params().serve.log_dir, params().drift.landing):
        mounts = [m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) == workdir / folder]
        assert len(mounts) == 1, f"serving.yaml: {folder} is not mounted at {workdir / folder}"
        (mount,) = mounts
        assert claims.get(mount["name"]) == shared, f"serving.yaml: {folder} is not on the claim {shared}"
        assert mount.get("subPath") == str(folder), (
            f"serving.yaml: {folder} mounted from {mount.get('subPath')}"
        )
