"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from tests.serving_support import ServingProject, build_project, register


@pytest.fixture(scope="session")
def serving_project(tmp_path_factory: pytest.TempPathFactory) -> ServingProject:
    """A trained, exported digits project whose model is `champion` of image-classifier (once per worker).

    Tests register other versions under other model names, or copy the project, never change this one.
    """
    built = build_project(tmp_path_factory.mktemp("serving") / "project")
    register(built, "champion")
    return built
