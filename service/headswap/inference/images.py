"""Image decoding and preprocessing for the serving path (Pillow + numpy, no TensorFlow).

A model's manifest says how its input is made: center square crop, resize to the input size,
channel order, then (pixel - mean) / std as float32 NHWC.

Decoding is split in two so a request can be bounded before any pixel is decoded: `decode` reads
only the header (format, size), `to_pixels` decodes one image into the right RGB: every Pillow mode
(16-bit scaled rather than clipped, transparency over white), EXIF orientation applied as photo
viewers do, truncated files refused.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from headswap.errors import InvalidInput, ResourceExhausted

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP"})
# Our own limit (Settings.max_image_pixels), checked as soon as the header is read and before any
# pixel is decoded, replaces Pillow's process-wide one so the error can name the image's size.
Image.MAX_IMAGE_PIXELS = None
# A file that ends early is refused, never padded with grey (Pillow's default; asserted here
# because the whole process shares this flag).
ImageFile.LOAD_TRUNCATED_IMAGES = False

# EXIF orientation tag -> the transpose that shows the image upright (as ImageOps.exif_transpose).
EXIF_ORIENTATION = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
# FP32 tensors from callers may stray this many whole pixel ranges beyond the model's normalised range
# (augmented or rounded input passes); further out is a caller's mistake (0..255 pixels sent to a
# model that takes -1..1, or values so large the model's output overflows to NaN) and is refused.
FP32_INPUT_SLACK = 1.0
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_WITH_ALPHA = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Start-of-frame markers of arithmetic-coded JPEGs: they can hold less than one bit per block,
# so the "too few bytes for the header's size" check below does not apply to them.
_ARITHMETIC_SOF = tuple(bytes([0xFF, m]) for m in (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


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

    # Derived once per version (the object lives as long as its runtime), not on every FP32 request.
    @functools.cached_property
    def input_range(self) -> tuple[float, float]:
        """The lowest and highest model input that a 0..255 pixel normalises to, over the channels."""
        ends = (np.array([0.0, 255.0], dtype=np.float32)[:, None] - self.mean) / self.std
        return float(ends.min()), float(ends.max())

    @functools.cached_property
    def accepted_range(self) -> tuple[float, float]:
        """The FP32 input values a caller may send: `input_range` widened by FP32_INPUT_SLACK."""
        low, high = self.input_range
        slack = FP32_INPUT_SLACK * (high - low)
        return low - slack, high + slack

    def check_fp32(self, batch: np.ndarray, first_index: int = 0) -> None:
        """Refuse a caller's FP32 batch holding NaN, infinity or values outside `accepted_range`,
        naming the first such image (counted from `first_index`) and what the model takes."""
        low, high = self.accepted_range
        if low <= batch.min() and batch.max() <= high:  # NaN fails both comparisons
            return
        rows = batch.reshape(len(batch), -1)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            bad = int(np.argmin(finite))
            raise InvalidInput(f"FP32 input image {first_index + bad} holds NaN or infinite values; "
                               "every value must be a finite number")
        bad = int(np.argmax((rows.min(axis=1) < low) | (rows.max(axis=1) > high)))
        lowest, highest = self.input_range
        raise InvalidInput(
            f"FP32 input image {first_index + bad} holds values from {rows[bad].min():.4g} to {rows[bad].max():.4g}; "
            f"this model takes pixels normalised as (pixel - mean) / std, {lowest:.4g} to {highest:.4g} "
            f"(values outside {low:.4g} to {high:.4g} are refused). Send raw 0..255 pixels as UINT8 instead")


def pixel_count(image: Image.Image) -> int:
    """Pixels the image will decode to (from its header)."""
    width, height = image.size
    return width * height


def decode(data: bytes, max_pixels: int, index: int = 0) -> Image.Image:
    """Open encoded bytes (header only), refusing what is empty, unknown, too large or cut short."""
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
        if image_format == "JPEG":
            _refuse_short_jpeg(image, data, index)
    except (InvalidInput, ResourceExhausted):
        raise
    except Exception as err:  # Pillow raises many types for broken input
        raise InvalidInput(f"image {index} could not be decoded ({len(data)} bytes): "
                           f"not a valid JPEG, PNG, WebP or BMP file ({type(err).__name__})") from None
    return image


def _refuse_short_jpeg(image: Image.Image, data: bytes, index: int) -> None:
    """A Huffman-coded JPEG spends at least one bit per 8x8 block (its DC code); libjpeg fills
    missing blocks with grey instead of failing, so a header claiming more blocks than the file
    has bits (e.g. 6000x6000 over 600x400 of data) is refused here."""
    header = data[:data.find(b"\xff\xda")] if b"\xff\xda" in data else data
    if any(marker in header for marker in _ARITHMETIC_SOF):
        return
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)]
    h_max = max(layer[1] for layer in layers) or 1
    v_max = max(layer[2] for layer in layers) or 1
    width, height = image.size
    blocks = sum(math.ceil(math.ceil(width * layer[1] / h_max) / 8) *
                 math.ceil(math.ceil(height * layer[2] / v_max) / 8) for layer in layers)
    if len(data) * 8 < blocks:
        raise InvalidInput(f"image {index} is truncated: its header says {width}x{height} pixels "
                           f"({blocks} blocks) but its {len(data)} bytes cannot hold that many; "
                           "send the whole file")


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright), as photo viewers read it."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is ignored, as viewers do
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16- and 32-bit integer pixels scaled (0..65535 -> 0..255, the
    high byte), not clipped; float pixels taken as 0..255 (Pillow's convention); transparency composed over
    white; palette, 1-bit, grayscale and CMYK converted by Pillow."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT or mode == "I":
        # The high byte, as Pillow itself reads 16-bit RGB PNGs (65535 -> 255, 257*k -> k).
        wide = np.asarray(image)
        if mode == "I":
            wide = np.clip(wide, 0, 65535)
        gray = (wide >> 8).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in _WITH_ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def to_pixels(image: Image.Image, height: int, width: int, index: int = 0) -> np.ndarray:
    """Center square crop and resize to (height, width), upright: uint8 RGB HWC."""
    try:
        upright = orientation(image)
        if image.format == "JPEG":
            # Let libjpeg decode at a reduced scale when the image is much larger than needed.
            image.draft("RGB", (max(width, height) * 2, max(width, height) * 2))
        rgb = to_rgb(image)
        w, h = rgb.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        # The center square of a rotated image is the rotated center square: crop and resize first,
        # then turn the small result upright (cheap), with the target size swapped for quarter turns.
        size = (height, width) if upright in (5, 6, 7, 8) else (width, height)
        resized = rgb.resize(size, Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
        if upright != 1:
            resized = resized.transpose(_UPRIGHT[upright])
        return np.asarray(resized, dtype=np.uint8)
    except Exception as err:  # Pillow raises many types (OSError, ValueError, struct.error...) for broken data
        raise InvalidInput(f"image {index} is truncated or corrupt: {str(err)[:200]}") from None


def load_pixels(data: bytes, height: int, width: int, max_pixels: int, index: int = 0) -> np.ndarray:
    """Encoded bytes -> uint8 RGB HWC at the model's size."""
    return to_pixels(decode(data, max_pixels, index), height, width, index)
