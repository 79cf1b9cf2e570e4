"""Look at one image file safely: header first, full decode only when it is small enough."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import replace

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.manifest import ManifestRow

# Our own size check runs on the header before any decode, so Pillow's global
# bomb guard is redundant; silence its warning but keep its hard error as a backstop.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def luminance(image: Image.Image) -> Image.Image:
    """An 8-bit grayscale view of any mode, 16-bit and float included.

    Pillow's own conversion clips 16-bit values to 255, which turns most
    16-bit photos white; scale by the value range instead.
    """
    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    return image.convert("L")


# (signature, bytes every complete file ends with or contains) for formats whose end is checkable.
_ENDINGS = ((b"\xff\xd8\xff", b"\xff\xd9"), (b"\x89PNG\r\n\x1a\n", b"IEND"), (b"GIF8", b";"))
_SIGNATURES = tuple(sig for sig, _ in _ENDINGS) + (b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def failure_reason(data: bytes, error: Exception) -> str:
    """Why Pillow failed: `truncated` (a known image cut short), `undecodable`, or `not_an_image`."""
    if "truncated" in str(error).lower():
        return "truncated"
    for signature, ending in _ENDINGS:
        if data.startswith(signature):
            complete = data.rstrip(b"\x00").endswith(ending) if ending != b"IEND" else ending in data
            return "undecodable" if complete else "truncated"
    return "undecodable" if data.startswith(_SIGNATURES) else "not_an_image"


def inspect_image(data: bytes, path: str, label: str, max_pixels: int) -> ManifestRow:
    """Describe one file's bytes as a manifest row, never raising on bad input.

    Args:
        data: the file's bytes.
        path: the path to record (relative to the project root).
        label: the class it was filed under.
        max_pixels: images with more pixels are described from the header only.

    Returns:
        A row whose `decodable` and `error` say whether and why the file is unusable.
    """
    base = ManifestRow(path=path, label=label, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    if not data:
        return replace(base, error="empty: file has 0 bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # Pillow's own guard, raised from the header
        return replace(base, error=f"oversize: {error}; not decoded")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        return replace(base, error=f"{failure_reason(data, error)}: Pillow cannot open it ({error})")
    with image:
        width, height = image.size
        header = replace(base, width=width, height=height, mode=image.mode, format=image.format or "")
        if width * height > max_pixels:
            return replace(
                header,
                error=f"oversize: {width}x{height} = {width * height} pixels exceeds "
                f"ingest.max_pixels {max_pixels}; not decoded",
            )
        try:
            image.load()
            phash = str(imagehash.phash(luminance(image)))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return replace(header, error=f"{failure_reason(data, error)}: {error}")
    return replace(header, phash=phash, decodable=True)
