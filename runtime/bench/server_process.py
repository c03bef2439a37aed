"""``reformer-rt serve`` as a child process: started with ports the OS picks (``--http-port 0`` ...), read back from
its startup log, ready when it says so, stopped with SIGTERM (its drain) and killed only if that hangs.

    with ServeProcess(["demo=models/demo", "--backend", "onnxruntime"]) as server:
        client = tritonclient.http.InferenceServerClient(server.http)

Used by ``reformer-rt bench serve`` and the tests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from reformer_rt.models import ReformerError

_PORT_LINE = re.compile(r"(HTTP/REST|gRPC|metrics) .*? on (?:\w+://)?[\d.]+:(\d+)")
_KIND = {"HTTP/REST": "http", "gRPC": "grpc", "metrics": "metrics"}
READY_LINE = "reformer-rt serve: ready"


class ServeProcess:
    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, start_timeout_s: float = 600.0) -> None:
        command = [sys.executable, "-m", "reformer_rt.runtime.commands.cli", "serve", "--http-port", "0",
                   "--grpc-port", "0", "--metrics-port", "0", *args]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                        env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}
        ready = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(ready,), daemon=True)
        self._reader.start()
        if not ready.wait(start_timeout_s) or self.process.poll() is not None:
            self.stop()
            raise ReformerError("reformer-rt serve did not become ready:\n" + self.log)

    def _read(self, ready: threading.Event) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            match = _PORT_LINE.search(line)
            if match:
                self.ports[_KIND[match.group(1)]] = int(match.group(2))
            if line.startswith(READY_LINE):
                ready.set()
        ready.set()  # the process ended: let the constructor see it

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> None:
        self.terminate()
        try:
            self.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.wait(10)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
