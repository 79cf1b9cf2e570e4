"""The Kubernetes manifests for multi-worker training agree with the code they run (parsed, not applied)."""

from __future__ import annotations

import yaml

from tests.conftest import REPO_ROOT

K8S = REPO_ROOT / "infra" / "k8s"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


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
