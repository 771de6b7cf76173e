"""Uploaded training data: checked as it streams in, stored compactly, split for validation.

Runs in the serving process, so numpy + Pillow only. Every image is decoded once here (Pillow,
with the server's size limits) so that a job never starts on data it cannot read; what is
stored is the encoded bytes themselves, appended to one file (`images.bin`), because they are
5-20x smaller than decoded pixels: a 50,000-image job stays a few hundred MB on disk and the
server never holds the set in memory. The worker decodes them again at the base model's input
size, in batches.

Layout of a job's data (written into a staging directory, renamed into place when complete):

    images.bin   the encoded images, back to back
    index.npz    offsets, lengths, label ids, is_validation, upload_index (position in the
                 upload, for messages), labels (class names, sorted), conflicting_duplicates,
                 sha256 (of each stored image: the version's training set, for RankForLabelling)

A full work directory (ENOSPC, a quota: EDQUOT, a file size limit: EFBIG) is the caller's
RESOURCE_EXHAUSTED naming the directory and the space left (`out_of_space`), not an internal error.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sqlite3
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from headswap.config import Settings
from headswap.errors import HeadswapError, InvalidInput, ResourceExhausted, shown_name
from headswap.inference.images import load_pixels
from headswap.training.spec import FineTuneSpec, normalize_label

IMAGES_FILE = "images.bin"
INDEX_FILE = "index.npz"
# Decoding at a tiny size still reads the whole file (PNG) or lets libjpeg skip work (JPEG
# draft mode), and proves the image is readable; the worker resizes for real.
CHECK_SIZE = 16
MAX_REPORTED = 20
DECODE_NICE = 10
# Errors that mean "does not fit": the file system is full, the user's quota is, or a file
# reached the process's size limit (RLIMIT_FSIZE).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def out_of_space(err: BaseException, directory: Path) -> ResourceExhausted | None:
    """The caller's error for a write that did not fit in `directory`, or None for any other error.

    Call it after the partial upload is removed: the space reported is what is free for a retry."""
    if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
        reason = {errno.EDQUOT: "the disk quota is used up", errno.EFBIG: "a file reached the server's "
                  "file size limit (RLIMIT_FSIZE)"}.get(err.errno, "the file system is full")
    elif isinstance(err, sqlite3.Error) and getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        reason = "the file system is full (job database)"
    else:
        return None
    try:
        free = f"{shutil.disk_usage(directory).free:,} bytes are free there now"
    except OSError:
        free = "its free space cannot be read"
    return ResourceExhausted(f"the upload does not fit in the work directory {directory}: {reason}; {free}. "
                             "Send less, or wait for queued jobs to finish (their images are removed then)")


def _lower_priority() -> None:
    """Upload checks run at a lower CPU priority than inference (Linux: per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)
    except (AttributeError, OSError):
        pass


# One low-priority decode slot for every upload together: a 36 Mpx PNG takes a core for a
# second, so uploads decode one image at a time, niced, and Classify keeps the other cores and
# wins the contended one. Uploads are throughput work; Classify has callers waiting.
_DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload-decode", initializer=_lower_priority)


def check_image(data: bytes, max_pixels: int, index: int) -> None:
    """Decode in the shared low-priority slot; raises the decoder's HeadswapError when unusable."""
    _DECODER.submit(load_pixels, data, CHECK_SIZE, CHECK_SIZE, max_pixels, index).result()


@dataclass(frozen=True)
class Example:
    """One labelled image as uploaded."""

    image: bytes
    label: str
    validation: bool = False


@dataclass
class Upload:
    """What was received: the classes, the split sizes, and what was skipped."""

    labels: list[str]
    num_images: int
    train_counts: dict[str, int]
    val_counts: dict[str, int]
    skipped: list[int] = field(default_factory=list)
    explicit_validation: bool = False
    # Identical image bytes uploaded under two or more labels: each such image counted once, and
    # the first pair found, (index, label, index, label), for the message.
    conflicting_duplicates: int = 0
    conflict_example: tuple[int, str, int, str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)


@dataclass
class StoredDataset:
    """A job's stored data, as the worker reads it."""

    directory: Path
    labels: list[str]
    offsets: np.ndarray
    lengths: np.ndarray
    label_ids: np.ndarray
    is_validation: np.ndarray
    upload_index: np.ndarray
    conflicting_duplicates: int = 0
    sha256: np.ndarray | None = None  # [N] 32-byte digests; None in an index written before they were kept

    @classmethod
    def load(cls, directory: Path) -> "StoredDataset":
        with np.load(directory / INDEX_FILE) as index:
            conflicts = int(index["conflicting_duplicates"]) if "conflicting_duplicates" in index else 0
            digests = index["sha256"] if "sha256" in index else None
            return cls(directory, [str(x) for x in index["labels"]], index["offsets"], index["lengths"],
                       index["label_ids"], index["is_validation"], index["upload_index"], conflicts, digests)

    def digests(self) -> np.ndarray:
        """sha256 of every stored image (recorded at upload; read from images.bin for older jobs)."""
        if self.sha256 is not None and len(self.sha256) == len(self):
            return self.sha256
        return np.array([hashlib.sha256(self.read([i])[0]).digest() for i in range(len(self))], dtype="S32")

    def __len__(self) -> int:
        return int(len(self.offsets))

    def read(self, positions: Iterable[int]) -> list[bytes]:
        """Encoded bytes of the images at these positions (in stored order)."""
        out = []
        with open(self.directory / IMAGES_FILE, "rb") as handle:
            for i in positions:
                handle.seek(int(self.offsets[i]))
                out.append(handle.read(int(self.lengths[i])))
        return out


class DatasetWriter:
    """Validates examples batch by batch and appends the good ones to `directory`.

    Limits are checked as the stream arrives (RESOURCE_EXHAUSTED at the first image over),
    labels at once (INVALID_ARGUMENT naming the image), undecodable images are collected and
    reported together at the end (or skipped, when the config allows).
    """

    def __init__(self, directory: Path, settings: Settings, skip_invalid: bool) -> None:
        self.directory = directory
        self.settings = settings
        self.skip_invalid = skip_invalid
        try:
            directory.mkdir(parents=True)
            self._images = open(directory / IMAGES_FILE, "wb")
        except OSError as err:  # a full work directory: the caller's RESOURCE_EXHAUSTED
            shutil.rmtree(directory, ignore_errors=True)
            raise out_of_space(err, directory.parent) or err
        self._offset = 0
        self.received = 0
        self.received_bytes = 0
        self.invalid: list[tuple[int, str]] = []
        self.offsets: list[int] = []
        self.lengths: list[int] = []
        self.labels: list[str] = []
        self.validation: list[bool] = []
        self.upload_index: list[int] = []
        self.digests: list[bytes] = []  # sha256 of each stored image, in stored order
        # sha256 of each stored image -> (upload index, label) of its first copy; 32 bytes a key.
        self._first_copy: dict[bytes, tuple[int, str]] = {}
        self.conflicts: dict[bytes, tuple[int, str, int, str]] = {}

    def add(self, examples: Iterable[Example]) -> None:
        s = self.settings
        for example in examples:
            index = self.received
            self.received += 1
            self.received_bytes += len(example.image)
            if self.received > s.max_train_images:
                raise ResourceExhausted(f"too many images: more than {s.max_train_images} in one job (the "
                                        "server's --max-train-images); send fewer or raise the limit")
            if self.received_bytes > s.max_train_bytes:
                raise ResourceExhausted(f"too much data: image {index} takes the upload over {s.max_train_bytes} "
                                        "bytes (the server's --max-train-bytes); send fewer or smaller images")
            if len(example.label) > s.max_label_length:
                raise InvalidInput(f"image {index} has a label of {len(example.label)} characters; the limit is "
                                   f"{s.max_label_length} (--max-label-length): {example.label[:40]!r}...")
            try:
                label = normalize_label(example.label)
            except InvalidInput as err:
                raise InvalidInput(f"image {index}: {err}") from None
            if not label:
                raise InvalidInput(f"image {index} has an empty label; every image needs its class name")
            if len(label) > s.max_label_length:  # NFKC may lengthen a label (U+FDFA is 18 letters)
                raise InvalidInput(f"image {index} has a label of {len(label)} characters once normalised "
                                   f"(NFKC); the limit is {s.max_label_length} (--max-label-length): "
                                   f"{shown_name(label)}")
            try:
                check_image(example.image, s.max_image_pixels, index)
            except HeadswapError as err:
                self.invalid.append((index, str(err)))
                continue
            self.digests.append(self._note_copy(example.image, index, label))
            self._images.write(example.image)
            self.offsets.append(self._offset)
            self.lengths.append(len(example.image))
            self._offset += len(example.image)
            self.labels.append(label)
            self.validation.append(bool(example.validation))
            self.upload_index.append(index)

    def _note_copy(self, image: bytes, index: int, label: str) -> bytes:
        """Remember identical bytes under another label: reported, because they teach the model
        two answers for one picture (a labelling mistake, or someone poisoning the set). Returns
        the image's sha256."""
        digest = hashlib.sha256(image).digest()
        first_index, first_label = self._first_copy.setdefault(digest, (index, label))
        if first_label != label and digest not in self.conflicts:
            self.conflicts[digest] = (first_index, first_label, index, label)
        return digest

    def finish(self, spec: FineTuneSpec) -> Upload:
        """Check the set as a whole, split it, write the index. Raises InvalidInput when unusable."""
        self._images.close()
        if self.invalid and not self.skip_invalid:
            shown = "; ".join(reason for _, reason in self.invalid[:MAX_REPORTED])
            more = f" (and {len(self.invalid) - MAX_REPORTED} more)" if len(self.invalid) > MAX_REPORTED else ""
            raise InvalidInput(f"{len(self.invalid)} of {self.received} images cannot be used (fix or remove "
                               "them, or set skip_invalid_images to train without them); indices "
                               f"{[i for i, _ in self.invalid[:MAX_REPORTED]]}{more}: {shown}")
        if not self.received:
            raise InvalidInput("no images received: send batches of labelled images after the config")
        if not self.labels:
            raise InvalidInput(f"none of the {self.received} images could be decoded")
        validation = np.asarray(self.validation, dtype=bool)
        explicit = bool(validation.any())
        train_labels = Counter(label for label, v in zip(self.labels, validation) if not v)
        classes = sorted(train_labels)
        if len(classes) < 2:
            raise InvalidInput(f"a classifier needs at least 2 classes; the training images have "
                               f"{len(classes)}: {classes}")
        if explicit:
            unknown = sorted({label for label, v in zip(self.labels, validation) if v} - set(classes))
            if unknown:
                raise InvalidInput(f"validation images have labels with no training image: {unknown[:MAX_REPORTED]}")
        else:
            validation = self._split(spec, classes, train_labels)
        unknown_weights = sorted(set(spec.class_weights) - set(classes))
        if unknown_weights:
            raise InvalidInput(f"class_weights names labels that are not in the data: {unknown_weights}; "
                               f"classes: {classes[:MAX_REPORTED]}")
        label_id = {label: i for i, label in enumerate(classes)}
        np.savez(self.directory / INDEX_FILE, labels=np.asarray(classes),
                 offsets=np.asarray(self.offsets, dtype=np.int64), lengths=np.asarray(self.lengths, dtype=np.int64),
                 label_ids=np.asarray([label_id[label] for label in self.labels], dtype=np.int32),
                 is_validation=validation, upload_index=np.asarray(self.upload_index, dtype=np.int64),
                 conflicting_duplicates=np.int64(len(self.conflicts)),
                 sha256=np.asarray(self.digests, dtype="S32"))
        val_counts = Counter(label for label, v in zip(self.labels, validation) if v)
        train_counts = Counter(label for label, v in zip(self.labels, validation) if not v)
        return Upload(labels=classes, num_images=len(self.labels), train_counts=dict(train_counts),
                      val_counts=dict(val_counts), skipped=[i for i, _ in self.invalid], explicit_validation=explicit,
                      conflicting_duplicates=len(self.conflicts),
                      conflict_example=next(iter(self.conflicts.values()), None))

    def _split(self, spec: FineTuneSpec, classes: list[str], counts: Counter) -> np.ndarray:
        """Stratified: each class gives round(n * split) images (at least one) to validation."""
        too_few = [f"{label!r} ({counts[label]})" for label in classes if counts[label] < 2]
        if too_few:
            raise InvalidInput("classes with too few images for a validation split: "
                               f"{', '.join(too_few[:MAX_REPORTED])}; "
                               "each class needs at least 2 (one to train on, one to validate with "
                               f"validation_split {spec.validation_split:g}), or send an explicit validation set")
        rng = np.random.default_rng(spec.seed)
        labels = np.asarray(self.labels)
        validation = np.zeros(len(labels), dtype=bool)
        for label in classes:
            members = np.flatnonzero(labels == label)
            n_val = min(max(1, int(round(len(members) * spec.validation_split))), len(members) - 1)
            validation[rng.permutation(members)[:n_val]] = True
        return validation

    def discard(self) -> None:
        """Nothing stored half-way: remove whatever this upload wrote."""
        if not self._images.closed:
            try:
                self._images.close()
            except OSError:  # its buffer could not be written (a full disk): closed all the same
                pass
        shutil.rmtree(self.directory, ignore_errors=True)
