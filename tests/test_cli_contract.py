"""The contract every console script keeps, run as a user runs it (a real process): `--help` documents
every flag and exits 0; bad input exits 2 with one line on stderr naming the flag, field or file, and no
traceback; nothing is created at a path that was only to be read."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = {  # console script -> module with main() (pyproject.toml [project.scripts])
    "hsa-train": "train.main", "hsa-preprocess": "data_pipeline.cli", "hsa-compare": "hsa_jax.cli.compare",
    "hsa-generate": "hsa_jax.cli.generate", "hsa-eval": "hsa_jax.cli.evaluate", "hsa-export": "hsa_jax.cli.export",
}


def cli(module, *args, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_console_script_is_listed_here():
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]")[1].split("\n\n")[0]
    listed = {line.split("=")[0].strip(): line.split('"')[1].split(":")[0]
              for line in section.strip().splitlines() if "=" in line}
    assert listed == SCRIPTS


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help(script):
    r = cli(SCRIPTS[script], "--help")
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--help" in r.stdout


def one_line_error(r, *needles):
    """Exit 2, no traceback, and exactly one 'PROG: error: ...' line holding every needle."""
    errors = [ln for ln in r.stderr.splitlines() if ": error:" in ln]
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and all(n in errors[0] for n in needles), r.stderr


def test_bad_input_is_one_line_exit_2(tmp_path):
    missing = tmp_path / "no_such_dir"
    one_line_error(cli("train.main", f"workdir={tmp_path / 'w'}", "optim.lr=abc"), "optim.lr")
    one_line_error(cli("train.main", f"workdir={tmp_path / 'w'}", f"data.index={missing}"), str(missing))
    one_line_error(cli("data_pipeline.cli", "verify", missing), str(missing))
    one_line_error(cli("hsa_jax.cli.compare", "--model-type", "swa_hsa", "--config", missing / "c.json",
                       "--reference", missing / "r.npz"), str(missing))
    one_line_error(cli("hsa_jax.cli.generate", "--checkpoint", missing, "--prompt", "hi"), str(missing))
    one_line_error(cli("hsa_jax.cli.evaluate", "--checkpoint", missing, "--haystack", missing), str(missing))
    one_line_error(cli("hsa_jax.cli.export", missing, tmp_path / "out"), str(missing))
    assert not missing.exists()  # asked to read: never created
    assert not (tmp_path / "out").exists()


def documented_commands():
    """(file, script, subcommand, flags) of every console-script command in the README's and docs' code
    blocks (backslash continuations joined)."""
    out = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        blocks = doc.read_text().split("```")[1::2]
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                words = line.split("#")[0].split()
                for i, w in enumerate(words):
                    name = w.rsplit("/", 1)[-1]
                    if name in SCRIPTS:
                        rest = words[i + 1:]
                        sub = rest[0] if name == "hsa-preprocess" and rest and not rest[0].startswith("-") else None
                        flags = sorted({r.split("=")[0] for r in rest if r.startswith("--")})
                        out.append((doc.name, name, sub, flags))
                        break
    return out


def test_documented_commands_use_existing_flags():
    """Every flag the README and docs show for a console script is one its --help documents (a renamed or
    removed flag, like hsa-eval's old --set, fails here)."""
    cmds = documented_commands()
    assert len(cmds) > 10 and {c[1] for c in cmds} >= {"hsa-train", "hsa-eval", "hsa-compare", "hsa-preprocess"}
    helps = {}
    for doc, script, sub, flags in cmds:
        key = (script, sub)
        if key not in helps:
            r = cli(SCRIPTS[script], *([sub] if sub else []), "--help")
            assert r.returncode == 0, (doc, script, sub, r.stderr[-500:])
            helps[key] = r.stdout
        missing = [f for f in flags if f not in helps[key]]
        assert not missing, f"{doc}: {script} {sub or ''} documents {missing}, which its --help does not have"
