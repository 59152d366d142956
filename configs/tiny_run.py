"""The tiny demo run: the bundled tiny Dynamic-LLaVA (5 layers, hidden 96, 64 image tokens)
on a generated synthetic dataset, float32 on CPU, about a minute on 2 cores.

    python train.py --config configs/tiny_run.py --workdir /tmp/tiny_run
"""

from configs import base_config


def get_config():
    c = base_config()
    c.init_from = "assets/tiny-dynamic-llava"
    c.model_preset = "tiny"
    c.dtype = "float32"                 # CPU: float32 (bit-exact resume is tested in it)
    c.param_dtype = "float32"
    # The synthetic answers are short at this sequence length: score answers of >= 16.
    c.sparse.output_text_len_for_training = 16
    c.optim.lr = 1e-3
    c.optim.predictor_lr = 1e-3
    c.optim.warmup_ratio = 0.1
    c.train.global_batch_size = 8
    c.train.total_steps = 40
    c.train.remat = "none"
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.checkpoint.every = 10
    c.data.seq_len = 192
    c.data.model_max_length = 192
    c.data.read_threads = 2
    c.synthetic.n = 96
    return c
