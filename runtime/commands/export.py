"""``reformer-rt export``: the export command of ``reformer_rt.export.cli``, plus ``--triton-repo`` -- a Triton
Inference Server model repository instead of one ONNX file (``serving/triton_repo.py``), which needs the runtime (a
Session describes the served interface), so it is added here rather than in ``export/``.

    reformer-rt export CHECKPOINT -o model.onnx                         # an ONNX file (export/cli.py)
    reformer-rt export CHECKPOINT -o int8.onnx --quantize int8 --validation-text corpus.txt
    reformer-rt export MODEL --triton-repo DIR [--name NAME] [--triton-backend python|onnxruntime]

``--validation-text`` is added here too: the text an int8 export is validated on is tokenized with the model's own
tokenizer (``runtime/tokenizers.py``), which ``export/`` does not import.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reformer_rt.export import QualityCheck
from reformer_rt.export import cli as export_cli
from reformer_rt.models import InputError, ReformerConfig
from reformer_rt.models.checkpoint import CONFIG_FILE

from ..serving.triton_repo import DEFAULT_QUEUE_DELAY_US, TRITON_BACKENDS
from ..session import BACKENDS
from ..tokenizers import load_tokenizer


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = export_cli.add_parser(subparsers)
    parser.description += (" With --triton-repo: a Triton Inference Server model repository for a checkpoint, an ONNX "
                           "file or an engine.")
    parser.add_argument("--validation-text", type=Path, metavar="FILE",
                        help="with --quantize: UTF-8 text to validate the int8 graph on, tokenized by the model's "
                             "tokenizer (default: held-out Python source for a byte-level model, else random ids)")
    triton = parser.add_argument_group("Triton Inference Server model repository (instead of -o)")
    triton.add_argument("--triton-repo", type=Path, metavar="DIR", help="write DIR/NAME/ for Triton")
    triton.add_argument("--name", help="model name in the repository (default: the source's directory name or stem)")
    triton.add_argument("--triton-backend", choices=TRITON_BACKENDS, default="python",
                        help="python: a Session over any artifact, batching by length bucket (default); "
                             "onnxruntime: the portable ONNX graph, no Python at serving time")
    triton.add_argument("--backend", choices=[b for b in BACKENDS if b != "auto"],
                        help="Session backend inside Triton's Python backend (default: torch for a checkpoint, "
                             "onnxruntime for an ONNX file, tensorrt for an engine)")
    triton.add_argument("--device", choices=("cpu", "cuda"), help="Triton instance kind (default: KIND_AUTO)")
    triton.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                        help=f"Triton's dynamic batcher delay (default {DEFAULT_QUEUE_DELAY_US})")
    parser.set_defaults(func=run)


def validation_text(args: argparse.Namespace) -> QualityCheck:
    """``--validation-text`` as token ids of the checkpoint's tokenizer (the default check when not given)."""
    if args.validation_text is None:
        return QualityCheck()
    if args.quantize is None:
        raise InputError("--validation-text: only with --quantize int8 (a float export is validated on random ids)")
    source = Path(args.source)
    try:
        text = args.validation_text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--validation-text: cannot read {args.validation_text} as UTF-8 text ({exc})") from exc
    config = ReformerConfig.from_json_file(source / CONFIG_FILE) if (source / CONFIG_FILE).is_file() else None
    if config is None:
        raise InputError(f"--validation-text: {source} is not a checkpoint directory; expected config.json there")
    ids = load_tokenizer(source, config).encode(text)
    return QualityCheck(text=ids, source=str(args.validation_text))


def run(args: argparse.Namespace) -> int:
    if args.triton_repo is None:
        triton_only = [f"--{n.replace('_', '-')}" for n in ("name", "backend", "device") if getattr(args, n)]
        if triton_only:
            raise InputError(f"{', '.join(triton_only)}: only with --triton-repo DIR")
        return export_cli.run(args, validation_text(args))
    if args.output is not None:
        raise InputError("-o and --triton-repo: got both; expected one (an ONNX file, or a Triton repository)")
    if args.max_queue_delay_us < 0:
        raise InputError(f"--max-queue-delay-us: got {args.max_queue_delay_us}; expected >= 0")
    if args.attention == "plugin":
        raise InputError("--attention plugin with --triton-repo: a plugin-form graph runs on TensorRT only; give the "
                         "TensorRT engine (reformer-rt build) as MODEL for the python layout")
    from ..serving.triton_repo import write_repository

    target = write_repository(Path(args.source), args.triton_repo, name=args.name, triton_backend=args.triton_backend,
                              backend=args.backend, device=args.device, queue_delay_us=args.max_queue_delay_us,
                              export_options={"dtype": args.dtype, "max_length": args.max_length, "opset": args.opset,
                                              "validate": args.validate, "quantize": export_cli.quantization(args),
                                              "quality": validation_text(args)})
    print(f"wrote Triton model repository {target} ({args.triton_backend} backend); serve it with: tritonserver "
          f"--model-repository={args.triton_repo}")
    return 0
