"""Which Keras backend a training worker runs, chosen in the serving process without importing either.

Keras reads KERAS_BACKEND once, when it is first imported, so a process runs one backend for good:
the choice is made per worker process (in its environment), never in the serving process.

- `auto` (the default): JAX for head-only jobs where it is installed (a warm job took 0.83 s
  against 2.0-2.5 s on TensorFlow on the same 2 cores), TensorFlow for phase 2, whose graph is
  exported with tf2onnx;
- `jax` / `tensorflow`: every job on that backend (a phase 2 job on JAX fails, saying why).

Exports (`headswap export`, the default model's first export) always run on TensorFlow:
`export.onnx_export` sets it before Keras is imported, whatever KERAS_BACKEND says.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

JAX = "jax"
TENSORFLOW = "tensorflow"
EXPORT_BACKEND = TENSORFLOW


@cache
def jax_installed() -> bool:
    """Whether `jax` can be imported, found without importing it (the serving process stays light)."""
    return importlib.util.find_spec("jax") is not None


def for_job(setting: str, unfreeze_top_layers: int) -> str:
    """The backend a job runs on under `--trainer-backend setting`."""
    if setting in (JAX, TENSORFLOW):
        return setting
    if unfreeze_top_layers:
        return TENSORFLOW
    return JAX if jax_installed() else TENSORFLOW


def default(setting: str) -> str:
    """The backend the warm worker starts with: that of head-only jobs, the usual kind."""
    return for_job(setting, 0)


def worker_environment(backend: str) -> dict[str, str]:
    """The environment of a worker process on `backend`."""
    return {**os.environ, "KERAS_BACKEND": backend}
