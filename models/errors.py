"""The project's user-facing error classes, and how the work stops when the user asks it to.

Every error a caller can cause (bad config, bad input, bad checkpoint, bad model file) is one of these. They
subclass the built-in ``ValueError``/``TypeError`` so plain ``except ValueError`` keeps working; the CLI maps
``ReformerError`` to exit code 2 with the message and no traceback.

Stopping: the CLI's handler for SIGINT (Ctrl-C) and SIGTERM calls ``stop``, which records the signal and raises
``Interrupted``. Whatever is being written is abandoned: temporary files are removed on the way out, and every
place that moves a finished file into place calls ``raise_if_stopped`` first -- so a library that swallows the
exception (torch's exporter retries a failed capture, for one) cannot make an interrupted run commit its output.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import threading
from collections.abc import Iterator
from typing import NoReturn


class ReformerError(Exception):
    """Base of all errors the caller can fix (exit code 2 in the CLI)."""


class ConfigError(ReformerError, ValueError):
    """An invalid or unsupported model configuration; the message names the field."""


class InputError(ReformerError, ValueError):
    """Invalid model input (ids, mask, lengths); the message names the argument and the allowed range."""


class InputTypeError(ReformerError, TypeError):
    """Model input of the wrong type or dtype."""


class CheckpointError(ReformerError, ValueError):
    """A missing, corrupt or mismatched checkpoint; the message names the file or tensor."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the work; the CLI exits with ``128 + signum`` (130 / 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: Signals received by this process, first first (appended by ``stop``).
_received: list[int] = []


def stop(signum: int, frame: object = None) -> NoReturn:
    """Signal handler: record ``signum`` and raise ``Interrupted`` (install with ``signal.signal``)."""
    _received.append(signum)
    raise Interrupted(signum)


def raise_if_stopped() -> None:
    """Raise ``Interrupted`` when a stop signal arrived earlier, even if its exception was swallowed since."""
    if _received:
        raise Interrupted(_received[0])


def stop_signal() -> int | None:
    """The first stop signal this process received, or None."""
    return _received[0] if _received else None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: SIGINT and SIGTERM call ``stop`` (SIGTERM would otherwise kill the process before any cleanup);
    signals received before or after are not remembered; the previous handlers come back after. A signal the
    process was started to ignore (a background job's SIGINT, ``nohup``) stays ignored. Only the main thread can
    set handlers: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    _received.clear()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()


_OS_ERROR_FIXES = {
    errno.ENOSPC: "free space on that file system or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EFBIG: "the file is over this process's file size limit (ulimit -f); raise it or write elsewhere",
    errno.EROFS: "write elsewhere",
    errno.EACCES: "check its permissions or write elsewhere",
    errno.EPERM: "check its permissions or write elsewhere",
    errno.ENOENT: "create the directory first or choose one that exists",
    errno.ENOTDIR: "a part of the path is a file; choose a directory",
    errno.EISDIR: "name a file instead",
}


def os_error_hint(exc: OSError) -> str:
    """'<what the OS said>; <how to fix it>' for an error reading or writing a file."""
    what = exc.strerror or type(exc).__name__
    fix = _OS_ERROR_FIXES.get(exc.errno or 0, "choose another location")
    return f"{what}; {fix}"
