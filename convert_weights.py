#!/usr/bin/env python
"""Convert a PyTorch LLaVA-1.5 / Dynamic-LLaVA / llava-hf checkpoint for dynllava_jax.

    python convert_weights.py --src liuhaotian/llava-v1.5-7b --dst ckpt/llava-7b \\
        [--vision-tower clip-vit-large-patch14-336] [--dtype float32|bfloat16] [--force]

The source is a local directory (safetensors or pytorch_model*.bin, single or sharded);
the destination is written to a temporary sibling and renamed, so a failed conversion
leaves nothing behind. Bad input exits with status 2 and one `error:` message.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="PyTorch checkpoint directory")
    ap.add_argument("--dst", required=True, help="output directory (must not exist without --force)")
    ap.add_argument("--vision-tower", default=None,
                    help="local CLIP vision directory (config.json, weights, preprocessor_config.json); "
                         "needed when the checkpoint lacks the tower or has a non-standard one")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype of the stored params (default float32)")
    ap.add_argument("--force", action="store_true", help="replace --dst if it exists")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dynllava_jax.checkpoint import CheckpointDirError
    from dynllava_jax.checkpoint_io import CheckpointError
    from dynllava_jax.convert import convert

    info: dict = {}
    try:
        convert(args.src, args.dst, vision_tower=args.vision_tower, dtype=args.dtype,
                force=args.force, progress=not args.quiet, info=info)
    except (CheckpointError, CheckpointDirError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"layout:      {info['layout']}")
    print(f"params:      {info['params']:,} ({info['dtype']})")
    print(f"predictors:  {', '.join(info['predictors']) or 'none (plain LLaVA-1.5)'}")
    print(f"vision:      {info['vision_tower']}")
    if info["ignored"]:
        print(f"ignored:     {len(info['ignored'])} unused tensor(s), e.g. {info['ignored'][0]}")
    print(f"written to:  {info['dst']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
