"""Writes the torch.save files that tests/test_torch_format.py reads without torch. Needs torch (any
version that writes the zip format; these were written by torch 2.5.1):

    python tests/data/torch_format/make_files.py

tensors.bin: the arrays of `expected()` (test_torch_format.py recomputes them) in the dtypes and
layouts a state_dict can hold: float32, bfloat16, float16, int64, bool, a transposed (non-contiguous)
view, two slices of one storage (offsets), a 0-d and an empty tensor, an nn.Parameter, in an
OrderedDict. evil.bin: a pickle whose loading would call print; a weights-only reader must refuse it.
"""

import collections
import pathlib

import numpy as np
import torch

HERE = pathlib.Path(__file__).parent


def expected() -> dict[str, np.ndarray]:
    a = (np.arange(24, dtype=np.float32) / 7 - 1).reshape(2, 3, 4)
    return {"f32": a, "bf16": a[0], "f16": a[1], "i64": np.arange(-3, 3, dtype=np.int64),
            "bool": np.array([True, False, True]), "transposed": a[1].T, "slice_a": a.reshape(-1)[2:9],
            "slice_b": a.reshape(-1)[10:20], "scalar": np.array(3.5, np.float32),
            "empty": np.zeros((0, 4), np.float32), "param": a[:, 1]}


def main():
    e = expected()
    t = lambda k: torch.from_numpy(e[k].copy())  # a C-contiguous copy (ascontiguousarray makes 0-d 1-d)
    flat = torch.from_numpy(e["f32"].reshape(-1).copy())
    sd = collections.OrderedDict(
        f32=t("f32"), bf16=t("bf16").to(torch.bfloat16), f16=t("f16").to(torch.float16), i64=t("i64"),
        bool=t("bool"), transposed=torch.from_numpy(e["f32"][1].copy()).T, slice_a=flat[2:9],
        slice_b=flat[10:20], scalar=t("scalar"), empty=t("empty"),
        param=torch.nn.Parameter(t("param"), requires_grad=False))
    assert not sd["transposed"].is_contiguous() and sd["slice_b"].storage_offset() == 10
    torch.save(sd, HERE / "tensors.bin")

    class Evil:
        def __reduce__(self):
            return (print, ("a weights-only reader must not call this",))
    torch.save({"x": Evil()}, HERE / "evil.bin")


if __name__ == "__main__":
    main()
