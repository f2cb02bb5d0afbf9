"""The ``refbn`` command line.

Each subcommand lives in its own module with ``configure(parser)`` and
``main(args) -> exit code``; only the chosen subcommand's module is loaded
(``refbn --help`` lists them all from SUBCOMMANDS without loading any), so
``refbn trace`` never imports TensorFlow.  No subcommand module imports
TensorFlow, Keras, torch or jax at import or ``configure`` time: those load in
``main(args)``, after the arguments and input files are checked, so ``--help``
and usage errors are answered at once.

Exit status: 0 on success; 1 when the subcommand found a problem (a FAILed
check, an unhealthy model); 2 for a usage error: a bad option, argument,
number or file, answered by one line ``refbn NAME: error: ...`` on stderr
that names the argument, what was expected and what was got (argparse's
errors too: no usage block), or a bare ``refbn`` (the help, on stderr).
``refbn --help`` and ``refbn NAME --help`` print to stdout and exit 0.
A subcommand reports a bad input by returning 2 after its one line, or by
raising :class:`UsageError`.  Anything else that escapes a subcommand is a
bug: one line ``refbn NAME: internal error: ...`` and exit status 1
(``REFBN_DEBUG=1`` shows the traceback); Ctrl-C gives ``refbn NAME:
interrupted`` and 130.

The checks the subcommands share (output paths, finite numbers in a range,
the memory a size needs) are here, importing nothing heavy.
"""
import argparse
import importlib
import math
import os
import sys

SUBCOMMANDS = {
    "trace": ("refbn.trace_cli", "walk through one BatchNorm call and its moving-average updates"),
    "verify": ("refbn.compare.cli", "check refbn against TensorFlow's fused kernels and Keras"),
    "bench": ("refbn.bench.cli", "time the kernels against TF and the memory-bandwidth floor"),
    "demo": ("refbn.keras.demo", "reproduce the 100%-train / 33%-predict failure and fix it"),
    "diagnose": ("refbn.keras.diagnose_cli", "report stale BatchNorm statistics in a Keras model"),
    "explain": ("refbn.explain_cli", "split TF's batch_variance error into its float32 steps"),
}


class UsageError(ValueError):
    """A bad argument or input file: ``refbn NAME: error: MESSAGE`` on stderr, exit status 2."""


def one_line(text, limit=500):
    """``text`` on one line (whitespace runs, newlines included, become one space), cut at ``limit``."""
    s = " ".join(str(text).split())
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")   # undecodable argv bytes as \udcff
    return s if len(s) <= limit else s[:limit - 3] + "..."


def fail(name, message):
    """Print ``refbn NAME: error: MESSAGE`` (one line) on stderr; returns 2, the usage-error status."""
    print(f"refbn {name}: error: {one_line(message)}", file=sys.stderr)
    return 2


def check_number(option, value, low=None, high=None, low_open=False, high_open=False):
    """``value`` unchanged if it is a finite number in the interval, else UsageError naming ``option``."""
    def text(v):
        return str(v) if isinstance(v, int) else f"{v:g}"
    lo = "" if low is None else ("(" if low_open else "[") + text(low)
    hi = "" if high is None else text(high) + (")" if high_open else "]")
    where = f" in {lo}, {hi}" if lo and hi else f" > {text(low)}" if lo and low_open else \
        f" >= {text(low)}" if lo else f" < {text(high)}" if hi and high_open else f" <= {text(high)}" if hi else ""
    ok = isinstance(value, (int, float)) and math.isfinite(value) \
        and (low is None or (value > low if low_open else value >= low)) \
        and (high is None or (value < high if high_open else value <= high))
    if not ok:
        kind = "an int" if isinstance(value, int) else "a finite number"
        raise UsageError(f"{option}: expected {kind}{where}, got {value!r}")
    return value


def check_output(option, path, suffixes=None, stdout_ok=False):
    """UsageError unless ``path`` (None: not asked for; ``-``: stdout, where ``stdout_ok``) names a
    file that can be written: not empty, not a folder, in an existing folder, ending in one of
    ``suffixes`` (without dots) if given.  Checked before any work, so that a run never ends on
    a file it cannot write."""
    if path is None or (path == "-" and stdout_ok):
        return
    if path == "-":
        raise UsageError(f"{option}: expected a file name, got '-' (this option does not write to stdout)")
    if not path.strip():
        raise UsageError(f"{option}: expected a file name, got {path!r}")
    if os.path.isdir(path):
        raise UsageError(f"{option}: expected a file name, got the folder {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option}: no such folder: {folder!r} (for {path!r})")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option}: cannot write in the folder {folder!r}")
    if suffixes:
        ext = os.path.splitext(path)[1].lstrip(".").lower()
        if ext not in suffixes:
            raise UsageError(f"{option}: expected a file name ending in "
                             f"{', '.join('.' + s for s in suffixes)}, got {path!r}")


def check_plot(option, path):
    """check_output for a matplotlib figure: matplotlib installed and a format it writes."""
    if path is None:
        return
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"{option}: needs matplotlib, which is not installed (pip install 'refbn[plot]')")
    from matplotlib.backend_bases import FigureCanvasBase   # matplotlib's core only, no pyplot
    check_output(option, path, sorted(FigureCanvasBase.get_supported_filetypes()))


def physical_memory():
    """Bytes of RAM on this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(option, what, nbytes):
    """UsageError when ``nbytes`` (a lower bound of what ``what`` needs) exceeds this machine's RAM."""
    total = physical_memory()
    if total and nbytes > total:
        raise UsageError(f"{option}: {what} needs at least {_size(nbytes)} of memory; this machine has "
                         f"{_size(total)}")


def _size(n):
    for unit, k in (("EiB", 2 ** 60), ("PiB", 2 ** 50), ("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= k:
            return f"{n / k:.3g} {unit}" if n < 2 ** 70 else f"{n:.3g} bytes"
    return f"{n} bytes"


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line ``PROG: error: MESSAGE`` (no usage block)."""

    def error(self, message):
        hint = ""
        if message.endswith("expected one argument"):
            hint = (" (a value that starts with '-' must be attached with '=', e.g. --std=-1; "
                    f"{self.prog} --help lists the options)")
        elif "invalid choice" not in message:
            hint = f" ({self.prog} --help lists the options)"
        self.exit(2, f"{self.prog}: error: {one_line(message)}{hint}\n")


def _load(name):
    try:
        return importlib.import_module(SUBCOMMANDS[name][0])
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("refbn"):
            return None
        raise


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(prog="refbn", description="Batch Normalization, shown and verified.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    chosen = parser
    for name, (_, help_) in SUBCOMMANDS.items():
        # argparse %-formats help strings (description only for %(prog)): escape '%'
        p = sub.add_parser(name, help=help_.replace("%", "%%"), description=help_)
        if name == wanted:
            module = _load(name)
            if module is None:
                return fail(name, f"'refbn {name}' is not available in this install")
            module.configure(p)
            p.set_defaults(_module=module)
            chosen = p
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            chosen.error(f"unrecognized arguments: {' '.join(map(repr, extra))}")
    except SystemExit as e:          # --help (0), or a usage error already printed (2)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    return _run(args.command, args)


def _run(name, args):
    """The subcommand's exit code; its uncaught exceptions as one line each (see the docstring)."""
    try:
        return int(args._module.main(args) or 0)
    except UsageError as e:
        return fail(name, e)
    except KeyboardInterrupt:
        print(f"refbn {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:          # e.g. refbn verify --list | head: the reader left
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception as e:  # noqa: BLE001 - the last line of defence, see the docstring
        if os.environ.get("REFBN_DEBUG"):
            raise
        print(f"refbn {name}: internal error: {type(e).__name__}: {one_line(e, 300)} (a bug, or an input "
              "refbn does not check yet: please report it; REFBN_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":   # python -m refbn.cli: run the importable module, whose UsageError
    from refbn import cli     # the subcommands raise (this file, run as __main__, is a copy)
    sys.exit(cli.main())
