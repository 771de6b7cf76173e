"""Image decoding and preprocessing for the serving path (Pillow + numpy, no TensorFlow).

A model's manifest says how its input is made: center square crop, resize to the input size,
channel order, then (pixel - mean) / std as float32 NHWC.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from headswap.errors import InvalidInput, ResourceExhausted

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP"})
# Our own limit (Settings.max_image_pixels), checked as soon as the header is read and before any
# pixel is decoded, replaces Pillow's process-wide one so the error can name the image's size.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become model input; read from the manifest."""

    height: int
    width: int
    mean: np.ndarray  # per channel, float32
    std: np.ndarray
    bgr: bool = False

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "Preprocessing":
        spec = manifest["preprocessing"]
        size = manifest["input"]
        return cls(height=int(size["height"]), width=int(size["width"]),
                   mean=np.asarray(spec.get("mean", [0.0, 0.0, 0.0]), dtype=np.float32),
                   std=np.asarray(spec.get("std", [1.0, 1.0, 1.0]), dtype=np.float32),
                   bgr=spec.get("channel_order", "RGB").upper() == "BGR")

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (or float 0..255) RGB NHWC -> float32 model input."""
        batch = pixels.astype(np.float32)
        if self.bgr:
            batch = batch[..., ::-1]
        batch -= self.mean
        batch /= self.std
        return batch


def decode(data: bytes, max_pixels: int, index: int = 0) -> Image.Image:
    """Open encoded bytes as an image, refusing what is empty, unknown or too large."""
    if not data:
        raise InvalidInput(f"image {index} is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        image_format = image.format
        if image_format not in ACCEPTED_FORMATS:
            raise InvalidInput(f"image {index} is {image_format or 'an unknown format'}; "
                               f"accepted: {', '.join(sorted(ACCEPTED_FORMATS))}")
        width, height = image.size
        if width * height > max_pixels:
            raise ResourceExhausted(f"image {index} is {width}x{height} pixels, over the limit of "
                                    f"{max_pixels} pixels; send a smaller image")
    except (InvalidInput, ResourceExhausted):
        raise
    except Exception as err:  # Pillow raises many types for broken input
        raise InvalidInput(f"image {index} could not be decoded ({len(data)} bytes): "
                           f"not a valid JPEG, PNG, WebP or BMP file ({type(err).__name__})") from None
    return image


def to_pixels(image: Image.Image, height: int, width: int, index: int = 0) -> np.ndarray:
    """Center square crop and resize to (height, width): uint8 RGB HWC."""
    try:
        if image.format == "JPEG":
            # Let libjpeg decode at a reduced scale when the image is much larger than needed.
            image.draft("RGB", (max(width, height) * 2, max(width, height) * 2))
        rgb = image.convert("RGB")
        w, h = rgb.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        resized = rgb.resize((width, height), Image.Resampling.BILINEAR,
                             box=(left, top, left + side, top + side))
        return np.asarray(resized, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise InvalidInput(f"image {index} is truncated or corrupt: {err}") from None


def load_pixels(data: bytes, height: int, width: int, max_pixels: int, index: int = 0) -> np.ndarray:
    """Encoded bytes -> uint8 RGB HWC at the model's size."""
    return to_pixels(decode(data, max_pixels, index), height, width, index)
