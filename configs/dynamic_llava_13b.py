"""Dynamic-LLaVA-13B: the paper's run (official `run/train_dynamic_llava_13b.sh`): as the
7B run, from a converted LLaVA-1.5-13B; global batch 64 as 8 GPUs x 4 x 2 accumulation
steps (here: 2 micro-batches per step).

    python train.py --config configs/dynamic_llava_13b.py --init-from /ckpt/llava-v1.5-13b-jax \\
        --config.data.json_path=/data/llava_v1_5_mix665k.json --config.data.image_folder=/data
"""

import importlib.util
from pathlib import Path


def get_config():
    spec = importlib.util.spec_from_file_location(
        "_dynamic_llava_7b", Path(__file__).with_name("dynamic_llava_7b.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.train.microbatches = 2
    c.objective.ce_group_size = 4       # official: per-GPU micro-batch of 4, averaged
    return c
