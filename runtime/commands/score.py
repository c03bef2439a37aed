"""``reformer-rt score``: bits per character and perplexity of a whole file under a causal language model.

``FILE`` is UTF-8 text (``-`` reads stdin), tokenized with the model's tokenizer (``--tokenizer DIR`` names another);
``--ids FILE`` takes token ids instead (a JSON list of ints or a 1-D .npy int array). The file is scored in one pass
when it fits the window, in windows beyond it: ``--window`` tokens (default the model's maximum length) every
``--stride`` tokens (default the window: no overlap), each window scoring only what the previous one did not -- the
standard strided evaluation, equal to transformers' loss on the same windows (``runtime/scoring.py``). A progress
bar over the windows goes to stderr (not with ``--quiet``, nor when stderr is not a terminal); the result is a
readable summary, or with ``--json`` one JSON object, on stdout; ``-o OUT.json`` also writes that object, atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from reformer_rt.export.metadata import QUANTIZE_SCHEMES
from reformer_rt.models import InputError

from ..artifacts import write_atomic
from ..batching import DEFAULT_MAX_TOKENS
from ..scoring import ScoreResult, check_window
from ..session import BACKENDS, Session
from ..tokenizers import load_tokenizer


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("score", help="bits per character / perplexity of a whole file (strided windows)",
                              description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("model", type=Path, help="checkpoint directory, exported .onnx, or TensorRT engine of a causal LM")
    p.add_argument("file", nargs="?", metavar="FILE", help="UTF-8 text file to score (- = stdin)")
    p.add_argument("--ids", metavar="FILE",
                   help="score token ids instead: a JSON list of ints or a 1-D .npy array (- = stdin, JSON)")
    p.add_argument("--window", type=int, metavar="N", help="tokens per window (default: the model's maximum length)")
    p.add_argument("--stride", type=int, metavar="N",
                   help="tokens between window starts (default: the window, no overlap)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="directory holding the tokenizer (default: the model's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("-o", "--output", type=Path, metavar="OUT.json", help="also write the JSON result to this file")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--quantize", choices=QUANTIZE_SCHEMES, help="a checkpoint on the torch or onnxruntime backend: "
                   "int8 weight products (an int8 .onnx file runs in int8 without it)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--max-tokens-per-batch", type=int, default=DEFAULT_MAX_TOKENS,
                   help="padded tokens per forward pass: windows are batched up to this")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _read_bytes(name: str, option: str) -> bytes:
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise InputError(f"{option}: cannot read {name} ({exc.strerror or exc}); expected a readable file") from exc
    if not data:
        raise InputError(f"{option}: {'stdin' if name == '-' else name} is empty; expected something to score")
    return data


def _read_text(name: str) -> str:
    data = _read_bytes(name, "FILE")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"FILE: {'stdin' if name == '-' else name} is not UTF-8 text (byte 0x{data[exc.start]:02x} "
                         f"at offset {exc.start:,}); expected UTF-8 text -- pass binary data as --ids") from exc


def _read_ids(name: str) -> np.ndarray | list:
    """The ids of ``--ids``: a 1-D .npy array, or a JSON list of ints (checked against the model by the Session)."""
    try:
        if name.endswith(".npy"):
            array = np.load(name, allow_pickle=False)
            if not isinstance(array, np.ndarray):
                raise ValueError(f"it holds {type(array).__name__}")
            if array.size == 0:
                raise InputError(f"--ids: {name} is empty; expected something to score")
            return array
        data = json.loads(_read_bytes(name, "--ids"))
    except OSError as exc:
        raise InputError(f"--ids: cannot read {name} ({exc.strerror or exc}); expected a readable file") from exc
    except (ValueError, EOFError) as exc:
        raise InputError(f"--ids: cannot read {name} ({exc}); expected a JSON list of ints or a 1-D .npy integer "
                         "array") from exc
    if not isinstance(data, list):
        raise InputError(f"--ids: {name} holds {type(data).__name__}; expected a JSON list of token ids")
    if not data:
        raise InputError(f"--ids: {name} is an empty list; expected something to score")
    return data


def _check_output(output: Path) -> None:
    """``-o``'s path, checked before any work."""
    if output.is_dir():
        raise InputError(f"--output: {output} is a directory; expected a file path")
    if not output.absolute().parent.is_dir():
        raise InputError(f"--output: {output.absolute().parent} is not an existing directory; create it or choose "
                         "another")


def summary(result: ScoreResult) -> str:
    """The readable form of a result: what was scored, then the figures."""
    figures = [f"nll {result.nll:.4f} nats/token", f"{result.bits_per_token:.4f} bits/token"]
    if result.bits_per_character is not None:
        figures.append(f"{result.bits_per_character:.4f} bits/character")
    if result.bits_per_byte is not None:
        figures.append(f"{result.bits_per_byte:.4f} bits/byte")
    figures.append(f"perplexity {result.perplexity:.4f}")
    source = "" if result.characters is None else f" ({result.characters:,} characters)"
    return (f"scored {result.scored_tokens:,} of {result.tokens:,} tokens{source} in {result.windows:,} "
            f"window{'s' if result.windows != 1 else ''} of {result.window:,} (stride {result.stride:,}) on "
            f"{result.backend}, {result.seconds:.1f} s\n" + ", ".join(figures))


def run(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.ids is None):
        raise InputError("got " + ("both FILE and --ids" if args.file else "neither FILE nor --ids") + "; expected "
                         "one: a text file to tokenize, or --ids with token ids")
    if args.tokenizer is not None and (args.ids is not None or not args.tokenizer.is_dir()):
        raise InputError(f"--tokenizer: {args.tokenizer} " + ("is for text; --ids are already tokens" if args.ids
                                                             else "is not a directory; expected the directory "
                                                             "holding the model's tokenizer.json or spiece.model"))
    if args.output is not None:
        _check_output(args.output)
    check_window(args.window, args.stride, max_length=None)  # what holds whatever the model: before opening it
    source = _read_ids(args.ids) if args.ids is not None else _read_text(args.file)
    session = Session(args.model, backend=args.backend, device=args.device,
                      max_tokens_per_batch=args.max_tokens_per_batch, progress=not args.quiet, quantize=args.quantize)
    tokenizer = load_tokenizer(args.tokenizer, session.config, required=True) if args.tokenizer else None
    result = session.score(source, window=args.window, stride=args.stride, tokenizer=tokenizer)
    record = result.as_dict()
    if args.output is not None:
        write_atomic(args.output, (json.dumps(record, indent=2) + "\n").encode(), label="--output")
    print(json.dumps(record) if args.json else summary(result))
    return 0
