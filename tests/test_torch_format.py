"""Original `.bin` checkpoints are read without torch and never run code: files written by real
torch.save (tests/data/torch_format/, made by its make_files.py with torch 2.5.1) hold every dtype and
layout of a state_dict; a pickle naming anything else is refused; damaged files fail with one clear
error."""

import pathlib
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from hsa_jax.cli import compare
from hsa_jax.common.interop import read_state_dict
from hsa_jax.common.torch_format import UnsafeCheckpointError, read_torch_file

DATA = pathlib.Path(__file__).parent / "data" / "torch_format"

def expected() -> dict[str, np.ndarray]:
    """The arrays make_files.py saved (its expected(), which imports torch at module level)."""
    source = (DATA / "make_files.py").read_text()
    namespace = {"np": np}
    exec(source[source.index("def expected"):source.index("def main")], namespace)
    return namespace["expected"]()


def test_every_dtype_and_layout_of_a_real_torch_file():
    got, want = read_torch_file(DATA / "tensors.bin"), expected()
    assert list(got) == list(want)  # the OrderedDict's order
    for key, value in want.items():
        if key == "bf16":
            assert got[key].dtype == jnp.bfloat16
            np.testing.assert_array_equal(got[key], value.astype(jnp.bfloat16))
        elif key == "f16":
            assert got[key].dtype == np.float16
            np.testing.assert_array_equal(got[key], value.astype(np.float16))
        else:
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert got["transposed"].flags.c_contiguous and got["transposed"].flags.owndata  # a copy, not a view of the file


def test_state_dict_reader_converts_bfloat16():
    sd = read_state_dict(DATA / "tensors.bin")
    assert sd["bf16"].dtype == np.float32
    np.testing.assert_array_equal(sd["bf16"], expected()["bf16"].astype(jnp.bfloat16).astype(np.float32))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    with pytest.raises(UnsafeCheckpointError, match=r"print: checkpoints are read weights only"):
        read_state_dict(DATA / "evil.bin")
    assert "must not call" not in capsys.readouterr().out
    cfg = pathlib.Path(__file__).parent / "golden" / "swa_hsa" / "model_b_hsa_swa_softmax1.config.json"
    rc = compare.main(["--model-type", "swa_hsa", "--config", str(cfg), "--weights", str(DATA / "evil.bin"),
                       "--reference", str(cfg.with_suffix("").with_suffix(".npz"))])
    assert rc == 2 and "weights only" in capsys.readouterr().err


def rewrite(src, dst, change):
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for name in a.namelist():
            data = change(name, a.read(name))
            if data is not None:
                b.writestr(name, data)


@pytest.mark.parametrize("fault, message", [
    ("short_storage", "fewer than its"),
    ("missing_storage", "not a readable torch checkpoint"),
    ("no_pickle", "no <archive>/data.pkl"),
    ("truncated_file", "not a torch checkpoint"),
    ("bad_stride", "reads past its storage"),
])
def test_damaged_files_fail_with_one_clear_error(tmp_path, fault, message):
    src, bad = DATA / "tensors.bin", tmp_path / "bad.bin"
    if fault == "truncated_file":
        bad.write_bytes(src.read_bytes()[:1000])
    elif fault == "bad_stride":  # the f32 tensor's stride (12, 4, 1) -> (120, 4, 1): past its 24 elements
        rewrite(src, bad, lambda n, d: d.replace(b"K\x0cK\x04K\x01\x87", b"KxK\x04K\x01\x87", 1)
                if n.endswith("data.pkl") else d)
    else:
        rewrite(src, bad, {
            "short_storage": lambda n, d: d[:10] if n.endswith("data/0") else d,
            "missing_storage": lambda n, d: None if n.endswith("data/0") else d,
            "no_pickle": lambda n, d: None if n.endswith("data.pkl") else d,
        }[fault])
    with pytest.raises(ValueError, match=message):
        read_state_dict(bad)


def test_legacy_format_without_torch_says_what_is_needed(tmp_path):
    legacy = tmp_path / "old.bin"
    legacy.write_bytes(b"\x80\x02" + b"\x00" * 30)
    try:
        import torch  # noqa: F401
        pytest.skip("torch is installed: the legacy format is read by torch.load")
    except ImportError:
        with pytest.raises(ValueError, match=r"legacy \(pre-1.6\) format; reading it needs torch"):
            read_state_dict(legacy)
