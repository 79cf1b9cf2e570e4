"""Drift detectors: two-sample tests between a reference profile and a new batch.

Each detector returns its statistic, p-value, threshold (its share of the
significance level) and verdict. scipy supplies the univariate and
chi-square tests; the kernel MMD permutation test is written here because
the drift libraries that have one (alibi-detect, torchdrift) do not install
beside TensorFlow 2.21 and numpy 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class DetectorResult:
    """One detector's outcome; `features` holds per-feature results where a detector has several."""

    name: str
    statistic: float
    p_value: float
    threshold: float
    drift: bool
    features: dict[str, dict[str, float]] = field(default_factory=dict)
    detail: str = ""


def alpha_shares(weights: Mapping[str, float], alpha: float) -> dict[str, float]:
    """Split the family-wise level across detectors by weight (a weighted Bonferroni split).

    Args:
        weights: weight of each detector that runs on this batch.
        alpha: the family-wise significance level.

    Returns:
        Each detector's own level; they sum to `alpha`.
    """
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("drift: every detector weight is 0; give at least one a positive weight")
    return {name: alpha * weight / total for name, weight in weights.items()}


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error control, any dependence)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    result = np.empty(m)
    result[order] = np.minimum(adjusted, 1.0)
    return result


def _two_sample(reference: np.ndarray, batch: np.ndarray, test: str) -> tuple[float, float]:
    if np.ptp(reference) == 0 and np.ptp(batch) == 0 and reference[0] == batch[0]:
        return 0.0, 1.0  # the same constant on both sides (all images 8x8, say)
    if test == "cvm":
        result = stats.cramervonmises_2samp(reference, batch)
        return float(result.statistic), float(result.pvalue)
    result = stats.ks_2samp(reference, batch)
    return float(result.statistic), float(result.pvalue)


def feature_tests(
    name: str,
    reference: np.ndarray,
    batch: np.ndarray,
    features: Sequence[str],
    alpha: float,
    test: str = "ks",
) -> DetectorResult:
    """Per-feature two-sample tests with a Holm correction across features.

    Args:
        name: the detector's name in reports.
        reference: (n, f) reference values.
        batch: (m, f) batch values.
        features: the f feature names.
        alpha: this detector's level.
        test: "ks" (Kolmogorov-Smirnov) or "cvm" (Cramer-von Mises).

    Returns:
        The largest statistic, the smallest adjusted p-value, and every feature's figures.
    """
    raw = [_two_sample(reference[:, i], batch[:, i], test) for i in range(len(features))]
    adjusted = holm([p for _, p in raw])
    per_feature = {
        feature: {
            "statistic": s,
            "p_value": p,
            "p_adjusted": float(a),
            "reference_mean": float(reference[:, i].mean()),
            "batch_mean": float(batch[:, i].mean()),
        }
        for i, (feature, (s, p), a) in enumerate(zip(features, raw, adjusted, strict=True))
    }
    worst = int(np.argmin(adjusted))
    drifted = [f for f, a in zip(features, adjusted, strict=True) if a < alpha]
    return DetectorResult(
        name=name,
        statistic=float(max(s for s, _ in raw)),
        p_value=float(adjusted[worst]),
        threshold=alpha,
        drift=bool(drifted),
        features=per_feature,
        detail=f"{test.upper()} per feature, Holm-adjusted; shifted: {', '.join(drifted) or 'none'}",
    )


def squared_distances(points: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances, clipped at 0 against rounding."""
    norms = np.einsum("ij,ij->i", points, points)
    return np.maximum(norms[:, None] + norms[None, :] - 2.0 * points @ points.T, 0.0)


def mmd_test(
    name: str,
    reference: np.ndarray,
    batch: np.ndarray,
    alpha: float,
    permutations: int,
    seed: int,
) -> DetectorResult:
    """Kernel two-sample test (Gretton et al. 2012): RBF-kernel MMD with a permutation p-value.

    The bandwidth is the median heuristic (median pairwise distance of the
    pooled sample). All permutations are evaluated at once: with signed
    weights w (1/n on one sample, -1/m on the other) the biased MMD^2 is
    w'Kw, so the null distribution is one matrix product with the permuted
    weight vectors.

    Returns:
        MMD^2 as the statistic and (1 + #{null >= observed}) / (1 + permutations).
    """
    pooled = np.vstack([reference, batch]).astype(np.float64)
    n, m = len(reference), len(batch)
    distances = squared_distances(pooled)
    off_diagonal = distances[np.triu_indices(n + m, k=1)]
    bandwidth = float(np.median(off_diagonal)) or 1.0
    kernel = np.exp(-distances / (2.0 * bandwidth)).astype(np.float32)
    weights = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)]).astype(np.float32)
    observed = float(weights @ kernel @ weights)
    rng = np.random.default_rng(seed)
    permuted = rng.permuted(np.tile(weights, (permutations, 1)), axis=1).T  # (n + m, permutations)
    null = np.einsum("ip,ip->p", kernel @ permuted, permuted)
    p_value = float((1 + np.count_nonzero(null >= observed)) / (1 + permutations))
    return DetectorResult(
        name=name,
        statistic=observed,
        p_value=p_value,
        threshold=alpha,
        drift=p_value < alpha,
        detail=f"RBF MMD^2, bandwidth^2 {bandwidth:.4g} (median heuristic), {permutations} permutations, "
        f"{n} reference vs {m} batch points",
    )


def label_shift_test(
    name: str, reference: Sequence[str], batch: Sequence[str], alpha: float
) -> DetectorResult:
    """Chi-square test of homogeneity on label counts (predicted or true), reference vs batch.

    Labels that only the batch has (a class the model never saw) count too.
    """
    labels = sorted(set(reference) | set(batch))
    table = np.array([[list(sample).count(label) for label in labels] for sample in (reference, batch)])
    table = table[:, table.sum(axis=0) > 0]
    counts = {
        label: {"reference": float(table[0, i]), "batch": float(table[1, i])}
        for i, label in enumerate(labels)
    }
    if table.shape[1] < 2:
        return DetectorResult(name, 0.0, 1.0, alpha, False, counts, "a single label on both sides")
    result = stats.chi2_contingency(table)
    p_value = float(result.pvalue)
    return DetectorResult(
        name=name,
        statistic=float(result.statistic),
        p_value=p_value,
        threshold=alpha,
        drift=p_value < alpha,
        features=counts,
        detail=f"chi-square homogeneity, {table.shape[1] - 1} degrees of freedom",
    )


def accuracy_test(
    name: str,
    correct: np.ndarray,
    reference_accuracy: float,
    alpha: float,
    min_drop: float,
    reference_images: int | None = None,
) -> DetectorResult:
    """One-sided exact test: is the batch accuracy below the model's test accuracy?

    With the test split's size (`reference_images`), Fisher's exact test of
    the two proportions: the test accuracy is itself an estimate, and on a
    small test split at 1.0 a binomial test against it as if exact would call
    a single miss significant. Without it (references from before it was
    recorded), the exact binomial test against the test accuracy. A
    significant drop smaller than `min_drop` is reported but is not drift.
    """
    hits, total = int(np.count_nonzero(correct)), len(correct)
    accuracy = hits / total
    if reference_images:
        reference_hits = int(round(min(reference_accuracy, 1.0) * reference_images))
        table = [[hits, total - hits], [reference_hits, reference_images - reference_hits]]
        p_value = float(stats.fisher_exact(table, alternative="less").pvalue)
    else:
        p_value = float(stats.binomtest(hits, total, min(reference_accuracy, 1.0), alternative="less").pvalue)
    drop = reference_accuracy - accuracy
    return DetectorResult(
        name=name,
        statistic=accuracy,
        p_value=p_value,
        threshold=alpha,
        drift=p_value < alpha and drop >= min_drop,
        features={"accuracy": {"batch": accuracy, "reference": reference_accuracy, "drop": drop}},
        detail=f"batch accuracy {accuracy:.4f} vs test accuracy {reference_accuracy:.4f} "
        f"(alarm needs p < {alpha:.3g} and a drop of at least {min_drop})",
    )
