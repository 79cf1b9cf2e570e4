"""Running a Keras model on an array of images, in batches, without tracing a function per model.

`model.predict` traces a `tf.function` per model and per batch shape, and
TensorFlow counts the traces of every model's predict function together (they
share one Python code object): a flow that loads the model in evaluate,
reference, export and gate, plus the champion, trips its "retracing" warning
although nothing is wrong. Calling the model directly, batch by batch, traces
nothing and computes the same outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PREDICT_BATCH = 64


def predict(model: Any, pixels: np.ndarray, batch_size: int = PREDICT_BATCH) -> Any:
    """The model's outputs for `pixels`, in order, in inference mode.

    Args:
        model: a Keras model (one output, or several).
        pixels: (N, size, size, 3) float32 model input.
        batch_size: images per call.

    Returns:
        An array (N, ...) for a one-output model, else a list of such arrays.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    batches: list[list[np.ndarray]] = []
    for start in range(0, max(len(pixels), 1), batch_size):
        result = model(pixels[start : start + batch_size], training=False)
        parts = list(result) if isinstance(result, list | tuple) else [result]
        batches.append([np.asarray(part) for part in parts])
    joined = [np.concatenate([batch[i] for batch in batches]) for i in range(len(batches[0]))]
    return joined[0] if len(joined) == 1 else joined
