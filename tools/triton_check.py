"""``make triton-check``: a repository written by ``reformer-rt export --triton-repo`` under a real NVIDIA Triton
Inference Server, answering exactly what ``reformer-rt serve`` answers.

    python tools/triton_check.py [--out build/triton-check] [--venv build/triton-venv]

Steps (CPU only; needs the package index once):

1. A virtual environment for Triton (``build/triton-venv``): nvidia-pytriton 0.7.0, whose wheel carries
   ``tritonserver`` 2.51 and its Python backend (built against numpy < 2, hence its own environment), torch (the
   CPU wheel, ``--torch``) and this checkout installed as a package.
2. ``reformer-rt export models/demo --triton-repo DIR --name demo`` (the Python layout, torch backend).
3. ``tritonserver`` on that repository, and ``reformer-rt serve demo=models/demo --backend torch`` beside it, both
   on free loopback ports. Triton's Python backend stub embeds the interpreter it finds first on ``PATH`` and
   ignores ``PYTHONPATH``: the environment's ``bin`` goes first on ``PATH`` and that interpreter's ``libpython``
   first on ``LD_LIBRARY_PATH``.
4. The same requests to both, with tritonclient over HTTP (binary tensors) and gRPC: a ragged batch with every
   output, a text request, a request naming no output, generated ids and text, pooled embeddings, and bad requests
   (an id out of range, an unknown output, a bad parameter, a generation longer than the positions left); outputs
   must agree within 1e-5 (text exactly) and errors must have the same status.

Writes ``triton_check.json`` and ``tritonserver.log`` to ``--out``; exit 0 when everything agreed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PYTRITON = "nvidia-pytriton==0.7.0"
OUTPUTS = ("logits", "last_logits", "top_k_ids", "top_k_log_probs", "log_probs", "last_hidden_state", "embedding",
           "lengths")
TOL = 1e-5


def _run(command: list[str], **kwargs: Any) -> None:
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def make_venv(venv: Path, torch_spec: str) -> Path:
    """The Triton environment (created once; reused when its marker file is there)."""
    python = venv / "bin" / "python"
    marker = venv / ".reformer-rt-triton"
    if not marker.exists():
        _run([sys.executable, "-m", "venv", str(venv)])
        _run([str(python), "-m", "pip", "install", "-q", torch_spec])  # first, so nothing pulls another torch
        _run([str(python), "-m", "pip", "install", "-q", PYTRITON, "numpy<2", f"{REPO}[cpu]"])
        marker.touch()
    # this checkout's code, as a package (an editable install is invisible to Triton's embedded interpreter)
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(REPO)])
    return python


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _triton_layout(venv_python: Path, work: Path) -> tuple[Path, Path, dict[str, str]]:
    """(tritonserver, backend directory, environment) from the pytriton wheel in the Triton environment."""
    site = Path(subprocess.check_output([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                         "['purelib'])"], text=True).strip())
    root = site / "pytriton" / "tritonserver"
    backends = work / "backends"
    (backends / "python").mkdir(parents=True, exist_ok=True)
    for item in (root / "backends" / "python").iterdir():
        if item.is_file():
            (backends / "python" / item.name).write_bytes(item.read_bytes())
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = backends / "python" / "triton_python_backend_stub"
    stub.write_bytes((root / "python_backend_stubs" / version / "triton_python_backend_stub").read_bytes())
    stub.chmod(0o755)
    libs = [sysconfig.get_config_var("LIBDIR"), str(site / "nvidia_pytriton.libs")]
    env = {**os.environ, "PATH": f"{venv_python.parent}:{os.environ.get('PATH', '')}",
           "LD_LIBRARY_PATH": ":".join([*libs, os.environ.get("LD_LIBRARY_PATH", "")])}
    return root / "bin" / "tritonserver", backends, env


def _wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if client.is_server_ready():
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} not ready after {timeout:.0f} s")


# -------------------------------------------------------------------------------------------------- requests
def _cases(vocab: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, vocab, n, dtype=np.int64) for n in (7, 130, 900)]
    ids = np.zeros((len(seqs), 900), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    text = np.array([[b"def f(x):\n    return x + 1\n"], [b"import os"]], dtype=object)
    return [
        {"what": "ragged batch, every output", "inputs": {"input_ids": ids, "attention_mask": mask},
         "outputs": OUTPUTS, "parameters": {"top_k": 4}},
        {"what": "text", "inputs": {"text": text}, "outputs": ("last_logits", "lengths"), "parameters": {}},
        {"what": "one sequence, default output", "inputs": {"input_ids": seqs[1][None]}, "outputs": (),
         "parameters": {}},
        {"what": "id out of range", "inputs": {"input_ids": np.array([[1, vocab + 5]], dtype=np.int64)},
         "outputs": ("last_logits",), "parameters": {}},
        {"what": "unknown output", "inputs": {"input_ids": seqs[0][None]}, "outputs": ("probabilities",),
         "parameters": {}},
        {"what": "generated ids and text", "inputs": {"text": text}, "outputs": ("generated_ids", "generated_text",
                                                                                "lengths"),
         "parameters": {"max_new_tokens": 8}},
        {"what": "embedding, last pooling", "inputs": {"input_ids": ids, "attention_mask": mask},
         "outputs": ("embedding",), "parameters": {"pooling": "last"}},
        {"what": "bad parameter", "inputs": {"input_ids": seqs[0][None]}, "outputs": ("top_k_ids",),
         "parameters": {"top_k": 0}},
        {"what": "generation over the positions left", "inputs": {"input_ids": seqs[2][None]},
         "outputs": ("generated_ids",), "parameters": {"max_new_tokens": 10**6}},
    ]


def _infer(protocol: str, url: str, case: dict[str, Any]) -> dict[str, Any]:
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    client = module.InferenceServerClient(url)
    inputs = []
    for name, array in case["inputs"].items():
        tensor = module.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [module.InferRequestedOutput(n) for n in case["outputs"]] or None
    try:
        result = client.infer("demo", inputs, outputs=outputs, parameters=case["parameters"] or None)
    except Exception as exc:
        return {"error": str(getattr(exc, "status", lambda: None)()), "message": str(exc)}
    finally:
        client.close()
    names = case["outputs"] or ("logits",)
    return {name: result.as_numpy(name) for name in names}


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """Why two answers differ (None when they agree)."""
    if ("error" in ours) != ("error" in theirs):
        return f"one answered, one failed: ours {ours.get('message', 'ok')!r}, Triton {theirs.get('message', 'ok')!r}"
    if "error" in ours:
        codes = {"400": "INVALID_ARG", "StatusCode.INVALID_ARGUMENT": "INVALID_ARG"}
        same = codes.get(ours["error"], ours["error"]) == codes.get(theirs["error"], theirs["error"])
        return None if same else f"statuses differ: ours {ours['error']}, Triton {theirs['error']}"
    for name, array in ours.items():
        other = theirs.get(name)
        if other is None or other.shape != array.shape:
            return f"{name}: shape {array.shape} vs Triton {None if other is None else other.shape}"
        if array.dtype == object:  # BYTES
            if array.tolist() != other.tolist():
                return f"{name}: {array.tolist()!r} vs Triton {other.tolist()!r}"
            continue
        diff = float(np.abs(array.astype(np.float64) - other.astype(np.float64)).max(initial=0.0))
        if diff > TOL:
            return f"{name}: max abs diff {diff:.3g} > {TOL}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/triton_check.py", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "triton-check")
    parser.add_argument("--venv", type=Path, default=REPO / "build" / "triton-venv",
                        help="the Triton environment (made on first use, then reused)")
    parser.add_argument("--torch", default="torch==2.13.0", help="torch requirement for the Triton environment")
    args = parser.parse_args(argv)
    from reformer_rt.models.presets import demo_model_dir
    from reformer_rt.runtime.bench.server_process import ServeProcess

    args.out.mkdir(parents=True, exist_ok=True)
    venv_python = make_venv(args.venv, args.torch)
    report: dict[str, Any] = {"tritonserver": "2.51 (nvidia-pytriton 0.7.0)", "checks": []}
    with tempfile.TemporaryDirectory(prefix="reformer-rt-triton-") as tmp:
        work = Path(tmp)
        repository = work / "repository"
        _run([str(venv_python.parent / "reformer-rt"), "export", str(demo_model_dir()), "--triton-repo",
              str(repository), "--name", "demo"])
        server, backends, env = _triton_layout(venv_python, work)
        http_port, grpc_port, metrics_port = _free_ports(3)
        log = (args.out / "tritonserver.log").open("w")
        triton = subprocess.Popen([str(server), f"--model-repository={repository}", f"--backend-directory={backends}",
                                   f"--http-port={http_port}", f"--grpc-port={grpc_port}",
                                   f"--metrics-port={metrics_port}"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(f"127.0.0.1:{http_port}", triton)
            with ServeProcess([f"demo={demo_model_dir()}", "--backend", "torch", "--device", "cpu"]) as ours:
                urls = {"http": (ours.http, f"127.0.0.1:{http_port}"), "grpc": (ours.grpc, f"127.0.0.1:{grpc_port}")}
                for case in _cases(vocab=258):
                    for protocol, (our_url, triton_url) in urls.items():
                        problem = compare(_infer(protocol, our_url, case), _infer(protocol, triton_url, case))
                        report["checks"].append({"case": case["what"], "protocol": protocol, "agree": problem is None,
                                                 "problem": problem})
                        print(f"{'ok  ' if problem is None else 'FAIL'} {protocol:4} {case['what']}"
                              + (f": {problem}" if problem else ""), flush=True)
        finally:
            triton.terminate()
            triton.wait(60)
            log.close()
    (args.out / "triton_check.json").write_text(json.dumps(report, indent=2) + "\n")
    failed = [c for c in report["checks"] if not c["agree"]]
    print(f"triton-check: {len(report['checks']) - len(failed)} of {len(report['checks'])} answers agree between "
          f"reformer-rt serve and tritonserver 2.51 (Python backend); wrote {args.out / 'triton_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
