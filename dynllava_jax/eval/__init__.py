"""Evaluation: `python -m dynllava_jax.eval SUBCOMMAND ...` (see `__main__`)."""
