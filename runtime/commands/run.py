"""``reformer-rt run``: token ids or text in, model outputs out (JSON or NPY), through a ``Session``.

Inputs: ``--ids FILE`` (JSON list of id lists, or a 2-D .npy int array) or ``--text FILE`` (repeatable; each file
is one sequence, ``-`` reads stdin). Outputs: the model's own (an LM's logits, a classifier's logits, QA start and
end logits, a bare model's hidden states), or ``--embed``: ``-o OUT.npy`` (one padded output array;
``OUT.lengths.npy`` beside it; per-position logits or hidden states are written into it as a memory map while the
model runs, so long ones are never held in memory), ``-o OUT.npz`` (every output and ``lengths`` by name: what a QA model needs),
``-o OUT.json`` (lengths + nested lists: only sensible for small outputs), and always a one-line JSON summary on
stdout (backend, quantization, shapes, padding waste, and for language models the bits per token of the input).
The output files are written atomically as a set: a failed or interrupted run leaves neither file new (an old pair
stays as it was), and the output path is checked before the model runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from reformer_rt.export.metadata import QUANTIZE_SCHEMES
from reformer_rt.models import InputError

from ..artifacts import Payload, staging_file, write_files_atomic
from ..batching import DEFAULT_MAX_TOKENS
from ..session import BACKENDS, Session
from ..tokenizers import load_tokenizer


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run a model on token ids or text", description=__doc__.split("\n\n")[1])
    p.add_argument("model", type=Path, help="checkpoint directory, exported .onnx, or TensorRT engine")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ids", type=Path, help="JSON list of token-id lists, or a 2-D .npy array")
    source.add_argument("--text", action="append", help="text file, one sequence each (repeatable; - = stdin)")
    p.add_argument("-o", "--output", type=Path, help="write outputs to OUT.npy, OUT.npz or OUT.json")
    p.add_argument("--embed", choices=("mean", "last"), help="write one embedding per sequence instead")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--quantize", choices=QUANTIZE_SCHEMES, help="a checkpoint on the torch or onnxruntime backend: "
                   "int8 weight products (an int8 .onnx file runs in int8 without it)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--tokenizer", type=Path, help="directory holding the tokenizer (default: the model's)")
    p.add_argument("--max-tokens-per-batch", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--quiet", action="store_true", help="print only the JSON summary")
    p.set_defaults(func=run)


def _read_ids(path: Path) -> list[list[int]] | np.ndarray:
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if not isinstance(array, np.ndarray):
                raise ValueError(f"it holds {type(array).__name__}")
            return array
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"--ids: cannot read {path} ({exc}); expected a JSON list of id lists or a 2-D .npy "
                         "integer array") from exc
    if not isinstance(data, list) or not all(isinstance(row, list) for row in data):
        raise InputError(f"--ids: {path} holds {type(data).__name__}; expected a JSON list of id lists")
    return data


def _read_text(name: str) -> str:
    """One ``--text`` argument's contents (``-`` = stdin), which must be UTF-8."""
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise InputError(f"--text: cannot read {name} ({exc.strerror or exc}); expected a UTF-8 text file") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"--text: {'stdin' if name == '-' else name} is not UTF-8 text (byte 0x{data[exc.start]:02x} "
                         f"at offset {exc.start}); expected UTF-8 text -- pass binary data as --ids") from exc


def _read_texts(names: list[str], session: Session, tokenizer_dir: Path | None) -> list[list[int]]:
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise InputError(f"--tokenizer: {tokenizer_dir} is not a directory; expected the directory holding the "
                         "model's tokenizer.json or spiece.model")
    directory = tokenizer_dir or (session.path if session.path.is_dir() else None)
    tokenizer = load_tokenizer(directory, session.config, required=tokenizer_dir is not None)
    return [tokenizer.encode(_read_text(name)) for name in names]


def _output_files(output: Path, lengths: bool) -> list[Path]:
    """The files ``-o`` writes (``OUT.npy`` and ``OUT.lengths.npy``, or ``OUT.npz``, or ``OUT.json``), checked before
    any work."""
    if output.suffix not in (".npy", ".npz", ".json"):
        raise InputError(f"--output: got {output}; expected a .npy, .npz or .json file name")
    files = [output, output.with_suffix(".lengths.npy")] if output.suffix == ".npy" and lengths else [output]
    for file in files:
        if file.is_dir():
            raise InputError(f"--output: {file} is a directory; expected a file path")
    if not output.absolute().parent.is_dir():
        raise InputError(f"--output: {output.absolute().parent} is not an existing directory; create it or choose "
                         "another")
    return files


def _bits_per_token(log_probs: list[np.ndarray]) -> list[float]:
    """Mean bits per predicted token of each sequence (NaN for a single token: nothing is predicted; null in the
    summary)."""
    return [float(-row.mean() / math.log(2)) if row.size else float("nan") for row in log_probs]


def _memory_map(output: Path | None, session: Session, sequences: object,
                names: list[str]) -> tuple[Path, np.ndarray] | None:
    """For ``-o OUT.npy`` of a per-position output (an LM's logits, hidden states): a .npy memory map staged beside
    OUT, of the padded shape, which the run writes into piece by piece (``Session.run(out=...)``) -- the file
    ``np.save`` would write, without holding the whole array in memory. None for other outputs and files."""
    if output is None or output.suffix != ".npy" or len(names) != 1:
        return None
    kind = session.output_kinds(names)[0]
    width = kind.shape(session.config)[1:]
    if kind.dims[:1] != ("n",) or not kind.passed_through or len(width) != 1:
        return None
    lengths = [len(seq) for seq in session.check_sequences(sequences)]
    path = staging_file(output)
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                          shape=(len(lengths), max(lengths), width[0]))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, array


def run(args: argparse.Namespace) -> int:
    if args.output is not None:
        _output_files(args.output, lengths=not args.embed)
    session = Session(args.model, backend=args.backend, device=args.device,
                      max_tokens_per_batch=args.max_tokens_per_batch, progress=not args.quiet, quantize=args.quantize)
    sequences = _read_ids(args.ids) if args.ids else _read_texts(args.text, session, args.tokenizer)
    names = ["embedding"] if args.embed else list(session.default_outputs)
    if args.output is not None and args.output.suffix == ".npy" and len(names) > 1:
        raise InputError(f"--output: this model gives {names}; one .npy file holds one array -- use -o OUT.npz")
    scoring = ["log_probs"] if session.task == "lm" and not args.embed else []
    staged = _memory_map(args.output, session, sequences, names)
    try:
        out = None if staged is None else {names[0]: staged[1]}
        result = session.run(sequences, outputs=[*names, *scoring], pooling=args.embed or "mean", out=out)
    except BaseException:
        if staged is not None:
            staged[0].unlink(missing_ok=True)
        raise
    arrays = {name: result[name] for name in names}
    lengths = None if args.embed else result["lengths"]
    summary = {"backend": session.backend, "quantize": None if session.quantization is None else
               session.quantization.scheme, "output": names[0] if len(names) == 1 else names,
               "shape": list(arrays[names[0]].shape), "padding_waste": round(result.plan.padding_waste, 4)}
    if lengths is not None:
        summary["lengths"] = lengths.tolist()
        if "log_probs" in result:
            summary["bits_per_token"] = [round(b, 4) if math.isfinite(b) else None  # strict JSON: no NaN
                                         for b in _bits_per_token(result.rows["log_probs"])]
    if args.output is not None:
        payloads: list[Payload]
        if staged is not None:
            staged[1].flush()
            payloads = [staged[0], lambda f: np.save(f, lengths)]
        elif args.output.suffix == ".npy":
            payloads = [lambda f: np.save(f, arrays[names[0]]), lambda f: np.save(f, lengths)]
        elif args.output.suffix == ".npz":
            everything = {**arrays, **({} if lengths is None else {"lengths": lengths})}
            payloads = [lambda f: np.savez(f, **everything)]
        else:
            payload = {"lengths": None if lengths is None else lengths.tolist(),
                       **{name: array.tolist() for name, array in arrays.items()}}
            payloads = [json.dumps(payload).encode()]
        write_files_atomic(dict(zip(_output_files(args.output, lengths is not None), payloads)), label="--output")
        summary["written"] = str(args.output)
    print(json.dumps(summary))
    return 0
