"""``reformer-rt bench accuracy``: what int8 costs on text -- bits per token, top-1 agreement and LSH bucket
agreement of every backend and quantization choice against the float PyTorch model, on the same windows.

    reformer-rt bench accuracy                        # the bundled demo model on its held-out text
    reformer-rt bench accuracy CHECKPOINT --text corpus.txt --windows 96 --length 512

Variants: ONNX Runtime on the float portable export (the floor: float against float), on int8 exports with the
hashing path (``rotations`` and ``query_key``) in float, with only the rotations in float, and with everything
quantized; the torch backend's float path (fused CPU attention), and its int8 Linear layers with and without the
LSH query/key projections (the rotation product is not a Linear layer: torch keeps it float in both). The metrics and
the text are ``reformer_rt.export.quality``'s, as export validation measures them; the reference is the model's
own forward (transformers' formulation). Each int8 export is written by ``export_onnx`` (unvalidated: this command
is the measurement), so a run traces the model four times.

Writes ``accuracy.json`` into ``--out`` and prints a markdown table with the machine. Accuracy only: no timing
(``reformer-rt bench --backends onnxruntime,onnxruntime-int8,torch,torch-int8`` times them).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from reformer_rt.models import InputError, ReformerConfig
from reformer_rt.models.checkpoint import CONFIG_FILE
from reformer_rt.models.presets import demo_model_dir

from ..artifacts import write_atomic
from .harness import Provenance, json_bytes, make_out_dir, markdown_table

COMMAND = "bench accuracy"


@dataclasses.dataclass(frozen=True)
class Variant:
    backend: str  # "onnxruntime" or "torch"
    fp32: tuple[str, ...] | None  # the hashing parts kept float; None: the float model

    @property
    def label(self) -> str:
        if self.fp32 is None:
            return f"{self.backend} float32"
        return f"{self.backend} int8, float: {', '.join(self.fp32) or 'nothing'}"


VARIANTS = (Variant("onnxruntime", None), Variant("onnxruntime", ("rotations", "query_key")),
            Variant("onnxruntime", ("rotations",)), Variant("onnxruntime", ()),
            Variant("torch", None), Variant("torch", ("rotations", "query_key")), Variant("torch", ("rotations",)))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("accuracy", help="bits per token, top-1 and LSH bucket agreement of int8 vs float",
                              description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("model", nargs="?", type=Path, help="checkpoint directory of a language model (default: the demo "
                   "model)")
    p.add_argument("--text", type=Path, help="UTF-8 text, tokenized by the model's tokenizer (default: held-out "
                   "Python source for a byte-level model, else random ids)")
    p.add_argument("--windows", type=int, default=96, help="evenly spaced windows of the text (default 96)")
    p.add_argument("--length", type=int, default=512, help="tokens per window, rounded down to the chunk multiple "
                   "(default 512)")
    p.add_argument("--out", type=Path, default=Path("bench-accuracy"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reformer_rt.export import QualityCheck
    from reformer_rt.export.quality import default_text, text_windows, window_length

    model_dir = args.model or demo_model_dir()
    if not (model_dir / CONFIG_FILE).is_file():
        raise InputError(f"MODEL: got {model_dir}; expected a checkpoint directory (config.json + weights)")
    if args.windows < 1 or args.length < 1:
        raise InputError(f"--windows / --length: got {args.windows} / {args.length}; expected >= 1")
    make_out_dir(args.out)
    config = ReformerConfig.from_json_file(model_dir / CONFIG_FILE)
    check = QualityCheck(windows=args.windows, length=args.length)
    if args.text is not None:
        from ..tokenizers import load_tokenizer

        try:
            text = args.text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--text: cannot read {args.text} as UTF-8 text ({exc})") from exc
        ids, source = load_tokenizer(model_dir, config).encode(text), str(args.text)
    else:
        ids, source = default_text(config.vocab_size)
    from reformer_rt.export import load_source

    reference = load_source(model_dir)
    import numpy as np

    windows = text_windows(np.asarray(ids, dtype=np.int64), check.windows, window_length(reference, check.length))
    rows = [_measure(model_dir, reference, variant, windows) for variant in VARIANTS]
    provenance = Provenance.here()
    report = {**dataclasses.asdict(provenance), "model": str(model_dir), "text": source,
              "windows": int(windows.shape[0]), "length": int(windows.shape[1]), "rows": rows}
    write_atomic(args.out / "accuracy.json", json_bytes(report), label="--out")
    print(f"machine: {provenance.machine}, {provenance.date}; {model_dir}, {windows.shape[0]} windows of "
          f"{windows.shape[1]} tokens of {source}\n\n{table(rows)}\n\nwrote {args.out / 'accuracy.json'}")
    return 0


def _measure(model_dir: Path, reference: object, variant: Variant, windows: object) -> dict[str, object]:
    """One variant against the reference model on ``windows`` (a JSON row)."""
    from reformer_rt.export import Quantization, export_onnx, load_source
    from reformer_rt.export.quality import compare, graph_forward, torch_forward

    if variant.backend == "onnxruntime":
        import onnx

        quantization = None if variant.fp32 is None else Quantization("int8", variant.fp32)
        with tempfile.TemporaryDirectory(prefix="reformer-rt-accuracy-") as tmp:
            path = Path(tmp) / "model.onnx"
            export_onnx(model_dir, path, validate=False, log=None, quantize=quantization)
            candidate = graph_forward(onnx.load(str(path)))
    else:
        from ..backends import quantize_linear_layers

        model = load_source(model_dir)
        if variant.fp32 is not None:
            model, _ = quantize_linear_layers(model, Quantization("int8", variant.fp32))
        candidate = torch_forward(model, fused=True)
    result = compare(torch_forward(reference), candidate, windows)  # type: ignore[arg-type]
    return {"variant": variant.label, "backend": variant.backend, "fp32": variant.fp32,
            **dataclasses.asdict(result), "increase": result.increase}


def table(rows: list[dict[str, object]]) -> str:
    def share(value: object) -> str:
        return "-" if value is None else f"{100 * float(value):.2f} %"  # type: ignore[arg-type]

    return markdown_table(
        ("variant", "bits per token", "vs float model", "top-1 agreement", "LSH bucket ids equal", "per LSH layer"),
        [(row["variant"], f"{row['bits']:.4f}", f"{row['increase']:+.4f}", share(row["top1_agreement"]),
          share(row["bucket_agreement"]), " / ".join(f"{100 * a:.1f}" for a in row["bucket_agreement_per_layer"]))
         for row in rows])
