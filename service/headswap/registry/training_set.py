"""The sha256 of every image a fine-tuned version was trained on, stored beside its model.

`training_sha256.bin` in the version directory: the raw 32-byte digests, sorted and unique, back to
back (32 bytes an image: 1.6 MB at the default --max-train-images of 50,000). RankForLabelling reads
it to mark images that are already labelled. It holds the job's training and validation images
alike: both were labelled by the user. Versions published before it existed have none.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np

TRAINING_SET_FILE = "training_sha256.bin"
DIGEST_BYTES = 32


def digests_of(images: Iterable[bytes]) -> np.ndarray:
    """sha256 of each image's encoded bytes, as an [N] array of 32-byte strings."""
    return np.array([hashlib.sha256(image).digest() for image in images], dtype=f"S{DIGEST_BYTES}")


def write(path: Path, digests: np.ndarray) -> int:
    """Write the sorted unique digests; returns how many."""
    unique = np.unique(np.asarray(digests, dtype=f"S{DIGEST_BYTES}"))
    path.write_bytes(unique.tobytes())  # fixed width: a digest ending in zero bytes keeps them
    return int(unique.size)


class TrainingSet:
    """Membership tests against a version's digests (a sorted array: no per-digest objects)."""

    def __init__(self, digests: np.ndarray) -> None:
        self.digests = digests

    def __len__(self) -> int:
        return int(self.digests.size)

    def contains(self, digests: np.ndarray) -> np.ndarray:
        """[N] bool: which of these digests are in the set."""
        if not self.digests.size or not len(digests):
            return np.zeros(len(digests), dtype=bool)
        where = np.searchsorted(self.digests, digests)
        where = np.minimum(where, self.digests.size - 1)
        return self.digests[where] == digests


def load(path: Path) -> TrainingSet:
    """The set in `path` (a verified file of the version), read once per file."""
    stat = path.stat()
    return _load(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load(path: str, size: int, mtime_ns: int) -> TrainingSet:
    data = Path(path).read_bytes()
    if len(data) % DIGEST_BYTES:
        raise ValueError(f"{path}: {len(data)} bytes is not a whole number of sha256 digests")
    # Fixed-width strings compare and sort as the raw 32 bytes (all have the same length).
    return TrainingSet(np.sort(np.frombuffer(data, dtype=f"S{DIGEST_BYTES}")))
