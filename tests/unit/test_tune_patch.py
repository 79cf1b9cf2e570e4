"""The params patch of a tuning run: only the best-param lines change, comments stay, `git apply` takes it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.params_patch import params_patch, with_values, yaml_scalar
from tests.conftest import REPO_ROOT

BEST = {
    "train.learning_rate": 0.0023456789,
    "train.fine_tune.learning_rate": 2.3456e-06,
    "train.batch_size": 32,
    "train.width": 48,
    "train.augment.zoom": 0.123456,
}


def leaves(mapping: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        flat |= leaves(value, dotted) if isinstance(value, dict) else {dotted: value}
    return flat


def git_apply(root: Path, text: str, patch: str) -> str:
    """Commit `text` as params.yaml in a new repository at root, `git apply` the patch, return the file."""
    run = lambda *args: subprocess.run(args, cwd=root, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    (root / "params.yaml").write_text(text)
    run("git", "add", "params.yaml")
    run("git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "params")
    (root / "tune.patch").write_text(patch)
    run("git", "apply", "--check", "tune.patch")
    run("git", "apply", "tune.patch")
    return (root / "params.yaml").read_text()


def test_the_patch_applies_and_changes_only_the_best_params(tmp_path: Path):
    text = (REPO_ROOT / "params.yaml").read_text()
    patch = params_patch(text, BEST)
    assert patch.missing == ()
    assert patch.diff.startswith("--- a/params.yaml\n+++ b/params.yaml\n")
    patched = git_apply(tmp_path, text, patch.diff)

    before, after = leaves(yaml.safe_load(text)), leaves(yaml.safe_load(patched))
    changed = {key for key in before if before[key] != after[key]}
    assert changed == set(BEST) - {key for key, value in BEST.items() if before[key] == value}
    for key, value in BEST.items():
        assert after[key] == pytest.approx(value, rel=1e-3), key
        assert type(after[key]) is type(value), f"{key} reads back as {type(after[key]).__name__}"
    removed = [
        line for line in patch.diff.splitlines() if line.startswith("-") and not line.startswith("---")
    ]
    assert len(removed) == len(changed)  # one line per changed key, nothing else
    comments = lambda t: [line.partition("#")[2] for line in t.splitlines() if "#" in line]  # noqa: E731
    assert comments(patched) == comments(text)


def test_a_key_is_found_by_its_whole_path_not_its_last_name():
    text = (
        "train:\n"
        "  learning_rate: 0.001     # head\n"
        "  fine_tune:\n"
        "    learning_rate: 0.00001\n"
        "tune:\n"
        "  space:\n"
        "    learning_rate: [1.0e-4, 3.0e-3]\n"
    )
    changed, missing = with_values(text, {"train.fine_tune.learning_rate": 0.0002})
    assert missing == ()
    assert changed.splitlines()[3] == "    learning_rate: 0.0002"
    assert [line for line in changed.splitlines() if line != "    learning_rate: 0.0002"] == [
        line for line in text.splitlines() if line != "    learning_rate: 0.00001"
    ]


def test_comments_keep_their_column():
    changed, _ = with_values("train:\n  dropout: 0.3             # why\n", {"train.dropout": 0.123456})
    assert changed == "train:\n  dropout: 0.1235          # why\n"
    longer, _ = with_values("a:\n  b: 1 # c\n", {"a.b": 0.0000432})
    assert longer == "a:\n  b: 0.0000432 # c\n"


@pytest.mark.parametrize("value", [1.2345e-05, 3e-3, 0.5, 0.0, 123.456, 1e-9])
def test_floats_are_written_as_yaml_floats(value: float):
    written = yaml_scalar(value)
    assert "e" not in written.lower()  # PyYAML (YAML 1.1) reads 1e-05 as a string
    assert isinstance(yaml.safe_load(written), float)
    assert yaml.safe_load(written) == pytest.approx(value, rel=1e-3)


def test_unknown_keys_are_reported_and_unchanged_values_make_no_patch():
    text = "train:\n  batch_size: 64\n"
    assert params_patch(text, {"train.batch_size": 64}).diff == ""
    patch = params_patch(text, {"train.batch_size": 32, "train.width": 48})
    assert patch.missing == ("train.width",)
    assert "+  batch_size: 32\n" in patch.diff


def test_a_last_line_without_a_newline_still_applies(tmp_path: Path):
    text = "train:\n  seed: 1\n  batch_size: 64"
    patch = params_patch(text, {"train.batch_size": 16})
    assert "\\ No newline at end of file" in patch.diff
    assert git_apply(tmp_path, text, patch.diff) == "train:\n  seed: 1\n  batch_size: 16"
