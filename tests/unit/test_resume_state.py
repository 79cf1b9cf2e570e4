"""A resume state torn by a kill mid-write is dropped, not fatal; a readable one is kept."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pipeline.train.callbacks import drop_torn_backup


def write_weights(path: Path) -> None:
    with h5py.File(path, "w") as handle:
        handle["w"] = np.arange(4.0)


def test_torn_weights_without_a_readable_copy_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "latest.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 20)  # a header, cut off
    (tmp_path / "training_metadata.json").write_text('{"epoch": 3, "batch": 0}')
    drop_torn_backup(tmp_path)
    assert not (tmp_path / "latest.weights.h5").exists()
    assert not (tmp_path / "training_metadata.json").exists()


def test_a_readable_state_or_a_readable_previous_copy_is_kept(tmp_path: Path) -> None:
    write_weights(tmp_path / "latest.weights.h5")
    drop_torn_backup(tmp_path)
    assert (tmp_path / "latest.weights.h5").is_file()
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "latest.weights.h5").write_bytes(b"garbage")
    write_weights(torn / "latest.weights.h5.bkp")  # Keras' double checkpoint restores this one itself
    drop_torn_backup(torn)
    assert (torn / "latest.weights.h5").is_file()
