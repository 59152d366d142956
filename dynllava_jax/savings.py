"""What sparsification saved on one answer, from its exact lengths (next to dense mode).

`prefill_flops`: the vision tower, projector, LLM prefill and (dynamic) the image predictor,
counted by `flops.py`; `kv_bytes_used`: the K and V entries the question's tokens occupy at
the end of generation (the allocation, which `infer.py --json` reports as `kv_cache_bytes`,
also holds the batch's padding and unused slots).
"""

from __future__ import annotations

from . import flops as F
from .config import ModelConfig


def prefill_flops(cfg: ModelConfig, prompt_len: int, kept: int, dynamic: bool) -> int:
    """FLOPs of one prefill of `prompt_len` tokens (image slots included) keeping `kept`
    image tokens from the sparse layer on."""
    after = prompt_len - (cfg.num_image_tokens - kept)
    return (F.vision_tower(cfg) + F.projector(cfg)
            + F.prefill_llm(cfg, prompt_len, after, dynamic and kept < cfg.num_image_tokens))


def kv_bytes_used(cfg: ModelConfig, prompt_len: int, kept: int, generated: int,
                  kept_generated: int, itemsize: int = 4) -> int:
    """K and V bytes after generation: layers < l hold every token, layers >= l the prompt
    with `kept` image tokens and `kept_generated` of the `generated` tokens."""
    llm = cfg.llm
    l = min(cfg.sparse.sparse_layer, llm.num_layers)
    per_token = 2 * llm.num_kv_heads * llm.head_dim * itemsize
    after = prompt_len - (cfg.num_image_tokens - kept)
    return per_token * (l * (prompt_len + generated)
                        + (llm.num_layers - l) * (after + kept_generated))


def answer_savings(cfg: ModelConfig, ans: dict, dynamic: bool, use_cache: bool = True) -> dict:
    """Savings of one answer of `inference.Llava.answer` (an image question)."""
    import numpy as np
    itemsize = np.dtype(cfg.dtype).itemsize
    n = cfg.num_image_tokens
    plen = len(ans["prompt_token_ids"]) - 1 + n  # the marker stands for n slots
    kept = ans["image_tokens_kept"]
    gen = len(ans["token_ids"])  # generated tokens whose K, V are computed (not the EOS)
    in_cache = ans["generated_tokens_in_cache"] if dynamic else gen
    flops, dense_flops = prefill_flops(cfg, plen, kept, dynamic), prefill_flops(cfg, plen, n, False)
    kv = kv_bytes_used(cfg, plen, kept, gen, in_cache, itemsize) if use_cache else 0
    return {"prompt_tokens": plen, "generated_tokens": gen, "generated_tokens_in_cache": in_cache,
            "prefill_flops": flops, "prefill_flops_dense": dense_flops,
            "prefill_flops_vs_dense": flops / dense_flops,
            "kv_bytes": kv, "kv_bytes_dense": kv_bytes_used(cfg, plen, n, gen, gen, itemsize)}
