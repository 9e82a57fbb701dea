"""A wheel install (not an editable checkout) has everything hsa-train needs: the embedded default run
config travels as data under <prefix>/share/hsa-jax/configs and is found there."""

import pathlib
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_wheel_install_finds_the_default_config(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", REPO],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("hsa_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".data/data/share/hsa-jax/configs/tiny.yaml") for n in names)
    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip first uninstalls the venv's own (editable) hsa-jax, and the
    # console scripts (`make demo`) are gone after the test suite.
    shown = lambda: subprocess.run([sys.executable, "-m", "pip", "show", "-q", "hsa-jax"], capture_output=True).returncode
    before = shown()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--ignore-installed",
                    "--prefix", prefix, wheel], check=True, capture_output=True, timeout=300)
    assert shown() == before, "installing the wheel elsewhere uninstalled the environment's hsa-jax"
    (site,) = prefix.glob("lib/python3*/site-packages")
    # Run from outside the checkout, with the installed copy first on the path (the venv gives the deps).
    probe = ("import sys, train.config as c; p = c.default_config(); "
             "assert c.__file__.startswith(sys.argv[1]), c.__file__; print(p); c.load_config(None, [])")
    r = subprocess.run([sys.executable, "-c", probe, str(site)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr
    assert pathlib.Path(r.stdout.strip()) == prefix / "share" / "hsa-jax" / "configs" / "tiny.yaml"
