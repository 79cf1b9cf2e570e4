"""explain: what the model looked at, on a few test images (Integrated Gradients, Grad-CAM, LIME).

Writes `reports/explain/`: one PNG per chosen image (the image, then one
overlay per method), `index.html` (a table of them) and `explain.json`
(the images, predictions and each method's status), and logs the folder to
the pipeline's MLflow run under `explain/`.
"""

from __future__ import annotations

import html
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from pipeline import tracking
from pipeline.artifacts import image_files, input_size, load_trained_model, read_split, write_report
from pipeline.config import ExplainConfig, PipelineConfig
from pipeline.explain.methods import (
    LIME_SEGMENTATION,
    GradCamUnavailable,
    LimeMask,
    feature_map,
    grad_cam,
    integrated_gradients,
    lime_mask,
    lime_masks,
)
from pipeline.images import load_files
from pipeline.inference import predict
from pipeline.paths import StagePaths

__all__ = [
    "LimeMask",
    "build_report",
    "choose_images",
    "explain_images",
    "grad_cam",
    "integrated_gradients",
    "lime_mask",
    "run",
]

log = logging.getLogger(__name__)

METHODS = {
    "integrated_gradients": (
        "Integrated Gradients",
        "pixel attributions: the gradient of the predicted class's score, averaged on the straight "
        "path from a black image to this one, times the pixels (summed |attribution| over channels).",
    ),
    "grad_cam": (
        "Grad-CAM",
        "the last convolutional feature map, weighted by the gradient of the predicted class's score "
        "and upsampled: where the network's coarse features back the prediction.",
    ),
    "lime": (
        "LIME",
        "superpixels switched off (black) at random; a weighted linear model fitted to the predicted "
        "class's probability gives each superpixel a weight (positive weights shown).",
    ),
}


def choose_images(
    labels: np.ndarray, predicted: np.ndarray, classes: int, per_class: int, max_misclassified: int
) -> list[tuple[int, str]]:
    """The test images to explain: the first `per_class` of each class, then misclassified ones.

    Returns:
        (index into the test split, "per_class" or "misclassified"), without duplicates;
        a misclassified image already chosen for its class is not counted again.
    """
    chosen = [(int(i), "per_class") for c in range(classes) for i in np.flatnonzero(labels == c)[:per_class]]
    taken = {i for i, _ in chosen}
    wrong = [int(i) for i in np.flatnonzero(labels != predicted) if int(i) not in taken]
    return chosen + [(i, "misclassified") for i in wrong[:max_misclassified]]


Attribution = tuple[np.ndarray | None, dict[str, Any]]  # (N, H, W) maps or None, and the status


def _integrated_gradients(
    model: Any, images: np.ndarray, class_ids: np.ndarray, settings: ExplainConfig
) -> Attribution:
    maps = integrated_gradients(model, images, class_ids, settings.ig_steps)
    return maps, {"status": "ok", "baseline": "black", "steps": settings.ig_steps}


def _grad_cam(model: Any, images: np.ndarray, class_ids: np.ndarray, settings: ExplainConfig) -> Attribution:
    try:
        layer = feature_map(model)
    except GradCamUnavailable as reason:
        return None, {"status": "skipped", "reason": str(reason)}
    return grad_cam(model, images, class_ids), {
        "status": "ok",
        "layer": layer.layer,
        "feature_map": list(layer.size),
    }


def _lime(model: Any, images: np.ndarray, class_ids: np.ndarray, settings: ExplainConfig) -> Attribution:
    used = {"samples": settings.lime_samples, "seed": settings.seed, "segmentation": LIME_SEGMENTATION}
    if not settings.lime:
        return None, {"status": "disabled", "reason": "explain.lime is false", **used}
    try:
        maps = lime_masks(model, images, class_ids, settings.lime_samples, settings.seed)
    except Exception as error:  # an optional package: any failure is reported, the other methods stand
        return None, {"status": "failed", "reason": f"{error.__class__.__name__}: {error}", **used}
    return maps, {"status": "ok", **used}


def explain_images(
    model: Any, images: np.ndarray, class_ids: np.ndarray, settings: ExplainConfig
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Every method's (N, H, W) maps, and each method's status (ok, skipped, disabled or failed, and why).

    A method that cannot run is recorded with its reason; the others still run.
    """
    maps: dict[str, np.ndarray] = {}
    status: dict[str, dict[str, Any]] = {}
    for method, attribute in (
        ("integrated_gradients", _integrated_gradients),
        ("grad_cam", _grad_cam),
        ("lime", _lime),
    ):
        start = time.perf_counter()
        heat, status[method] = attribute(model, images, class_ids, settings)
        if heat is not None:
            maps[method] = heat
        log.log(
            logging.WARNING if status[method]["status"] == "failed" else logging.INFO,
            "%s: %s on %d images in %.1f s %s",
            method,
            status[method]["status"],
            len(images),
            time.perf_counter() - start,
            status[method].get("reason", ""),
        )
    return maps, status


def display_scale(method: str, heat: np.ndarray) -> np.ndarray:
    """A map in 0..1 for drawing: IG clipped at its 99th percentile, LIME's positive weights only."""
    if method == "lime":
        heat = np.clip(heat, 0.0, None)
    top = np.percentile(heat, 99) if method == "integrated_gradients" else heat.max()
    return np.clip(heat / top, 0.0, 1.0) if top > 0 else np.zeros_like(heat)


def draw_overlay(image: np.ndarray, maps: dict[str, np.ndarray], title: str, path: Path) -> None:
    """One PNG: the image, then each method's map over a grey copy of it, side by side."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    pixels = np.clip(image / 255.0, 0.0, 1.0)
    figure, axes = plt.subplots(1, 1 + len(maps), figsize=(2.2 * (1 + len(maps)), 2.6), squeeze=False)
    axes[0, 0].imshow(pixels, interpolation="nearest")
    axes[0, 0].set_title("image", fontsize=9)
    for axis, (method, heat) in zip(axes[0, 1:], maps.items(), strict=True):
        axis.imshow(pixels.mean(axis=-1), cmap="gray", interpolation="nearest")
        axis.imshow(
            display_scale(method, heat), cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="nearest"
        )
        axis.set_title(METHODS[method][0], fontsize=9)
    for axis in axes[0]:
        axis.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def index_page(rows: list[dict[str, Any]], status: dict[str, dict[str, Any]]) -> str:
    """index.html: what each method is, its status, and one table row per image (relative links)."""
    shown = [m for m in METHODS if status[m]["status"] == "ok"]
    notes = "".join(
        f"<li><b>{METHODS[m][0]}</b> ({html.escape(status[m]['status'])}"
        + (f": {html.escape(status[m]['reason'])}" if "reason" in status[m] else "")
        + f"): {html.escape(METHODS[m][1])}</li>"
        for m in METHODS
    )
    panels = " | ".join(["image"] + [METHODS[m][0] for m in shown])
    body = "".join(
        "<tr>"
        f"<td>{html.escape(row['file'])}</td><td>{html.escape(row['true'])}</td>"
        f"<td>{html.escape(row['predicted'])} ({row['confidence']:.1%})</td>"
        f"<td class={'ok' if row['correct'] else 'wrong'}>{'correct' if row['correct'] else 'wrong'}</td>"
        f"<td>{row['chosen_as']}</td>"
        f'<td><img src="{html.escape(row["overlay"])}" alt="{html.escape(row["file"])}"></td>'
        "</tr>"
        for row in rows
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>What the model looked at</title>"
        "<style>body{font-family:sans-serif;margin:1em}td,th{border:1px solid #ccc;padding:4px}"
        "table{border-collapse:collapse}.ok{color:green}.wrong{color:red}img{height:180px}</style>"
        "</head><body><h1>What the model looked at (test split)</h1>"
        f"<ul>{notes}</ul><p>Maps explain the predicted class. Overlays: {html.escape(panels)}.</p>"
        "<table><tr><th>image</th><th>true class</th><th>predicted (confidence)</th><th>result</th>"
        f"<th>chosen as</th><th>{html.escape(panels)}</th></tr>{body}</table></body></html>\n"
    )


def overlay_name(position: int, file: str) -> str:
    """A file name for the PNG of the image at `position`, safe in a URL."""
    return f"{position:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', Path(file).stem)}.png"


def build_report(
    files: list[str],
    names: list[str],
    labels: np.ndarray,
    probabilities: np.ndarray,
    chosen: list[tuple[int, str]],
    status: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """explain.json: `class_names`, `counts`, `methods` (each one's status) and one row per chosen image."""
    predicted = probabilities.argmax(axis=1)
    rows = [
        {
            "file": files[index],
            "true": names[labels[index]],
            "predicted": names[predicted[index]],
            "confidence": float(probabilities[index, predicted[index]]),
            "correct": bool(labels[index] == predicted[index]),
            "chosen_as": reason,
            "overlay": overlay_name(position, files[index]),
        }
        for position, (index, reason) in enumerate(chosen)
    ]
    return {
        "class_names": names,
        "counts": {
            "test_images": len(labels),
            "misclassified_in_test": int((labels != predicted).sum()),
            "per_class": sum(reason == "per_class" for _, reason in chosen),
            "misclassified": sum(reason == "misclassified" for _, reason in chosen),
            "explained": len(chosen),
        },
        "methods": status,
        "images": rows,
    }


def write_folder(
    report: dict[str, Any], images: np.ndarray, maps: dict[str, np.ndarray], folder: Path
) -> None:
    """Replace `folder` with the overlays of `images` (in report order), index.html and explain.json."""
    if folder.exists():  # the folder is this stage's output: no overlay of an earlier run stays
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for position, row in enumerate(report["images"]):
        title = f"true {row['true']}, predicted {row['predicted']} ({row['confidence']:.0%})"
        image_maps = {method: values[position] for method, values in maps.items()}
        draw_overlay(images[position], image_maps, title, folder / row["overlay"])
    (folder / "index.html").write_text(index_page(report["images"], report["methods"]), encoding="utf-8")
    write_report(report, folder / "explain.json")


def run(cfg: PipelineConfig, paths: StagePaths) -> dict[str, Any]:
    """Explain the model's predictions on chosen test images; write reports/explain/ and log it.

    Returns:
        The report written to explain.json (see `build_report`).
    """
    settings = cfg.explain
    model, names = load_trained_model(paths)
    test = read_split(paths, "test")
    images = load_files(image_files(test, paths.root), input_size(model))
    labels = np.array([names.index(label) for label in test["label"]], dtype=int)
    probabilities = np.asarray(predict(model, images)).reshape(len(images), len(names))
    chosen = choose_images(
        labels, probabilities.argmax(axis=1), len(names), settings.per_class, settings.max_misclassified
    )
    which = np.array([i for i, _ in chosen], dtype=int)
    maps, status = explain_images(model, images[which], probabilities[which].argmax(axis=1), settings)
    report = build_report(list(test["path"]), names, labels, probabilities, chosen, status)

    write_folder(report, images[which], maps, paths.explain)
    with tracking.resume_run(cfg.mlflow, paths):
        mlflow.log_artifacts(str(paths.explain), "explain")
    log.info("explained %d test images: %s", len(chosen), paths.relative(paths.explain / "index.html"))
    return report
