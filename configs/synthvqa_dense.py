"""SynthVQA stage 1: the dense model (vision tower, projector, LLM) from random weights.

    python -m dynllava_jax.data.synthvqa --out data/synthvqa          # data + tokenizer
    python train.py --config configs/synthvqa_tower.py --workdir runs/synthvqa_tower
    python train.py --config configs/synthvqa_dense.py --workdir runs/synthvqa_dense \
        --init-from runs/synthvqa_tower/export

The predictors exist (random) but are off: every image and answer token is kept. Without
--init-from it starts from random weights (the recipe without stage 0, the tower
pretraining of configs/synthvqa_tower.py).
Stage 2 (configs/synthvqa_dynamic.py) starts from WORKDIR/export.
"""

from configs import base_config


def get_config():
    c = base_config()
    c.init_from = "random"
    c.model_preset = "synthvqa"
    c.assets_dir = "data/synthvqa/tokenizer"   # written by dynllava_jax.data.synthvqa
    c.dtype = "float32"                        # CPU
    c.param_dtype = "float32"
    c.sparse.use_vision_predictor = False
    c.sparse.use_output_text_predictor = False
    c.optim.train_vision = True                # nothing is pretrained
    c.optim.vision_lr_scale = 2.0
    c.optim.lr = 5e-4
    c.optim.predictor_lr = 0.0
    c.optim.warmup_ratio = 0.05
    c.optim.weight_decay = 0.05
    c.train.global_batch_size = 8
    c.train.total_steps = 5000
    c.train.remat = "none"
    c.train.log_every = 10
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.checkpoint.every = 250
    c.data.json_path = "data/synthvqa/train.json"
    c.data.image_folder = "data/synthvqa"
    c.data.seq_len = 384   # the 7-question records are ~364-379 tokens
    c.data.model_max_length = 384
    c.data.read_threads = 2
    # The cell objective: a direct path from what each of the 3 x 3 grid cells holds
    # (the records' cell_text) to the tower, which the answers alone reach too weakly.
    c.data.cell_grid = 3
    c.data.cell_tokens = 5       # "top left small red circle": place, then content
    c.objective.cell_loss_weight = 1.0
    # The attention objective: where the LLM predicts an answer whose question names one
    # object, head 0 of layer 1 is taught to attend to that object's cell (the records'
    # turn_cells), so that it learns to find "the red object" among the 144 image tokens.
    c.data.attention_turns = 8   # records hold up to 7 answers
    c.objective.attention_loss_weight = 1.0
    # Position questions: heads 0 and 1 of that layer on the two objects they name.
    c.data.attention_pairs = True
    c.objective.pair_loss_weight = 0.25
    # Multiple choice: where the LLM predicts an option letter, head 1 of layer 2 is taught
    # to attend to the right option's text (choice), head 0 of layer 0 at every option's text
    # to its letter (letter), and head 1's own output to predict the letter (copy): without
    # them the model answers multiple choice at chance (docs/synthvqa_history.md).
    c.data.choice_targets = True
    c.objective.choice_loss_weight = 0.25
    c.objective.letter_loss_weight = 0.25
    c.objective.copy_loss_weight = 0.25
    return c
