"""Real photos for a zero-shot precision tier: a calibration set and a disjoint held-out set.

Nothing is downloaded: the photos ship inside scikit-image (`skimage.data`) and scikit-learn
(`load_sample_images`), both in the `train` extra. Each photo gives a fixed set of square crops at
three scales and their mirror images, resized to the model's input as the server resizes.
The photos are split by name, so no held-out crop shares a source photo with a calibration crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headswap.errors import FailedPrecondition

# Photos that ship in skimage.data (colour and grey; grey ones are repeated over RGB).
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
                  "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
                  "microaneurysms", "moon", "page", "retina", "rocket", "text")
SKLEARN_PHOTOS = ("china", "flower")
# Crop windows: (scale of the short side, horizontal, vertical position), each also mirrored.
CROPS = ((1.0, 0.5, 0.5), (1.0, 0.0, 0.0), (1.0, 1.0, 1.0),
         (0.75, 0.5, 0.5), (0.75, 0.0, 0.0), (0.75, 1.0, 0.0), (0.75, 0.0, 1.0), (0.75, 1.0, 1.0),
         (0.5, 0.5, 0.5), (0.5, 0.0, 0.0), (0.5, 1.0, 0.0), (0.5, 0.0, 1.0), (0.5, 1.0, 1.0))


@dataclass(frozen=True)
class PhotoSet:
    """uint8 RGB crops [N, h, w, 3] and the name of the photo each came from."""

    pixels: np.ndarray
    sources: tuple[str, ...]


def photos() -> dict[str, np.ndarray]:
    """Every shipped photo as uint8 RGB [h, w, 3], by name."""
    try:
        from skimage import data
        from sklearn.datasets import load_sample_images
    except ImportError as err:
        raise FailedPrecondition(f"the calibration photos ship with scikit-image and scikit-learn ({err}); "
                                 "install the train extra: pip install 'headswap[train]'") from None
    out: dict[str, np.ndarray] = {}
    for name in SKIMAGE_PHOTOS:
        out[name] = _rgb(getattr(data, name)())
    samples = load_sample_images()
    for filename, image in zip(samples.filenames, samples.images):
        stem = filename.replace("\\", "/").rsplit("/", 1)[-1].split(".")[0]
        if stem in SKLEARN_PHOTOS:
            out[stem] = _rgb(image)
    return out


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8 RGB from a grey, boolean, RGBA or wider-integer photo."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (image.astype(np.float32) * (255.0 / max(float(image.max()), 1e-9))).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def crops(photo: np.ndarray, height: int, width: int) -> list[np.ndarray]:
    """The fixed crop windows of one photo (and their mirror images), resized to the model input."""
    from PIL import Image

    image = Image.fromarray(photo)
    w, h = image.size
    seen: set[tuple[int, int, int]] = set()
    out: list[np.ndarray] = []
    for scale, fx, fy in CROPS:
        side = max(1, int(min(w, h) * scale))
        left, top = int((w - side) * fx), int((h - side) * fy)
        if (left, top, side) in seen:  # a square photo's full-size windows coincide
            continue
        seen.add((left, top, side))
        array = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR,
                                        box=(left, top, left + side, top + side)), dtype=np.uint8)
        out.extend((array, np.ascontiguousarray(array[:, ::-1])))
    return out


def photo_sets(height: int, width: int) -> tuple[PhotoSet, PhotoSet]:
    """(calibration, held-out): crops of alternate photos in name order, so the two never share a photo."""
    sets: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    names: tuple[list[str], list[str]] = ([], [])
    for i, (name, photo) in enumerate(sorted(photos().items())):
        for crop in crops(photo, height, width):
            sets[i % 2].append(crop)
            names[i % 2].append(name)
    return (PhotoSet(np.stack(sets[0]), tuple(names[0])), PhotoSet(np.stack(sets[1]), tuple(names[1])))
