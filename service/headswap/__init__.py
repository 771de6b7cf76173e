"""headswap: gRPC image classification with fine-tuned heads and hot-swapped ONNX versions.

`from headswap import Client` loads the Python client on first use only, so that importing the
package (as the server and the training workers do) pulls in nothing else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headswap.client import (Client, ClientError, InvalidArgumentError, Job, JobEvent, JobState, ModelInfo,
                                 NotFoundError, PermissionDeniedError, Prediction, UnauthenticatedError,
                                 UnavailableError)

_CLIENT_NAMES = ("Client", "ClientError", "InvalidArgumentError", "Job", "JobEvent", "JobState", "ModelInfo",
                 "NotFoundError", "PermissionDeniedError", "Prediction", "UnauthenticatedError", "UnavailableError")


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        return getattr(importlib.import_module("headswap.client"), name)
    raise AttributeError(f"module 'headswap' has no attribute {name!r}")


__all__ = list(_CLIENT_NAMES)
