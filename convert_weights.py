#!/usr/bin/env python
"""Convert a PyTorch LLaVA-1.5 / Dynamic-LLaVA / llava-hf checkpoint for dynllava_jax, and back.

    python convert_weights.py --src liuhaotian/llava-v1.5-7b --dst ckpt/llava-7b \\
        [--vision-tower clip-vit-large-patch14-336] [--dtype float32|bfloat16] [--force]
    python convert_weights.py --export --src ckpt/llava-7b --dst out/llava-7b \\
        --format original|llava-hf [--dtype float32|float16|bfloat16] [--max-shard-size 5GB]
        [--dense-only] [--force]

The source is a local directory (safetensors or pytorch_model*.bin, single or sharded; with
--export a converted directory or train.py's WORKDIR/export); the destination is written to
a temporary sibling and renamed, so a failed run leaves nothing behind. Bad input exits with
status 2 and one `error:` message.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="PyTorch checkpoint directory (with --export: a converted one)")
    ap.add_argument("--dst", required=True, help="output directory (must not exist without --force)")
    ap.add_argument("--vision-tower", default=None,
                    help="local CLIP vision directory (config.json, weights, preprocessor_config.json); "
                         "needed when the checkpoint lacks the tower or has a non-standard one")
    ap.add_argument("--dtype", default=None,
                    help="dtype of the written weights: float32 (default) or bfloat16; with --export "
                         "also float16 (default: the params' dtype)")
    ap.add_argument("--force", action="store_true", help="replace --dst if it exists")
    ap.add_argument("--allow-nonfinite", action="store_true",
                    help="convert weights holding NaN or Inf (refused by default: such a model answers garbage)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ex = ap.add_argument_group("export (converted directory -> PyTorch)")
    ex.add_argument("--export", action="store_true", help="export --src back to a PyTorch layout")
    ex.add_argument("--format", default=None,
                    help="original (LLaVA / Dynamic-LLaVA, predictors included) or llava-hf "
                         "(transformers' LlavaForConditionalGeneration: dense)")
    ex.add_argument("--max-shard-size", default=None, help="largest weight file, e.g. 5GB (default), 500MB")
    ex.add_argument("--dense-only", action="store_true",
                    help="llava-hf: export the dense model of a Dynamic-LLaVA checkpoint, without its predictors")
    return ap.parse_args(argv)


def _export(args) -> int:
    from dynllava_jax.export import export

    info: dict = {}
    export(args.src, args.dst, args.format, dtype=args.dtype,
           max_shard_size=args.max_shard_size or "5GB", dense_only=args.dense_only,
           force=args.force, progress=not args.quiet, info=info)
    print(f"format:      {info['format']}")
    print(f"params:      {info['params']:,} ({info['dtype']})")
    print(f"predictors:  {info['predictors']}")
    print(f"vision:      {info['vision']}")
    print(f"weights:     {', '.join(info['files'])}")
    for note in info["notes"]:
        print(f"note:        {note}")
    print(f"written to:  {info['dst']}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from dynllava_jax.checkpoint import CheckpointDirError
    from dynllava_jax.checkpoint_io import CheckpointError
    from dynllava_jax.checksums import ChecksumError
    from dynllava_jax.convert import convert

    try:
        if args.export:
            if args.format is None:
                raise CheckpointError("--export needs --format original or --format llava-hf")
            if args.vision_tower is not None or args.allow_nonfinite:
                raise CheckpointError("--vision-tower and --allow-nonfinite apply to conversion, not to --export")
            return _export(args)
        if args.format is not None or args.max_shard_size is not None or args.dense_only:
            raise CheckpointError("--format, --max-shard-size and --dense-only need --export")
        info: dict = {}
        convert(args.src, args.dst, vision_tower=args.vision_tower, dtype=args.dtype or "float32",
                force=args.force, progress=not args.quiet, info=info, allow_nonfinite=args.allow_nonfinite)
    except (CheckpointError, CheckpointDirError, ChecksumError, FileNotFoundError, PermissionError,
            NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in info["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"layout:      {info['layout']}")
    print(f"params:      {info['params']:,} ({info['dtype']})")
    print(f"predictors:  {', '.join(info['predictors']) or 'none (plain LLaVA-1.5)'}")
    print(f"vision:      {info['vision_tower']}")
    print(f"tokenizer:   {info['tokenizer']}")
    if info["ignored"]:
        print(f"ignored:     {len(info['ignored'])} unused tensor(s), e.g. {info['ignored'][0]}")
    print(f"written to:  {info['dst']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
