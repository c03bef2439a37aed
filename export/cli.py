"""``reformer-rt export``: a checkpoint directory -> a validated ONNX file (see ``export_onnx``).

Errors the user can fix (missing checkpoint, bad option, unwritable output, failed validation) are
``ReformerError``s: the ``reformer-rt`` entry point prints them on one line and exits with code 2.
"""

from __future__ import annotations

import argparse

from reformer_rt.models.lsh_op import ONNX_LOWERINGS

from .lowering import DTYPES
from .onnx_export import DEFAULT_OPSET, export_onnx


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX (LSH attention as a TensorRT plugin node or portable ops)",
        description="Export a Reformer checkpoint directory (HF transformers or reformer-rt format) to ONNX with "
                    "dynamic batch and length, then validate it against PyTorch in ONNX Runtime.")
    parser.add_argument("source", metavar="SOURCE", help="checkpoint directory (config.json + weights)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="ONNX file to write")
    parser.add_argument("--attention", choices=ONNX_LOWERINGS, default="plugin",
                        help="LSH layers as one TensorRT-plugin node each (plugin) or standard ONNX ops (portable)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="precision of the graph")
    parser.add_argument("--max-length", type=int, default=None, metavar="N",
                        help="longest input the graph serves (default max_position_embeddings); also resolves "
                             "num_buckets when the checkpoint leaves it unset")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--no-validate", dest="validate", action="store_false",
                        help="skip the ONNX Runtime comparison against PyTorch")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    export_onnx(args.source, args.output, attention=args.attention, dtype=args.dtype, max_length=args.max_length,
                opset=args.opset, validate=args.validate)
    return 0
