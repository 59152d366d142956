"""SynthVQA stage 0: the vision tower and projector pretrained alone on the cell objective.

    python -m dynllava_jax.data.synthvqa --out data/synthvqa          # data + tokenizer
    python train.py --config configs/synthvqa_tower.py --workdir runs/synthvqa_tower

LLaVA starts from a pretrained CLIP tower; ours is trained from random weights, and through
the answers alone it learns the shapes late (the README's SynthVQA section). This stage
teaches it what each grid cell holds before the LLM trains on it: `objective.ce_loss_weight
= 0` runs no LLM, only the tower, the projector and the cell objective (each cell's mean
image token scored against the input embeddings of the words naming its place and content).
Stage 1 (configs/synthvqa_dense.py) starts from WORKDIR/export.
"""

from configs import load
from pathlib import Path


def get_config():
    c = load(Path(__file__).with_name("synthvqa_dense.py"))
    c.init_from = "random"
    c.assets_dir = "data/synthvqa/tokenizer"
    c.objective.ce_loss_weight = 0.0
    c.objective.attention_loss_weight = 0.0   # the terms that read the LLM are off
    c.data.attention_turns = 0
    c.data.attention_pairs = False
    c.objective.pair_loss_weight = 0.0
    c.data.choice_targets = False
    c.objective.choice_loss_weight = 0.0
    c.objective.letter_loss_weight = 0.0
    c.objective.copy_loss_weight = 0.0
    c.optim.lr = 1e-3
    c.optim.vision_lr_scale = 1.0
    c.train.global_batch_size = 32
    c.train.total_steps = 1500
    c.checkpoint.every = 500
    return c
