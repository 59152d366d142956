"""SynthVQA, an experiment after stage 1 (not part of the bundled model's recipe): a fresh LLM
on stage 1's vision tower, to learn to find a named object among the 144 image tokens.

    python train.py --config configs/synthvqa_lookup.py --workdir runs/synthvqa_lookup

Stage 1's LLM answers what needs no lookup (count, the word) but not "What shape is the red
object?" (docs/synthvqa_history.md). Here the LLM is drawn anew at LLaMA's init scale
(N(0, 0.02)); the tower trains on with every token scored against its cell's words
(`cell_per_token`); the records are `train_lookup.json` (a short-question record for every
image); the CE is a mean over samples of their token means, so that the description records'
~150 answer tokens no longer outweigh a record's short answers. Measured (README): after 3,000
steps it still answers the named-object questions at chance.
"""

from configs import load
from pathlib import Path


def get_config():
    c = load(Path(__file__).with_name("synthvqa_dense.py"))
    c.init_from = "runs/synthvqa_dense/export"
    c.assets_dir = ""
    c.reinit = "llm"
    c.init_std = 0.02
    c.objective.cell_per_token = True
    c.objective.ce_group_size = 1
    c.data.json_path = "data/synthvqa/train_lookup.json"
    c.train.total_steps = 3000
    c.train.seed = 2
    c.data.attention_turns = 0               # as measured: before the attention objective
    c.objective.attention_loss_weight = 0.0
    return c
