"""The runtime's rooms stay apart: the engine (``reformer_rt.runtime``: Session, backends, batching, generation)
imports no server, Ray, benchmark or command module, so embedding the runtime in a pipeline pulls in none of them;
the development tools under ``tools/`` are not part of the installed package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APART = ("reformer_rt.runtime.serving", "reformer_rt.runtime.bench", "reformer_rt.runtime.commands", "ray",
         "aiohttp", "grpc", "tritonclient", "prometheus_client", "matplotlib")


@pytest.mark.parametrize("statement", ["import reformer_rt.runtime",
                                       "from reformer_rt.runtime import GenerationOptions, Session"])
def test_the_engine_imports_no_serving_ray_bench_or_command_module(statement: str) -> None:
    code = (f"import sys\n{statement}\n"
            f"print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in {APART!r} or "
            f"any(m == a or m.startswith(a + '.') for a in {APART!r}))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"{statement} imported: {result.stdout.split()}"


def test_tools_are_not_packaged() -> None:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert "tools" not in text.split("[tool.setuptools.package-dir]")[1].split("[")[0]
    assert (REPO / "tools" / "gpu_check.py").is_file() and not (REPO / "tools" / "__init__.py").exists()
