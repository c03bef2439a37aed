"""``reformer-rt export``: a checkpoint directory -> a validated ONNX file (see ``export_onnx``).

The default LSH form is ``portable`` (standard ONNX ops): it runs wherever ONNX Runtime does, so the first export
runs on the machine that made it, whatever is installed. ``--attention plugin`` writes the TensorRT form. Either
way the command says which runtimes can run the file, and whether they are installed here. ``--quantize int8``
writes int8 weight products (ONNX Runtime's dynamic quantization; ``--keep-float`` says which parts of the LSH
hashing path stay float) and validates them on text (``--max-bpc-increase``; ``reformer-rt export`` adds
``--validation-text``).

Errors the user can fix (missing checkpoint, bad option, unwritable output, failed validation) are
``ReformerError``s: the ``reformer-rt`` entry point prints them on one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util

from reformer_rt.models import InputError
from reformer_rt.models.lsh_op import ONNX_LOWERINGS

from .lowering import DTYPES
from .metadata import HASHING_PARTS, QUANTIZE_SCHEMES, RUNS_ON, Quantization
from .onnx_export import DEFAULT_ATTENTION, DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, export_onnx
from .quality import MAX_BPC_INCREASE, QualityCheck

#: The Python package each form's runtime needs, for the "not installed here" note.
_RUNTIME_PACKAGE = {"portable": "onnxruntime", "plugin": "tensorrt"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX (LSH attention as portable ops or a TensorRT plugin node)",
        description="Export a Reformer checkpoint directory (HF transformers or reformer-rt format) to ONNX with "
                    "dynamic batch and length, then validate it against PyTorch in ONNX Runtime.")
    parser.add_argument("source", metavar="SOURCE", help="checkpoint directory (config.json + weights)")
    parser.add_argument("-o", "--output", metavar="OUT.onnx", help="ONNX file to write (required)")
    parser.add_argument("--attention", choices=ONNX_LOWERINGS, default=DEFAULT_ATTENTION,
                        help=f"LSH layers as standard ONNX ops for ONNX Runtime (portable) or one TensorRT-plugin "
                             f"node each (plugin); default {DEFAULT_ATTENTION}")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="precision of the graph")
    parser.add_argument("--max-length", type=int, default=None, metavar="N",
                        help="longest input the graph serves (default max_position_embeddings); also resolves "
                             "num_buckets when the checkpoint leaves it unset")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    parser.add_argument("--no-validate", dest="validate", action="store_false",
                        help="skip the ONNX Runtime comparison against PyTorch")
    int8 = parser.add_argument_group("int8 (portable form, language models)")
    int8.add_argument("--quantize", choices=QUANTIZE_SCHEMES,
                      help="int8: weight products in int8 with ONNX Runtime's dynamic quantization")
    int8.add_argument("--keep-float", default=",".join(HASHING_PARTS), metavar="PARTS",
                      help=f"parts of the LSH hashing path left in float, comma-separated from "
                           f"{', '.join(HASHING_PARTS)}, or 'none' (default: {','.join(HASHING_PARTS)})")
    int8.add_argument("--max-bpc-increase", type=float, default=MAX_BPC_INCREASE, metavar="BITS",
                      help=f"validation fails when int8 loses more bits per token than this on text (default "
                           f"{MAX_BPC_INCREASE})")
    parser.set_defaults(func=run)
    return parser


def quantization(args: argparse.Namespace) -> Quantization | None:
    """``--quantize`` and ``--keep-float`` as one record (None: a float graph)."""
    words = args.keep_float.strip()
    parts = () if words == "none" else tuple(p.strip() for p in words.split(",") if p.strip())
    if args.quantize is None:
        if args.keep_float != ",".join(HASHING_PARTS):
            raise InputError("--keep-float: only with --quantize int8")
        return None
    if set(parts) - set(HASHING_PARTS):
        raise InputError(f"--keep-float: got {args.keep_float!r}; expected 'none' or a comma-separated subset of "
                         f"{', '.join(HASHING_PARTS)}")
    return Quantization(args.quantize, parts)


def runs_on_note(attention: str) -> str:
    """Which runtimes run a file of this form, and whether the one it needs is installed here."""
    package = _RUNTIME_PACKAGE[attention]
    here = "" if importlib.util.find_spec(package) else f" -- {package} is not installed on this machine"
    return f"runs on: {RUNS_ON[attention]}{here}"


def run(args: argparse.Namespace, quality: QualityCheck = QualityCheck()) -> int:
    """The command; ``quality`` carries the validation text the caller read (``reformer-rt export
    --validation-text``)."""
    if args.output is None:
        raise InputError("-o/--output: missing; expected the ONNX file to write, such as -o model.onnx")
    quality = dataclasses.replace(quality, max_bpc_increase=args.max_bpc_increase)
    report = export_onnx(args.source, args.output, attention=args.attention, dtype=args.dtype,
                         max_length=args.max_length, opset=args.opset, validate=args.validate,
                         quantize=quantization(args), quality=quality)
    print(runs_on_note(report.attention))
    return 0
