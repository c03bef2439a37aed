"""Every kernel specialization the launchers can choose compiles for sm_80 and sm_90, here, without a GPU.

``python -m reformer_rt.plugins.compile_check`` runs in a subprocess with ``TRITON_INTERPRET`` removed (this test
session may have switched the interpreter on, which turns ``@triton.jit`` kernels into interpreted functions that
cannot be compiled) and an empty Triton cache, so every compile really runs: about two minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

MODULE = "reformer_rt.plugins.compile_check"


def _run(env: dict[str, str], *args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", MODULE, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.slow
def test_every_specialization_compiles_for_sm80_and_sm90(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    result = _run(env, "--arch", "80", "90", "--json", str(tmp_path / "compile.json"), timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    results = json.loads((tmp_path / "compile.json").read_text())["results"]
    names = {r["name"] for r in results}
    assert {r["arch"] for r in results} == {80, 90} and len(results) == 2 * len(names)
    assert all(r["ok"] and r["error"] is None and r["shared_bytes"] is not None for r in results)
    words = [name.split() for name in names]
    assert {w[0] for w in words} == {"hash", "attend", "combine"} and {w[1] for w in words} == {"fp32", "fp16"}
    attend = [w for w in words if w[0] == "attend"]
    assert {w[2] for w in attend} == {"D16", "D32", "D64", "D128"}
    assert any(w[-1] == "sorted" for w in attend) and any(w[-1] != "sorted" for w in attend)
    assert result.stdout.rstrip().splitlines()[-1].startswith(f"compile_check: {len(results)} of {len(results)}")


def test_under_the_interpreter_it_refuses_with_the_fix() -> None:
    result = _run({**os.environ, "TRITON_INTERPRET": "1"}, timeout=120)
    assert result.returncode == 2 and "TRITON_INTERPRET unset" in result.stderr
