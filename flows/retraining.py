"""The drift-check flow: for now a placeholder that the `drift-check` deployment schedules.

The drift-detection issue fills it in: look for new batches in the landing
area, compare them with the champion's reference profile, and run the
training flow when the data has drifted.
"""

from __future__ import annotations

from prefect import flow, get_run_logger


@flow(name="drift-check")
def drift_check_flow(root: str | None = None) -> str:
    """Placeholder: logs that drift detection is not implemented yet and returns 'not-implemented'."""
    get_run_logger().warning("drift detection is not implemented yet; nothing checked (root=%s)", root)
    return "not-implemented"
