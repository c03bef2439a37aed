"""``reformer-rt build``: a TensorRT engine from a plugin-form ONNX export, through the engine cache.

    reformer-rt build MODEL.onnx -o MODEL.engine --min 1x1 --opt 4x16384 --max 8x65536

writes ``MODEL.engine`` and its record ``MODEL.engine.json`` (model config, export options, cache key, engine
sha256), so ``reformer-rt run MODEL.engine`` / ``Session("MODEL.engine")`` can open the engine alone. Shapes are
batch x length in tokens for both ``input_ids`` and ``attention_mask``; defaults: max = (131072 // max_length) x
max_length of the export, min = 1x1, opt = max. A build is reused from the engine cache (default
``$REFORMER_RT_CACHE/engines``, else ``~/.cache/reformer-rt/engines``) when the ONNX file, TensorRT version, GPU,
profile and options all match. Everything the engine builder does is described in ``engine_builder.py``.

Needs TensorRT and a CUDA GPU; without them the command exits with code 2 and says what to install.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reformer_rt.export.metadata import export_info
from reformer_rt.models import InputError

from ..artifacts import ENGINE_SUFFIXES
from ..engine_builder import BuildOptions, engine_for
from ..engine_cache import EngineCache, sidecar_path, write_engine_file
from ..engine_profiles import make_profile, parse_batch_length


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("build", help="build a TensorRT engine from a plugin-form ONNX export",
                              description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("model", type=Path, help="ONNX file from reformer-rt export --attention plugin")
    p.add_argument("-o", "--output", type=Path, required=True, help="engine file to write (e.g. MODEL.engine)")
    p.add_argument("--min", dest="min_shape", metavar="BxL", help="smallest batch x length (default 1x1)")
    p.add_argument("--opt", dest="opt_shape", metavar="BxL", help="shape TensorRT tunes for (default: --max)")
    p.add_argument("--max", dest="max_shape", metavar="BxL",
                   help="largest batch x length (default: (131072 // max_length) x max_length)")
    p.add_argument("--workspace-mib", type=int, help="limit TensorRT's workspace memory pool (MiB)")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file to load and update")
    p.add_argument("--cache-dir", type=Path, help="engine cache directory (default: the reformer-rt cache)")
    p.add_argument("--no-cache", action="store_true", help="always build; neither read nor write the cache")
    p.add_argument("--no-tf32", action="store_true", help="keep float32 matmuls in full float32 (no TF32)")
    p.set_defaults(func=run)


def _check_paths(args: argparse.Namespace) -> None:
    """The files the build writes, checked before TensorRT spends minutes building."""
    if args.output.suffix not in ENGINE_SUFFIXES:
        raise InputError(f"-o: got {args.output}; expected a file name ending in {' or '.join(ENGINE_SUFFIXES)} "
                         "(reformer-rt run recognises engines by that suffix)")
    if args.output.is_dir():
        raise InputError(f"-o: {args.output} is a directory; expected a file path such as model.engine")
    if not args.output.absolute().parent.is_dir():
        raise InputError(f"-o: {args.output.absolute().parent} is not an existing directory; create it or choose "
                         "another")
    if args.timing_cache is not None and args.timing_cache.is_dir():
        raise InputError(f"--timing-cache: {args.timing_cache} is a directory; expected a file (created if missing)")
    if args.cache_dir is not None and args.cache_dir.exists() and not args.cache_dir.is_dir():
        raise InputError(f"--cache-dir: {args.cache_dir} is a file; expected a directory (created if missing)")


def run(args: argparse.Namespace) -> int:
    _check_paths(args)
    max_length = export_info(args.model, attention="plugin").max_length
    given = ((args.min_shape, "--min"), (args.opt_shape, "--opt"), (args.max_shape, "--max"))
    low, opt, high = (parse_batch_length(text, flag) if text else None for text, flag in given)
    profile = make_profile(low, opt, high, max_length)
    if args.workspace_mib is not None and args.workspace_mib < 1:
        raise InputError(f"--workspace-mib: got {args.workspace_mib}; expected a positive number of MiB")
    cache = None if args.no_cache else EngineCache(args.cache_dir)
    options = BuildOptions(profile, args.workspace_mib, args.timing_cache, tf32=not args.no_tf32)
    print(f"reformer-rt build: {args.model} (max length {max_length}), profile {profile}", file=sys.stderr)
    built = engine_for(args.model, options, cache, log=lambda line: print(line, file=sys.stderr))
    write_engine_file(args.output, built.engine, built.record)
    key = built.record["key"]
    source = "engine cache" if built.cache_hit else "built"
    print(f"wrote {args.output} ({len(built.engine) / 2**20:.1f} MiB, {source} in {built.seconds:.1f} s; "
          f"TensorRT {key['tensorrt_version']}, {key['gpu_name']} sm {key['compute_capability']}) and "
          f"{sidecar_path(args.output)}")
    return 0
