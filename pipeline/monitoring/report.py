"""Drift reports: `reports/drift/<batch>.json`, an HTML page with histograms, an MLflow monitoring run."""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

import numpy as np

from pipeline import tracking
from pipeline.artifacts import write_report
from pipeline.config import MlflowConfig
from pipeline.monitoring.check import DriftReport
from pipeline.monitoring.profile import STATISTICS, BatchProfile, ReferenceProfile

log = logging.getLogger(__name__)


def monitoring_experiment(cfg: MlflowConfig) -> str:
    """The MLflow experiment that holds one run per drift check."""
    return f"{cfg.experiment}-drift-monitoring"


def histogram_png(reference: np.ndarray, batch: np.ndarray, title: str) -> str:
    """A reference-vs-batch histogram as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4, 2.6), dpi=90)
    low, high = float(min(reference.min(), batch.min())), float(max(reference.max(), batch.max()))
    bins = np.linspace(low, high if high > low else low + 1.0, 30).tolist()
    axis.hist(reference, bins=bins, density=True, alpha=0.55, label=f"reference ({len(reference)})")
    axis.hist(batch, bins=bins, density=True, alpha=0.55, label=f"batch ({len(batch)})")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def html_report(report: DriftReport, reference: ReferenceProfile, batch: BatchProfile) -> str:
    """A self-contained HTML page: the detector table and per-feature histograms."""
    rows = "".join(
        f"<tr class={'drift' if d.drift else 'ok'}><td>{d.name}</td><td>{d.statistic:.4g}</td>"
        f"<td>{d.p_value:.4g}</td><td>{d.threshold:.4g}</td><td>{'DRIFT' if d.drift else 'ok'}</td>"
        f"<td>{html.escape(d.detail)}</td></tr>"
        for d in report.detectors
    )
    stats_by_name = next((d.features for d in report.detectors if d.name == "image_stats"), {})
    figures = "".join(
        f"<figure><img src='data:image/png;base64,"
        f"{histogram_png(reference.profile.statistics[:, i], batch.statistics[:, i], name)}'>"
        f"<figcaption>{name}: p (Holm) = {stats_by_name.get(name, {}).get('p_adjusted', float('nan')):.3g}"
        "</figcaption></figure>"
        for i, name in enumerate(STATISTICS)
    )
    verdict = "DRIFT" if report.drift else "no drift"
    title = f"Drift: {html.escape(report.batch)}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse}}tr.drift{{background:#fdd}}figure{{display:inline-block;margin:6px}}</style>
</head><body><h1>Batch {html.escape(report.batch)}: {verdict}</h1>
<p>{report.images} images ({"labelled" if report.labelled else "unlabelled"}) against the reference of
{html.escape(report.champion)} ({len(reference.profile.predicted)} validation images), checked
{report.checked_at}; family-wise alpha {report.alpha}, split across detectors.</p>
<table><tr><th>detector</th><th>statistic</th><th>p-value</th><th>threshold</th><th>verdict</th>
<th>detail</th></tr>{rows}</table><h2>Image statistics, reference vs batch</h2>{figures}</body></html>
"""


def report_files(folder: Path, batch: str) -> tuple[Path, Path]:
    """`<folder>/<batch>.json` and `<folder>/<batch>.html`: where a check of `batch` is reported."""
    return folder / f"{batch}.json", folder / f"{batch}.html"


def write_reports(
    report: DriftReport, reference: ReferenceProfile, batch: BatchProfile, folder: Path
) -> tuple[Path, Path]:
    """`<folder>/<batch>.json` and `<folder>/<batch>.html`."""
    json_path, html_path = report_files(folder, report.batch)
    write_report(report.to_dict(), json_path)
    html_path.write_text(html_report(report, reference, batch), encoding="utf-8")
    return json_path, html_path


def metric_key(*parts: str) -> str:
    """An MLflow metric name (letters, digits, _ - . / and spaces only)."""
    return ".".join("".join(c if c.isalnum() or c in "_-" else "_" for c in part) for part in parts)


def log_monitoring_run(report: DriftReport, files: tuple[Path, Path], cfg: MlflowConfig, root: Path) -> str:
    """One MLflow run per check in the monitoring experiment: every statistic and p-value, and the files.

    Returns:
        The run id.
    """
    import mlflow

    experiment_id = tracking.configure(
        cfg.model_copy(update={"experiment": monitoring_experiment(cfg)}), root
    )
    metrics = {"drift": float(report.drift), "images": float(report.images)}
    for detector in report.detectors:
        metrics[metric_key(detector.name, "statistic")] = detector.statistic
        metrics[metric_key(detector.name, "p_value")] = detector.p_value
        metrics[metric_key(detector.name, "threshold")] = detector.threshold
        metrics[metric_key(detector.name, "drift")] = float(detector.drift)
        for feature, figures in detector.features.items():
            for figure, value in figures.items():
                metrics[metric_key(detector.name, feature, figure)] = float(value)
    for figure, value in report.quality.items():  # the figures the service reports live
        if isinstance(value, dict):
            for name, share in value.items():
                metrics[metric_key("quality", figure, name)] = float(share)
        elif value is not None:
            metrics[metric_key("quality", figure)] = float(value)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"drift-{report.batch}") as run:
        mlflow.set_tags(
            {"batch": report.batch, "champion": report.champion, "labelled": str(report.labelled)}
        )
        mlflow.log_metrics(metrics)
        for path in files:
            mlflow.log_artifact(str(path), "drift")
    return str(run.info.run_id)
