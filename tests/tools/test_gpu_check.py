"""``make gpu-check`` where there is no GPU (this CI): it says so and exits 2 within seconds; its machinery -- the
import path, per-step timeouts, verdicts, summary -- works. (The check itself runs on a GPU machine.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
import gpu_check  # noqa: E402  (a tool of the repository, not of the package)

REPO = gpu_check.REPO
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the no-GPU exit is moot")


@needs_no_gpu
def test_without_a_gpu_it_says_so_and_exits_2_quickly(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path / "gc")], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "no CUDA GPU" in result.stderr and "Nothing was run" in result.stderr
    assert time.monotonic() - started < 30 and not (tmp_path / "gc").exists()


@needs_no_gpu
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_target_reports_the_same(tmp_path: Path) -> None:
    result = subprocess.run(["make", "-s", "gpu-check", f"OUT={tmp_path / 'gc'}", f"GPU_PYTHON={sys.executable}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0 and "no CUDA GPU" in result.stderr


def test_import_path_makes_reformer_rt_this_checkout() -> None:
    root = gpu_check.import_path()
    links = {p.name: p.resolve() for p in (root / "reformer_rt").iterdir()}
    assert links == {name: REPO / name for name in ("export", "models", "plugins", "runtime")}
    code = "import reformer_rt.models.demo, reformer_rt.runtime.commands.cli as c; print(c.__file__)"
    result = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(root), "PATH": ""}, cwd="/",
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(root / "reformer_rt" / "runtime" / "commands" / "cli.py")


def _step(name: str, code: str, timeout_s: int = 60) -> gpu_check.Step:
    return gpu_check.Step(name, [sys.executable, "-c", code], timeout_s, 1, gpu_check._judge_by_exit("done"))


def test_a_hung_step_is_killed_at_its_timeout(tmp_path: Path) -> None:
    log = (tmp_path / "log").open("w")
    started = time.monotonic()
    hung = gpu_check.run_step(_step("hang", "import time; print('start', flush=True); time.sleep(60)"), 2.0, {},
                              log, tmp_path)
    assert hung.status == "TIMED OUT" and time.monotonic() - started < 20
    ok = gpu_check.run_step(_step("fine", "print('done: 3 of 3')"), 30.0, {}, log, tmp_path)
    failing = gpu_check.run_step(_step("bad", "import sys; print('done: no'); sys.exit(1)"), 30.0, {}, log, tmp_path)
    log.close()
    assert (ok.status, ok.summary) == ("passed", "done: 3 of 3") and failing.status == "FAILED"
    assert "start" in (tmp_path / "log").read_text()


def test_skipped_gpu_tests_fail_the_step(tmp_path: Path) -> None:
    xml = '<testsuites><testsuite name="pytest" tests="5" failures="0" errors="0" skipped="{}"/></testsuites>'
    (tmp_path / "tests.xml").write_text(xml.format(0))
    assert gpu_check._judge_tests(0, "", tmp_path) == (True, "5 passed, 0 failed, 0 errors, 0 skipped of 5")
    (tmp_path / "tests.xml").write_text(xml.format(2))
    assert gpu_check._judge_tests(0, "", tmp_path)[0] is False
    assert gpu_check._judge_tests(0, "", tmp_path / "missing")[0] is False


def test_summary_lists_steps_and_targets(tmp_path: Path) -> None:
    (tmp_path / "bench").mkdir()
    target = {"what": "LSH op at 64K: time", "measured": 1.0, "limit": 2.0, "unit": "ms", "ratio": 0.5, "met": True}
    (tmp_path / "bench" / "bench.json").write_text(json.dumps({"parity": [{"ok": True}], "targets": [target]}))
    assert gpu_check._judge_bench(0, "", tmp_path) == (True, "parity 1 of 1 ok; targets met 1 of 1")
    results = [gpu_check.StepResult("doctor", "passed", 20.0, 150.0, "doctor: healthy"),
               gpu_check.StepResult("bench", "TIMED OUT", 330.0, 330.0, "killed after 330 s")]
    text = gpu_check.summary(results, gpu_check._targets(tmp_path), "GPU X", 350.0)
    assert "| doctor | passed | 20 | 30 | 150 | doctor: healthy |" in text
    assert "| LSH op at 64K: time | 1 ms | 2 ms | 0.50 | met |" in text
    assert text.splitlines()[-1] == "gpu-check: FAILED: bench (1 of 2 steps) in 350 s"
