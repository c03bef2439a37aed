"""``reformer-rt``: the command-line entry point.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers the command and sets
``func(args) -> int``; ``NESTED`` commands (``reformer-rt bench serve``) are recognised by their first two words.

Exit codes: 0 done; 2 an error the user can fix -- a ``ReformerError``, a bad argument, or the machine refusing a
file (disk full, read-only, no permission) -- printed as one line ``reformer-rt CMD: error: ...`` without a
traceback; 1 anything else, which is a bug and keeps its traceback; 130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM,
printed as ``reformer-rt CMD: interrupted``; 141 (quietly) when the reader of stdout went away, as for SIGPIPE.
Whatever a stopped or failed command was writing is left as it was (see ``runtime/artifacts.py`` and
``models/errors.py``).

``REFORMER_RT_KERNELS=triton|reference`` is read here, once: every command runs inside ``forced_kernels`` with
its value (``models/lsh_op.py``).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys

#: Modules providing ``add_parser(subparsers)``, in the order ``--help`` lists them.
COMMANDS = (
    "reformer_rt.runtime.commands.demo",
    "reformer_rt.runtime.commands.export",
    "reformer_rt.runtime.commands.run",
    "reformer_rt.runtime.commands.score",
    "reformer_rt.runtime.commands.generate",
    "reformer_rt.runtime.commands.serve",
    "reformer_rt.runtime.bench.forward",
    "reformer_rt.runtime.commands.build",
    "reformer_rt.runtime.commands.doctor",
)


#: Two-word commands whose first word is also a command of its own, -> the module providing the second word.
NESTED = {("bench", "serve"): "reformer_rt.runtime.bench.serve",
          ("bench", "generate"): "reformer_rt.runtime.bench.generate",
          ("bench", "accuracy"): "reformer_rt.runtime.bench.accuracy"}
#: OS errors that are the machine's answer, not a bug: reported like a ``ReformerError`` wherever they surface.
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


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


def _parse(argv: list[str]) -> argparse.Namespace:
    """The parsed arguments; a usage error exits 2 naming the command (``reformer-rt run: error: ...``)."""
    nested = NESTED.get(tuple(argv[:2]))
    if nested is not None:
        args = _nested_parser(argv[0], nested).parse_args(argv[1:])
        args.command = " ".join(argv[:2])
        return args
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _fail(command: str, message: str) -> int:
    print(f"reformer-rt {command}: error: {message}", file=sys.stderr)
    return 2


def _interrupted(command: str, signum: int) -> int:
    print(f"reformer-rt {command}: interrupted ({signal.Signals(signum).name}); nothing was left half-written",
          file=sys.stderr)
    return 128 + signum


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else ""
    try:  # the first imports load torch (seconds): Ctrl-C there is an interrupt too, not a traceback
        from reformer_rt.models import ReformerError
        from reformer_rt.models.errors import os_error_hint, stop_on_signals, stop_signal
        from reformer_rt.models.lsh_op import KERNELS_ENV, forced_kernels, parse_kernels
    except KeyboardInterrupt:
        return _interrupted(command, signal.SIGINT)
    with stop_on_signals():
        try:
            args = _parse(argv)  # imports every command's module: signals are handled from here on
            command = args.command
            with forced_kernels(parse_kernels(os.environ.get(KERNELS_ENV))):
                code = int(args.func(args) or 0)
        except KeyboardInterrupt as exc:
            return _interrupted(command, getattr(exc, "signum", signal.SIGINT))
        except BrokenPipeError:  # the reader of stdout went away (| head): stop quietly, as SIGPIPE would
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        except Exception as exc:
            if stop_signal() is not None:  # a library turned the interrupt into an error of its own
                return _interrupted(command, stop_signal())
            if isinstance(exc, ReformerError):
                return _fail(command, str(exc))
            if isinstance(exc, OSError) and exc.errno in USER_ERRNOS:
                where = f"{exc.filename}: " if exc.filename else ""
                return _fail(command, f"{where}{os_error_hint(exc)}")
            raise
        if stop_signal() is not None:  # the interrupt was swallowed, but the user asked to stop
            return _interrupted(command, stop_signal())
        return code


if __name__ == "__main__":
    sys.exit(main())
