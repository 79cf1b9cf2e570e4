"""Requests in TF Serving's REST format, read and checked before any image reaches the model.

Follows tensorflow_serving/g3doc/api_rest.md: a predict request is JSON with
either `instances` (row format, one entry per image) or `inputs` (columnar
format); binary values are `{"b64": "<base64>"}`; the SavedModel's one input
is `image_bytes`, so an instance is the b64 object itself or a one-key object
`{"image_bytes": {"b64": ...}}`. The answer mirrors the request: `predictions`
(a list with one object of outputs per image) for rows, `outputs` (one list
per output) for columns.

Every image is opened with Pillow's header reader and then decoded once here,
so that a request that is not JSON, not base64, not an image, cut short, or
too large is refused with a message naming the instance, and one bad image
never fails the model call it would have shared with other requests.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import PipelineError
from pipeline.ingest.images import failure_reason

warnings.simplefilter("ignore", Image.DecompressionBombWarning)

INPUT_NAME = "image_bytes"  # the serving signature's one input (pipeline/export.py)
# What the model's decoder (tf.io.decode_image) reads; MPO is a JPEG with extra images (phone photos).
FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP")

Layout = Literal["row", "columnar"]


class ServingError(PipelineError):
    """A request the service refuses, with the HTTP status it answers with."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class NotFound(ServingError):
    """An unknown model, version or label."""

    status = 404


class NotReady(ServingError):
    """No version is loaded and warmed up for what was asked."""

    status = 503


class ImageInfo(NamedTuple):
    """What checking an image learned about it (the prediction log records it)."""

    width: int
    height: int
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class PredictRequest:
    """A parsed predict request: the images' bytes in order and the layout to answer in."""

    images: list[bytes]
    layout: Layout
    pixels: int = 0  # width x height summed over the images, once checked
    checked: tuple[ImageInfo, ...] = ()  # each image's size and format, once checked


def _where(index: int | None, name: str | None = None) -> str:
    if name:
        return f"file {index} ({name})" if index is not None else f"file {name}"
    return f"instance {index}" if index is not None else "the request"


def decode_b64(value: Any, index: int) -> bytes:
    """The bytes of one `{"b64": "..."}` value (standard or URL-safe alphabet, padding optional)."""
    if isinstance(value, dict) and set(value) == {INPUT_NAME}:
        value = value[INPUT_NAME]
    if not (isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str)):
        raise ServingError(
            f'instance {index}: expected an image as {{"b64": "<base64 of the file>"}} '
            f'(or {{"{INPUT_NAME}": {{"b64": ...}}}}), got {_shape(value)}'
        )
    text = value["b64"].strip()
    text += "=" * (-len(text) % 4)
    try:
        altchars = b"-_" if ("-" in text or "_" in text) else None
        return base64.b64decode(text, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ServingError(f"instance {index}: the b64 value is not valid base64 ({error})") from None


def _shape(value: Any) -> str:
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)[:5]}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"


def parse_predict(body: bytes, max_instances: int) -> PredictRequest:
    """Read a TF Serving predict request.

    Raises:
        ServingError: (400) for anything but one of the two formats with 1..max_instances images.
    """
    if not body.strip():
        raise ServingError('the request body is empty; send JSON like {"instances": [{"b64": "..."}]}')
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, nested or numbers too deep
        raise ServingError(f"the request body is not JSON we can read ({str(error)[:200]})") from None
    if not isinstance(request, dict):
        raise ServingError(f'expected a JSON object with "instances" or "inputs", got {_shape(request)}')
    signature = request.get("signature_name", "serving_default")
    if signature != "serving_default":
        raise ServingError(f"unknown signature_name {signature!r}; the model has 'serving_default' only")
    if ("instances" in request) == ("inputs" in request):
        raise ServingError('the request needs exactly one of "instances" (row format) or "inputs" (columnar)')
    layout: Layout = "row" if "instances" in request else "columnar"
    values = request["instances"] if layout == "row" else request["inputs"]
    if layout == "columnar" and isinstance(values, dict):
        if set(values) != {INPUT_NAME}:
            raise ServingError(
                f'"inputs" has keys {sorted(values)}; the model\'s only input is "{INPUT_NAME}"'
            )
        values = values[INPUT_NAME]
    if layout == "columnar" and isinstance(values, dict) and "b64" in values:
        values = [values]
    if not isinstance(values, list) or not values:
        key = "instances" if layout == "row" else "inputs"
        raise ServingError(f'"{key}" must be a non-empty list of images')
    if len(values) > max_instances:
        raise ServingError(
            f"{len(values)} images in one request; the limit is serve.max_instances = {max_instances}: "
            "split the request"
        )
    return PredictRequest([decode_b64(value, index) for index, value in enumerate(values)], layout)


class DecodeElsewhere(Exception):
    """An image larger than the caller's `decode_limit`: check it where a slow decode blocks no one."""


def check_image(
    data: bytes,
    max_pixels: int,
    index: int | None = None,
    name: str | None = None,
    decode_limit: int | None = None,
) -> ImageInfo:
    """Refuse bytes that are not one whole image the model's decoder reads, or that are too large.

    Returns:
        The image's width, height and format.

    Raises:
        ServingError: (400) naming the instance (or file) and the problem.
        DecodeElsewhere: before decoding an image of more than `decode_limit` pixels.
    """
    where = _where(index, name)
    if not data:
        raise ServingError(f"{where}: empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # Pillow's own guard, far above max_pixels
        raise ServingError(
            f"{where}: too many pixels, over ingest.max_pixels {max_pixels} ({error})"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        reason = failure_reason(data, error)
        what = {"not_an_image": "not an image", "truncated": "a truncated image"}.get(reason, "undecodable")
        raise ServingError(f"{where}: {what}; send a JPEG, PNG, BMP, GIF or WebP file") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ServingError(
                f"{where}: {width}x{height} = {width * height} pixels exceeds ingest.max_pixels {max_pixels}"
            )
        if decode_limit is not None and width * height > decode_limit:
            raise DecodeElsewhere(where)
        if image.format not in FORMATS:
            raise ServingError(
                f"{where}: {image.format} is not served; send a JPEG, PNG, BMP, GIF or WebP file"
            )
        try:
            image.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            what = "a truncated image" if failure_reason(data, error) == "truncated" else "undecodable"
            raise ServingError(f"{where}: {what} ({error})") from None
    return ImageInfo(int(width), int(height), str(image.format))


def text(value: Any) -> str:
    """A string output value (TensorFlow gives bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def row(outputs: dict[str, np.ndarray], index: int) -> dict[str, Any]:
    """One image's outputs as JSON values."""
    return {key: _json(value[index]) for key, value in outputs.items()}


def _json(value: Any) -> Any:
    value = np.asarray(value)
    if value.dtype.kind in "SO":
        flat = [v.decode() if isinstance(v, bytes) else str(v) for v in np.ravel(value)]
        return flat if value.ndim else flat[0]
    return value.tolist()


def response(outputs: dict[str, np.ndarray], layout: Layout) -> dict[str, Any]:
    """TF Serving's answer: `predictions` for the row format, `outputs` for the columnar one."""
    count = len(next(iter(outputs.values())))
    if layout == "row":
        return {"predictions": [row(outputs, i) for i in range(count)]}
    return {"outputs": {key: [_json(value[i]) for i in range(count)] for key, value in outputs.items()}}
