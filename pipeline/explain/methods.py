"""Saliency methods on a Keras classifier: Integrated Gradients, Grad-CAM and LIME.

Each takes the model, raw pixels (0..255, as every model of this project
expects) and the class to explain, and returns a map with the image's height
and width, so the stage can draw them side by side. They read no config and
write no files.

Integrated Gradients and Grad-CAM differentiate the class's pre-softmax score
when the model ends in a softmax Dense layer (all models built by
`pipeline.train.models` do): the gradient of a probability near 1 vanishes,
that of its logit does not. Both are written here with `tf.GradientTape`,
since no maintained library does them for Keras 3 models; LIME comes from the
`lime` package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline.inference import predict

GRADIENT_BATCH = 64

# SLIC with a fixed number of segments gives about the same superpixels on a 32-px digit and a
# 224-px photo; quickshift's parameters are in pixels and give hundreds of 1-px segments on noise.
LIME_SEGMENTATION = {"algorithm": "slic", "n_segments": 50, "compactness": 10.0, "sigma": 1.0}


class GradCamUnavailable(Exception):
    """The model has no spatial feature map Grad-CAM could weigh; the message says why."""


@dataclass(frozen=True)
class FeatureMap:
    """The last convolutional feature map of a model: its symbolic tensor and the layer that makes it."""

    tensor: Any
    layer: str

    @property
    def size(self) -> tuple[int, int]:
        """Height and width of the feature map."""
        return int(self.tensor.shape[1]), int(self.tensor.shape[2])


def _class_scores(model: Any) -> tuple[Any, Callable[[Any], Any]]:
    """A tensor of the model's graph and the function turning it into the scores to differentiate.

    The input of a final softmax Dense layer, mapped to logits; else the output, as it is.
    """
    head = model.layers[-1]
    if isinstance(head, keras.layers.Dense) and getattr(head.activation, "__name__", "") == "softmax":

        def logits(features: Any) -> Any:
            scores = tf.matmul(tf.cast(features, tf.float32), tf.cast(head.kernel, tf.float32))
            return scores + tf.cast(head.bias, tf.float32) if head.bias is not None else scores

        return head.input, logits
    return model.outputs[0], lambda outputs: tf.cast(outputs, tf.float32)


def integrated_gradients(
    model: Any, images: np.ndarray, class_ids: np.ndarray, steps: int, batch_size: int = GRADIENT_BATCH
) -> np.ndarray:
    """Integrated Gradients from a black image, summed as |attribution| over the colour channels.

    A midpoint Riemann sum with `steps` points on the straight path from the
    black baseline to each image; the path points of all images are batched together.

    Args:
        model: a Keras classifier taking (N, H, W, 3) pixels in 0..255.
        images: (N, H, W, 3) float pixels.
        class_ids: (N,) the class explained for each image (usually the predicted one).
        steps: points on the path.
        batch_size: path points per gradient call.

    Returns:
        (N, H, W) float32, non-negative.
    """
    images = np.asarray(images, dtype=np.float32)
    features, to_scores = _class_scores(model)
    network = keras.Model(model.inputs, features)
    alphas = ((np.arange(steps) + 0.5) / steps).astype(np.float32)
    owner = np.repeat(np.arange(len(images)), steps)
    alpha = np.tile(alphas, len(images))
    gradient_sum = np.zeros_like(images)
    for start in range(0, len(owner), batch_size):
        which, scale = owner[start : start + batch_size], alpha[start : start + batch_size]
        path = tf.constant(scale[:, None, None, None] * images[which])
        targets = tf.constant(np.asarray(class_ids)[which], dtype=tf.int32)
        with tf.GradientTape() as tape:
            tape.watch(path)
            scores = to_scores(network(path, training=False))
            chosen = tf.gather(scores, targets, axis=1, batch_dims=1)
        np.add.at(gradient_sum, which, tape.gradient(chosen, path).numpy())
    attribution = images * gradient_sum / steps  # (x - baseline) times the mean gradient; baseline 0
    return np.abs(attribution).sum(axis=-1).astype(np.float32)


def feature_map(model: Any) -> FeatureMap:
    """The feature map Grad-CAM weighs: the last Conv2D, or the output of a nested pretrained base.

    Transfer models call a keras.applications base as one layer; its output,
    the last 4-D tensor inside it, is used where the outer model sees it.

    Raises:
        GradCamUnavailable: no such layer, or a 1x1 map (no spatial detail to show).
    """
    found = None
    for layer in reversed(model.layers):
        if isinstance(layer, keras.Model):  # a nested base: nothing before it is a feature extractor
            # Functional.output is the tensor of the base's own graph; Keras 3 has no public
            # accessor for the output of its call in the outer graph, the node holds it.
            output = layer._inbound_nodes[0].output_tensors[0]
            if len(output.shape) != 4:
                raise GradCamUnavailable(f"the base {layer.name!r} does not output a feature map")
            found = FeatureMap(output, layer.name)
            break
        if isinstance(layer, keras.layers.Conv2D):
            found = FeatureMap(layer.output, layer.name)
            break
    if found is None:
        raise GradCamUnavailable("the model has no Conv2D layer and no nested convolutional base")
    if found.size == (1, 1):
        raise GradCamUnavailable(
            f"{found.layer!r} outputs a 1x1 feature map at this input size: Grad-CAM would be uniform"
        )
    return found


def grad_cam(
    model: Any, images: np.ndarray, class_ids: np.ndarray, batch_size: int = GRADIENT_BATCH
) -> np.ndarray | None:
    """Grad-CAM on the last feature map (see `feature_map`), upsampled to the input size.

    Returns:
        (N, H, W) float32 in 0..1 (each map divided by its maximum), or None
        when the model has no usable feature map.
    """
    try:
        target = feature_map(model)
    except GradCamUnavailable:
        return None
    images = np.asarray(images, dtype=np.float32)
    features, to_scores = _class_scores(model)
    network = keras.Model(model.inputs, [target.tensor, features])
    maps = []
    for start in range(0, len(images), batch_size):
        batch = tf.constant(images[start : start + batch_size])
        targets = tf.constant(np.asarray(class_ids)[start : start + batch_size], dtype=tf.int32)
        with tf.GradientTape() as tape:
            tape.watch(batch)  # records the graph also when every weight is frozen
            activations, head = network(batch, training=False)
            chosen = tf.gather(to_scores(head), targets, axis=1, batch_dims=1)
        activations = tf.cast(activations, tf.float32)
        weights = tf.reduce_mean(tape.gradient(chosen, activations), axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1, keepdims=True))
        maps.append(tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0].numpy())
    if not maps:
        return np.zeros(images.shape[:3], dtype=np.float32)
    cams = np.concatenate(maps)
    peak = cams.reshape(len(cams), -1).max(axis=1)
    return (cams / np.where(peak > 0, peak, 1.0)[:, None, None]).astype(np.float32)


@dataclass(frozen=True)
class LimeMask:
    """LIME's explanation of one image: its superpixels and each one's weight for the class."""

    segments: np.ndarray  # (H, W) superpixel id of each pixel, 0..K-1
    weights: np.ndarray  # (K,) weight of each superpixel in LIME's local linear model

    def heatmap(self) -> np.ndarray:
        """(H, W): each pixel carries its superpixel's weight."""
        return self.weights[self.segments].astype(np.float32)

    def top(self, count: int) -> np.ndarray:
        """(H, W) bool: the pixels of the `count` superpixels with the largest positive weights."""
        ranked = [s for s in np.argsort(-self.weights)[:count] if self.weights[s] > 0]
        return np.isin(self.segments, ranked)


def _no_progress_bar(iterable: Any, *args: Any, **kwargs: Any) -> Any:
    return iterable


def lime_mask(model: Any, image: np.ndarray, class_id: int, samples: int, seed: int) -> LimeMask:
    """LIME (lime.lime_image) for one image: superpixels hidden to black, a weighted ridge fit.

    Args:
        model: a Keras classifier taking pixels in 0..255.
        image: (H, W, 3) float pixels in 0..255.
        class_id: the class explained.
        samples: perturbed images LIME scores.
        seed: seeds the perturbations, so reruns agree.

    Raises:
        ImportError: when `lime` is not installed.
    """
    from lime import lime_image
    from lime.lime_image import LimeImageExplainer
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    # lime 0.2.0.1 draws a tqdm bar per image on stderr and has no switch for it: one line per
    # event is what the pipeline prints (pipeline/logs.py), so its module's `tqdm` passes through.
    lime_image.tqdm = _no_progress_bar
    settings = dict(LIME_SEGMENTATION)
    segmentation = SegmentationAlgorithm(settings.pop("algorithm"), start_label=0, **settings)
    explainer = LimeImageExplainer(random_state=seed)
    explanation = explainer.explain_instance(
        np.asarray(image, dtype=np.float64) / 255.0,  # scikit-image segments colours in 0..1
        lambda batch: predict(model, batch * 255.0),
        labels=(int(class_id),),
        top_labels=None,
        hide_color=0.0,
        num_samples=samples,
        batch_size=max(10, min(samples, 100)),
        segmentation_fn=segmentation,
        random_seed=seed,
    )
    segments = np.asarray(explanation.segments)
    weights = np.zeros(int(segments.max()) + 1, dtype=np.float64)
    for segment, weight in explanation.local_exp[int(class_id)]:
        weights[segment] = weight
    return LimeMask(segments, weights)


def lime_masks(model: Any, images: np.ndarray, class_ids: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """`lime_mask` for each image, as (N, H, W) heat maps of superpixel weights."""
    maps = [
        lime_mask(model, image, int(c), samples, seed).heatmap()
        for image, c in zip(images, class_ids, strict=True)
    ]
    return np.stack(maps) if maps else np.zeros(np.shape(images)[:3], dtype=np.float32)
