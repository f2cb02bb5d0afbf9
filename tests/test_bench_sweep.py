"""refbn bench --sweep: the size schedule, a tiny sweep end to end (validated rows, JSON, Markdown,
plot) and its bad arguments.  No timing is asserted: speed is measured by the sweep, not by tests."""
import argparse
import json
import os

import pytest

from refbn import cli
from refbn.bench import sweep

K, M = 1 << 10, 1 << 20


def test_sizes_double_from_the_smallest_to_the_largest():
    assert sweep.sizes(256 * K, 320 * M) == [256 * K << i for i in range(10)] + [320 * M]   # ..., 128M, 320M
    assert sweep.sizes(256 * K, 1 * M) == [256 * K, 512 * K, 1 * M]
    assert sweep.sizes(64 * K, 64 * K) == [64 * K]
    assert sweep.sizes(64 * K, 100 * K) == [64 * K, 100 * K]       # one doubling: kept even within 1.5x


def test_sizes_parse_in_binary_units_and_cache_multiples():
    cache = {"L2": 1 * M, "LLC": 32 * M}
    assert sweep.parse_size("--sweep-min", "262144", cache) == 256 * K
    assert sweep.parse_size("--sweep-min", "256K", cache) == 256 * K
    assert sweep.parse_size("--sweep-min", "256 KiB", cache) == 256 * K
    assert sweep.parse_size("--sweep-min", "1.5M", cache) == 3 * M // 2
    assert sweep.parse_size("--sweep-max", "10xLLC", cache) == 320 * M
    assert sweep.parse_size("--sweep-max", "0.25xL2", cache) == 256 * K


def test_shapes_keep_the_channel_count_and_the_layout():
    s = sweep.spec_for(320 * M, 256, "NHWC")
    assert (s.shape, s.data_format) == ((320 * M // 1024, 256), "NC")
    s = sweep.spec_for(256 * K, 256, "NCHW")
    assert (s.shape, s.data_format) == ((1, 256, 16, 16), "NCHW")


def test_schedule_is_warm_below_the_last_level_cache_and_cold_above():
    args = argparse.Namespace(repeats=None, warmup=None, gap_ms=None)    # none given: the sweep's defaults
    llc = 32 * M
    state, repeats, warmup, calls, gap = sweep.schedule(256 * K, llc, args)
    assert (state, repeats, warmup, gap) == ("warm", 9, 2, 2.0) and calls == sweep.MAX_CALLS
    assert sweep.schedule(2 * llc, llc, args) == ("cold", 5, 1, 1, 0.0)
    assert sweep.schedule(10 * llc, llc, args) == ("cold", 3, 1, 1, 0.0)
    assert sweep.schedule(256 * K, llc, args, cache="cold")[0] == "cold"
    args.repeats = 4
    assert sweep.schedule(10 * llc, llc, args)[1] == 4


def test_tiny_sweep_validates_every_timed_contender_and_writes_its_outputs(tmp_path, capsys):
    out, md, png = tmp_path / "s.json", tmp_path / "s.md", tmp_path / "s.png"
    rc = cli.main(["bench", "--sweep", "--sweep-channels", "16", "--sweep-min", "64K", "--sweep-max", "128K",
                   "--sweep-threads", "1,all", "--ops", "train,bwd", "--contenders", "numba", "--repeats", "1",
                   "--warmup", "0", "--json", str(out), "--markdown", str(md), "--plot", str(png)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    threads = list(dict.fromkeys([1, os.cpu_count() or 1]))
    assert res["config"]["threads"] == threads
    recs = res["records"]
    assert {(r["x_bytes"], r["threads"], r["op"]) for r in recs} == \
        {(x, k, op) for x in (64 * K, 128 * K) for k in threads for op in ("train", "bwd")}
    for r in recs:
        assert r["cache"] == "warm" and r["layout"] == "NHWC" and r["shape"] in ("n1024c16", "n2048c16")
        nb = r["contenders"]["numba"]
        assert nb["refused"] is None and nb["checks"] and all(k["passed"] for k in nb["checks"])
        assert len(nb["times_ms"]) == 1 and nb["gbps"] > 0
        floors = [n for n, c in r["contenders"].items() if c["family"] == "floor"]
        assert floors and all(len(r["contenders"][n]["times_ms"]) == 1 for n in floors)
        assert r["floor_ms"] > 0 and r["floor_gbps"] > 0
        assert set(r["floor_parts"]) == ({"read", "copy"} if r["op"] == "train" else {"add"})
    v = res["validations"]
    assert v["full"] + v["reused"] == len(recs)       # one validation (full or bitwise reused) per timed numba
    text = md.read_text()
    assert "| x | shape | cache | rounds | numba 1t |" in text and "| 64 KiB | n1024c16 | warm | 1 |" in text
    assert png.stat().st_size > 10_000
    shown = capsys.readouterr().out
    assert "train, NHWC C=16: GB/s" in shown and "bwd, NHWC C=16: GB/s" in shown


SWEEP = ["bench", "--sweep"]


@pytest.mark.parametrize("argv, expected", [
    (SWEEP + ["--sweep-min=-5"], ["--sweep-min", "expected a size of x in bytes", "'-5'"]),
    (SWEEP + ["--sweep-min", "0"], ["--sweep-min", "at least 1 byte", "'0'"]),
    (SWEEP + ["--sweep-min", "lots"], ["--sweep-min", "expected a size", "'lots'"]),
    (SWEEP + ["--sweep-max", "10xL4"], ["--sweep-max", "expected a size", "'10xL4'"]),
    (SWEEP + ["--sweep-min", "2M", "--sweep-max", "1M"], ["--sweep-min", "2 MiB is above --sweep-max 1 MiB"]),
    (SWEEP + ["--sweep-max", "1T"], ["--sweep-max", "needs"]),
    (SWEEP + ["--sweep-layouts", "NCHW", "--sweep-min", "64K"], ["--sweep-min", "NCHW x with 256 channels",
                                                                 "262144 bytes"]),
    (SWEEP + ["--sweep-layouts", "NWHC"], ["--sweep-layouts", "subset of NHWC, NCHW", "'NWHC'"]),
    (SWEEP + ["--sweep-channels", "0"], ["--sweep-channels", "expected an int >= 1", "0"]),
    (SWEEP + ["--sweep-threads", "0"], ["--sweep-threads", "expected an int in [1,"]),
    (SWEEP + ["--sweep-threads", "one"], ["--sweep-threads", "thread counts", "'one'"]),
    (SWEEP + ["--sweep-threads", ","], ["--sweep-threads", "thread counts"]),
    (SWEEP + ["--contenders", "tf"], ["--contenders (with --sweep)", "numpy, numba, torch", "'tf'"]),
    (SWEEP + ["--shapes", "smoke"], ["--shapes", "not with --sweep"]),
    (SWEEP + ["--threads", "2"], ["--threads", "--sweep-threads"]),
    (SWEEP + ["--dtypes", "bfloat16"], ["--dtypes", "float32 only"]),
    (SWEEP + ["--jit"], ["--jit", "not with --sweep"]),
    (SWEEP + ["--repeats", "0"], ["--repeats", "expected an int >= 1"]),
    (SWEEP + ["--plot", "s.txt"], ["--plot", "ending in"]),
    (["bench", "--sweep-min", "1M"], ["--sweep-min", "only with --sweep", "'1M'"]),
    (["bench", "--shapes", "smoke", "--cache", "auto"], ["--cache", "auto", "for --sweep"]),
])
def test_bad_sweep_arguments_get_one_line_naming_the_argument(argv, expected, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("refbn bench: error: " + expected[0]), err
    for part in expected:
        assert part in err, (part, err)
