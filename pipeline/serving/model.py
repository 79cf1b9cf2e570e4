"""One loaded model version: the exported SavedModel's bytes-in signature, called on encoded images.

The service runs exactly what `export` wrote (pipeline/export.py): decoding,
resizing and the network are one graph, the one evaluate's predictions were
checked against, so serving cannot skew from evaluation.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.serving.inputs import INPUT_NAME

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
OUTPUT_OP = "StatefulPartitionedCall"  # the output tensors' op in a Keras-exported signature


class LoadFailed(PipelineError):
    """A model version could not be loaded or did not answer its warm-up calls."""


def warmup_image(side: int = 32) -> bytes:
    """A small PNG with some structure (a gradient), for warm-up calls."""
    ramp = np.linspace(0, 255, side * side * 3).reshape(side, side, 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    return buffer.getvalue()


def _tensor_info(spec: tf.TensorSpec, name: str) -> dict[str, Any]:
    shape = spec.shape
    dims = [] if shape.rank is None else [{"size": str(-1 if d is None else d), "name": ""} for d in shape]
    return {
        "dtype": f"DT_{spec.dtype.name.upper()}",
        "tensor_shape": {"dim": dims, "unknown_rank": shape.rank is None},
        "name": name,
    }


@dataclass
class ServableVersion:
    """A SavedModel folder loaded for serving under a model name and version number."""

    name: str
    version: str
    folder: Path
    _function: Any = field(default=None, repr=False)
    class_names: list[str] = field(default_factory=list)
    loaded_at: float = 0.0
    _keep: Any = field(default=None, repr=False)  # the loaded object: the signature's variables live with it

    @classmethod
    def load(cls, name: str, version: str, folder: Path, warmup_requests: int = 3) -> ServableVersion:
        """Load the folder's `serving_default` signature and call it `warmup_requests` times.

        Raises:
            LoadFailed: naming the folder and the reason (no SavedModel, no bytes-in signature,
                a warm-up call that failed).
        """
        try:
            loaded = tf.saved_model.load(str(folder))
            function = loaded.signatures[SIGNATURE]
        except (OSError, KeyError, ValueError, tf.errors.OpError) as error:
            raise LoadFailed(
                f"{name} version {version}: {folder} holds no loadable SavedModel with a "
                f"'{SIGNATURE}' signature ({error.__class__.__name__}: {str(error).splitlines()[0][:200]})"
            ) from None
        inputs = function.structured_input_signature[1]
        if set(inputs) != {INPUT_NAME} or inputs[INPUT_NAME].dtype != tf.string:
            raise LoadFailed(
                f"{name} version {version}: the '{SIGNATURE}' signature takes {sorted(inputs)}, not "
                f"'{INPUT_NAME}' (encoded image bytes); export it with this pipeline's export stage"
            )
        servable = cls(name, version, folder, function, loaded_at=time.time())
        servable._keep = loaded
        servable.warm_up(max(warmup_requests, 1))
        return servable

    def warm_up(self, calls: int) -> None:
        """Run the signature on a small image `calls` times (the first traces and allocates)."""
        try:
            for _ in range(calls):
                outputs = self.predict([warmup_image()])
        except (tf.errors.OpError, ValueError, KeyError) as error:
            raise LoadFailed(
                f"{self.name} version {self.version}: the warm-up call failed "
                f"({error.__class__.__name__}: {str(error).splitlines()[0][:200]})"
            ) from None
        if "class_names" in outputs:
            self.class_names = [c.decode() for c in outputs["class_names"][0]]

    def predict(self, images: list[bytes]) -> dict[str, np.ndarray]:
        """The signature's outputs for encoded images: probabilities, predicted_class, class_names."""
        outputs = self._function(**{INPUT_NAME: tf.constant(images, dtype=tf.string)})
        return {key: value.numpy() for key, value in outputs.items()}

    def metadata(self) -> dict[str, Any]:
        """`GET /v1/models/{name}[/versions/N]/metadata` in TF Serving's JSON form."""
        inputs = self._function.structured_input_signature[1]
        outputs = self._function.structured_outputs
        return {
            "model_spec": {"name": self.name, "signature_name": "", "version": self.version},
            "metadata": {
                "signature_def": {
                    "signature_def": {
                        SIGNATURE: {
                            "inputs": {k: _tensor_info(v, f"{SIGNATURE}_{k}:0") for k, v in inputs.items()},
                            "outputs": {
                                k: _tensor_info(tf.TensorSpec(v.shape, v.dtype), f"{OUTPUT_OP}:{i}")
                                for i, (k, v) in enumerate(sorted(outputs.items()))
                            },
                            "method_name": "tensorflow/serving/predict",
                        }
                    }
                }
            },
        }
