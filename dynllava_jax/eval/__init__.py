"""Evaluation: LLaVA benchmark scorers (``python -m dynllava_jax.eval score TASK``), answer
merging, perplexity (``ppl``) and the SynthVQA held-out evaluation (``synth``).

Each scorer module holds one benchmark's rules as pure functions over parsed rows plus a
``score_files`` that reads the files LLaVA's own script reads; ``__main__`` is the CLI.
"""
