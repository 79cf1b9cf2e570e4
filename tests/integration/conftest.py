"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.serving_support import Service, ServingProject, build_project, register, running_service


@pytest.fixture(scope="session")
def serving_project(tmp_path_factory: pytest.TempPathFactory) -> ServingProject:
    """A trained, exported digits project whose model is `champion` of image-classifier (once per worker).

    Tests register other versions under other model names, or copy the project, never change this one.
    """
    built = build_project(tmp_path_factory.mktemp("serving") / "project")
    register(built, "champion")
    return built


@pytest.fixture(scope="module")
def champion_service(serving_project: ServingProject) -> Iterator[Service]:
    """`python -m serving` on `serving_project`'s params (the committed defaults), ready; one per module."""
    with running_service(serving_project.params) as running:
        running.wait_ready()
        yield running
