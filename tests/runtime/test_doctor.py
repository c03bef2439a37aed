"""``reformer-rt doctor``'s ONNX Runtime line on machines this CI is not: a GPU without CUDAExecutionProvider, and
the CPU wheel shadowing onnxruntime-gpu. (The whole report on this machine: ``test_tensorrt_path.py``.)"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from reformer_rt.runtime.commands import doctor


def _fake_onnxruntime(monkeypatch: pytest.MonkeyPatch, providers: list[str], installed: list[str],
                      gpu: bool) -> None:
    module = types.SimpleNamespace(__version__="1.30.0", get_available_providers=lambda: providers)
    monkeypatch.setitem(sys.modules, "onnxruntime", module)
    monkeypatch.setattr(doctor, "_installed", lambda names: installed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)


def test_cpu_wheel_shadowing_the_gpu_wheel_fails_with_the_repair(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_onnxruntime(monkeypatch, ["CPUExecutionProvider"], ["onnxruntime", "onnxruntime-gpu"], gpu=True)
    check = doctor.check_onnxruntime()
    assert check.status == doctor.FAILED and "shadows" in check.detail
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in check.detail


def test_gpu_without_cuda_provider_says_which_package(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_onnxruntime(monkeypatch, ["CPUExecutionProvider"], ["onnxruntime"], gpu=True)
    check = doctor.check_onnxruntime()
    assert check.status == doctor.OK  # the CPU provider works; the GPU runs the PyTorch + Triton path
    assert "usable providers: CPUExecutionProvider" in check.detail and "pip install onnxruntime-gpu" in check.detail


def test_gpu_wheel_without_its_provider_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_onnxruntime(monkeypatch, ["CPUExecutionProvider"], ["onnxruntime-gpu"], gpu=True)
    assert doctor.check_onnxruntime().status == doctor.FAILED


def test_gpu_wheel_with_its_provider_is_healthy(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_onnxruntime(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"], ["onnxruntime-gpu"], gpu=True)
    check = doctor.check_onnxruntime()
    assert check.status == doctor.OK and "(onnxruntime-gpu)" in check.detail and "pip" not in check.detail


def test_gpu_checks_say_why_they_did_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for probe in (doctor.check_kernels_fp32, doctor.check_kernels_fp16, doctor.check_cuda_forward):
        assert probe() == doctor.Check(probe().name, doctor.ABSENT, "not run: no CUDA GPU")
