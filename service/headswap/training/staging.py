"""A job's upload, staged in the model store so that any trainer can run any job.

The replica that receives a FineTune validates the upload into a local directory
(`dataset.DatasetWriter`), then copies it here, under `.jobs/<job id>/` of the model store (the
local directory, a shared volume or S3, whatever --model-dir is), and removes its local copy:
the job no longer depends on the pod that took it. A trainer copies it back to its own work
directory before it runs the job. The images file is cut into parts of `PART_BYTES`, so neither
side holds more than one part in memory (an object store writes whole objects).

Registry listings never show `.jobs` (model names cannot start with a dot).
"""

from __future__ import annotations

import logging
from pathlib import Path

from headswap.registry.store import Store

log = logging.getLogger(__name__)

PREFIX = ".jobs"
PART_BYTES = 32 << 20
IMAGES_FILE = "images.bin"
FILES = ("job.json", "index.npz")  # staged whole, beside the images' parts


def _key(job_id: str, name: str = "") -> str:
    return f"{PREFIX}/{job_id}" + (f"/{name}" if name else "")


def stage(store: Store, job_id: str, directory: Path) -> int:
    """Copy a validated upload into the store; returns the bytes staged."""
    total = 0
    with open(directory / IMAGES_FILE, "rb") as images:
        part = 0
        while True:
            chunk = images.read(PART_BYTES)
            if not chunk and part:
                break
            store.write_bytes(_key(job_id, f"{IMAGES_FILE}.{part:05d}"), chunk)
            total += len(chunk)
            part += 1
            if len(chunk) < PART_BYTES:
                break
    for name in FILES:
        data = (directory / name).read_bytes()
        store.write_bytes(_key(job_id, name), data)
        total += len(data)
    return total


def fetch(store: Store, job_id: str, directory: Path) -> None:
    """Copy a staged upload into `directory` (a trainer's local copy of the job)."""
    directory.mkdir(parents=True, exist_ok=True)
    if not store.exists(_key(job_id, f"{IMAGES_FILE}.00000")):
        raise FileNotFoundError(f"the upload of job {job_id} is not in the model store ({_key(job_id)})")
    with open(directory / IMAGES_FILE, "wb") as images:
        part = 0
        while store.exists(key := _key(job_id, f"{IMAGES_FILE}.{part:05d}")):
            images.write(store.read_bytes(key))
            part += 1
    for name in FILES:
        (directory / name).write_bytes(store.read_bytes(_key(job_id, name)))


def remove(store: Store, job_id: str) -> None:
    """Delete a job's staged upload (the job ended; a failed job's after --keep-failed-job-data-s)."""
    store.delete_prefix(_key(job_id))
