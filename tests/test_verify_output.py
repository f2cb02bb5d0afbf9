"""``refbn verify``'s report survives an 80-column terminal and a log file.

The report is rendered from real results (one TF run of a few small cases)
into an 80-column console in every format: every check keeps its verdict,
worst output and that output's errors, detail tables name their TF kernel and
refbn backend, kernel names in brackets are not eaten as rich markup, and the
last line says OK: or FAIL:.  The CLI tests replay the same results through
``refbn.cli.main`` (TensorFlow is not started again).
"""
import copy
import io
import json
import re

import pytest
from rich.cells import cell_len
from rich.console import Console

from refbn import cli
from refbn.compare import cli as verify_cli
from refbn.compare import report, runner

pytestmark = pytest.mark.tf

WIDTH = 80
CASES = ("n1h1w6c1:f32:NHWC:train",                            # an op case under both kernels
         "n1h1w6c1:f16:NHWC:infer",                            # float16: asked for oneDNN, TF runs Eigen
         "n0h7w11c4:f32:NHWC:train",                           # N == 0: a divergence, nothing compared
         "n16h4w4c8:f32:NHWC:tf_fused:mean3:std2:k20:mom0.9")  # the longest descriptor; a fact
FORMATS = ("table", "plain", "markdown")


@pytest.fixture(scope="module")
def results():
    res = list(runner.verify(CASES, backend="numpy", kernels=runner.KERNELS))
    assert {r.verdict for r in res} <= {"exact", "close", "divergence"}, [r.failures for r in res]
    return res


def render(results, fmt, detail=False):
    con = Console(width=WIDTH, record=True, file=io.StringIO(), highlight=False, emoji=False)
    report.print_report(con, results, detail=detail, fmt=fmt)
    return con.export_text(styles=False).splitlines()


def expected(r):
    """What every format must show for a check, straight from the result object."""
    w = r.worst("refbn_vs_tf")
    if w is None:
        return {"verdict": r.verdict, "worst": "-", "refbn_tf": "-", "tf_truth": "-", "refbn_truth": "-"}
    wt, wr = r.worst("tf_vs_truth"), r.worst("refbn_vs_truth")
    return {"verdict": r.verdict, "worst": w.output, "refbn_tf": report.ratio_text(w.refbn_vs_tf),
            "tf_truth": f"{report.fmt_eps(wt.tf_vs_truth.max_ulps)}({wt.output})",
            "refbn_truth": report.fmt_eps(wr.refbn_vs_truth.max_ulps), "closer": w.closer}


def last_line(lines):
    return [ln for ln in lines if ln.strip()][-1]


def assert_fits(lines):
    """Nothing is cut with an ellipsis and every line fits, except the final line and repro
    commands, which stay whole on one line by design."""
    assert "…" not in "\n".join(lines)
    long = [ln for ln in lines[:-1] if cell_len(ln.rstrip()) > WIDTH and "repro: " not in ln]
    assert not long, long


def normalized(lines):
    return " ".join(" ".join(lines).split())


def test_fixture_covers_what_the_layout_has_to_survive(results):
    assert any(r.kernel_used != r.kernel for r in results)  # the widest kernel label
    assert any(r.verdict == "divergence" and not r.outputs for r in results)
    assert any(r.facts for r in results)
    assert max(len(r.descriptor) for r in results) > WIDTH // 2


def test_table_at_80_columns_keeps_verdict_worst_output_and_refbn_tf_eps(results):
    lines = render(results, "table")
    assert_fits(lines)
    rule = next(i for i, ln in enumerate(lines) if ln.startswith("━"))
    header = normalized(lines[:rule])
    for name in ("case", "kernel", "verdict", "worst output", "refbn↔TF"):
        assert name in header
    # every row's first line holds the start of its case, its kernel, verdict, worst output and
    # refbn↔TF eps/allowed (cells that wrap continue below); rows are in result order
    i = rule + 1
    for r in results:
        e = expected(r)
        first_piece = r.descriptor.split(":")[0] + ":"
        while i < len(lines):
            ln = lines[i]
            i += 1
            if (ln.startswith(first_piece) and r.kernel in ln and re.search(rf"\b{e['verdict']}\b", ln)
                    and f" {e['worst']} " in ln and ln.rstrip().endswith(e["refbn_tf"])):
                break
        else:
            pytest.fail(f"no table row for {r.descriptor} [{r.kernel}] with {e}:\n" + "\n".join(lines))
    # what does not fit is named, not silently dropped
    assert "not shown at this width: TF↔truth eps" in normalized(lines)


def _plain_records(lines):
    """{first line: fields} for the records of the first plain table (records continue on
    lines indented by 4 spaces)."""
    records, cur = [], None
    for ln in lines[1:]:
        if not ln.strip():
            break
        if ln.startswith("    ") and cur is not None:
            cur += ln.split()
        else:
            cur = ln.split()
            records.append(cur)
    return records


def test_plain_is_one_record_per_check_with_every_field(results):
    lines = render(results, "plain")
    assert_fits(lines)
    start = next(i for i, ln in enumerate(lines) if ln.startswith(report.TITLE))
    header, *records = _plain_records(lines[start:])
    assert header[:8] == ["case", "kernel", "verdict", "worst", "refbn~TF", "TF~truth", "refbn~truth", "closer"]
    assert len(records) == len(results)
    for r, f in zip(results, records):
        e = expected(r)
        # the fields, in their fixed places (notes, free text, follow them)
        assert f[0] == r.descriptor and f[1].startswith(r.kernel) and f[1].endswith(r.kernel_used)
        assert f[2:8] == [e["verdict"], e["worst"], e["refbn_tf"], e["tf_truth"], e["refbn_truth"],
                          e.get("closer", "-")], (f, e)


def test_markdown_table_has_every_field(results):
    lines = render(results, "markdown")
    rows = [ln for ln in lines if ln.startswith("| ")]
    head = rows.index(next(ln for ln in rows if ln.startswith("| case |")))
    body = rows[head + 1:head + 1 + len(results)]
    for r, row in zip(results, body):
        e = expected(r)
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[0] == r.descriptor and cells[1].startswith(r.kernel)
        assert cells[2:6] == [e["verdict"], e["worst"], e["refbn_tf"], e["tf_truth"].replace("(", " (")]
        assert cells[6] == e["refbn_truth"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_detail_tables_name_their_kernel_and_backend(results, fmt):
    lines = render(results, fmt, detail=True)
    if fmt != "markdown":
        assert_fits(lines)
    text = normalized(lines)
    for r in results:
        if not r.outputs:
            continue
        asked = f" (asked for {r.kernel})" if r.kernel_used != r.kernel else ""
        title = f"{r.descriptor} TF kernel {r.kernel_used}{asked}, refbn backend {r.backend}: {r.verdict}"
        assert title in text, title
    # the two kernels' tables of one case are told apart
    d = CASES[0]
    assert f"{d} TF kernel onednn," in text and f"{d} TF kernel eigen," in text


@pytest.mark.parametrize("fmt", FORMATS)
def test_bracketed_kernels_are_not_eaten_as_markup(results, fmt):
    text = normalized(render(results, fmt))
    facts = [r for r in results if r.facts]
    for r in facts:
        assert f"{r.descriptor} [{r.kernel_used}]: " in text


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_clean_run_ends_with_an_ok_line(results, fmt):
    lines = render(results, fmt)
    last = last_line(lines)
    n_div = sum(r.verdict == "divergence" for r in results)
    assert last.startswith(f"OK: {len(results)} checks, refbn within tolerance everywhere")
    assert f"{n_div} documented divergence" in last and "refbn verify --divergences" in last
    assert last == report.final_line(results)


def _with_failure(results):
    res = copy.deepcopy(results)
    bad = res[1]  # n1h1w6c1:f32:NHWC:train under Eigen
    bad.verdict = "FAIL"
    bad.failures.append("test: this check was marked failed")
    return res, bad


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_failure_ends_with_a_fail_line_and_its_repro(results, fmt):
    res, bad = _with_failure(results)
    lines = render(res, fmt)
    assert last_line(lines).startswith(f"FAIL: 1 of {len(res)} checks failed")
    text = "\n".join(lines)
    assert f"FAIL {bad.descriptor} [{bad.kernel_used}]" in text
    assert "test: this check was marked failed" in text
    assert bad.repro() in text


def test_unsupported_checks_are_counted_in_the_final_line(results):
    res = copy.deepcopy(results)
    u = res[0]
    u.verdict, u.outputs, u.notes = "unsupported", [], ["torch parity not run: torch is not installed"]
    assert "1 unsupported here, not compared (torch parity not run" in report.final_line(res)
    res, _ = _with_failure(res)
    line = report.final_line(res)
    assert line.startswith("FAIL: 1 of") and "1 unsupported here" in line


# -- through the CLI, replaying the fixture's results -------------------------------------------
@pytest.fixture
def replay(results, monkeypatch):
    """refbn verify with the fixture's results instead of a TF run; returns a runner of cli.main."""
    monkeypatch.setenv("COLUMNS", str(WIDTH))

    def run(res, *args):
        def fake_verify(cases, backend="numpy", kernels=runner.KERNELS, on_start=None, **kw):
            if on_start:
                on_start({k: {"tf_version": "replayed"} for k in kernels})
            yield from res
        monkeypatch.setattr(verify_cli, "verify", fake_verify)
        return cli.main(["verify", *CASES, *args])
    return run


def test_cli_defaults_to_plain_when_piped_and_ends_with_ok(results, replay, capsys):
    assert replay(results) == 0
    lines = capsys.readouterr().out.splitlines()
    assert_fits(lines)
    assert any(ln.startswith(f"{CASES[0]} ") for ln in lines)  # a plain record, not a rich row
    assert last_line(lines).startswith("OK: ")


def test_cli_table_at_80_columns_with_detail(results, replay, capsys, tmp_path):
    out = tmp_path / "v.json"
    assert replay(results, "--format", "table", "--detail", "--json", str(out)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert_fits(lines)
    text = normalized(lines)
    assert f"{CASES[0]} TF kernel onednn," in text and f"metrics written to {out}" in text
    assert last_line(lines).startswith("OK: ")
    assert len(json.loads(out.read_text())["results"]) == len(results)


def test_cli_json_on_stdout_is_the_json_file_payload(results, replay, capsys, tmp_path):
    out = tmp_path / "v.json"
    assert replay(results, "--format", "json", "--json", str(out)) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out) == json.loads(out.read_text())  # stdout holds nothing else
    assert json.loads(cap.out)["final"].startswith("OK: ")
    assert last_line(cap.err.splitlines()).startswith("OK: ")


def test_cli_failure_exits_1_with_a_fail_line(results, replay, capsys):
    res, bad = _with_failure(results)
    assert replay(res, "--format", "plain") == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"  repro: {bad.repro()}" in lines
    assert last_line(lines).startswith(f"FAIL: 1 of {len(res)} checks failed (see the repro lines above)")
