"""The typed configuration: params.yaml parsed once, validated, passed down.

Every section forbids unknown keys, so a typo fails at start with the key's
path instead of being silently ignored.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    """Base for every config section: unknown keys and mutation are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_s3_uri(value: str) -> str:
    if not value.startswith("s3://") or len(value) <= len("s3://"):
        raise ValueError(f"'{value}' is not an S3 URI; write s3://<bucket>/<prefix>")
    return value


S3Uri = Annotated[str, AfterValidator(_check_s3_uri)]  # s3://bucket/prefix


class StorageConfig(Section):
    """S3 settings shared by the s3 ingest source, the S3 landing area and the DVC remote.

    Credentials never go here: boto3 and DVC read them from the environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or an AWS profile (AWS_PROFILE).
    """

    # An S3-compatible endpoint; null: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS itself.
    endpoint_url: str | None = None
    region: str | None = None  # null: AWS_DEFAULT_REGION or the profile's
    max_attempts: int = Field(5, ge=1, le=20)  # per request and per download
    timeout_seconds: float = Field(60.0, gt=0.0)  # connect and read timeouts
    dvc_remote: S3Uri | None = None  # the environment variable PIPELINE_DVC_REMOTE_URL overrides it

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError(f"'{value}' is not an http(s) URL")
            if parts.username or parts.password:
                raise ValueError(
                    "must not carry credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                    "in the environment (or AWS_PROFILE) instead"
                )
        return value


class PathsConfig(Section):
    """Where stages read and write, relative to the project root."""

    raw: Path = Path("data/raw")
    manifest: Path = Path("data/manifest.csv")
    quarantine: Path = Path("data/quarantine.csv")
    splits: Path = Path("data/splits")
    reports: Path = Path("reports")
    models: Path = Path("models")
    train_backup: Path = Path(".cache/train_backup")
    batches: Path = Path("data/batches")
    reference: Path = Path("models/reference")


class EmbeddedSource(Section):
    """scikit-learn's bundled 8x8 digits, written out as PNG files."""

    scale: int = Field(1, ge=1, le=32)


class FolderSource(Section):
    """A class-per-folder tree: <path>/<class>/<image>."""

    path: Path | None = None


class TfdsSource(Section):
    """A TensorFlow Datasets image-classification dataset."""

    name: str = "tf_flowers"
    split: str = "train"
    data_dir: Path = Path("data/tfds")
    download: bool = False


class S3Source(Section):
    """Images in S3: s3://<bucket>/<prefix>/<class>/<image>, downloaded incrementally."""

    uri: S3Uri | None = None  # the environment variable PIPELINE_INGEST_S3_URI overrides it
    cache: Path = Path(".cache/s3")  # the mirror and its ETags; unchanged objects are not fetched again


class IngestConfig(Section):
    """Which source to ingest and how."""

    source: Literal["embedded", "folder", "tfds", "s3"] = "embedded"
    max_pixels: int = Field(40_000_000, gt=0)
    embedded: EmbeddedSource = EmbeddedSource()
    folder: FolderSource = FolderSource()
    tfds: TfdsSource = TfdsSource()
    s3: S3Source = S3Source()

    @model_validator(mode="after")
    def _folder_needs_path(self) -> IngestConfig:
        if self.source == "folder" and self.folder.path is None:
            raise ValueError("ingest.folder.path is required when ingest.source is 'folder'")
        return self


class ValidateConfig(Section):
    """Thresholds of the data checks."""

    expected_classes: list[str] = []
    min_classes: int = Field(2, ge=1)
    min_images_per_class: int = Field(10, ge=1)
    max_imbalance_ratio: float = Field(10.0, ge=1.0)
    max_bad_fraction: float = Field(0.2, ge=0.0, le=1.0)
    min_side: int = Field(8, ge=1)
    max_side: int = Field(8192, ge=1)
    allowed_formats: list[str] = ["PNG", "JPEG", "BMP", "GIF", "WEBP"]
    allowed_modes: list[str] = [
        "1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "I;16B", "I;16L", "F",
    ]  # fmt: skip

    @model_validator(mode="after")
    def _sides_ordered(self) -> ValidateConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must not exceed max_side ({self.max_side})")
        return self


class SplitRatios(Section):
    """Fractions of the accepted images per split; they sum to 1."""

    train: float = Field(0.7, gt=0.0, lt=1.0)
    val: float = Field(0.2, ge=0.0, lt=1.0)
    test: float = Field(0.1, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class SplitConfig(Section):
    """How the accepted images are divided."""

    ratios: SplitRatios = SplitRatios()
    seed: int = 42
    group_near_duplicates: bool = True


class AugmentConfig(Section):
    """Random augmentation of training images only; 0 or `none` turns a transform off."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "none"
    rotation: float = Field(0.03, ge=0.0, le=0.5)  # fraction of a full turn
    zoom: float = Field(0.2, ge=0.0, lt=1.0)
    translation: float = Field(0.1, ge=0.0, lt=1.0)
    brightness: float = Field(0.1, ge=0.0, lt=1.0)
    contrast: float = Field(0.2, ge=0.0, lt=1.0)
    channel_shuffle: bool = True  # permute R, G, B at random: colour does not decide the label


class FineTuneConfig(Section):
    """Second phase of transfer learning: unfreeze the top `layers` of the base."""

    epochs: int = Field(5, ge=0)  # passes, with the same steps-per-epoch floor as the first phase
    layers: int = Field(20, ge=0)
    learning_rate: float = Field(1e-5, gt=0.0)  # peak of its own warmup + cosine schedule


ModelName = Literal["small_cnn", "mobilenet_v2", "efficientnet_b0", "resnet50"]


class DistillConfig(Section):
    """Knowledge distillation: the configured model (the student) also learns the teacher's soft targets.

    loss = alpha * cross-entropy(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T),
    with both softmaxes at temperature T (Hinton et al.; keras.distillation.LogitsDistillation).
    """

    teacher: str  # models:/<name>@<alias> or models:/<name>/<version> (the registry), or a .keras file
    temperature: float = Field(2.0, gt=0.0)
    alpha: float = Field(0.1, ge=0.0, le=1.0)  # weight of the hard-label loss; 1 - alpha on the soft one


class TrainConfig(Section):
    """Model, optimisation and callbacks."""

    model: ModelName = "small_cnn"
    weights: str = "none"
    # auto: from the image sizes in the manifest (pipeline/train/recipe.py); a number fixes it
    image_size: int | Literal["auto"] = "auto"
    batch_size: int = Field(64, ge=1)  # the largest per-replica batch; small training sets use smaller ones
    min_batch_size: int = Field(16, ge=1)  # the batch halves down to this for small sets
    epochs: int = Field(30, ge=1)  # passes over the training data (the head phase for transfer models)
    min_steps_per_epoch: int = Field(20, ge=1)  # small sets repeat, reshuffled, to fill one
    min_steps: int = Field(600, ge=0)  # optimizer steps before early stopping may stop, and the least run
    max_steps: int = Field(20_000, ge=1)  # the most optimizer steps a phase runs, however large the data
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0)  # linear warmup, then cosine decay to zero
    patience_steps: int = Field(200, ge=1)  # early stopping: steps without a better val_loss
    learning_rate: float = Field(1e-3, gt=0.0)  # peak, for one replica; scaled by lr_scaling
    weight_decay: float = Field(1e-4, ge=0.0)  # AdamW's decoupled weight decay
    width: int = Field(32, ge=4, le=256)  # small_cnn: filters of the first block (doubled per block)
    distribution: Literal["auto", "one_device", "mirrored", "multi_worker"] = "auto"
    lr_scaling: Literal["none", "linear", "sqrt"] = "linear"
    mixed_precision: Literal["auto", "on", "off"] = "auto"
    jit_compile: bool = False
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    fine_tune: FineTuneConfig = FineTuneConfig()
    class_weights: Literal["auto", "balanced", "none"] = "auto"
    imbalance_threshold: float = Field(1.5, ge=1.0)
    seed: int = 42
    augment: AugmentConfig = AugmentConfig()
    distill: DistillConfig | None = None  # null: plain training; set: the model learns from a teacher too

    @model_validator(mode="after")
    def _weights_choice(self) -> TrainConfig:
        if self.model == "small_cnn" and self.weights not in {"none"}:
            raise ValueError("weights: small_cnn has no pretrained weights; use 'none'")
        if self.model != "small_cnn" and self.image_size != "auto" and self.image_size < 32:
            raise ValueError(f"image_size: {self.model} needs at least 32 pixels, got {self.image_size}")
        if self.image_size != "auto" and not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size: {self.image_size} is outside 8-1024; write a size or 'auto'")
        if self.min_batch_size > self.batch_size:
            raise ValueError(
                f"min_batch_size ({self.min_batch_size}) must not exceed batch_size ({self.batch_size})"
            )
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})")
        return self


class EvaluateConfig(Section):
    """Test-set metrics."""

    top_k: int = Field(3, ge=1)
    calibration_bins: int = Field(15, ge=2)
    latency_images: int = Field(50, ge=1)


class BaselineConfig(Section):
    """The classical route: HOG features, PCA, RBF SVM."""

    image_size: int = Field(32, ge=8)
    orientations: int = Field(9, ge=1)
    pixels_per_cell: int = Field(4, ge=2)
    cells_per_block: int = Field(2, ge=1)
    pca_variance: float = Field(0.95, gt=0.0, le=1.0)
    svm_c: float = Field(10.0, gt=0.0)
    seed: int = 42


class PruneConfig(Section):
    """Magnitude pruning (tensorflow-model-optimization) of a tf_keras copy, fine-tuned on the train split."""

    target_sparsity: float = Field(0.5, gt=0.0, lt=1.0)  # share of zero weights in conv and dense kernels
    epochs: int = Field(2, ge=1)  # fine-tuning passes: the sparsity ramps up over the first half
    min_steps: int = Field(200, ge=1)  # small training sets repeat until this many steps, to recover
    batch_size: int = Field(32, ge=1)


class ExportConfig(Section):
    """SavedModel, TFLite (float32, float16, dynamic range, int8 by PTQ or QAT, pruned) and ONNX."""

    calibration_images: int = Field(200, ge=1)
    # ptq: post-training int8; qat: quantization-aware fine-tuning; auto: QAT only when PTQ loses more
    # than gate.max_int8_accuracy_drop on the test split.
    int8: Literal["ptq", "qat", "auto"] = "auto"
    qat_epochs: int = Field(2, ge=1)  # QAT fine-tuning passes over the train split
    qat_learning_rate: float = Field(1e-4, gt=0.0)
    prune: PruneConfig | None = None  # null: no pruned variant
    onnx: bool = True  # models/onnx/model.onnx, checked with onnxruntime on the test split


class RobustnessConfig(Section):
    """The robustness stage: accuracy under FGSM and under common corruptions, on the test split."""

    epsilons: list[float] = [0.0, 0.01, 0.03, 0.1]  # FGSM step on the 0-1 pixel scale
    corruptions: list[Literal["gaussian_noise", "blur", "brightness", "contrast", "jpeg"]] = [
        "gaussian_noise",
        "blur",
        "brightness",
        "contrast",
        "jpeg",
    ]
    max_images: int = Field(1000, ge=1)  # test images used (a stratified, seeded subset of larger splits)
    seed: int = 0


class ExplainConfig(Section):
    """The explain stage: Integrated Gradients, Grad-CAM and LIME on a few test images."""

    per_class: int = Field(1, ge=0)  # correctly and wrongly classified alike, the first of each class
    max_misclassified: int = Field(10, ge=0)  # every misclassified test image, up to this many
    ig_steps: int = Field(32, ge=4)  # Riemann steps from the black baseline
    lime: bool = True  # also LIME (the `lime` package): superpixels, a local linear model
    lime_samples: int = Field(200, ge=10)
    seed: int = 0


class GateConfig(Section):
    """Thresholds a model must meet to become champion."""

    min_accuracy: float = Field(0.95, ge=0.0, le=1.0)
    min_macro_f1: float = Field(0.95, ge=0.0, le=1.0)
    min_margin_over_baseline: float = Field(0.0, ge=-1.0, le=1.0)
    max_int8_accuracy_drop: float = Field(0.02, ge=0.0, le=1.0)
    champion_tolerance: float = Field(0.01, ge=0.0, le=1.0)
    # The candidate predicts other classes than the champion: block (fail), compare_common (compare
    # on the test images of the shared classes), or allow (promote without comparing, shown as skipped).
    on_class_change: Literal["block", "compare_common", "allow"] = "block"
    serving_smoke_test: bool = (
        True  # the exported model must load and answer over HTTP (pipeline/serving/smoke.py)
    )
    # Robustness (reports/robustness.json); null skips the check, shown as skipped.
    min_fgsm_accuracy: float | None = Field(None, ge=0.0, le=1.0)  # accuracy under FGSM at fgsm_epsilon
    fgsm_epsilon: float = Field(0.01, ge=0.0, le=1.0)  # one of robustness.epsilons
    max_corruption_drop: float | None = Field(None, ge=0.0, le=1.0)  # clean - worst corrupted accuracy


class MlflowConfig(Section):
    """Tracking and registry names; the server comes from MLFLOW_TRACKING_URI."""

    experiment: str = "image-classification"
    registered_model: str = "image-classifier"
    connect_timeout_seconds: float = Field(30.0, gt=0.0)  # wait this long for a tracking server to answer
    request_timeout_seconds: int = Field(
        60, gt=0
    )  # per HTTP request (MLFLOW_HTTP_REQUEST_TIMEOUT unless set)


class OrchestrationConfig(Section):
    """Prefect deployments: work pool and cron schedules."""

    work_pool: str = "local-process"
    training_cron: str = "0 3 * * 1"
    drift_check_cron: str = "0 * * * *"
    timezone: str = "UTC"


class FeatureTestConfig(Section):
    """Per-feature two-sample tests on the image statistics."""

    test: Literal["ks", "cvm"] = "ks"  # Kolmogorov-Smirnov or Cramer-von Mises
    weight: float = Field(1.0, ge=0.0)


class EmbeddingTestConfig(Section):
    """Kernel MMD on the model's penultimate-layer embeddings."""

    dim: int = Field(16, ge=1, le=256)  # PCA components kept from the embeddings
    permutations: int = Field(500, ge=50)
    max_reference: int = Field(2000, ge=50)  # a random subset of a larger reference keeps a check fast
    weight: float = Field(1.0, ge=0.0)


class DetectorWeight(Section):
    """A detector with nothing to set but its share of the significance level."""

    weight: float = Field(1.0, ge=0.0)


class AccuracyTestConfig(Section):
    """Accuracy on a labelled batch against the model's test accuracy."""

    min_drop: float = Field(0.05, ge=0.0, le=1.0)  # smaller drops are not alarms, however significant
    weight: float = Field(1.0, ge=0.0)


class DriftConfig(Section):
    """Drift checks on new batches and when they retrain (flows/retraining.py)."""

    landing: Path = Path("data/landing")  # new batches: <landing>/<batch>/<class>/<image> or /<image>
    landing_s3: S3Uri | None = None  # pulled into `landing`; env PIPELINE_LANDING_S3_URI overrides it
    archive: Path = Path("data/landing_archive")  # checked batches are moved here, never deleted
    settle_seconds: float = Field(60.0, ge=0.0)  # a batch is ready when no file changed for this long
    alpha: float = Field(0.1, gt=0.0, lt=1.0)  # family-wise level, split across the detectors that run
    seed: int = 0
    image_stats: FeatureTestConfig = FeatureTestConfig()
    embeddings: EmbeddingTestConfig = EmbeddingTestConfig()
    softmax: DetectorWeight = DetectorWeight()
    predicted_labels: DetectorWeight = DetectorWeight()
    true_labels: DetectorWeight = DetectorWeight()
    accuracy: AccuracyTestConfig = AccuracyTestConfig()
    min_batch_images: int = Field(50, ge=1)  # labelled images a drifted batch needs to be trained on
    cooldown_hours: float = Field(24.0, ge=0.0)  # no retraining sooner than this after the last one
    max_model_age_days: float = Field(30.0, gt=0.0)  # retrain without drift when the champion is older


FloatRange = tuple[float, float]  # [low, high] of a searched float; low == high fixes it


class TuneSpace(Section):
    """The search space of `make tune` (pipeline/tune/); null leaves a knob at its params.yaml value.

    learning_rate is the head's learning rate for transfer models, whose base is searched through
    fine_tune_learning_rate; width applies to small_cnn only.
    """

    learning_rate: FloatRange | None = (1e-4, 3e-3)  # log scale
    fine_tune_learning_rate: FloatRange | None = (1e-6, 1e-4)  # log scale; transfer models only
    batch_size: list[int] | None = [16, 32, 64]
    weight_decay: FloatRange | None = (1e-6, 1e-3)  # log scale
    dropout: FloatRange | None = (0.0, 0.5)
    width: list[int] | None = [16, 32, 48, 64]
    zoom: FloatRange | None = (0.0, 0.3)
    translation: FloatRange | None = (0.0, 0.2)
    rotation: FloatRange | None = (0.0, 0.1)
    contrast: FloatRange | None = (0.0, 0.4)

    @field_validator("learning_rate", "fine_tune_learning_rate", "weight_decay")
    @classmethod
    def _log_range_positive(cls, value: FloatRange | None) -> FloatRange | None:
        if value is not None and value[0] <= 0.0:
            raise ValueError(f"a log-scale range must start above 0, got {list(value)}")
        return value

    @field_validator("batch_size")
    @classmethod
    def _powers_of_two(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(size < 1 or size & (size - 1) for size in value):
            raise ValueError(f"batch sizes must be powers of two, got {value}")
        return value

    @field_validator("*")
    @classmethod
    def _valid_for_train(cls, choices: Any, info: ValidationInfo) -> Any:
        if choices is None:
            return choices
        if not choices:
            raise ValueError("list at least one choice, or write null to leave the knob out")
        if isinstance(choices, tuple) and choices[0] > choices[1]:
            raise ValueError(f"low {choices[0]} exceeds high {choices[1]}")
        for value in choices:  # both ends of a range, every choice of a list
            try:
                _train_with(str(info.field_name), value)
            except ValidationError as error:
                message = error.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"{value} is not a valid train value: {message}") from None
        return choices


def _train_with(knob: str, value: float) -> TrainConfig:
    """A TrainConfig with one searched knob set, validated (the corners of the space must be valid)."""
    augment = {"zoom", "translation", "rotation", "contrast"}
    if knob in augment:
        return TrainConfig.model_validate({"augment": {knob: value}})
    if knob == "fine_tune_learning_rate":
        return TrainConfig.model_validate({"fine_tune": {"learning_rate": value}})
    return TrainConfig.model_validate({knob: value, "min_batch_size": 1})


class TuneConfig(Section):
    """Hyperparameter search over the train recipe (pipeline/tune/, `make tune`)."""

    study_name: str = Field("image-classifier-tuning", min_length=1)
    trials: int = Field(20, ge=1)  # finished (complete + pruned) trials the study reaches, over all processes
    timeout_seconds: float | None = Field(None, gt=0.0)  # per process; null: until `trials` are done
    # null: sqlite:///<root>/<cache>/optuna.db; or a database URL shared by several machines
    # (postgresql://user@host/db); the environment variable PIPELINE_TUNE_STORAGE overrides it
    storage: str | None = None
    cache: Path = Path(".cache/tune")  # the default SQLite study and each trial's checkpoints
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_startup_trials: int = Field(5, ge=0)  # median: finished trials before any pruning
    pruner_warmup_epochs: int = Field(1, ge=0)  # median: epochs of a trial before it may be pruned
    seed: int = 0  # the sampler's base seed
    trial_max_steps: int = Field(400, ge=1)  # caps train.max_steps and train.min_steps of a trial
    heartbeat_seconds: int = Field(60, ge=1)  # a running trial's heartbeat in the storage
    grace_seconds: int = Field(180, ge=1)  # without a heartbeat this long, a trial is failed and retried
    max_retry: int = Field(2, ge=0)  # retries of a trial whose process died
    space: TuneSpace = TuneSpace()

    @field_validator("storage")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        # Never echo the value: a database URL may carry a password.
        if value is not None and "://" not in value:
            raise ValueError(
                "is not a database URL; write e.g. postgresql://user@host/db or sqlite:////abs/path.db"
            )
        return value

    @model_validator(mode="after")
    def _grace_after_heartbeat(self) -> TuneConfig:
        if self.grace_seconds <= self.heartbeat_seconds:
            raise ValueError(
                f"grace_seconds ({self.grace_seconds}) must exceed "
                f"heartbeat_seconds ({self.heartbeat_seconds})"
            )
        return self


class ServeConfig(Section):
    """The model service (`make serve`: serving/ over pipeline/serving/), TF Serving's REST API."""

    host: str = "127.0.0.1"  # 0.0.0.0 in a container
    port: int = Field(8501, ge=0, le=65535)  # TF Serving's REST port; 0 picks a free one
    workers: int = Field(1, ge=1, le=64)  # uvicorn processes, each with its own copy of the models
    max_batch_size: int = Field(32, ge=1)  # images per model call when requests are batched
    batch_timeout_ms: float = Field(2.0, ge=0.0)  # wait this long for more requests; 0 disables batching
    poll_seconds: float = Field(10.0, gt=0.0)  # how often the registry's aliases are checked
    max_body_mb: float = Field(16.0, gt=0.0)  # larger request bodies get 413
    max_instances: int = Field(256, ge=1)  # images in one request; more get 400
    top_k: int = Field(3, ge=1)  # classes per image in POST /predict and on the page
    warmup_requests: int = Field(3, ge=1)  # calls on a new version before it serves (and is ready)
    max_request_pixels: int = Field(40_000_000, ge=1)  # decoded pixels in one request, and in one batch
    cache: Path = Path(".cache/serving")  # downloaded SavedModels: <cache>/<model>/<version>/
    smoke_test_images: int = Field(50, ge=1)  # test images the gate's serving smoke test sends
    smoke_test_timeout_seconds: float = Field(180.0, gt=0.0)  # for the candidate to load and answer
    # The loop (pipeline/serving/loop.py): prediction log -> landing batches -> drift check -> retraining.
    log_dir: Path = Path("data/served")  # prediction log (log/*.jsonl) and stored images (images/)
    log_sample: float = Field(1.0, ge=0.0, le=1.0)  # fraction of requests logged; 0 logs nothing
    store_images: bool = True  # keep the images (needed to cut landing batches); false: hashes only
    log_roll_mb: float = Field(64.0, gt=0.0)  # a log file is closed and a new one started at this size
    log_roll_minutes: float = Field(60.0, gt=0.0)  # ... or at this age
    log_fsync_seconds: float = Field(1.0, ge=0.0)  # fsync the log this often (0: before every response)
    batch_images: int = Field(200, ge=1)  # served images per landing batch
    batch_minutes: float = Field(60.0, gt=0.0)  # ... or a batch of what came, at this age
    shadow_fraction: float = Field(0.1, ge=0.0, le=1.0)  # requests also scored by the challenger
    max_shadow_images: int = Field(256, ge=1)  # shadow images waiting at once; more are skipped
    feedback_window: int = Field(100_000, ge=1)  # logged images a feedback label can still find


class PipelineConfig(Section):
    """The whole of params.yaml."""

    paths: PathsConfig = PathsConfig()
    ingest: IngestConfig = IngestConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    baseline: BaselineConfig = BaselineConfig()
    export: ExportConfig = ExportConfig()
    robustness: RobustnessConfig = RobustnessConfig()
    explain: ExplainConfig = ExplainConfig()
    gate: GateConfig = GateConfig()
    mlflow: MlflowConfig = MlflowConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    drift: DriftConfig = DriftConfig()
    storage: StorageConfig = StorageConfig()
    tune: TuneConfig = TuneConfig()
    serve: ServeConfig = ServeConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _fgsm_epsilon_measured(self) -> PipelineConfig:
        if self.gate.min_fgsm_accuracy is not None and self.gate.fgsm_epsilon not in self.robustness.epsilons:
            raise ValueError(
                f"gate.fgsm_epsilon {self.gate.fgsm_epsilon} is not one of robustness.epsilons "
                f"{self.robustness.epsilons}: the robustness stage must measure the epsilon the gate checks"
            )
        return self


# Settings a deployment gives as environment variables (bucket names differ per environment). They are
# applied once, when params are parsed, so every stage and flow sees the same value.
INGEST_URI_ENV = "PIPELINE_INGEST_S3_URI"
LANDING_URI_ENV = "PIPELINE_LANDING_S3_URI"
DVC_REMOTE_ENV = "PIPELINE_DVC_REMOTE_URL"
TUNE_STORAGE_ENV = "PIPELINE_TUNE_STORAGE"  # a shared study's database URL (it may hold a password)
ENV_OVERRIDES = {
    INGEST_URI_ENV: "ingest.s3.uri",
    LANDING_URI_ENV: "drift.landing_s3",
    DVC_REMOTE_ENV: "storage.dvc_remote",
    TUNE_STORAGE_ENV: "tune.storage",
}


def environment_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ENV_OVERRIDES that are set (non-empty), as dotted params keys."""
    environ = os.environ if environ is None else environ
    return {key: environ[name] for name, key in ENV_OVERRIDES.items() if environ.get(name)}


def _format_errors(source: Path, error: ValidationError, from_env: Mapping[str, str]) -> str:
    by_key = {key: name for name, key in ENV_OVERRIDES.items() if key in from_env}
    lines = []
    for item in error.errors():
        key = ".".join("validate" if part == "validate_" else str(part) for part in item["loc"])
        if key in by_key:
            key = f"{key}: {by_key[key]}"  # the value came from this environment variable
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling against params.yaml"
        elif "input" in item and item["type"] not in {"missing", "value_error"}:
            message = f"{message} (got {item['input']!r})"
        lines.append(f"{source}: {key or '<root>'}: {message}")
    return "\n".join(lines)


def parse_config(
    raw: Any, source: Path = DEFAULT_PARAMS, environ: Mapping[str, str] | None = None
) -> PipelineConfig:
    """Validate an already-loaded params mapping, with the ENV_OVERRIDES applied.

    Args:
        raw: the mapping read from YAML.
        source: the file it came from, named in error messages.
        environ: where the ENV_OVERRIDES are read (default: the process environment).

    Returns:
        The validated, immutable configuration.

    Raises:
        ConfigError: naming each wrong key's dotted path (and variable) and what was expected.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    from_env = environment_overrides(environ)
    try:
        return PipelineConfig.model_validate(with_overrides(raw, from_env, create=True))
    except ValidationError as error:
        raise ConfigError(_format_errors(source, error, from_env)) from None


def with_overrides(raw: dict[str, Any], overrides: Mapping[str, Any], create: bool = False) -> dict[str, Any]:
    """A copy of a params mapping with dotted keys replaced, e.g. {"train.epochs": 5}.

    Args:
        raw: the params mapping (not changed).
        overrides: values by dotted key.
        create: add keys and sections the mapping leaves out (they then get checked as any key is);
            without it, an override must name an existing entry.

    Raises:
        ConfigError: when a key does not name an existing params entry (and `create` is off).
    """
    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            if create and part not in node:
                node[part] = {}
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {dotted}: '{part}' is not a params section")
            node = node[part]
        if leaf not in node and not create:
            raise ConfigError(f"override {dotted}: unknown key '{leaf}'")
        node[leaf] = value
    return result


def resolve_path(path: Path | str, root: Path) -> Path:
    """A configured path: as given when absolute, else relative to the project root.

    The one place relative paths in params.yaml are resolved.
    """
    path = Path(path)
    return path if path.is_absolute() else root / path


def check_sources_exist(cfg: PipelineConfig, root: Path, source: Path = DEFAULT_PARAMS) -> None:
    """Fail early when a configured input file or folder is missing.

    Raises:
        ConfigError: when ingest.folder.path is not a directory or train.weights not a file.
    """
    if cfg.train.weights not in {"none", "imagenet"}:
        weights = resolve_path(cfg.train.weights, root)
        if not weights.is_file():
            raise ConfigError(
                f"{source}: train.weights: {weights} is not a file; use none, imagenet or a weights file path"
            )
    if cfg.ingest.source == "folder" and cfg.ingest.folder.path is not None:
        folder = resolve_path(cfg.ingest.folder.path, root)
        if not folder.is_dir():
            raise ConfigError(
                f"{source}: ingest.folder.path: directory {folder} does not exist; "
                "point it at a class-per-folder tree of images"
            )


def load_config(path: Path = DEFAULT_PARAMS, root: Path | None = None) -> PipelineConfig:
    """Read, parse and check params.yaml.

    Args:
        path: the params file.
        root: the project root that relative paths refer to (default: the file's folder).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: when the file is missing, is not YAML, or fails validation.
    """
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    cfg = parse_config(raw, path)
    check_sources_exist(cfg, root if root is not None else path.resolve().parent, path)
    return cfg


def load_with_section_overrides(
    project: Path, overrides: Mapping[str, Any] | None, section: str, purpose: str
) -> PipelineConfig:
    """params.yaml with in-memory overrides of one section, for one run only (the file is not changed).

    Args:
        project: the project root holding params.yaml.
        overrides: dotted keys, all under `section` (e.g. {"drift.cooldown_hours": 0}).
        section: the only params section the overrides may touch.
        purpose: what the overrides are for, named in the error ("drift-check", "tuning").

    Raises:
        ConfigError: when an override is outside `section` or fails validation.
    """
    params = project / "params.yaml"
    cfg = load_config(params, project)
    if not overrides:
        return cfg
    outside = [key for key in overrides if not key.startswith(f"{section}.")]
    if outside:
        raise ConfigError(f"{purpose} overrides may only set {section}.* keys, not {outside}")
    return parse_config(with_overrides(cfg.model_dump(by_alias=True, mode="json"), overrides), params)
