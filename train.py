#!/usr/bin/env python
"""Train Dynamic-LLaVA: LLaVA-1.5 plus its two learned token-dropping predictors.

    python train.py --config configs/tiny_run.py [--workdir DIR] [--init-from CONVERTED_DIR]
                    [--config.train.total_steps=100 --config.optim.lr=1e-5 ...]

A run resumes from the newest checkpoint in its workdir. The same command runs on every
host of a multi-host job (jax.distributed is initialised from the environment).
Writes WORKDIR/metrics.jsonl, WORKDIR/tb/ (TensorBoard), WORKDIR/checkpoints/ and, at the
end, WORKDIR/export (a converted dir that infer.py reads).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config field can be overridden: --config.a.b=value (e.g.\n"
               "--config.train.total_steps=100 --config.optim.lr=1e-5); configs/__init__.py\n"
               "lists every field with its default and meaning.\n\n"
               "WORKDIR may be a local folder or a bucket URL (gs://bucket/run; needs gcsfs).\n"
               "SIGTERM (preemption) or Ctrl-C: the run saves a checkpoint after the current\n"
               "step and exits (status 143 / 130); the same command resumes it. A second\n"
               "Ctrl-C quits without saving. Exit status 2: bad input (one 'error:' line).")
    ap.add_argument("--config", required=True, metavar="FILE",
                    help="run configuration, a configs/*.py file (required)")
    ap.add_argument("--workdir", default=None, metavar="DIR_OR_URL",
                    help="where checkpoints, metrics.jsonl, tb/ and export/ go; a run resumes "
                         "from its newest checkpoint (default: workdirs/<config file name>)")
    ap.add_argument("--init-from", default=None, metavar="DIR_OR_URL",
                    help="converted checkpoint (convert_weights.py) to start from (default: the "
                         "config's init_from)")
    ap.add_argument("--export-only", action="store_true",
                    help="export the newest checkpoint of the workdir to WORKDIR/export and exit "
                         "(default: train)")
    ap.add_argument("--no-progress", action="store_true",
                    help="log one line per step instead of a progress bar (default: a bar)")
    args, rest = ap.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        a = rest[i]
        if not a.startswith("--config."):
            ap.error(f"unrecognised argument {a!r}")
        a = a[len("--config."):]
        if "=" not in a:
            if i + 1 >= len(rest):
                ap.error(f"--config.{a} needs a value")
            a = f"{a}={rest[i + 1]}"
            i += 1
        overrides.append(a)
        i += 1
    return args, overrides


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import configs
    from dynllava_jax.checkpoint import CheckpointDirError
    try:
        config = configs.apply_overrides(configs.load(args.config), overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # A bucket URL (gs://...) stays a URL: never Path() it into a local "gs:/" folder.
    workdir = args.workdir or str(Path("workdirs") / Path(args.config).stem)
    from dynllava_jax.trainer import Trainer
    from dynllava_jax.data.pipeline import DataError
    try:
        trainer = Trainer(config, workdir, init_from=args.init_from,
                          progress=not args.no_progress, export_only=args.export_only)
        try:
            if args.export_only:
                if trainer.ckpt.latest_step() is None:
                    print(f"error: no checkpoint in {workdir}/checkpoints", file=sys.stderr)
                    return 2
                print(f"exported {trainer.export(trainer.workdir / 'export')}")
                return 0
            last = trainer.run()
        finally:
            trainer.close()  # releases WORKDIR/.lock
    except (FileNotFoundError, ValueError, CheckpointDirError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the loop, or a second one while stopping
        print("error: interrupted: nothing saved now; run the same command to resume from "
              "the last checkpoint", file=sys.stderr)
        return 130
    if trainer.stopped:
        from dynllava_jax.preemption import EXIT_CODES
        print(f"stopped by {trainer.stopped} after step {trainer.step}: checkpoint saved in "
              f"{trainer.ckpt.directory}/{trainer.step}; run the same command to resume",
              file=sys.stderr)
        return EXIT_CODES[trainer.stopped]
    if last:
        print(f"done: step {trainer.step}, loss {last['loss']:.4f}, workdir {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
