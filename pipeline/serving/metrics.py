"""The service's Prometheus metrics, named like other model servers' (`*_requests_total`, `*_seconds`).

Each service holds its own CollectorRegistry, so two services in one process
(tests, the gate's smoke test) never mix their counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

disable_created_metrics()  # no `*_created` series: scrapers derive start times themselves

PREFIX = "serving"
CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    """Request, model-call, batch, prediction and model-load metrics of one service."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "Requests answered, by endpoint, HTTP status and model version.",
            ["endpoint", "status", "model_version"], registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds", "Request received to response ready, by endpoint.",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "Requests being handled now.", registry=r)
        self.model_calls = Counter(
            f"{PREFIX}_model_calls", "Calls of a model (one per batch).", ["model_version"], registry=r
        )
        self.model_call_seconds = Histogram(
            f"{PREFIX}_model_call_duration_seconds", "Time of one model call (a whole batch).",
            ["model_version"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_images = Histogram(
            f"{PREFIX}_batch_size_images", "Images in one model call.", ["model_version"],
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_requests = Histogram(
            f"{PREFIX}_batch_size_requests", "Requests sharing one model call.", ["model_version"],
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.images = Counter(f"{PREFIX}_images", "Images predicted.", ["model_version"], registry=r)
        self.predicted_class = Counter(
            f"{PREFIX}_predicted_class", "Predictions by top-1 class.", ["model_version", "class_name"],
            registry=r,
        )  # fmt: skip
        self.model_loads = Counter(
            f"{PREFIX}_model_loads", "Model versions loaded and warmed up.", ["model_version"], registry=r
        )
        self.model_load_failures = Counter(
            f"{PREFIX}_model_load_failures", "Model versions that failed to load or warm up.",
            ["model_version"], registry=r,
        )  # fmt: skip
        self.loaded = Gauge(
            f"{PREFIX}_model_version_loaded", "1 for each version served now, by label.",
            ["model_version", "label"], registry=r,
        )  # fmt: skip

        self.shadow_images = Counter(
            f"{PREFIX}_shadow_scored_images", "Images the challenger scored in the shadow of a request.",
            ["model_version"], registry=r,
        )  # fmt: skip
        self.shadow_skipped = Counter(
            f"{PREFIX}_shadow_skipped_images",
            "Images not shadow-scored: serve.max_shadow_images were waiting, no idle moment came in 30 s, "
            "or the challenger failed.",
            registry=r,
        )

    def observe_batch(self, version: str, images: int, requests: int, seconds: float) -> None:
        """One model call of `images` images from `requests` requests."""
        self.model_calls.labels(version).inc()
        self.model_call_seconds.labels(version).observe(seconds)
        self.batch_images.labels(version).observe(images)
        self.batch_requests.labels(version).observe(requests)

    def observe_predictions(self, version: str, classes: list[str]) -> None:
        """Top-1 classes returned to a client."""
        self.images.labels(version).inc(len(classes))
        for name in classes:
            self.predicted_class.labels(version, name).inc()

    def exposition(self) -> bytes:
        """The text format for `GET /metrics`."""
        return generate_latest(self.registry)


class LiveCollector(Collector):
    """The loop's live figures as gauges, read from `report()` (ServingLoop.monitoring) at each scrape."""

    def __init__(self, report: Callable[[], dict[str, Any]]) -> None:
        self.report = report

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self.report()
        prefix = "serving_live"
        accuracy = GaugeMetricFamily(
            f"{prefix}_accuracy", "Accuracy over feedback labels, by version.", labels=["model_version"]
        )
        labelled = GaugeMetricFamily(
            f"{prefix}_labelled_images", "Served images with a feedback label.", labels=["model_version"]
        )
        images = GaugeMetricFamily(
            f"{prefix}_images", "Served images in the prediction log.", labels=["model_version"]
        )
        confidence = GaugeMetricFamily(
            f"{prefix}_mean_confidence", "Mean top-1 probability served.", labels=["model_version"]
        )
        reference = GaugeMetricFamily(
            f"{prefix}_reference_test_accuracy",
            "The version's test accuracy at training.",
            labels=["model_version"],
        )
        share = GaugeMetricFamily(
            f"{prefix}_class_share", "Share of each class: predicted when served, or in training.",
            labels=["model_version", "class_name", "source"],
        )  # fmt: skip
        for version, figures in report["versions"].items():
            images.add_metric([version], figures["images"])
            labelled.add_metric([version], figures["labelled"])
            if figures["accuracy"] is not None:
                accuracy.add_metric([version], figures["accuracy"])
            if figures["mean_confidence"] is not None:
                confidence.add_metric([version], figures["mean_confidence"])
            if figures["reference_test_accuracy"] is not None:
                reference.add_metric([version], figures["reference_test_accuracy"])
            for name, value in figures["predicted_class_share"].items():
                share.add_metric([version, name, "served"], value)
            for name, value in (figures["training_class_share"] or {}).items():
                share.add_metric([version, name, "training"], value)
        yield from (accuracy, labelled, images, confidence, reference, share)
        pairs = ["champion_version", "challenger_version"]
        agreement = GaugeMetricFamily(
            "serving_shadow_agreement",
            "Champion-challenger top-1 agreement on shadowed images.",
            labels=pairs,
        )
        shadowed = GaugeMetricFamily(
            "serving_shadow_images", "Images the challenger scored in the shadow.", labels=pairs
        )
        both = GaugeMetricFamily(
            "serving_shadow_accuracy", "Accuracy on shadowed images with feedback, by which model answered.",
            labels=[*pairs, "model"],
        )  # fmt: skip
        for pair in report["shadow"]:
            versions = [pair["champion_version"], pair["challenger_version"]]
            shadowed.add_metric(versions, pair["images"])
            if pair["agreement"] is not None:
                agreement.add_metric(versions, pair["agreement"])
            if pair["labelled"]:
                both.add_metric([*versions, "champion"], pair["champion_accuracy"])
                both.add_metric([*versions, "challenger"], pair["challenger_accuracy"])
        yield from (agreement, shadowed, both)
