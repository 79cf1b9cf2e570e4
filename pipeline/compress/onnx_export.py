"""ONNX export beside TFLite, checked with onnxruntime against Keras on the test split.

Keras' own exporter (`model.export(format="onnx")`, tf2onnx underneath) comes
first; when it fails, the model's SavedModel goes through tf2onnx's command
line. A converter failure is reported with its reason; it never stops the
other exports.
"""

from __future__ import annotations

import gzip
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_PROBABILITY_DIFF = (
    1e-4  # the check: ONNX and Keras agree on every top-1 and within this on every probability
)
OPSET = 17


def _short(error: BaseException | str) -> str:
    text = str(error).strip().splitlines()
    name = error.__class__.__name__ + ": " if isinstance(error, BaseException) else ""
    return name + (text[-1][:400] if text else "")


def _keras_exporter(model: Any, target: Path) -> None:
    model.export(str(target), format="onnx", verbose=False, opset_version=OPSET)


def _savedmodel_exporter(model: Any, target: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:
        model.export(folder, format="tf_saved_model", verbose=False)
        command = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", folder]
        command += ["--output", str(target), "--opset", str(OPSET)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"tf2onnx exited with {done.returncode}: {done.stderr.strip()[-400:]}")


CONVERTERS = (
    ("keras (model.export format=onnx)", _keras_exporter),
    ("tf2onnx from the SavedModel", _savedmodel_exporter),
)


def onnx_predict(path: Path, images: np.ndarray) -> tuple[np.ndarray, float]:
    """Probabilities with onnxruntime (the whole set in one call) and the median ms of one-image calls."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    probabilities = np.concatenate(
        [session.run(None, {name: images[i : i + 64]})[0] for i in range(0, len(images), 64)]
    )
    timings = []
    for image in images[:50]:
        start = time.perf_counter()
        session.run(None, {name: image[None]})
        timings.append((time.perf_counter() - start) * 1000.0)
    return probabilities.astype(np.float32), float(np.median(timings)) if timings else float("nan")


def export_onnx(
    model: Any, target: Path, images: np.ndarray, labels: np.ndarray, keras_probabilities: np.ndarray
) -> dict:
    """Convert with the first converter that works, run it on `images`, compare with Keras.

    Returns the report entry: status `ok`, `mismatch` (converted but the
    check failed) or `failed` (no converter could handle the model; `errors`
    says which and why).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    errors = {}
    converter = None
    for name, convert in CONVERTERS:
        try:
            convert(model, target)
        except Exception as error:  # a converter's own failure: named, then the next one
            errors[name] = _short(error)
            log.warning("ONNX export with %s failed: %s", name, errors[name])
            target.unlink(missing_ok=True)
            continue
        converter = name
        break
    if converter is None:
        return {"status": "failed", "errors": errors}
    try:
        probabilities, latency = onnx_predict(target, images.astype(np.float32))
    except Exception as error:
        return {
            "status": "failed",
            "converter": converter,
            "errors": {**errors, "onnxruntime": _short(error)},
        }
    predicted = probabilities.argmax(axis=1)
    agreement = float((predicted == keras_probabilities.argmax(axis=1)).mean())
    difference = float(np.abs(probabilities - keras_probabilities).max())
    flat = target.read_bytes()
    within = agreement == 1.0 and difference < MAX_PROBABILITY_DIFF
    return {
        "status": "ok" if within else "mismatch",
        "converter": converter,
        **({"errors": errors} if errors else {}),
        "size_bytes": len(flat),
        "gzip_size_bytes": len(gzip.compress(flat, 9)),
        "accuracy": float((predicted == labels).mean()),
        "agreement_with_keras": agreement,
        "max_probability_diff": difference,
        "max_probability_diff_allowed": MAX_PROBABILITY_DIFF,
        "latency_ms_median": latency,
    }
