"""The gate's serving smoke test (TFX's infra validation): the candidate must load and answer over HTTP.

Before `register` may move `champion`, the exported SavedModel is served by
the service's own code (`python -m serving --model-dir ...`) in a child
process on a free port, sent test-split images in TF Serving's REST format,
and must answer each with the class the evaluate stage predicted. A candidate
that does not load, does not become ready in time, or answers differently
fails the check, so it is registered as `challenger` only.
"""

from __future__ import annotations

import base64
import json
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from pipeline import children
from pipeline.artifacts import image_files, read_split
from pipeline.config import PipelineConfig
from pipeline.paths import StagePaths

log = logging.getLogger(__name__)

REQUEST_IMAGES = 16  # images per predict request
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never via a proxy


@dataclass(frozen=True)
class SmokeResult:
    """How many images the served candidate answered as evaluate did (None: it never answered)."""

    agreement: float | None
    images: int
    detail: str


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str, timeout: float) -> int | None:
    try:
        with _direct.open(url, timeout=timeout) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


def _load_error(base: str, name: str) -> str | None:
    """The reason the served version could not load (its status says UNAVAILABLE), else None."""
    try:
        with _direct.open(f"{base}/v1/models/{name}", timeout=2.0) as answer:
            versions = json.loads(answer.read()).get("model_version_status", [])
    except (OSError, ValueError):
        return None
    failed = [v["status"]["error_message"] for v in versions if v.get("state") == "UNAVAILABLE"]
    return failed[0] if failed else None


def _tail(log_file: Path, lines: int = 8) -> str:
    try:
        text = log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def _stop(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(15)


def _predict(url: str, images: list[bytes], timeout: float) -> list[str]:
    body = json.dumps({"instances": [{"b64": base64.b64encode(i).decode()} for i in images]}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with _direct.open(request, timeout=timeout) as answer:
        return [row["predicted_class"] for row in json.loads(answer.read())["predictions"]]


def run(cfg: PipelineConfig, paths: StagePaths) -> SmokeResult:
    """Serve `models/savedmodel` in a child process and compare its answers with evaluate's predictions."""
    test = read_split(paths, "test")
    expected = pd.read_csv(paths.predictions, dtype=str, keep_default_na=False)["predicted"].tolist()
    count = min(cfg.serve.smoke_test_images, len(test))
    files, expected = image_files(test, paths.root)[:count], expected[:count]
    if not paths.savedmodel.is_dir():
        return SmokeResult(None, count, f"{paths.relative(paths.savedmodel)} not found; run the export stage")
    name = cfg.mlflow.registered_model
    timeout = cfg.serve.smoke_test_timeout_seconds
    with tempfile.TemporaryDirectory(prefix="serving-smoke-") as scratch:
        params, log_file = Path(scratch) / "params.yaml", Path(scratch) / "serving.log"
        settings = cfg.model_dump(mode="json", by_alias=True)
        settings["serve"]["log_sample"] = (
            0.0  # a candidate's test traffic is not the product's: no log, no batches
        )
        params.write_text(yaml.safe_dump(settings, sort_keys=False))
        port = _free_port()
        command = [sys.executable, "-m", "serving", "--params", str(params), "--host", "127.0.0.1"]
        command += ["--port", str(port), "--model-dir", str(paths.savedmodel), "--model-name", name]
        base = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        with log_file.open("wb") as sink:
            child = children.start(command, stdout=sink, stderr=subprocess.STDOUT, cwd=paths.root)
        try:
            while _get(f"{base}/v2/health/ready", 2.0) != 200:
                if child.poll() is not None:
                    return SmokeResult(
                        None, count, f"the service exited with code {child.returncode}: {_tail(log_file)}"
                    )
                failed = _load_error(base, name)
                if failed is not None:  # it will not load however long we wait
                    return SmokeResult(None, count, f"the service could not load it: {failed}")
                if time.monotonic() - started > timeout:
                    return SmokeResult(
                        None,
                        count,
                        f"not ready within serve.smoke_test_timeout_seconds = {timeout:g}: {_tail(log_file)}",
                    )
                time.sleep(0.25)
            answered: list[str] = []
            try:
                for start in range(0, count, REQUEST_IMAGES):
                    chunk = [f.read_bytes() for f in files[start : start + REQUEST_IMAGES]]
                    answered += _predict(f"{base}/v1/models/{name}:predict", chunk, timeout)
            except (OSError, KeyError, ValueError) as error:
                detail = getattr(error, "read", lambda: b"")()[:300].decode(errors="replace")
                return SmokeResult(
                    None, count, f"the served candidate did not answer ({error} {detail}): {_tail(log_file)}"
                )
        finally:
            _stop(child)
    same = sum(a == b for a, b in zip(answered, expected, strict=True))
    seconds = time.monotonic() - started
    differ = [i for i, (a, b) in enumerate(zip(answered, expected, strict=True)) if a != b]
    detail = (
        f"{same}/{count} test images answered over HTTP as evaluate predicted "
        f"({seconds:.1f} s to load and answer)" + (f"; differing rows: {differ[:10]}" if differ else "")
    )
    return SmokeResult(same / count if count else 0.0, count, detail)
