"""Helpers of the Ray tests (``test_ray.py`` on one node, ``test_ray_cluster.py`` on two): a hermetic loopback
environment for a module's cluster, free loopback ports, plain HTTP/JSON requests that report
what a client would see, and ``reformer-rt serve --ray`` as a real subprocess read up to its ready line."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest


@contextlib.contextmanager
def hermetic_ray() -> Iterator[None]:
    """The environment of a module's own cluster, from before it starts until after it stops:

    * Ray's files in a private ``RAY_TMPDIR``, with the address file that ``ray start`` and ``Cluster`` write and a
      bare ``ray.init()`` joins: no one else's driver joins this cluster, and no one else's file is read;
    * a stale ``RAY_ADDRESS`` (a free port): every join here names its cluster, and one that followed the environment
      would fail;
    * addresses on loopback: Ray on Linux turns 127.0.0.1 into the machine's address when a driver joins, unless told
      that the cluster is local-only -- by the environment in the processes it starts, by the constant in this one,
      which imported Ray before;
    * no usage reports (a network call from every head)."""
    import ray._private.ray_constants

    temp = tempfile.mkdtemp(prefix="rrt-ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("RAY_TMPDIR", temp)
            env.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
            env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            env.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
            env.setenv("RAY_USAGE_STATS_ENABLED", "0")
            yield
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def raw_request(url: str, seq: np.ndarray) -> tuple[int, Any, bytes]:
    """Plain HTTP/JSON inference of ``last_logits``: (status, headers -- case-insensitive --, body)."""
    import http.client

    host, port = url.split(":")
    body = json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, len(seq)],
                                   "data": seq.tolist()}], "outputs": [{"name": "last_logits"}]})
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", "/v2/models/tiny/infer", body=body)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def call(url: str, seq: np.ndarray) -> tuple[int, Any, bytes]:
    """``raw_request``, with a failed connection -- which the client sees, and can retry -- as (0, None, message)."""
    try:
        return raw_request(url, seq)
    except OSError as exc:
        return 0, None, str(exc).encode()


def last_logits(body: bytes) -> np.ndarray:
    return np.array(json.loads(body)["outputs"][0]["data"], dtype=np.float32)


def start_serve_on_ray(*args: str, env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    """``reformer-rt serve --ray ARGS`` read up to its ready line: (the process, its log lines so far). The caller
    stops it (SIGTERM) and kills it if it did not stop."""
    command = [sys.executable, "-m", "reformer_rt.runtime.commands.cli", "serve", "--ray", *args]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("reformer-rt serve: ready"):
            break
    return process, lines
