"""The ``refbn`` command line answers ``--help``, a bare ``refbn`` and usage errors without
importing TensorFlow, Keras, torch or jax (or, for the top level, any subcommand's module).

Every case runs in a fresh interpreter, so what it imports is its own.  Speed is measured,
not tested: the point of the import checks is that nothing slow is loaded.
"""
import json
import os
import subprocess
import sys

import pytest

from refbn.cli import SUBCOMMANDS

HEAVY = ("tensorflow", "keras", "tf_keras", "torch", "jax")

# Calls refbn.cli.main(argv) and writes its exit code and the modules it left loaded to a file.
_SNIPPET = """
import json, sys
import refbn.cli
try:
    rc = refbn.cli.main(sys.argv[2:])
except SystemExit as e:
    rc = e.code if isinstance(e.code, int) or e.code is None else 1
heavy = %r
subcommands = [m for m, _ in refbn.cli.SUBCOMMANDS.values()]
with open(sys.argv[1], "w") as f:
    json.dump(dict(rc=0 if rc is None else rc, heavy=[m for m in heavy if m in sys.modules],
                   subcommand_modules=[m for m in subcommands if m in sys.modules]), f)
""" % (HEAVY,)


def _env():
    return dict(os.environ, COLUMNS="200")


def _main(tmp_path, *argv):
    """Run refbn.cli.main(argv) in a fresh interpreter: (CompletedProcess, result dict)."""
    out = tmp_path / "result.json"
    p = subprocess.run([sys.executable, "-c", _SNIPPET, str(out), *argv], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert out.exists(), p.stdout + p.stderr
    return p, json.loads(out.read_text())


def _module(tmp_path, *argv):
    """Run ``python -m refbn.cli ARGV`` (the path the installed ``refbn`` script takes)."""
    return subprocess.run([sys.executable, "-m", "refbn.cli", *argv], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)


def test_bare_refbn_prints_the_help_on_stderr_and_exits_2(tmp_path):
    p = _module(tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stdout == "" and p.stderr.startswith("usage: refbn")
    for name in SUBCOMMANDS:
        assert name in p.stderr
    p, r = _main(tmp_path)
    assert r == dict(rc=2, heavy=[], subcommand_modules=[]), p.stderr


def test_help_lists_every_subcommand_without_loading_any(tmp_path):
    p = _module(tmp_path, "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: refbn")
    for name, (_, help_) in SUBCOMMANDS.items():
        assert f"{name} " in p.stdout and help_ in p.stdout  # '%' printed as itself
    p, r = _main(tmp_path, "--help")
    assert r == dict(rc=0, heavy=[], subcommand_modules=[]), p.stderr


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_subcommand_help_is_answered_without_heavy_imports(tmp_path, name):
    p, r = _main(tmp_path, name, "--help")
    assert r["rc"] == 0, (r, p.stderr)
    assert p.stdout.startswith(f"usage: refbn {name}")
    assert SUBCOMMANDS[name][1] in p.stdout
    assert r["heavy"] == [], r
    assert SUBCOMMANDS[name][0] in r["subcommand_modules"]


def _files(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"not read")
    (tmp_path / "data.npz").write_bytes(b"not read")
    return "model.keras", "data.npz"


# (argv, words the error on stderr must name); files named model.keras / data.npz exist
BAD = [
    (["diagnose", "/no/such/model.keras", "/no/such/data.npz"], ["no such file", "/no/such/model.keras"]),
    (["diagnose", "model.keras", "/no/such/data.npz"], ["no such file", "/no/such/data.npz"]),
    (["diagnose", "/no/such/model.keras"], ["data"]),
    (["diagnose", "model.keras", "data.npz", "--batch-size", "0"], ["--batch-size"]),
    (["diagnose", "model.keras", "data.npz", "--convergence", "1"], ["--convergence"]),
    (["diagnose", "model.keras", "data.npz", "--json", "/no/such/dir/r.json"], ["--json", "/no/such/dir"]),
    (["demo", "--images", "0"], ["--images"]),
    (["demo", "--epochs", "two"], ["--epochs"]),
    (["demo", "--model", "vgg"], ["--model"]),
    (["demo", "--tolerance", "2"], ["--tolerance"]),
    (["demo", "--low-momentum", "1"], ["--low-momentum"]),
    (["demo", "--model", "resnet50", "--size", "16"], ["--size"]),
    (["demo", "--out", "data.npz"], ["--out", "data.npz"]),
    (["no-such-command"], ["no-such-command"]),
]


@pytest.mark.parametrize("argv, words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_and_files_exit_2_naming_them_without_heavy_imports(tmp_path, argv, words):
    _files(tmp_path)
    p, r = _main(tmp_path, *argv)
    assert r["rc"] == 2, (r, p.stderr)
    assert r["heavy"] == [], (r, p.stderr)
    for word in words:
        assert word in p.stderr, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert sorted(os.listdir(tmp_path)) == ["data.npz", "model.keras", "result.json"]  # nothing written
