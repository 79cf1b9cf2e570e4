from pipeline.config import load_config
from pipeline.tracking import flat_params, tracking_uri
from tests.conftest import REPO_ROOT


def test_flat_params_use_params_yaml_keys():
    params = flat_params(load_config(REPO_ROOT / "params.yaml"))
    assert params["split.ratios.train"] == "0.7"
    assert params["validate.min_images_per_class"] == "10"
    assert params["train.model"] == "small_cnn"
    assert not any(key.startswith("validate_") for key in params)


def test_tracking_uri_defaults_to_sqlite_in_project(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:5000"
