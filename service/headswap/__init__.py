"""headswap: gRPC image classification with fine-tuned heads and hot-swapped ONNX versions.

`from headswap import Client` loads the Python client on first use only, so that importing the
package (as the server and the training workers do) pulls in nothing else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headswap.client import *  # noqa: F403

# headswap.client.__all__ (tests/test_client.py checks that the two agree).
_CLIENT_NAMES = (
    "DEFAULT_TARGET", "FINETUNE_OPTIONS", "Client", "Connection", "FineTuneOptions",
    "Classifications", "Job", "JobEvent", "JobState", "ModelInfo", "Prediction", "Submission",
    "ClientError", "AbortedError", "AlreadyExistsError", "CancelledError", "DataLossError", "DeadlineExceededError",
    "FailedPreconditionError", "InternalError", "InvalidArgumentError", "NotFoundError", "OutOfRangeError",
    "PermissionDeniedError", "ResourceExhaustedError", "UnauthenticatedError", "UnavailableError",
    "UnimplementedError", "UnknownError",
)


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        return getattr(importlib.import_module("headswap.client"), name)
    raise AttributeError(f"module 'headswap' has no attribute {name!r}")


__all__ = list(_CLIENT_NAMES)
