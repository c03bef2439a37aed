"""``reformer-rt export``: a checkpoint directory -> a validated ONNX file (see ``export_onnx``).

The default LSH form is ``portable`` (standard ONNX ops): it runs wherever ONNX Runtime does, so the first export
runs on the machine that made it, whatever is installed. ``--attention plugin`` writes the TensorRT form. Either
way the command says which runtimes can run the file, and whether they are installed here.

Errors the user can fix (missing checkpoint, bad option, unwritable output, failed validation) are
``ReformerError``s: the ``reformer-rt`` entry point prints them on one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib.util

from reformer_rt.models import InputError
from reformer_rt.models.lsh_op import ONNX_LOWERINGS

from .lowering import DTYPES
from .metadata import RUNS_ON
from .onnx_export import DEFAULT_ATTENTION, DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, export_onnx

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
    parser.set_defaults(func=run)
    return parser


def runs_on_note(attention: str) -> str:
    """Which runtimes run a file of this form, and whether the one it needs is installed here."""
    package = _RUNTIME_PACKAGE[attention]
    here = "" if importlib.util.find_spec(package) else f" -- {package} is not installed on this machine"
    return f"runs on: {RUNS_ON[attention]}{here}"


def run(args: argparse.Namespace) -> int:
    if args.output is None:
        raise InputError("-o/--output: missing; expected the ONNX file to write, such as -o model.onnx")
    report = export_onnx(args.source, args.output, attention=args.attention, dtype=args.dtype,
                         max_length=args.max_length, opset=args.opset, validate=args.validate)
    print(runs_on_note(report.attention))
    return 0
