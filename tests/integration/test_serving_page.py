"""The page at `/` in a real browser: a person uploads images and reads the classes the service gives.

One small digits project is trained, registered as champion and served by
`python -m serving` per module, as in test_serving.py; one headless Chromium
(Debian's, installed by infra/scripts/install-postgres.sh) drives the page
through Playwright. Playwright never downloads a browser here: it launches the
system's `chromium` by path. The feedback tests label a result through the page
and read what the service counted in `GET /v1/models/{name}/monitoring`.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Error, Page, expect, sync_playwright

from tests.serving_support import (
    Service,
    ServingProject,
    evaluate_predictions,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TIMEOUT_MS = 30_000  # the first upload of a module runs the model cold on a busy 2-core machine


@dataclass
class Visit:
    """An open page at `/` and the JavaScript errors it reported (console errors, uncaught exceptions)."""

    page: Page
    errors: list[str] = field(default_factory=list)

    def upload(self, *files: Path) -> None:
        """Choose `files` in the page's file input, as a person clicking the drop zone does."""
        self.page.set_input_files("#files", list(files))

    def drop(self, *files: Path) -> None:
        """Drop `files` on the drop zone, as a person dragging them from a file manager does."""
        payload = [
            {"name": f.name, "b64": base64.b64encode(f.read_bytes()).decode(), "type": "image/png"}
            for f in files
        ]
        transfer = self.page.evaluate_handle(
            """(files) => {
                const transfer = new DataTransfer();
                for (const file of files) {
                    const bytes = Uint8Array.from(atob(file.b64), (c) => c.charCodeAt(0));
                    transfer.items.add(new File([bytes], file.name, {type: file.type}));
                }
                return transfer;
            }""",
            payload,
        )
        self.page.dispatch_event("#drop", "dragover", {"dataTransfer": transfer})
        expect(self.page.locator("#drop")).to_have_class(re.compile(r"\bover\b"))  # the zone lights up
        self.page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


@pytest.fixture(scope="module")
def project(serving_project: ServingProject) -> ServingProject:
    return serving_project


@pytest.fixture(scope="module")
def service(champion_service: Service) -> Service:
    return champion_service


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        pytest.fail(
            "Chromium not found on PATH or at /usr/bin/chromium; run infra/scripts/install-postgres.sh"
        )
    with sync_playwright() as playwright:
        # Playwright passes --no-sandbox itself (chromium_sandbox defaults to False), so root is fine.
        launched = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def visit(browser: Browser, service: Service) -> Iterator[Visit]:
    context = browser.new_context()
    page = context.new_page()
    opened = Visit(page)

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            opened.errors.append(f"console: {message.text} ({message.location.get('url')})")

    def uncaught(error: Error) -> None:
        opened.errors.append(f"pageerror: {error.message}")

    page.on("console", console)
    page.on("pageerror", uncaught)
    page.goto(f"{service.url}/")
    expect(page).to_have_title(f"{service.model}: classify images")
    expect(page.locator("#status")).not_to_have_text(
        re.compile("checking|not ready|does not answer"), timeout=TIMEOUT_MS
    )
    yield opened
    context.close()


def top_k(project: ServingProject, classes: int) -> int:
    return min(project.cfg.serve.top_k, classes)


def labels_counted(service: Service, version: str) -> dict[str, Any]:
    """`version` in the monitoring view: how many of its served images carry a label, and its accuracy."""
    with service.client() as client:
        answer = client.get(f"/v1/models/{service.model}/monitoring")
    assert answer.status_code == 200, answer.text
    return answer.json()["versions"].get(version, {"labelled": 0, "accuracy": None})


def test_an_uploaded_image_shows_the_evaluate_stages_class_its_bars_and_the_model_version(
    project, service, visit
):
    image = project.test_files()[0]
    expected_classes, probabilities = evaluate_predictions(project)

    visit.upload(image)

    results = visit.page.locator(".result")
    expect(results).to_have_count(1, timeout=TIMEOUT_MS)
    result = results.first
    expect(result).to_have_attribute("data-file", image.name)
    assert result.locator(".predicted-class").inner_text() == expected_classes[0]
    with Image.open(image) as pixels:
        width = pixels.width
    assert result.locator("img").evaluate("img => img.decode().then(() => img.naturalWidth)") == width

    bars = result.locator(".bar")
    expect(bars).to_have_count(top_k(project, probabilities.shape[1]))
    shown = [
        (bar.locator(".class").inner_text(), float(bar.locator(".probability").inner_text().rstrip("%")))
        for bar in bars.all()
    ]
    assert shown[0][0] == expected_classes[0]
    assert [value for _, value in shown] == sorted((value for _, value in shown), reverse=True)
    names = [str(i) for i in range(probabilities.shape[1])]  # the digits project's classes 0..n-1
    for name, percent in shown:
        assert percent == pytest.approx(100 * probabilities[0][names.index(name)], abs=0.051)
    widths = [bar.locator(".fill").evaluate("fill => fill.style.width") for bar in bars.all()]
    assert widths == [f"{percent:.1f}%" for _, percent in shown]

    expect(visit.page.locator("#meta")).to_have_text(
        re.compile(rf"^model {service.model} version 1 \(stable\) · 1 image\(s\) in \d+\.\d ms$")
    )
    expect(visit.page.locator("#error")).to_be_hidden()
    assert visit.errors == []


@pytest.mark.parametrize("how", ["chosen", "dropped"])
def test_two_images_uploaded_at_once_show_two_results_in_their_order(project, service, visit, how):
    files = project.test_files()
    expected_classes, _ = evaluate_predictions(project)
    # Two images of different classes, so a swap of the results would show.
    second = next(i for i, name in enumerate(expected_classes) if name != expected_classes[0])

    (visit.upload if how == "chosen" else visit.drop)(files[0], files[second])

    results = visit.page.locator(".result")
    expect(results).to_have_count(2, timeout=TIMEOUT_MS)
    assert [r.get_attribute("data-file") for r in results.all()] == [files[0].name, files[second].name]
    assert results.locator(".predicted-class").all_inner_texts() == [
        expected_classes[0],
        expected_classes[second],
    ]
    expect(visit.page.locator("#meta")).to_contain_text("version 1 (stable) · 2 image(s)")
    assert visit.errors == []


def test_a_text_file_shows_the_services_error_naming_the_file_and_no_result(
    project, service, visit, tmp_path
):
    notes = tmp_path / "notes.txt"
    notes.write_text("Shopping list: milk, eggs, a better digit classifier.\n")

    visit.upload(notes)

    error = visit.page.locator("#error")
    expect(error).to_be_visible(timeout=TIMEOUT_MS)
    expect(error).to_contain_text("notes.txt")
    expect(error).to_contain_text("not an image")
    expect(visit.page.locator(".result")).to_have_count(0)
    expect(visit.page.locator("#meta")).to_have_text("")
    # Chromium logs every 4xx answer to fetch() as a console error; the 400 of /predict is this test's.
    refused = [
        e for e in visit.errors if "status of 400" in e and f"/predict?top_k={project.cfg.serve.top_k}" in e
    ]
    assert len(refused) == 1 and [e for e in visit.errors if e not in refused] == []


def test_correct_then_a_chosen_class_labels_a_result_once_and_the_second_is_a_correction(
    project, service, visit
):
    image = project.test_files()[0]
    expected_classes, probabilities = evaluate_predictions(project)
    predicted = expected_classes[0]
    names = [str(i) for i in range(probabilities.shape[1])]  # the digits project's classes 0..n-1
    other = next(name for name in names if name != predicted)

    with visit.page.expect_response(lambda r: "/predict" in r.url) as answered:
        visit.upload(image)
    version = answered.value.json()["model_version"]
    before = labels_counted(service, version)  # the session's project may carry other modules' labels
    result = visit.page.locator(".result")
    expect(result).to_have_count(1, timeout=TIMEOUT_MS)
    status = result.locator(".feedback-status")
    expect(status).to_have_text("")

    result.locator(".feedback-correct").click()

    expect(status).to_have_text(f"Thanks: recorded as {predicted}", timeout=TIMEOUT_MS)
    expect(status).not_to_have_class(re.compile(r"\berror\b"))
    counted = labels_counted(service, version)
    assert counted["labelled"] == before["labelled"] + 1
    right_before = (before["accuracy"] or 0.0) * before["labelled"]
    assert counted["accuracy"] == pytest.approx((right_before + 1) / counted["labelled"])

    wrong = result.get_by_label("Wrong, it is a")  # the select is labelled, as a screen reader reads it
    expect(wrong).to_have_class("feedback-select")
    assert wrong.locator("option").all_inner_texts() == [name for name in names if name != predicted]
    wrong.select_option(other)
    result.locator(".feedback-send").click()

    expect(status).to_have_text(f"Thanks: recorded as {other} (correction)", timeout=TIMEOUT_MS)
    expect(status).not_to_have_class(re.compile(r"\berror\b"))
    counted = labels_counted(service, version)
    assert counted["labelled"] == before["labelled"] + 1  # replaced, not added
    assert counted["accuracy"] == pytest.approx(right_before / counted["labelled"])
    assert visit.errors == []


def test_feedback_the_service_refuses_shows_its_error_on_the_card(project, service, visit):
    visit.upload(project.test_files()[0])
    result = visit.page.locator(".result")
    expect(result).to_have_count(1, timeout=TIMEOUT_MS)
    # An id the service no longer knows (past serve.feedback_window): the page's own request, re-addressed.
    forgotten = json.dumps({"id": "no-such-request", "index": 0, "label": "0"})
    visit.page.route("**/v1/feedback", lambda route: route.continue_(post_data=forgotten))

    with visit.page.expect_response("**/v1/feedback") as answered:
        result.locator(".feedback-correct").click()

    assert answered.value.status == 404
    message = answered.value.json()["error"]
    status = result.locator(".feedback-status")
    expect(status).to_have_text(message, timeout=TIMEOUT_MS)
    expect(status).to_have_class(re.compile(r"\berror\b"))
    expect(result.locator(".feedback-correct")).to_be_enabled()
    # Chromium logs every 4xx answer to fetch() as a console error; the 404 of /v1/feedback is this test's.
    refused = [e for e in visit.errors if "status of 404" in e and "/v1/feedback" in e]
    assert len(refused) == 1 and [e for e in visit.errors if e not in refused] == []
