"""Dynamic-LLaVA-7B: the paper's run (SPEC §4, official `run/train_dynamic_llava_7b.sh`).

From a converted LLaVA-1.5-7B (with or without predictors: missing ones are initialised),
1 epoch of llava_v1_5_mix665k at global batch 64 (official: 8 GPUs x 8, no accumulation),
AdamW lr 5e-6 (LLM + projector) / 2e-4 (predictors), weight decay 0, 3 % warm-up then
cosine, grad-norm clip 1.0, bf16 compute, model_max_length 2048, gradient checkpointing,
Gumbel tau 1.0 -> 0.1, lambda 100, keep rates 0.2 (image) / 0.5 (output text, answers
>= 50 tokens).

    python train.py --config configs/dynamic_llava_7b.py --init-from /ckpt/llava-v1.5-7b-jax \\
        --config.data.json_path=/data/llava_v1_5_mix665k.json --config.data.image_folder=/data
"""

from configs import base_config


def get_config():
    c = base_config()
    c.init_from = ""                    # --init-from: a converted llava-v1.5-7b
    c.dtype = "bfloat16"
    c.param_dtype = "float32"           # fp32 master weights and Adam moments (as ZeRO-3 bf16)
    c.optim.lr = 5e-6
    c.optim.predictor_lr = 2e-4
    c.optim.warmup_ratio = 0.03
    c.optim.schedule = "cosine"
    c.optim.train_projector = True      # official code; the paper freezes it
    c.train.global_batch_size = 64
    c.objective.ce_group_size = 8       # official CE mean: per GPU batch of 8, averaged
    c.train.microbatches = 1
    c.train.num_epochs = 1.0
    c.train.remat = "full"
    c.train.log_every = 1
    c.mesh.data = 1
    c.mesh.fsdp = -1                    # ZeRO-3-like: params + optimiser state over all chips
    c.mesh.tensor = 1
    c.checkpoint.every = 500
    c.checkpoint.keep = 2
    c.data.source = "json"
    c.data.seq_len = 2048
    c.data.requires_image = True  # the official run trains on image samples only
    c.objective.ce_chunk = 512    # never hold the [8, 2048, 32000] float32 logits at once
    c.data.model_max_length = 2048
    c.data.worker_count = 8
    c.data.read_threads = 8
    return c
