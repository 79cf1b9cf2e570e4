"""ingest's three sources, on data the tests make (no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import ingest
from pipeline.errors import ConfigError, IngestError
from tests.conftest import digit_images, tree_digest, write_tree


def test_embedded_digits_are_deterministic(make_config):
    cfg, paths = make_config()
    result = ingest.run(cfg, paths)
    assert result.files == result.decodable == 1797
    assert list(result.classes) == [str(d) for d in range(10)]
    first_manifest, first_raw = paths.manifest.read_bytes(), tree_digest(paths.raw)

    ingest.run(cfg, paths)
    assert paths.manifest.read_bytes() == first_manifest
    assert tree_digest(paths.raw) == first_raw
    assert not list(paths.raw.parent.glob(".ingest-*"))  # staging folder cleaned up


def test_embedded_scale_upsamples(make_config):
    cfg, paths = make_config({"ingest": {"embedded": {"scale": 4}}})
    ingest.run(cfg, paths)
    manifest = pd.read_csv(paths.manifest)
    assert set(manifest["width"]) == {32} and set(manifest["height"]) == {32}


def test_folder_is_copied_not_changed(make_config, small_tree: Path):
    cfg, paths = make_config({"ingest": {"source": "folder", "folder": {"path": str(small_tree)}}})
    before = tree_digest(small_tree)
    (small_tree / "stray.png").write_bytes(b"outside any class")
    (small_tree / "0" / ".DS_Store").write_bytes(b"finder")

    result = ingest.run(cfg, paths)
    assert result.files == 60 and result.classes == {"0": 20, "1": 20, "2": 20}
    assert (paths.raw / "1" / "img_005.png").read_bytes() == (small_tree / "1" / "img_005.png").read_bytes()
    (small_tree / "stray.png").unlink()
    (small_tree / "0" / ".DS_Store").unlink()
    assert tree_digest(small_tree) == before


def test_folder_inside_raw_is_refused(make_config, tmp_path: Path):
    (tmp_path / "data" / "raw" / "a").mkdir(parents=True)
    cfg, paths = make_config({"ingest": {"source": "folder", "folder": {"path": str(tmp_path / "data/raw")}}})
    with pytest.raises(ConfigError, match=r"ingest\.folder\.path: .* is inside paths\.raw"):
        ingest.run(cfg, paths)


def test_folder_without_class_folders(make_config, tmp_path: Path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"x")
    cfg, paths = make_config({"ingest": {"source": "folder", "folder": {"path": str(tmp_path / "flat")}}})
    with pytest.raises(IngestError, match="no class folders found"):
        ingest.run(cfg, paths)


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory) -> Path:
    """A two-class TFDS dataset prepared locally with the real builder machinery."""
    import tensorflow_datasets as tfds

    class TinyShapes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(16, 16, 3)),
                        "label": tfds.features.ClassLabel(names=["circle", "square"]),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            for index in range(12):
                yield index, {"image": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), "label": index % 2}

    data_dir = tmp_path_factory.mktemp("tfds")
    TinyShapes(data_dir=str(data_dir)).download_and_prepare()
    return data_dir


@pytest.mark.slow
def test_tfds_source_uses_tfds_load(make_config, tiny_tfds: Path):
    cfg, paths = make_config(
        {"ingest": {"source": "tfds", "tfds": {"name": "tiny_shapes", "data_dir": str(tiny_tfds)}}}
    )
    result = ingest.run(cfg, paths)
    assert result.classes == {"circle": 6, "square": 6} and result.decodable == 12
    manifest = pd.read_csv(paths.manifest)
    assert set(manifest["width"]) == {16} and set(manifest["mode"]) == {"RGB"}
    assert (paths.raw / "square" / "tiny_shapes_000001.png").is_file()


@pytest.mark.slow
def test_tfds_missing_dataset_says_what_to_do(make_config, tmp_path: Path):
    cfg, paths = make_config(
        {"ingest": {"source": "tfds", "tfds": {"name": "tiny_shapes", "data_dir": str(tmp_path / "empty")}}}
    )
    with pytest.raises(
        IngestError, match=r"ingest\.tfds\.name: cannot load TFDS dataset 'tiny_shapes'.*tfds build"
    ):
        ingest.run(cfg, paths)


def test_accepted_batches_join_the_source_under_their_own_names(make_config, small_tree: Path):
    cfg, paths = make_config({"ingest": {"source": "folder", "folder": {"path": str(small_tree)}}})
    write_tree(paths.batches / "bright-1", digit_images(per_class=4, classes=2))
    (paths.batches / "README.md").write_text("accepted batches land here")
    result = ingest.run(cfg, paths)
    assert result.classes == {"0": 24, "1": 24, "2": 20}
    assert (paths.raw / "0" / "bright-1__img_003.png").is_file()


def test_a_versioned_batch_without_its_images_says_to_pull(make_config, small_tree: Path):
    cfg, paths = make_config({"ingest": {"source": "folder", "folder": {"path": str(small_tree)}}})
    paths.batches.mkdir(parents=True)
    (paths.batches / "b7.dvc").write_text("outs:\n- path: b7\n")
    with pytest.raises(IngestError, match=r"b7\.dvc.*dvc pull"):
        ingest.run(cfg, paths)
