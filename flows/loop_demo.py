"""`make loop-demo`: the closed loop on the embedded default, each step printed.

Needs a champion (`make run` first; the Makefile target does that). The story:

1. the service (`python -m serving`) serves the champion and logs every prediction;
2. clients send it the test split shifted (brightness +0.3), and label two thirds of
   what they got through `POST /v1/feedback`;
3. the service cuts its traffic into landing batches: `served-*` (unlabelled) and
   `feedback-*/<class>/` (labelled);
4. the drift-check flow flags them, versions the labelled batches with DVC, retrains,
   and the gate decides;
5. the running service picks up the new champion by itself (registry polling), and
   its live accuracy on further shifted traffic (the validation split) is compared
   with the old version's.

`story` is the same sequence for any project; the end-to-end test runs it on a
small one and asserts on what it returns.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from flows.retraining import drift_check_flow
from flows.training import PROJECT_ROOT
from pipeline import children
from pipeline.config import load_config
from pipeline.monitoring.shifts import Shift, brightness, shifted_png
from pipeline.paths import StagePaths

Say = Callable[[str], None]


@dataclass(frozen=True)
class Answer:
    """One image sent: its request id, the version and class the service answered, and the truth."""

    id: str
    version: str
    predicted: str
    truth: str

    @property
    def correct(self) -> bool:
        return self.predicted == self.truth


class LoopClient:
    """A client of the running service: predictions, feedback, monitoring."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model

    def _client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout, trust_env=False)

    def send(self, images: list[bytes], truths: list[str], threads: int = 8) -> list[Answer]:
        """One TF Serving REST request per image, `threads` at a time."""

        def one(client: httpx.Client, image: bytes, truth: str) -> Answer:
            import base64

            body = {"instances": [{"b64": base64.b64encode(image).decode()}]}
            answer = client.post(f"/v1/models/{self.model}:predict", json=body)
            answer.raise_for_status()
            data = answer.json()
            return Answer(
                data["request_id"],
                answer.headers["X-Model-Version"],
                data["predictions"][0]["predicted_class"],
                truth,
            )

        with self._client() as client, ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda pair: one(client, *pair), zip(images, truths, strict=True)))

    def label(self, answers: list[Answer]) -> None:
        """Send each answer's true label (the batch form of POST /v1/feedback)."""
        with self._client() as client:
            response = client.post(
                "/v1/feedback", json={"feedback": [{"id": a.id, "label": a.truth} for a in answers]}
            )
            if response.status_code != 200:
                raise RuntimeError(f"feedback refused ({response.status_code}): {response.text[:500]}")

    def monitoring(self) -> dict[str, Any]:
        with self._client() as client:
            response = client.get(f"/v1/models/{self.model}/monitoring")
            response.raise_for_status()
            return dict(response.json())

    def wait_for_stable(self, not_version: str, timeout: float) -> str | None:
        """The version `stable` moves to from `not_version`, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stable = self.monitoring()["served"].get("stable")
            if stable is not None and stable != not_version:
                return str(stable)
            time.sleep(0.5)
        return None


@contextmanager
def running_service(params: Path, port: int, *args: str, log_file: Path) -> Iterator[LoopClient]:
    """`python -m serving` on the project's params, tied to this process, ready on yield."""
    cfg = load_config(params)
    command = [sys.executable, "-m", "serving", "--params", str(params), "--port", str(port), *args]
    with log_file.open("ab") as sink:
        child = children.start(command, stdout=sink, stderr=subprocess.STDOUT, cwd=params.parent)
    client = LoopClient(f"http://127.0.0.1:{port}", cfg.mlflow.registered_model)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with client._client(2.0) as http:
                    if http.get("/v2/health/ready").status_code == 200:
                        break
            except httpx.TransportError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not become ready; see {log_file}")
            time.sleep(0.3)
        yield client
    finally:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()


def wait_for_batches(
    landing: Path, prefix: str, count: int, since: set[str], timeout: float = 60
) -> list[str]:
    """Names of the `count` new `<prefix>-*` batches in the landing area (cut by the service)."""
    deadline = time.monotonic() + timeout
    while True:
        found = (
            sorted(p.name for p in landing.glob(f"{prefix}-*") if p.is_dir() and p.name not in since)
            if landing.is_dir()
            else []
        )
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def mixed(files: tuple[list[Path], list[str]], rng: np.random.Generator) -> tuple[list[Path], list[str]]:
    """Files and labels in a random order (sorted folders would send one class after another)."""
    order = rng.permutation(len(files[0]))
    return [files[0][i] for i in order], [files[1][i] for i in order]


def accuracy(answers: list[Answer]) -> float:
    return float(np.mean([a.correct for a in answers])) if answers else float("nan")


def story(
    root: Path,
    traffic: tuple[list[Path], list[str]],
    later: tuple[list[Path], list[str]],
    shift: Shift,
    port: int,
    batch_images: int,
    label_share: float = 2 / 3,
    drift_overrides: dict[str, Any] | None = None,
    say: Say = print,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """Serve, send shifted traffic, label part of it, let the service cut batches, check for drift
    (which retrains and gates), then send more traffic to whatever serves now.

    Args:
        root: the project (it has a champion).
        traffic: image files and their true labels, sent first; `label_share` of them get feedback.
        later: files and labels sent once a retrained champion serves (all get feedback).
        shift: applied to every image sent.
        port: the service's port.
        batch_images: serve.batch_images for this run (how the traffic is cut into batches).
        drift_overrides: `drift.*` settings for the check (the cooldown is always off).
        say: where each step is told.
        log_dir: serve.log_dir for this run (default: params.yaml's).

    Returns:
        What happened: versions, batches, the drift check's summary, live accuracies.
    """
    params = root / "params.yaml"
    cfg = load_config(params)
    paths = StagePaths.from_config(cfg.paths, root)
    landing = paths.resolve(cfg.drift.landing)
    before = {p.name for p in landing.iterdir()} if landing.is_dir() else set()
    rng = np.random.default_rng(0)
    traffic, later = mixed(traffic, rng), mixed(later, rng)  # clients arrive in no class order
    images = [shifted_png(path, shift, rng) for path in traffic[0]]
    result: dict[str, Any] = {}
    args = ["--poll-seconds", "1", "--batch-images", str(batch_images), "--batch-minutes", "600"]
    if log_dir is not None:
        args += ["--log-dir", str(log_dir)]
    (root / ".cache").mkdir(exist_ok=True)
    with running_service(params, port, *args, log_file=root / ".cache" / "loop-demo-serving.log") as client:
        old = client.monitoring()["served"]["stable"]
        reference = client.monitoring()["versions"][old]["reference_test_accuracy"]
        say(f"1. service up at {client.url}: {client.model} version {old} serves as stable")
        answers = client.send(images, traffic[1])
        say(
            f"2. traffic: {len(answers)} images sent, answered by version(s) "
            f"{sorted({a.version for a in answers})}; accuracy {accuracy(answers):.3f} "
            f"(its test accuracy at training: {reference if reference is None else round(reference, 3)})"
        )
        labelled = answers[: int(round(len(answers) * label_share))]
        client.label(labelled)
        live = client.monitoring()["versions"][old]
        say(
            f"3. feedback: {len(labelled)} labels sent; live accuracy of version {old}: "
            f"{live['accuracy']:.3f} over {live['labelled']} labelled images, "
            f"mean confidence {live['mean_confidence']:.3f}"
        )
        shown = landing.relative_to(root) if landing.is_relative_to(root) else landing
        served = wait_for_batches(landing, "served", len(answers) // batch_images, before)
        feedback = wait_for_batches(landing, "feedback", len(labelled) // batch_images, before)
        say(
            f"4. batches cut into {shown}: {', '.join(served)} (unlabelled); {', '.join(feedback)} (labelled)"
        )
        summary = drift_check_flow(
            root=str(root), settle_seconds=0, overrides={"drift.cooldown_hours": 0, **(drift_overrides or {})}
        )
        say("5. drift check:")
        for name, outcome in summary["batches"].items():
            say(f"     {name}: {outcome}")
        say(f"   decision: {summary.get('decision')}")
        say(f"   training: {summary.get('training', 'none')}")
        result.update(
            old_version=old,
            answers=answers,
            labelled=len(labelled),
            served_batches=served,
            feedback_batches=feedback,
            drift=summary,
            old_live=live,
        )
        if "new champion" not in summary.get("training", ""):
            return result
        new = client.wait_for_stable(old, timeout=120)
        say(f"6. the service switched by itself: version {new} serves as stable")
        later_images = [shifted_png(path, shift, rng) for path in later[0]]
        after = client.send(later_images, later[1])
        client.label(after)
        figures = client.monitoring()["versions"]
        say(
            f"7. further shifted traffic: {len(after)} images, answered by version(s) "
            f"{sorted({a.version for a in after})}, all labelled"
        )
        say(
            f"   live accuracy: version {old} {figures[old]['accuracy']:.3f} "
            f"({figures[old]['labelled']} labels) -> version {new} {figures[new]['accuracy']:.3f} "
            f"({figures[new]['labelled']} labels)"
        )
        result.update(new_version=new, later_answers=after, monitoring=figures)
    return result


def main() -> None:
    """The story on this repository's project (after `make run`)."""
    from flows.server import temporary_server  # Prefect's server code loads for this entry point only
    from pipeline.artifacts import image_files, read_split
    from serving.__main__ import free_port

    cfg = load_config(PROJECT_ROOT / "params.yaml", PROJECT_ROOT)
    paths = StagePaths.from_config(cfg.paths, PROJECT_ROOT)
    test, val = read_split(paths, "test"), read_split(paths, "val")
    print(
        "the loop on the embedded digits: shifted traffic (brightness +0.3) -> feedback -> batches -> drift"
    )
    with temporary_server():  # when no Prefect server is configured; it ends with this process
        story(
            PROJECT_ROOT,
            (image_files(test, paths.root), list(test["label"])),
            (image_files(val, paths.root)[:180], list(val["label"])[:180]),
            brightness(0.3),
            port=free_port(cfg.serve.host),
            batch_images=60,
        )


if __name__ == "__main__":
    main()
