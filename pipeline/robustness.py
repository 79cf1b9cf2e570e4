"""robustness: test-split accuracy under FGSM and under common corruptions.

Two stress tests of the trained model on the test split (or a seeded, stratified
subset of `robustness.max_images`):

- FGSM (Goodfellow et al., 2015): one step of size epsilon, on the 0-1 pixel
  scale, along the sign of the gradient of the cross-entropy with the true label.
- Common corruptions in the spirit of ImageNet-C (Hendrycks & Dietterich, 2019),
  at severities 1, 2 and 3: the parameters are in `CORRUPTION_SEVERITIES` and
  are copied into the report.

`reports/robustness.json` keys FGSM accuracies by `epsilon_key(eps)` (Python's
`str(float(eps))`: "0.0", "0.01", "0.03", "0.1"); read them with `fgsm_accuracy`.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import tensorflow as tf
from PIL import Image
from scipy import ndimage
from sklearn.model_selection import train_test_split

from pipeline import tracking
from pipeline.artifacts import image_files, input_size, load_trained_model, read_split, write_report
from pipeline.config import PipelineConfig
from pipeline.images import load_files
from pipeline.inference import predict
from pipeline.paths import StagePaths

log = logging.getLogger(__name__)

SEVERITIES = (1, 2, 3)
FGSM_BATCH = 64

# ImageNet-C's levels 1-3 where its parameter does not depend on image size. Blur is the
# exception: its sigma is a share of the image side (0.32, 0.64, 0.96 px at 32 px; 2.2,
# 4.5, 6.7 px at 224 px), because ImageNet-C's 1-3 px, made for 224 px, do nothing to
# small images.
CORRUPTION_SEVERITIES: dict[str, dict[str, Any]] = {
    "gaussian_noise": {"parameter": "noise sigma, 0-1 pixel scale", "values": (0.08, 0.12, 0.18)},
    "blur": {"parameter": "Gaussian blur sigma, share of the image side", "values": (0.01, 0.02, 0.03)},
    "brightness": {"parameter": "added to every pixel, 0-1 pixel scale", "values": (0.1, 0.2, 0.3)},
    "contrast": {"parameter": "factor around each image's channel means", "values": (0.4, 0.3, 0.2)},
    "jpeg": {"parameter": "JPEG quality (PIL)", "values": (25, 18, 15)},
}


def severity_table() -> dict[str, dict[str, Any]]:
    """The corruption parameters as the report records them: {name: {parameter, severities: {"1": v}}}."""
    return {
        name: {
            "parameter": row["parameter"],
            "severities": {str(s): value for s, value in zip(SEVERITIES, row["values"], strict=True)},
        }
        for name, row in CORRUPTION_SEVERITIES.items()
    }


def _jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(np.round(image).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32)
    return out


def corrupt(images: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A corrupted copy of `images` (the input is not changed).

    Args:
        images: (N, H, W, 3) pixels in 0..255.
        name: one of CORRUPTION_SEVERITIES.
        severity: 1, 2 or 3.
        rng: draws the noise of `gaussian_noise` (the other corruptions are deterministic).

    Returns:
        float32 (N, H, W, 3) in 0..255.

    Raises:
        ValueError: for an unknown corruption or severity.
    """
    if name not in CORRUPTION_SEVERITIES:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTION_SEVERITIES)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, not {severity}")
    value = CORRUPTION_SEVERITIES[name]["values"][severity - 1]
    x = np.asarray(images, dtype=np.float32) / 255.0
    if name == "gaussian_noise":
        x = x + rng.normal(scale=value, size=x.shape).astype(np.float32)
    elif name == "blur":
        sigma = value * x.shape[1]
        x = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="nearest")
    elif name == "brightness":
        x = x + value
    elif name == "contrast":
        means = x.mean(axis=(1, 2), keepdims=True)
        x = (x - means) * value + means
    else:
        x = _jpeg(np.clip(x, 0.0, 1.0) * 255.0, int(value)) / 255.0
    return (np.clip(x, 0.0, 1.0) * 255.0).astype(np.float32)


def gradient_sign(
    model: Any, images: np.ndarray, labels: np.ndarray, batch_size: int = FGSM_BATCH
) -> np.ndarray:
    """The sign of d(cross-entropy with the true label)/d(pixels), per pixel, in inference mode.

    The gradient w.r.t. the 0-1 pixels x/255 is 255 times the one w.r.t. the raw
    pixels, so both have the same sign. The Keras loss uses the softmax's logits
    that Keras keeps on its output: a clipped log of saturated probabilities
    would have no gradient for confidently right images and hide their weakness.
    """
    import keras

    signs = []
    for start in range(0, len(images), batch_size):
        x = tf.convert_to_tensor(images[start : start + batch_size], dtype=tf.float32)
        y = tf.convert_to_tensor(labels[start : start + batch_size])
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, model(x, training=False)))
        signs.append(tf.sign(tape.gradient(loss, x)).numpy())
    return np.concatenate(signs) if signs else np.zeros_like(images, dtype=np.float32)


def fgsm_step(images: np.ndarray, sign: np.ndarray, epsilon: float) -> np.ndarray:
    """x01 + epsilon * sign, clipped to [0, 1], as raw pixels.

    Computed on the 0..255 scale so that epsilon 0 returns the images bit for bit.
    """
    return np.clip(images + np.float32(255.0 * epsilon) * sign, 0.0, 255.0).astype(np.float32)


def fgsm(model: Any, images: np.ndarray, labels: np.ndarray, epsilon: float) -> np.ndarray:
    """FGSM adversarial images (Goodfellow et al.) of raw pixels 0..255, epsilon on the 0-1 scale.

    Args:
        model: a Keras model taking raw pixels and returning softmax probabilities.
        images: (N, H, W, 3) float32 pixels in 0..255.
        labels: (N,) true class indices.
        epsilon: step on the 0-1 pixel scale.
    """
    return fgsm_step(images, gradient_sign(model, images, labels), epsilon)


def accuracy(model: Any, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose argmax is the label."""
    return float((predict(model, images).argmax(axis=1) == labels).mean())


def epsilon_key(epsilon: float) -> str:
    """The report's key for an FGSM epsilon: str(float(eps)), e.g. "0.0", "0.01"."""
    return str(float(epsilon))


def fgsm_accuracy(report: dict, epsilon: float) -> float | None:
    """Accuracy under FGSM at `epsilon` in a robustness report; None when it was not measured.

    Matches keys numerically, so "0.01", "0.010" and "1e-2" all find 0.01.
    """
    table = report.get("fgsm", {})
    if epsilon_key(epsilon) in table:
        return float(table[epsilon_key(epsilon)])
    for key, value in table.items():
        try:
            if math.isclose(float(key), epsilon, rel_tol=1e-9, abs_tol=1e-12):
                return float(value)
        except ValueError:
            continue
    return None


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, str]:
    """Indices (sorted) of at most `size` images, stratified by label, and how they were chosen.

    Returns:
        (indices, sampling) with sampling "all", "stratified", or "random" when
        a class is too small to stratify (logged).
    """
    if size >= len(labels):
        return np.arange(len(labels)), "all"
    try:
        chosen, _ = train_test_split(
            np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed
        )
        return np.sort(chosen), "stratified"
    except ValueError as error:
        log.warning("robustness: cannot stratify %d test images (%s); sampling at random", size, error)
        return np.sort(np.random.default_rng(seed).choice(len(labels), size, replace=False)), "random"


def measure(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    epsilons: list[float],
    corruptions: list[str],
    seed: int,
) -> dict[str, Any]:
    """Clean, FGSM and corruption accuracies, as the report holds them.

    Every (corruption, severity) draws from a fresh generator seeded with `seed`, so the
    noise at severity 3 is the noise at severity 1, scaled: results do not depend on the
    order or on which corruptions are configured.
    """
    clean = accuracy(model, images, labels)
    fgsm_table = {}
    if epsilons:
        sign = gradient_sign(model, images, labels)  # one gradient serves every epsilon
        fgsm_table = {epsilon_key(e): accuracy(model, fgsm_step(images, sign, e), labels) for e in epsilons}
    table = {
        name: {
            str(s): accuracy(model, corrupt(images, name, s, np.random.default_rng(seed)), labels)
            for s in SEVERITIES
        }
        for name in corruptions
    }
    cells = [(value, name, int(s)) for name, row in table.items() for s, value in row.items()]
    worst = None
    if cells:  # the first of equally bad cells, in config order
        value, name, severity = min(cells, key=lambda cell: cell[0])
        worst = {"name": name, "severity": severity, "accuracy": value, "drop": clean - value}
    return {"clean_accuracy": clean, "fgsm": fgsm_table, "corruptions": table, "worst_corruption": worst}


def plot(report: dict[str, Any], path: Path) -> None:
    """Accuracy against corruption severity (0: clean) and against FGSM epsilon, side by side."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    clean = report["clean_accuracy"]
    for name, row in report["corruptions"].items():
        left.plot([0, *SEVERITIES], [clean, *(row[str(s)] for s in SEVERITIES)], marker="o", label=name)
    left.set(
        xlabel="severity (0: clean)", ylabel="accuracy", title="Common corruptions", xticks=[0, *SEVERITIES]
    )
    if report["corruptions"]:
        left.legend(fontsize=8)
    epsilons = sorted(report["fgsm"], key=float)
    right.plot([float(e) for e in epsilons], [report["fgsm"][e] for e in epsilons], marker="o", color="C3")
    right.set(xlabel="epsilon (0-1 pixel scale)", ylabel="accuracy", title="FGSM")
    for axis in (left, right):
        axis.set_ylim(0.0, 1.05)
        axis.grid(alpha=0.3)
    figure.suptitle(f"Robustness on {report['images']} test images")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def metrics_of(report: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics: robustness_clean_accuracy, robustness_fgsm_<key>, robustness_<name>_s<k>.

    <key> is the report's epsilon key with "_" for "." (robustness_fgsm_0_01), so names
    carry no dots for dashboards that read them as separators.
    """
    metrics = {"robustness_clean_accuracy": report["clean_accuracy"]}
    for key, value in report["fgsm"].items():
        metrics[f"robustness_fgsm_{key.replace('.', '_')}"] = value
    for name, row in report["corruptions"].items():
        for s, value in row.items():
            metrics[f"robustness_{name}_s{s}"] = value
    if report["worst_corruption"] is not None:
        metrics["robustness_worst_corruption_drop"] = report["worst_corruption"]["drop"]
    return metrics


def run(cfg: PipelineConfig, paths: StagePaths) -> dict[str, Any]:
    """Measure the trained model under FGSM and corruptions; write the report and plot; log to the run.

    Returns:
        The report written to reports/robustness.json.
    """
    settings = cfg.robustness
    model, names = load_trained_model(paths)
    test = read_split(paths, "test")
    labels = np.array([names.index(label) for label in test["label"]])
    chosen, sampling = stratified_subset(labels, settings.max_images, settings.seed)
    images = load_files(image_files(test.iloc[chosen], paths.root), input_size(model))
    labels = labels[chosen]
    measured = measure(model, images, labels, settings.epsilons, list(settings.corruptions), settings.seed)
    report = {
        "images": int(len(labels)),
        "sampling": sampling,
        **measured,
        "parameters": {name: severity_table()[name] for name in settings.corruptions},
    }
    write_report(report, paths.robustness_report)
    plot(report, paths.robustness_plot)
    with tracking.resume_run(cfg.mlflow, paths):
        mlflow.log_metrics(metrics_of(report))
        mlflow.log_artifact(str(paths.robustness_report), "reports")
        mlflow.log_artifact(str(paths.robustness_plot), "reports")
    worst = report["worst_corruption"]
    log.info(
        "robustness on %d test images: clean %.4f; FGSM %s; worst corruption %s",
        report["images"],
        report["clean_accuracy"],
        ", ".join(f"eps {k}: {v:.4f}" for k, v in report["fgsm"].items()) or "none",
        f"{worst['name']} s{worst['severity']} {worst['accuracy']:.4f} (drop {worst['drop']:.4f})"
        if worst
        else "none",
    )
    return report
