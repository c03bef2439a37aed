"""One forward pass in this (fresh) process and its peak resident memory, as one JSON line -- what the memory model
(``reformer_rt.runtime.memory``) is calibrated and tested against.

    python tests/helpers/memory_probe.py CHECKPOINT BACKEND LENGTH [--outputs logits,log_probs] [--out-file F.npy]

Prints {"backend", "length", "outputs", "base_bytes" (the high-water mark once the Session is open), "peak_bytes"
(after the pass), "predicted_bytes", "seconds"}. ``--out-file`` writes the first output into a memory-mapped .npy
(``Session.run(out=...)``) instead of memory of its own. The high-water mark is VmHWM, this process's own:
``ru_maxrss`` carries a forking parent's over exec.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def high_water_mark() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("backend")
    parser.add_argument("length", type=int)
    parser.add_argument("--outputs", default="logits")
    parser.add_argument("--out-file", type=Path)
    args = parser.parse_args()

    import numpy as np

    from reformer_rt.runtime import Session

    session = Session(args.checkpoint, backend=args.backend, device="cpu", max_tokens_per_batch=args.length)
    base = high_water_mark()
    outputs = args.outputs.split(",")
    ids = np.random.default_rng(0).integers(0, session.config.vocab_size, (1, args.length), dtype=np.int64)
    out = None
    if args.out_file is not None:
        shape = (1, args.length, session.config.vocab_size if outputs[0] == "logits" else 2 * session.config.hidden_size)
        out = {outputs[0]: np.lib.format.open_memmap(args.out_file, mode="w+", dtype=np.float32, shape=shape)}
    predicted = session.memory_footprint([args.length], session.output_kinds(outputs),
                                         outputs if out is None else outputs[1:]).peak
    start = time.perf_counter()
    session.run(ids, outputs=outputs, out=out)
    seconds = time.perf_counter() - start
    print(json.dumps({"backend": session.backend, "length": args.length, "outputs": outputs,
                      "out_file": out is not None, "base_bytes": base, "peak_bytes": high_water_mark(),
                      "predicted_bytes": predicted, "seconds": round(seconds, 2)}))


if __name__ == "__main__":
    main()
