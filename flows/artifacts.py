"""Markdown for the Prefect artifacts of a flow run, built from the stage reports (pure functions)."""

from __future__ import annotations

from typing import Any


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def validation_markdown(report: dict) -> str:
    """Every validation check: observed value, pass/fail, blocking or warning."""
    rows = [
        [
            c["name"],
            "pass" if c["passed"] else "**FAIL**",
            "blocking" if c["blocking"] else "warning",
            str(c["observed"])[:80],
        ]
        for c in report["checks"]
    ]
    summary = report["summary"]
    return (
        f"# Data validation: {'passed' if report['passed'] else 'FAILED'}\n\n"
        f"{summary['files']} files, {summary['accepted']} accepted, {summary['quarantined']} quarantined "
        f"({report['quarantine_reasons'] or 'none'}).\n\n"
        + _table(["check", "result", "severity", "observed"], rows)
    )


def split_markdown(report: dict) -> str:
    """Images per class per split."""
    classes = sorted({label for counts in report["counts"].values() for label in counts})
    rows = [
        [label, *(report["counts"][name].get(label, 0) for name in ("train", "val", "test"))]
        for label in classes
    ]
    rows.append(["**total**", *(report["totals"][name] for name in ("train", "val", "test"))])
    return f"# Split (seed {report['seed']})\n\n" + _table(["class", "train", "val", "test"], rows)


def metrics_markdown(metrics: dict) -> str:
    """Headline test metrics."""
    keys = [k for k, v in metrics.items() if isinstance(v, int | float)]
    return "# Test metrics\n\n" + _table(["metric", "value"], [[k, f"{metrics[k]:.4f}"] for k in keys])


def export_markdown(report: dict) -> str:
    """The export table: variant, size, gzip size, accuracy, latency, agreement; the int8 path; ONNX."""
    rows = [
        [
            variant,
            row["size_bytes"],
            row.get("gzip_size_bytes", ""),
            f"{row['accuracy']:.4f}",
            f"{row['latency_ms_median']:.3f}",
            f"{row['agreement_with_keras']:.4f}",
        ]
        for variant, row in report["tflite"].items()
    ]
    onnx = report.get("onnx", {})
    if "accuracy" in onnx:
        rows.append(
            [
                "onnx (onnxruntime)",
                onnx["size_bytes"],
                onnx["gzip_size_bytes"],
                f"{onnx['accuracy']:.4f}",
                f"{onnx['latency_ms_median']:.3f}",
                f"{onnx['agreement_with_keras']:.4f}",
            ]
        )
    saved = report["savedmodel"]
    int8 = report.get("int8", {})
    notes = f"\n\nint8: **{int8['used']}** ({int8['reason']})." if int8 else ""
    if onnx:
        detail = onnx.get("errors") if onnx.get("status") == "failed" else onnx.get("max_probability_diff")
        notes += f"\n\nONNX: {onnx.get('status')} ({detail})."
    return (
        "# Export\n\n"
        + _table(["variant", "bytes", "gzip bytes", "accuracy", "median ms", "agreement"], rows)
        + f"\n\nSavedModel `serving_default` (encoded bytes in): accuracy {saved['accuracy']:.4f}, "
        f"agreement with Keras {saved['agreement_with_keras']:.4f}." + notes
    )


def robustness_markdown(report: dict) -> str:
    """Accuracy under FGSM per epsilon and under each corruption per severity."""
    fgsm = _table(["FGSM epsilon", "accuracy"], [[eps, f"{acc:.4f}"] for eps, acc in report["fgsm"].items()])
    rows = [
        [name, *(f"{by_severity[s]:.4f}" for s in sorted(by_severity))]
        for name, by_severity in report["corruptions"].items()
    ]
    return (
        f"# Robustness ({report['images']} test images, clean accuracy {report['clean_accuracy']:.4f})\n\n"
        + fgsm
        + "\n\n"
        + _table(["corruption", "severity 1", "severity 2", "severity 3"], rows)
    )


def gate_markdown(report: dict) -> str:
    """Every gate check with value, threshold and verdict."""
    rows = [
        [
            name,
            c["status"] if c["status"] != "failed" else "**failed**",
            c["value"],
            c["threshold"],
            c["detail"],
        ]
        for name, c in report["checks"].items()
    ]
    return f"# Gate: {'passed' if report['passed'] else 'FAILED'}\n\n" + _table(
        ["check", "status", "value", "threshold", "detail"], rows
    )


def drift_markdown(report: dict) -> str:
    """One drift check: every detector's statistic, p-value, threshold and verdict."""
    rows = [
        [
            d["name"],
            f"{d['statistic']:.4g}",
            f"{d['p_value']:.4g}",
            f"{d['threshold']:.4g}",
            "**DRIFT**" if d["drift"] else "ok",
            d["detail"],
        ]
        for d in report["detectors"]
    ]
    return (
        f"# Drift check of batch `{report['batch']}`: {'DRIFT' if report['drift'] else 'no drift'}\n\n"
        f"{report['images']} images ({'labelled' if report['labelled'] else 'unlabelled'}) against "
        f"{report['champion']}; family-wise alpha {report['alpha']}.\n\n"
        + _table(["detector", "statistic", "p-value", "threshold", "verdict", "detail"], rows)
    )


def retraining_markdown(summary: dict) -> str:
    """What one drift-check run did with each batch, and whether it retrained."""
    rows = [[name, outcome] for name, outcome in summary["batches"].items()] or [["(none)", "no ready batch"]]
    return (
        f"# Drift check: {summary['status']}\n\n"
        f"Champion: {summary.get('champion') or 'none'}. Decision: {summary.get('decision', '-')}. "
        f"Training: {summary.get('training', '-')}.\n\n" + _table(["batch", "outcome"], rows)
    )


def tuning_markdown(report: dict) -> str:
    """A tuning run: the study's trial counts, its best trial and params, and how to use them."""
    counts = ", ".join(f"{count} {state}" for state, count in report["counts"].items() if count)
    head = (
        f"# Tuning: study `{report['study_name']}`\n\n"
        f"{counts or 'no trials'} (target {report['target_trials']}); storage `{report['storage']}`.\n\n"
    )
    if report["best_trial"] is None:
        return head + "No trial completed yet."
    rows = [[key, f"{value:.4g}"] for key, value in report["best_params"].items()]
    use = (
        f"`git apply {report['patch']} && dvc repro` applies them; params.yaml was not changed."
        if report["patch"]
        else "params.yaml already holds them."
    )
    return (
        head
        + f"Best: trial {report['best_trial']}, val_accuracy {report['best_value']:.4f}.\n\n"
        + _table(["param", "best"], rows)
        + f"\n\n{use}"
    )
