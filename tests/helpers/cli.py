"""``reformer-rt`` in the tests, two ways with one result type (``subprocess.CompletedProcess``):

* ``real_process(*args)``: a new interpreter, as a user runs it -- seconds each (importing torch alone), so at least
  one per command contract (its exit status, one error line, no traceback) and no more;
* ``in_process(argv, capsys)``: ``cli.main`` in the test's own process -- milliseconds, for the many cases of a
  contract once a real process has shown it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from reformer_rt.runtime.commands import cli


def real_process(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed ``reformer-rt`` script (``python -m`` where it is not on PATH); ``env`` adds to the current
    environment."""
    exe = shutil.which("reformer-rt")
    command = [exe] if exe else [sys.executable, "-m", "reformer_rt.runtime.commands.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)


def in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess:
    """``cli.main(argv)`` with its exit status (argparse's usage errors exit 2 through ``SystemExit``) and what it
    printed."""
    capsys.readouterr()  # what the test printed before is not the command's
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = int(exc.code)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def one_error_line(command: str, err: str) -> str:
    """The error line of a failed command: the last line, ``reformer-rt COMMAND: error: ...``, the only one that
    mentions an error (argparse's usage line aside), and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"reformer-rt {command}: error: "), err
    assert sum("error" in line for line in lines if not line.startswith("usage:")) == 1, err
    return lines[-1]
