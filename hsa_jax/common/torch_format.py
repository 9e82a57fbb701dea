"""Reads PyTorch's checkpoint format (`torch.save` since torch 1.6: a zip of `data.pkl` and one raw file
per storage) without torch, and without running code from the file.

`data.pkl` is a pickle whose tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)` calls, storages being persistent ids `("storage", torch.<Type>Storage, key, device, numel)` whose
bytes are the zip member `<archive>/data/<key>`. The unpickler below resolves exactly those names (and
the containers a state_dict uses) and refuses every other global, so a crafted file fails with an error
instead of running code: the guarantee of `torch.load(weights_only=True)`. Files of torch's legacy
(pre-1.6, non-zip) format are not read here.
"""

from __future__ import annotations

import collections
import pathlib
import pickle
import zipfile

import jax.numpy as jnp
import numpy as np

STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """The file's pickle names something other than tensors and plain containers."""


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 on a flat numpy storage: a bounds-checked strided view, copied."""
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise ValueError(f"tensor of size {size}, stride {stride}, offset {offset} is malformed")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise ValueError(f"tensor of size {size}, stride {stride}, offset {offset} reads past its "
                             f"storage of {storage.size} elements")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=[s * item for s in stride],
                                           writeable=False) if all(size) else np.empty(size, storage.dtype)
    return np.array(view, order="C")  # owns its memory, in C order like the torch tensor's .contiguous()


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(f"refusing to load {module}.{name}: checkpoints are read weights only "
                                    f"(tensors and plain containers)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}: checkpoints are read weights only")
        _, kind, key, _device, numel = pid
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            if len(raw) < numel * kind.dtype.itemsize:
                raise ValueError(f"storage {key} holds {len(raw)} bytes, fewer than its {numel} "
                                 f"{kind.name[:-len('Storage')]} elements")
            self.storages[key] = np.frombuffer(raw, kind.dtype, count=numel)
        return self.storages[key]


def read_torch_file(path: str | pathlib.Path):
    """-> the object a torch.save file (zip format) holds, every tensor as a numpy array (bfloat16 as
    jnp.bfloat16). UnsafeCheckpointError for a pickle that names anything else; ValueError for a file
    that is not such a checkpoint or is damaged; NotImplementedError for torch's legacy format."""
    path = pathlib.Path(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":  # a bare pickle: torch's pre-1.6 format (or torch.save(_use_new_zipfile_serialization=False))
            raise NotImplementedError(f"{path} is in torch's legacy (pre-1.6) format")
        raise ValueError(f"{path} is not a torch checkpoint (neither torch.save's zip format nor a pickle)")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise ValueError("no <archive>/data.pkl member")
            prefix = pickles[0][:-len("data.pkl")]
            if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder") != b"little":
                raise ValueError("big-endian checkpoints are not supported")
            with archive.open(pickles[0]) as f:
                return _Unpickler(f, archive, prefix).load()
    except UnsafeCheckpointError:
        raise
    except (ValueError, KeyError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is not a readable torch checkpoint: {e}") from None
