"""Turning what a caller holds into what the server takes: encoded image bytes, and labelled
examples from a folder (DATA/<class>/<image files>) or from (image, label) pairs.

Files are read only when their batch is sent, so a large folder never sits in memory at once.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Union

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image as PILImage

    ImageLike = Union[bytes, bytearray, memoryview, str, os.PathLike[str], PILImage, np.ndarray]
else:
    ImageLike = Union[bytes, bytearray, memoryview, str, os.PathLike, Any]

# keras.utils.image_dataset_from_directory's extensions, plus WebP (the server decodes it).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
# PIL modes that PNG stores as they are; anything else (CMYK, YCbCr, float) is sent as RGB.
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}


def is_single_image(value: object) -> bool:
    """True for one image (bytes, a path, a PIL image or an array), False for a collection of them."""
    return (isinstance(value, (bytes, bytearray, memoryview, str, os.PathLike))
            or (hasattr(value, "save") and hasattr(value, "mode"))
            or hasattr(value, "__array_interface__"))


def encode(image: ImageLike) -> bytes:
    """Encoded image bytes for the server: bytes pass through, paths are read, PIL images and
    uint8 arrays (HxW or HxWxC) are encoded as PNG, which is lossless."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if hasattr(image, "__array_interface__") and not hasattr(image, "save"):
        from PIL import Image

        image = Image.fromarray(image)
    if hasattr(image, "save") and hasattr(image, "mode"):
        if image.mode not in _PNG_MODES:
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"an image must be bytes, a path (str or os.PathLike), a PIL image or a uint8 array, "
                    f"not {type(image).__name__}")


@dataclass(frozen=True)
class Example:
    """One labelled image, not read yet."""

    image: ImageLike
    label: str
    validation: bool = False


def scan_folder(folder: str | os.PathLike[str], validation: bool = False) -> list[Example]:
    """FOLDER/<class>/<image files>, as keras' image_dataset_from_directory reads it; sorted, so
    that upload order (and the indices of skipped images) is stable."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder: expected {root}/<class name>/<image files>")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class folders: expected {root}/<class name>/<image files>")
    examples = [Example(path, folder.name, validation) for folder in classes for path in sorted(folder.rglob("*"))
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS]
    if not examples:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return examples


def examples_of(data: str | os.PathLike[str] | Iterable[tuple[ImageLike, Any]],
                validation: bool = False) -> Iterable[Example]:
    """A folder's examples (scanned now, so that a wrong folder fails before any upload), or
    (image, label) pairs as examples, read as the upload goes (labels become strings: 3 -> "3")."""
    if isinstance(data, (str, os.PathLike)):
        return scan_folder(data, validation)
    if isinstance(data, (bytes, bytearray, memoryview)) or not hasattr(data, "__iter__"):
        raise TypeError(f"fine-tune data is a folder or (image, label) pairs, not {type(data).__name__}")
    return _pairs(data, validation)


def _pairs(data: Iterable[tuple[ImageLike, Any]], validation: bool) -> Iterator[Example]:
    for position, pair in enumerate(data):
        try:
            image, label = pair
        except (TypeError, ValueError):
            raise TypeError(f"fine-tune data item {position} is not an (image, label) pair: "
                            f"{type(pair).__name__}") from None
        yield Example(image, label if isinstance(label, str) else str(label), validation)
