"""read_torch_state_dict on small files written here in both of PyTorch's layouts, torch-free."""

import collections
import io
import os
import pickle
import sys
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from models.torch_weights import read_torch_state_dict


# Stand-ins carrying the names that torch.save writes; pickle records a class by name only.
class FloatStorage:
    __module__ = "torch"


class LongStorage:
    __module__ = "torch"


class _rebuild_tensor_v2:  # lower case: the name must be torch's function name
    __module__ = "torch._utils"


@pytest.fixture(autouse=True)
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets pickle find the stand-ins under their torch names, as it checks before writing."""
    torch = types.ModuleType("torch")
    torch.FloatStorage, torch.LongStorage = FloatStorage, LongStorage
    utils = types.ModuleType("torch._utils")
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)


@dataclass(frozen=True)
class _Storage:
    key: str
    kind: type
    data: np.ndarray


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def __reduce__(self) -> tuple:
        hooks = collections.OrderedDict()
        args = (self.storage, self.offset, self.size, self.stride, False, hooks)
        return _rebuild_tensor_v2, args


class _TorchPickler(pickle.Pickler):
    """Writes storages as persistent ids, the way torch.save refers to tensor bytes."""

    def persistent_id(self, obj: object) -> tuple | None:
        if isinstance(obj, _Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.data.size)
        return None


def _pickle_state(state: object) -> bytes:
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(state)
    return buffer.getvalue()


def _storages(state: dict) -> list[_Storage]:
    found = [v.storage for v in state.values() if isinstance(v, _Tensor)]
    return list({storage.key: storage for storage in found}.values())


def write_legacy(path: Path, state: dict) -> None:
    with path.open("wb") as file:
        sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}
        for header in (0x1950A86A20F9469CFC6C, 1001, sys_info):
            pickle.dump(header, file, protocol=2)
        file.write(_pickle_state(state))
        pickle.dump([storage.key for storage in _storages(state)], file, protocol=2)
        for storage in _storages(state):
            file.write(np.int64(storage.data.size).tobytes() + storage.data.tobytes())


def write_zip(path: Path, state: dict) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", _pickle_state(state))
        archive.writestr("archive/byteorder", "little")
        for storage in _storages(state):
            archive.writestr(f"archive/data/{storage.key}", storage.data.tobytes())


WRITERS = pytest.mark.parametrize("write", [write_legacy, write_zip], ids=["legacy", "zip"])
Writer = Callable[[Path, dict], None]


def _example() -> tuple[dict, dict[str, np.ndarray]]:
    """Returns a state dict with shared, offset and transposed views, and the arrays it holds."""
    weights = _Storage("0", FloatStorage, np.arange(12, dtype="<f4") / 4)
    counter = _Storage("1", LongStorage, np.array([7], dtype="<i8"))
    state = collections.OrderedDict(
        [
            ("conv.weight", _Tensor(weights, 0, (2, 3), (3, 1))),
            ("conv.weight_t", _Tensor(weights, 0, (3, 2), (1, 3))),
            ("bn.bias", _Tensor(weights, 7, (2, 2), (3, 1))),
            ("bn.num_batches_tracked", _Tensor(counter, 0, (), ())),
        ]
    )
    expected = {
        "conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3) / 4,
        "conv.weight_t": np.arange(6, dtype=np.float32).reshape(2, 3).T / 4,
        "bn.bias": np.array([[7, 8], [10, 11]], dtype=np.float32) / 4,
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }
    return state, expected


@WRITERS
def test_round_trip_is_exact(tmp_path: Path, write: Writer) -> None:
    state, expected = _example()
    write(tmp_path / "weights.pth", state)

    tensors = read_torch_state_dict(tmp_path / "weights.pth")

    assert list(tensors) == list(expected)
    for name, array in expected.items():
        assert tensors[name].dtype == array.dtype
        np.testing.assert_array_equal(tensors[name], array, strict=True)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@WRITERS
def test_foreign_globals_are_refused_unrun(tmp_path: Path, write: Writer) -> None:
    marker = tmp_path / "pwned"
    write(tmp_path / "evil.pth", {"weight": _RunsShell(marker)})

    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle .*system"):
        read_torch_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


@WRITERS
def test_view_past_its_storage_is_refused(tmp_path: Path, write: Writer) -> None:
    storage = _Storage("0", FloatStorage, np.zeros(4, dtype="<f4"))
    write(tmp_path / "bad.pth", {"w": _Tensor(storage, 2, (2, 2), (2, 1))})

    with pytest.raises(pickle.UnpicklingError, match="past the end"):
        read_torch_state_dict(tmp_path / "bad.pth")


@WRITERS
def test_anything_but_a_dict_of_tensors_is_refused(tmp_path: Path, write: Writer) -> None:
    write(tmp_path / "odd.pth", {"w": [1, 2, 3]})

    with pytest.raises(pickle.UnpicklingError, match="dict of tensors"):
        read_torch_state_dict(tmp_path / "odd.pth")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.99])
def test_truncated_legacy_file_is_reported(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "weights.pth"
    write_legacy(path, _example()[0])
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])

    with pytest.raises(pickle.UnpicklingError, match="truncated"):
        read_torch_state_dict(path)
