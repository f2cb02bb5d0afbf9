"""The ``refbn`` command line.

Each subcommand lives in its own module with ``configure(parser)`` and
``main(args) -> exit code``; only the chosen subcommand's module is loaded
(``refbn --help`` lists them all from SUBCOMMANDS without loading any), so
``refbn trace`` never imports TensorFlow.  No subcommand module imports
TensorFlow, Keras, torch or jax at import or ``configure`` time: those load in
``main(args)``, after the arguments and input files are checked, so ``--help``
and usage errors are answered at once.

Exit status: 0 on success; 1 when the subcommand found a problem (a FAILed
check, an unhealthy model); 2 for a usage error -- argparse's (usage and the
error on stderr), a subcommand's bad argument or missing file (``refbn NAME:
error: ...`` on stderr), or a bare ``refbn`` (the help, on stderr).
``refbn --help`` and ``refbn NAME --help`` print to stdout and exit 0.
"""
import argparse
import importlib
import sys

SUBCOMMANDS = {
    "trace": ("refbn.trace_cli", "walk through one BatchNorm call and its moving-average updates"),
    "verify": ("refbn.compare.cli", "check refbn against TensorFlow's fused kernels and Keras"),
    "bench": ("refbn.bench.cli", "time the kernels against TF and the memory-bandwidth floor"),
    "demo": ("refbn.keras.demo", "reproduce the 100%-train / 33%-predict failure and fix it"),
    "diagnose": ("refbn.keras.diagnose_cli", "report stale BatchNorm statistics in a Keras model"),
}


def _load(name):
    try:
        return importlib.import_module(SUBCOMMANDS[name][0])
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("refbn"):
            return None
        raise


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="refbn", description="Batch Normalization, shown and verified.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    for name, (_, help_) in SUBCOMMANDS.items():
        # argparse %-formats help strings (description only for %(prog)): escape '%'
        p = sub.add_parser(name, help=help_.replace("%", "%%"), description=help_)
        if name == wanted:
            module = _load(name)
            if module is None:
                parser.error(f"'refbn {name}' is not available in this install")
            module.configure(p)
            p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    return int(args._module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
