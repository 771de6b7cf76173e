"""headswap: gRPC image classification with fine-tuned heads and hot-swapped ONNX versions.

`from headswap import Client` loads the Python client on first use only, so that importing the
package (as the server and the training workers do) pulls in nothing else. The names it offers
are `headswap.client.__all__`, read from there (one list).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headswap.client import *  # noqa: F403


def __getattr__(name: str) -> Any:
    if name.startswith("__") and name != "__all__":  # probes for module dunders never load the client
        raise AttributeError(f"module 'headswap' has no attribute {name!r}")
    client = importlib.import_module("headswap.client")
    if name == "__all__" or name in client.__all__:
        return getattr(client, name)
    raise AttributeError(f"module 'headswap' has no attribute {name!r}")
