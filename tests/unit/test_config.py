from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipeline.config import PipelineConfig, load_config, parse_config
from pipeline.errors import ConfigError
from tests.conftest import REPO_ROOT


def params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def test_repository_params_load_with_defaults():
    cfg = load_config(REPO_ROOT / "params.yaml")
    assert cfg.ingest.source == "embedded"
    assert (cfg.split.ratios.train, cfg.split.ratios.val, cfg.split.ratios.test) == (0.7, 0.2, 0.1)
    # params.yaml's `validate` section is read into the `validate_` field
    assert cfg.validate_.min_images_per_class == params()["validate"]["min_images_per_class"]


def test_unknown_key_names_its_path():
    raw = params()
    raw["split"]["sed"] = 3
    with pytest.raises(ConfigError, match=r"split\.sed: unknown key"):
        parse_config(raw)


def test_unknown_section_names_its_path():
    raw = params()
    raw["trian"] = {}
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        parse_config(raw)


def test_wrong_type_names_key_and_value():
    raw = params()
    raw["validate"]["min_images_per_class"] = "many"
    with pytest.raises(ConfigError, match=r"validate\.min_images_per_class: .*integer.*'many'"):
        parse_config(raw)


def test_ratios_must_sum_to_one():
    raw = params()
    raw["split"]["ratios"] = {"train": 0.7, "val": 0.2, "test": 0.2}
    with pytest.raises(ConfigError, match=r"split\.ratios: train \+ val \+ test must sum to 1, got 1\.1"):
        parse_config(raw)


def test_unknown_source_lists_choices():
    raw = params()
    raw["ingest"]["source"] = "ftp"
    with pytest.raises(ConfigError, match=r"ingest\.source: .*'embedded', 'folder', 'tfds' or 's3'"):
        parse_config(raw)


def test_folder_source_needs_a_path():
    raw = params()
    raw["ingest"]["source"] = "folder"
    with pytest.raises(ConfigError, match=r"ingest\.folder\.path is required"):
        parse_config(raw)


def test_missing_source_folder_fails_at_load(tmp_path: Path):
    raw = params()
    raw["ingest"]["source"] = "folder"
    raw["ingest"]["folder"]["path"] = "no/such/images"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"ingest\.folder\.path: directory .*no/such/images does not exist"):
        load_config(params_file)


def test_missing_params_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "params.yaml")


def test_config_is_immutable():
    cfg = load_config(REPO_ROOT / "params.yaml")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.split.seed = 1  # type: ignore[misc]


def test_credentials_in_the_endpoint_url_are_refused_without_echoing_them():
    raw = params()
    raw["storage"]["endpoint_url"] = "http://AKIAEXAMPLE:s3cr3t-value@minio:9000"
    with pytest.raises(ConfigError, match=r"storage\.endpoint_url: .*must not carry credentials") as raised:
        parse_config(raw)
    assert "s3cr3t-value" not in str(raised.value)


@pytest.mark.parametrize(
    ("section", "key"), [("ingest.s3", "uri"), ("storage", "dvc_remote"), ("drift", "landing_s3")]
)
def test_s3_locations_must_be_s3_uris(section: str, key: str):
    raw = params()
    node = raw
    for part in section.split("."):
        node = node[part]
    node[key] = "my-bucket/images"
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: .*not an S3 URI; write s3://"):
        parse_config(raw)
    node[key] = "s3://my-bucket/images"
    parse_config(raw)


def leaves(mapping: dict, prefix: str = "") -> dict[str, object]:
    """Every leaf of a nested mapping by dotted key."""
    flat: dict[str, object] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        flat |= leaves(value, dotted) if isinstance(value, dict) else {dotted: value}
    return flat


def test_params_yaml_and_code_defaults_agree():
    """A config built from partial params gets what params.yaml says (augmentation included)."""
    committed = leaves(load_config(REPO_ROOT / "params.yaml").model_dump(mode="json", by_alias=True))
    defaults = leaves(PipelineConfig().model_dump(mode="json", by_alias=True))
    differing = {key: (committed.get(key), defaults.get(key)) for key in committed.keys() | defaults.keys()}
    differing = {key: pair for key, pair in differing.items() if pair[0] != pair[1]}
    assert not differing, f"params.yaml vs pipeline/config.py defaults (change both together): {differing}"
    assert set(leaves(params())) == set(defaults), "params.yaml must spell out every key the code knows"


def test_environment_overrides_apply_when_params_are_parsed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PIPELINE_LANDING_S3_URI", "s3://landing-bucket/new")
    monkeypatch.setenv("PIPELINE_DVC_REMOTE_URL", "")  # empty: not set
    cfg = parse_config(params())
    assert cfg.drift.landing_s3 == "s3://landing-bucket/new"
    assert cfg.storage.dvc_remote is None
    monkeypatch.setenv("PIPELINE_DVC_REMOTE_URL", "bucket/dvc")
    with pytest.raises(
        ConfigError, match=r"storage\.dvc_remote: PIPELINE_DVC_REMOTE_URL: 'bucket/dvc' is not"
    ):
        parse_config(params())


def test_section_overrides_apply_in_memory_and_stay_in_their_section(tmp_path):
    import shutil

    from pipeline.config import load_with_section_overrides
    from tests.conftest import REPO_ROOT

    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_bytes()
    cfg = load_with_section_overrides(tmp_path, {"drift.cooldown_hours": 0}, "drift", "drift-check")
    assert cfg.drift.cooldown_hours == 0 and (tmp_path / "params.yaml").read_bytes() == before
    outside = r"tuning overrides may only set tune\.\* keys, not \['train.epochs'\]"
    with pytest.raises(ConfigError, match=outside):
        load_with_section_overrides(tmp_path, {"train.epochs": 1}, "tune", "tuning")
