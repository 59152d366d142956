"""python -m dynllava_jax.eval synth --checkpoint C --data D --out O [--sweep]"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynllava_jax.eval")
    sub = p.add_subparsers(dest="command", required=True)
    from dynllava_jax.eval import synth
    synth.add_arguments(sub.add_parser("synth", help="accuracy on the SynthVQA held-out split"))
    a = p.parse_args(argv)
    if a.command == "synth":
        return synth.main(a)
    return 2


if __name__ == "__main__":
    sys.exit(main())
