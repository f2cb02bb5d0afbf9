"""Every ``refbn`` subcommand, fed what a careful adversarial user would try: malformed
descriptors, bad numbers (NaN, Inf, negative, zero, 1e400, huge, words), missing, empty,
folder-shaped, truncated or corrupt files (.keras, .h5, .npz, shape lists), arrays of the wrong
shape, dtype, rank or contents, unknown choices and non-UTF-8 bytes.

Each must answer with exactly one line on stderr, ``refbn NAME: error: ...`` naming the argument
and what was expected, exit status 2, print nothing on stdout and write no file; and none may
load TensorFlow (or Keras, torch, jax) to do so.  The cases run in-process (cheap); one
subprocess runs them all again in a fresh interpreter to see what they import.

The .keras files are made by hand (a zip holding config.json and weights), so that no test
needs Keras: every case here is refused before Keras would load the model.
"""
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from refbn import cli

HEAVY = ("tensorflow", "keras", "tf_keras", "torch", "jax")
HUGE = "99999999999999999999"         # past int64


# -- the files ---------------------------------------------------------------------------
def _config(with_bn=True, shape=(None, 4, 4, 2)):
    layers = [{"class_name": "InputLayer", "config": {"batch_shape": list(shape), "name": "in"}}]
    if with_bn:
        layers.append({"class_name": "BatchNormalization", "config": {"name": "bn"}})
    return {"module": "keras.src.models.functional", "class_name": "Functional",
            "config": {"name": "m", "layers": layers}}


def _keras(path, config=None, members=None):
    """A .keras-shaped zip (metadata.json, config.json, model.weights.h5); members override."""
    files = {"metadata.json": b'{"keras_version": "3"}', "config.json": json.dumps(config or _config()).encode(),
             "model.weights.h5": b"\x89HDF\r\n\x1a\n" + bytes(64)}
    files.update(members or {})
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            if data is not None:
                z.writestr(name, data)


def _make_files(d):
    rng = np.random.default_rng(0)
    x = rng.random((6, 4, 4, 2)).astype(np.float32)
    y = np.arange(6) % 2
    _keras(d / "model.keras")
    _keras(d / "nobn.keras", _config(with_bn=False))
    _keras(d / "noconfig.keras", members={"config.json": None})
    _keras(d / "noweights.keras", members={"model.weights.h5": None})
    _keras(d / "badjson.keras", members={"config.json": b"{not json"})
    _keras(d / "notmodel.keras", members={"config.json": b"[1, 2]"})
    good = (d / "model.keras").read_bytes()
    (d / "trunc.keras").write_bytes(good[:len(good) // 2])
    crc = bytearray(good)
    at = good.index(b"\x89HDF\r\n\x1a\n") + 20          # inside the stored weights' bytes
    crc[at] ^= 0xFF
    (d / "crc.keras").write_bytes(bytes(crc))
    (d / "empty.keras").write_bytes(b"")
    (d / "random.keras").write_bytes(rng.bytes(3000))
    (d / "model.txt").write_bytes(good)
    (d / "fake.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    (d / "text.h5").write_text("not hdf5\n")
    (d / "folder.keras").mkdir()
    np.savez(d / "data.npz", x=x, y=y)
    np.savez(d / "nox.npz", images=x)
    (d / "empty.npz").write_bytes(b"")
    (d / "random.npz").write_bytes(rng.bytes(3000))
    whole = (d / "data.npz").read_bytes()
    (d / "trunc.npz").write_bytes(whole[:len(whole) // 2])
    buf = io.BytesIO()
    np.save(buf, x)
    (d / "array.npz").write_bytes(buf.getvalue())
    np.savez(d / "shape.npz", x=rng.random((6, 5, 5, 2)).astype(np.float32), y=y)
    np.savez(d / "rank.npz", x=x[..., 0], y=y)
    np.savez(d / "str.npz", x=np.array(["a"] * 6), y=y)
    np.savez(d / "complex.npz", x=x.astype(np.complex64), y=y)
    np.savez(d / "object.npz", x=np.array([None] * 6, dtype=object), y=y)
    bad = x.copy()
    bad[0, 1, 2, 1] = np.nan
    np.savez(d / "nan.npz", x=bad, y=y)
    bad[0, 1, 2, 1] = np.inf
    np.savez(d / "inf.npz", x=bad, y=y)
    np.savez(d / "nosamples.npz", x=x[:0], y=y[:0])
    np.savez(d / "scalar.npz", x=np.float32(3), y=y)
    np.savez(d / "ylen.npz", x=x, y=y[:3])
    np.savez(d / "ystr.npz", x=x, y=np.array(list("abcdef")))
    np.savez(d / "yfloat.npz", x=x, y=y + 0.5)
    np.savez(d / "yneg.npz", x=x, y=-y - 1)
    np.savez(d / "ynan.npz", x=x, y=np.where(y == 0, np.nan, 1.0))
    (d / "shapes_empty.txt").write_text("")
    (d / "shapes_comments.txt").write_text("# no shapes here\n\n")
    (d / "shapes_bad.txt").write_text("32x56x56x64\nbogus\n")
    (d / "shapes_neg.txt").write_text("4x-2x2x2\n")
    (d / "shapes_binary.txt").write_bytes(b"\xff\xfe\x00garbage\n")


# -- the cases: (argv, words the one error line must contain) -----------------------------
B = ["bench", "--contenders", "numpy", "--shapes", "4x4"]      # a bench that would run: one option made bad
D = ["diagnose", "model.keras", "data.npz"]
T = ["trace"]
CASES = [
    # refbn itself
    (["no-such-command"], ["refbn: error:", "invalid choice", "no-such-command"]),
    (["trace", "--bogus"], ["unrecognized arguments", "--bogus"]),
    (["trace", "extra"], ["unrecognized arguments", "extra"]),
    # trace: --shape
    (T + ["--shape", ""], ["--shape", "joined by 'x'"]),
    (T + ["--shape", "abc"], ["--shape", "joined by 'x'"]),
    (T + ["--shape", "4x"], ["--shape", "joined by 'x'"]),
    (T + ["--shape", "4.5x3"], ["--shape", "joined by 'x'"]),
    (T + ["--shape", "4²x3"], ["--shape", "joined by 'x'"]),
    (T + ["--shape", "\udcff"], ["--shape", "\\udcff"]),
    (T + ["--shape", "4x0"], ["--shape", "positive dimensions"]),
    (T + ["--shape", "0x3"], ["--shape", "positive dimensions"]),
    (T + ["--shape", "1x3"], ["--shape", "at least 2 values per channel"]),
    (T + ["--shape=-4x3"], ["--shape", "positive dimensions"]),
    (T + ["--shape", "-4x3"], ["--shape", "expected one argument", "--std=-1"]),
    (T + ["--shape", "100000x100000x100000"], ["--shape", "needs at least", "PiB", "this machine has"]),
    (T + ["--shape", f"{HUGE}x3"], ["--shape", "needs at least", "this machine has"]),
    # trace: numbers
    (T + ["--steps", "-1"], ["--steps", "expected an int in [0, 100000]", "-1"]),
    (T + ["--steps", HUGE], ["--steps", "expected an int in [0, 100000]", HUGE]),
    (T + ["--steps", "nan"], ["--steps", "invalid int value: 'nan'"]),
    (T + ["--steps", "1e3"], ["--steps", "invalid int value"]),
    (T + ["--steps", ""], ["--steps", "invalid int value"]),
    (T + ["--seed", "-1"], ["--seed", "expected an int >= 0", "-1"]),
    (T + ["--seed", "two"], ["--seed", "invalid int value"]),
    (T + ["--mean", "nan"], ["--mean", "expected a finite number", "nan"]),
    (T + ["--mean", "inf"], ["--mean", "expected a finite number", "inf"]),
    (T + ["--mean=-inf"], ["--mean", "expected a finite number", "-inf"]),
    (T + ["--mean", "1e400"], ["--mean", "expected a finite number", "inf"]),
    (T + ["--mean", "1e300"], ["--mean", "overflows float32"]),
    (T + ["--mean", "abc"], ["--mean", "invalid float value: 'abc'"]),
    (T + ["--std", "nan"], ["--std", "expected a finite number >= 0", "nan"]),
    (T + ["--std=-1"], ["--std", "expected a finite number >= 0", "-1"]),
    (T + ["--std", "1e400"], ["--std", "expected a finite number >= 0", "inf"]),
    (T + ["--std", "1e38"], ["--std", "overflows float32"]),
    (T + ["--tolerance", "nan"], ["--tolerance", "in (0, 1)", "nan"]),
    (T + ["--tolerance", "0"], ["--tolerance", "in (0, 1)"]),
    (T + ["--tolerance", "1"], ["--tolerance", "in (0, 1)"]),
    (T + ["--momentum", "nan"], ["--momentum", "nan"]),
    (T + ["--momentum", "1.5"], ["--momentum", "1.5"]),
    (T + ["--momentum=-1"], ["--momentum", "-1"]),
    (T + ["--momentum", "inf"], ["--momentum", "inf"]),
    (T + ["--convention", "pytorch"], ["--convention", "invalid choice: 'pytorch'"]),
    # trace: output files
    (T + ["--plot", ""], ["--plot", "expected a file name, got ''"]),
    (T + ["--plot", "gap"], ["--plot", "ending in", ".png", "'gap'"]),
    (T + ["--plot", "gap.txt"], ["--plot", "ending in", "'gap.txt'"]),
    (T + ["--plot", "folder.keras"], ["--plot", "the folder 'folder.keras'"]),
    (T + ["--plot", "/no/such/dir/gap.png"], ["--plot", "no such folder", "/no/such/dir"]),
    (T + ["--json", ""], ["--json", "expected a file name, got ''"]),
    (T + ["--json", "folder.keras"], ["--json", "the folder 'folder.keras'"]),
    (T + ["--json", "-"], ["--json", "does not write to stdout"]),
    (T + ["--json", "model.keras/t.json"], ["--json", "no such folder"]),
    # verify: descriptors
    (["verify", "", "--list"], ["CASE", "expected a descriptor"]),
    (["verify", ":", "--list"], ["CASE", "option ''"]),
    (["verify", "abc", "--list"], ["CASE", "shape 'abc'", "letters n, c, d, h, w"]),
    (["verify", "resnet", "--list"], ["CASE", "shape 'resnet'"]),
    (["verify", "n2h2w2", "--list"], ["CASE", "needs dimensions n, h, w, c"]),
    (["verify", "n2n2h2w2c2", "--list"], ["CASE", "'n' given twice"]),
    (["verify", "n0h1w1c0", "--list"], ["CASE", "at least one channel"]),
    (["verify", "n1h1w1c-1", "--list"], ["CASE", "letters n, c, d, h, w"]),
    (["verify", "1x-2x2x2", "--list"], ["CASE", "expected sizes >= 0", "h-2"]),
    (["verify", "2x2x2", "--list"], ["CASE", "rank 3"]),
    (["verify", "2x2x2x2x2x2", "--list"], ["CASE", "rank 6"]),
    (["verify", "n1h1w1c1:f64", "--list"], ["CASE", "float64"]),
    (["verify", "n1h1w1c1:int8", "--list"], ["CASE", "option 'int8'"]),
    (["verify", "n2h2w2c2:\udcff", "--list"], ["CASE", "option '\\udcff'"]),
    (["verify", "n2h2w2c2:eafnan", "--list"], ["CASE", "eafnan", "finite"]),
    (["verify", "n2h2w2c2:eaf2", "--list"], ["CASE", "eaf must lie in [0, 1]"]),
    (["verify", "n2h2w2c2:eps0", "--list"], ["CASE", "epsilon must be > 0"]),
    (["verify", "n2h2w2c2:eps-1", "--list"], ["CASE", "epsilon must be > 0"]),
    (["verify", "n2h2w2c2:eps1e400", "--list"], ["CASE", "eps1e400", "finite"]),
    (["verify", "n2h2w2c2:meaninf", "--list"], ["CASE", "meaninf", "finite"]),
    (["verify", "n2h2w2c2:std-1", "--list"], ["CASE", "std must be >= 0"]),
    (["verify", "n2h2w2c2:mean1e39", "--list"], ["CASE", "overflows f32"]),
    (["verify", "n2h2w2c2:f16:mean1e5", "--list"], ["CASE", "overflows f16", "65504"]),
    (["verify", "n2h2w2c2:seed-1", "--list"], ["CASE", "option 'seed-1'"]),
    (["verify", "n2h2w2c2:keras:k0", "--list"], ["CASE", "k must be >= 1"]),
    (["verify", "n2h2w2c2:keras:mom2", "--list"], ["CASE", "mom must lie in [0, 1]"]),
    (["verify", "n2h2w2c2:k3", "--list"], ["CASE", "parity modes"]),
    (["verify", "n1h1w1c1:keras", "--list"], ["CASE", "at least 2 values per channel"]),
    (["verify", "n2h2w2c2:infer:eaf0.5", "--list"], ["CASE", "eaf applies to mode 'train' only"]),
    (["verify", "n100000h100000w100000c64", "--list"], ["CASE", "needs at least", "this machine has"]),
    (["verify", "--seed", "-1", "--list"], ["--seed", "expected an int >= 0"]),
    (["verify", "--seed", "nan", "--list"], ["--seed", "invalid int value"]),
    (["verify", "--framework", "caffe"], ["--framework", "'caffe'"]),
    (["verify", "--", "-n2h2w2c2"], ["CASE", "'-n2h2w2c2'"]),
    (["verify", "--backend", "torch"], ["--backend", "invalid choice: 'torch'"]),
    (["verify", "--tf-kernel", "mkl"], ["--tf-kernel", "invalid choice: 'mkl'"]),
    (["verify", "--format", "html"], ["--format", "invalid choice: 'html'"]),
    (["verify", "--json", "", "n1h1w1c2:train"], ["--json", "expected a file name"]),
    (["verify", "--json", "folder.keras", "n1h1w1c2:train"], ["--json", "the folder"]),
    (["verify", "--json", "/no/such/dir/v.json", "n1h1w1c2:train"], ["--json", "no such folder"]),
    # bench: --shapes
    (B[:-1] + [""], ["--shapes", "at least one shape"]),
    (B[:-1] + [","], ["--shapes", "at least one shape"]),
    (B[:-1] + ["abc"], ["--shapes", "neither a shape list", "letters n, c, d, h, w"]),
    (B[:-1] + ["0x4"], ["--shapes", "every size must be >= 1"]),
    (B[:-1] + ["4x-4"], ["--shapes", "every size must be >= 1"]),
    (B[:-1] + ["4.5x4"], ["--shapes", "sizes joined by 'x'"]),
    (B[:-1] + ["4²x4"], ["--shapes", "sizes joined by 'x'"]),
    (B[:-1] + ["n4h4w4c4:NCWH"], ["--shapes", "layout 'NCWH'"]),
    (B[:-1] + ["4x4:NHWC"], ["--shapes", "2 sizes do not fit layout NHWC"]),
    (B[:-1] + ["n4n4c4"], ["--shapes", "'n' given twice"]),
    (B[:-1] + ["4x4x4x4x4x4"], ["--shapes", "6 sizes"]),
    (B[:-1] + ["100000x100000x100000x100"], ["--shapes", "needs at least", "EiB", "this machine has"]),
    (B[:-1] + [f"{HUGE}x{HUGE}"], ["--shapes", "needs at least", "this machine has"]),
    (B[:-1] + ["folder.keras"], ["--shapes", "the folder 'folder.keras'"]),
    (B[:-1] + ["shapes_empty.txt"], ["--shapes", "lists no shapes"]),
    (B[:-1] + ["shapes_comments.txt"], ["--shapes", "lists no shapes"]),
    (B[:-1] + ["shapes_bad.txt"], ["--shapes", "line 2", "'bogus'"]),
    (B[:-1] + ["shapes_neg.txt"], ["--shapes", "line 1", "every size must be >= 1"]),
    (B[:-1] + ["shapes_binary.txt"], ["--shapes", "not UTF-8"]),
    # bench: lists, numbers, files
    (B + ["--ops", ""], ["--ops", "comma-separated subset of train, infer, bwd", "''"]),
    (B + ["--ops", "fwd"], ["--ops", "comma-separated subset", "'fwd'"]),
    (B + ["--contenders", "pytorch"], ["--contenders", "comma-separated subset", "'pytorch'"]),
    (B + ["--contenders", ",,"], ["--contenders", "comma-separated subset"]),
    (B + ["--threads", "0"], ["--threads", "expected an int >= 1", "0"]),
    (B + ["--threads", "-1"], ["--threads", "expected an int >= 1"]),
    (B + ["--threads", "x"], ["--threads", "invalid int value"]),
    (B + ["--repeats", "0"], ["--repeats", "expected an int >= 1"]),
    (B + ["--warmup", "-1"], ["--warmup", "expected an int >= 0"]),
    (B + ["--gap-ms", "nan"], ["--gap-ms", "in [0, 60000]", "nan"]),
    (B + ["--gap-ms", "-1"], ["--gap-ms", "in [0, 60000]"]),
    (B + ["--gap-ms", "inf"], ["--gap-ms", "in [0, 60000]", "inf"]),
    (B + ["--gap-ms", "1e400"], ["--gap-ms", "in [0, 60000]", "inf"]),
    (B + ["--seed", "-1"], ["--seed", "expected an int >= 0"]),
    (B + ["--cache", "hot"], ["--cache", "invalid choice: 'hot'"]),
    (B + ["--numba-layer", "tbbx"], ["--numba-layer", "invalid choice"]),
    (B + ["--jit"], ["--jit", "no numba"]),
    (B + ["--json", "/no/such/dir/b.json"], ["--json", "no such folder"]),
    (B + ["--json", "folder.keras"], ["--json", "the folder"]),
    (B + ["--markdown", ""], ["--markdown", "expected a file name"]),
    (B + ["--plot", "b.txt"], ["--plot", "ending in"]),
    (B + ["--plot", "/no/such/dir/b.png"], ["--plot", "no such folder"]),
    # demo
    (["demo", "--images", "0"], ["--images", "positive int"]),
    (["demo", "--images", "1"], ["--images", "expected an int >= 2"]),
    (["demo", "--images", "1e3"], ["--images", "invalid int value"]),
    (["demo", "--model", "tiny", "--images", "100000", "--size", "100000"], ["--images/--size", "needs at least"]),
    (["demo", "--model", "tiny", "--size", HUGE], ["--images/--size", "needs at least"]),
    (["demo", "--size", "20000"], ["--images/--size", "resnet50 on 3 images of 20000x20000", "needs at least"]),
    (["demo", "--classes", "1"], ["--classes", "in [2, 3]"]),
    (["demo", "--classes", "4"], ["--classes", "in [2, 3]"]),
    (["demo", "--classes", HUGE], ["--classes", "in [2, 3]"]),
    (["demo", "--classes=-1"], ["--classes", "positive int"]),
    (["demo", "--epochs", "0"], ["--epochs", "positive int"]),
    (["demo", "--epochs", HUGE], ["--epochs", "in [1, 1000000]"]),
    (["demo", "--extra-steps=-1"], ["--extra-steps", "non-negative"]),
    (["demo", "--extra-steps", HUGE], ["--extra-steps", "in [0, 1000000]"]),
    (["demo", "--rows", "0"], ["--rows", "expected an int >= 1"]),
    (["demo", "--seed=-1"], ["--seed", "in [0, 4294967295]"]),
    (["demo", "--seed", HUGE], ["--seed", "in [0, 4294967295]"]),
    (["demo", "--lr", "nan"], ["--lr", "positive learning rate"]),
    (["demo", "--lr", "0"], ["--lr", "positive learning rate"]),
    (["demo", "--lr", "inf"], ["--lr", "expected a finite number > 0", "inf"]),
    (["demo", "--low-momentum", "nan"], ["--low-momentum", "[0, 1)"]),
    (["demo", "--low-momentum", "1"], ["--low-momentum", "[0, 1)"]),
    (["demo", "--tolerance", "inf"], ["--tolerance", "(0, 1)"]),
    (["demo", "--model", "vgg"], ["--model", "invalid choice: 'vgg'"]),
    (["demo", "--model", "resnet50", "--size", "16"], ["--size", "at least 32x32"]),
    (["demo", "--out", ""], ["--out", "expected a folder name"]),
    (["demo", "--out", "data.npz"], ["--out", "not a folder"]),
    (["demo", "--out", "data.npz/sub"], ["--out", "is a file"]),
    # diagnose: the model file
    (["diagnose", "missing.keras", "data.npz"], ["MODEL", "no such file"]),
    (["diagnose", "folder.keras", "data.npz"], ["MODEL", "not a file"]),
    (["diagnose", "\udcff.keras", "data.npz"], ["MODEL", "no such file", "\\udcff"]),
    (["diagnose", "empty.keras", "data.npz"], ["MODEL", "is empty"]),
    (["diagnose", "random.keras", "data.npz"], ["MODEL", "not a .keras archive"]),
    (["diagnose", "trunc.keras", "data.npz"], ["MODEL", "not a .keras archive", "truncated"]),
    (["diagnose", "noconfig.keras", "data.npz"], ["MODEL", "no config.json"]),
    (["diagnose", "noweights.keras", "data.npz"], ["MODEL", "no weights"]),
    (["diagnose", "badjson.keras", "data.npz"], ["MODEL", "corrupt .keras archive", "JSONDecodeError"]),
    (["diagnose", "notmodel.keras", "data.npz"], ["MODEL", "not a Keras model config"]),
    (["diagnose", "crc.keras", "data.npz"], ["MODEL", "corrupt", "checksum", "model.weights.h5"]),
    (["diagnose", "nobn.keras", "data.npz"], ["MODEL", "no BatchNormalization layers"]),
    (["diagnose", "model.txt", "data.npz"], ["MODEL", "ending in .keras, .h5, .hdf5", "'model.txt'"]),
    (["diagnose", "text.h5", "data.npz"], ["MODEL", "not an HDF5 file"]),
    (["diagnose", "fake.h5", "data.npz"], ["MODEL", "corrupt HDF5 file"]),
    # diagnose: the data file
    (["diagnose", "model.keras", "missing.npz"], ["DATA", "no such file"]),
    (["diagnose", "model.keras", "folder.keras"], ["DATA", "not a file"]),
    (["diagnose", "model.keras", "empty.npz"], ["DATA", "is empty"]),
    (["diagnose", "model.keras", "random.npz"], ["DATA", "not a .npz archive"]),
    (["diagnose", "model.keras", "trunc.npz"], ["DATA", "truncated or corrupt .npz"]),
    (["diagnose", "model.keras", "array.npz"], ["DATA", "a .npy file", "np.savez"]),
    (["diagnose", "model.keras", "nox.npz"], ["DATA", "no array 'x'", "images", "--x"]),
    (["diagnose", "model.keras", "shape.npz"], ["DATA", "(6, 5, 5, 2)", "MODEL takes inputs of shape (None, 4, 4, 2)"]),
    (["diagnose", "model.keras", "rank.npz"], ["DATA", "(6, 4, 4)", "MODEL takes inputs of shape"]),
    (["diagnose", "model.keras", "str.npz"], ["DATA", "expected real numbers", "<U1"]),
    (["diagnose", "model.keras", "complex.npz"], ["DATA", "expected real numbers", "complex64"]),
    (["diagnose", "model.keras", "object.npz"], ["DATA", "Python objects"]),
    (["diagnose", "model.keras", "nan.npz"], ["DATA", "expected finite values", "1 NaN/Inf", "(0, 1, 2, 1)"]),
    (["diagnose", "model.keras", "inf.npz"], ["DATA", "expected finite values", "1 NaN/Inf"]),
    (["diagnose", "model.keras", "nosamples.npz"], ["DATA", "at least one sample"]),
    (["diagnose", "model.keras", "scalar.npz"], ["DATA", "one row per sample", "shape ()"]),
    (["diagnose", "model.keras", "ylen.npz"], ["DATA", "['y']", "one label per sample", "(3,)"]),
    (["diagnose", "model.keras", "ystr.npz"], ["DATA", "['y']", "numeric labels"]),
    (["diagnose", "model.keras", "yfloat.npz"], ["DATA", "['y']", "class indices", "0.5"]),
    (["diagnose", "model.keras", "yneg.npz"], ["DATA", "['y']", "class indices", "-1"]),
    (["diagnose", "model.keras", "ynan.npz"], ["DATA", "['y']", "finite labels"]),
    (["diagnose", "model.keras", "data.npz", "--x", "images"], ["DATA", "no array 'images'"]),
    (["diagnose", "model.keras", "data.npz", "--y", "labels"], ["--y", "no array 'labels'"]),
    (["diagnose", "model.keras"], ["diagnose: error:", "data"]),
    # diagnose: numbers and outputs
    (D + ["--batch-size", "0"], ["--batch-size", "positive int"]),
    (D + ["--batch-size", "x"], ["--batch-size", "invalid int value"]),
    (D + ["--steps=-1"], ["--steps", "non-negative"]),
    (D + ["--steps", HUGE], ["--steps", "in [0, 10000000]"]),
    (D + ["--tolerance", "nan"], ["--tolerance", "positive number of standard deviations"]),
    (D + ["--tolerance", "inf"], ["--tolerance", "finite number > 0", "inf"]),
    (D + ["--tolerance", "0"], ["--tolerance", "positive number"]),
    (D + ["--convergence", "nan"], ["--convergence", "(0, 1)"]),
    (D + ["--convergence", "1"], ["--convergence", "(0, 1)"]),
    (D + ["--json", "/no/such/dir/r.json"], ["--json", "no such folder"]),
    (D + ["--json", "folder.keras"], ["--json", "the folder"]),
    (D + ["--json", "data.npz"], ["--json", "'data.npz' is DATA"]),
    (D + ["--recalibrated", "fixed.h5"], ["--recalibrated", "ending in .keras"]),
    (D + ["--recalibrated", "model.keras"], ["--recalibrated", "'model.keras' is MODEL"]),
    (D + ["--recalibrated", "/no/such/dir/f.keras"], ["--recalibrated", "no such folder"]),
    (D + ["--recalibrated", ""], ["--recalibrated", "expected a file name"]),
    (D + ["--recalibrated", "-"], ["--recalibrated", "does not write to stdout"]),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("adversarial")
    _make_files(d)
    return d


def _listing(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def check_answer(argv, rc, out, err, words):
    """The contract: exit 2, nothing on stdout, one line on stderr naming what was wrong."""
    lines = [line for line in err.splitlines() if line.strip()]
    name = argv[0] if argv and argv[0] in cli.SUBCOMMANDS else None
    assert rc == 2, (argv, rc, err)
    assert len(lines) == 1, (argv, err)
    assert lines[0].startswith(f"refbn {name}: error: " if name else "refbn: error: "), lines
    assert "Traceback" not in err and "internal error" not in err, err
    assert out == "", (argv, out)
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(a).encode("ascii", "backslashreplace").decode()
                                                    for a, _ in CASES])
def test_bad_input_gets_one_line_and_status_2(files, monkeypatch, capsys, argv, words):
    monkeypatch.chdir(files)
    before = _listing(files)
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    check_answer(argv, rc, out, err, words)
    assert _listing(files) == before, "a rejected call wrote a file"


# Runs every case in one fresh interpreter: the answers again, and what they imported.
_SNIPPET = """
import io, json, sys, contextlib
from refbn import cli
cases = json.loads(sys.argv[1])
answers = []
for argv in cases:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    answers.append((rc, out.getvalue(), err.getvalue()))
print(json.dumps({"answers": answers, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def test_no_rejection_loads_tensorflow(files):
    argvs = [argv for argv, _ in CASES]
    p = subprocess.run([sys.executable, "-c", _SNIPPET, json.dumps(argvs)], cwd=files, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, COLUMNS="200"))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.splitlines()[-1])
    assert r["heavy"] == [], r["heavy"]
    for (argv, words), (rc, out, err) in zip(CASES, r["answers"]):
        check_answer(argv, rc, out, err, words)


def test_bad_bytes_in_argv_from_a_real_command_line(files):
    """Non-UTF-8 bytes as the OS passes them (surrogate-escaped by Python): one line, status 2."""
    for argv in ([b"trace", b"--shape", b"4x\xff"], [b"diagnose", b"m\xe9.keras", b"data.npz"],
                 [b"bench", b"--shapes", b"\xff\xfe"], [b"verify", b"n2h2w2c2:\xff", b"--list"]):
        p = subprocess.run([sys.executable, "-m", "refbn.cli", *argv], cwd=files, capture_output=True, timeout=120)
        err = p.stderr.decode("utf-8", "backslashreplace")
        assert p.returncode == 2 and p.stdout == b"", (argv, p.returncode, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"refbn {argv[0].decode()}: error: "), err


# -- the last line of defence ---------------------------------------------------------------
class _Boom:
    def __init__(self, exc):
        self.exc = exc

    def configure(self, p):
        pass

    def main(self, args):
        raise self.exc


def _patched(monkeypatch, exc):
    monkeypatch.setattr(cli, "_load", lambda name: _Boom(exc))


def test_an_unexpected_exception_is_one_line_status_1_with_a_hint(monkeypatch, capsys):
    monkeypatch.delenv("REFBN_DEBUG", raising=False)
    _patched(monkeypatch, RuntimeError("kaput\non two lines"))
    assert cli.main(["trace"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("refbn trace: internal error: RuntimeError: kaput on two lines") and "REFBN_DEBUG=1" in err


def test_refbn_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("REFBN_DEBUG", "1")
    _patched(monkeypatch, RuntimeError("kaput"))
    with pytest.raises(RuntimeError, match="kaput"):
        cli.main(["trace"])


def test_usage_error_and_interrupt(monkeypatch, capsys):
    _patched(monkeypatch, cli.UsageError("--thing: expected\nsomething, got nothing"))
    assert cli.main(["bench"]) == 2
    assert capsys.readouterr().err == "refbn bench: error: --thing: expected something, got nothing\n"
    _patched(monkeypatch, KeyboardInterrupt())
    assert cli.main(["demo"]) == 130
    assert capsys.readouterr().err == "refbn demo: interrupted\n"


def test_check_number_names_the_interval():
    for value, kw, text in [(float("nan"), dict(low=0), "expected a finite number >= 0, got nan"),
                            (-1, dict(low=0), "expected an int >= 0, got -1"),
                            (1.0, dict(low=0, high=1, low_open=True, high_open=True), "in (0, 1), got 1.0"),
                            (5, dict(high=3), "expected an int <= 3, got 5"),
                            (float("inf"), {}, "expected a finite number, got inf")]:
        with pytest.raises(cli.UsageError) as e:
            cli.check_number("--opt", value, **kw)
        assert str(e.value).startswith("--opt: expected ") and str(e.value).endswith(text), str(e.value)
    assert cli.check_number("--opt", 0.5, 0, 1) == 0.5


# -- after Keras has loaded: what only Keras can tell --------------------------------------
@pytest.mark.tf
@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="needs Keras")
def test_a_model_keras_cannot_load_is_one_line_status_2(files):
    """A well-formed .keras whose config names a layer class Keras does not know: load_model
    fails, and the answer is still one refbn line (the last on stderr: TensorFlow's C++ start-up
    log, printed before Python runs, may come before it), status 2, no traceback."""
    config = _config()
    config["config"]["layers"].append({"class_name": "NoSuchLayer", "config": {"name": "mystery"}})
    _keras(files / "unknown_layer.keras", config)
    try:
        p = subprocess.run([sys.executable, "-m", "refbn.cli", "diagnose", "unknown_layer.keras", "data.npz"],
                           cwd=files, capture_output=True, text=True, timeout=300)
    finally:
        (files / "unknown_layer.keras").unlink()
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2, p.stderr[-2000:]
    assert last.startswith("refbn diagnose: error: MODEL: cannot load unknown_layer.keras"), last
    assert "Traceback" not in p.stderr and p.stdout == "", p.stderr[-2000:]
