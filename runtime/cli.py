"""``reformer-rt``: the command-line entry point.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers the command and sets
``func(args) -> int``; ``NESTED`` commands (``reformer-rt bench serve``) are recognised by their first two words.
Errors the user can fix (``ReformerError``) print one line and exit with code 2, without a traceback; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from reformer_rt.models import ReformerError

#: Modules providing ``add_parser(subparsers)``, in the order ``--help`` lists them.
COMMANDS = (
    "reformer_rt.runtime.demo",
    "reformer_rt.export.cli",
    "reformer_rt.runtime.run_cmd",
    "reformer_rt.runtime.serve_cmd",
    "reformer_rt.runtime.bench",
    "reformer_rt.runtime.build_cmd",
    "reformer_rt.runtime.doctor",
)


#: Two-word commands whose first word is also a command of its own, -> the module providing the second word.
NESTED = {("bench", "serve"): "reformer_rt.runtime.bench_serve"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reformer-rt", description="Deploy trained Reformer models: export to "
                                     "ONNX, run with TensorRT / ONNX Runtime / PyTorch, long sequences in batches.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def _nested_parser(first: str, module: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"reformer-rt {first}")
    importlib.import_module(module).add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    nested = NESTED.get(tuple(argv[:2]))
    if nested is not None:
        args = _nested_parser(argv[0], nested).parse_args(argv[1:])
        args.command = " ".join(argv[:2])
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ReformerError as exc:
        print(f"reformer-rt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reformer-rt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
