"""Analytic FLOP counts of what `generate.py` runs (matrix products only).

Conventions: one multiply-add = 2 FLOPs (XLA's convention too); only matrix products
(dense layers, attention scores and values, convolutions) are counted: norms, RoPE,
softmax, activations and residual adds are left out, so XLA's count of the same program
is a little higher (well under 1 % at 7B scale, a few % for the tiny test model).
Attention is counted over the full query x key rectangle, masked entries included: the
implementation computes them (no causal skipping), and so does the paper's formula.

All functions count ONE sequence; multiply by the batch size.
"""

from __future__ import annotations

from typing import Iterable

from .config import LLMConfig, ModelConfig


# -- building blocks ----------------------------------------------------------------

def llm_layer_macs_per_token(llm: LLMConfig) -> int:
    """Multiply-adds of the dense layers of one decoder layer, per token:
    q, o = H x (heads x D); k, v = H x (kv heads x D); SwiGLU gate, up, down = 3 x H x I."""
    h, d = llm.hidden_size, llm.head_dim
    return h * llm.num_heads * d * 2 + 2 * h * llm.num_kv_heads * d + 3 * h * llm.intermediate_size


def llm_layer(llm: LLMConfig, q: int, k: int) -> int:
    """One decoder layer, `q` query tokens attending `k` key slots."""
    return 2 * q * llm_layer_macs_per_token(llm) + 4 * q * k * llm.num_heads * llm.head_dim


def lm_head(cfg: ModelConfig, tokens: int = 1) -> int:
    return 2 * tokens * cfg.llm.hidden_size * cfg.llm.vocab_size


def vision_tower(cfg: ModelConfig) -> int:
    """Patch embedding + the CLIP encoder layers that run (select_layer -2: 23 of 24)."""
    v = cfg.vision
    n, c = v.num_patches, v.hidden_size
    t = n + 1  # CLS
    patch = 2 * n * 3 * v.patch_size ** 2 * c
    layer = 2 * t * (4 * c * c + 2 * c * v.intermediate_size) + 4 * t * t * c
    return patch + v.layers_used * layer


def projector(cfg: ModelConfig) -> int:
    h = cfg.llm.hidden_size
    return 2 * cfg.num_image_tokens * (cfg.vision.hidden_size * h + h * h)


def _output_mlp(d: int) -> int:
    return d * (d // 2) + (d // 2) * (d // 4) + (d // 4) * 2


def image_predictor(cfg: ModelConfig) -> int:
    s, n, h = cfg.sparse, cfg.num_image_tokens, cfg.llm.hidden_size
    d, f = s.d_model, s.dim_feedforward
    block = 2 * n * (3 * d * d + d * d + 2 * d * f) + 4 * n * n * d
    return 2 * n * h * d + s.num_layers * block + 2 * n * _output_mlp(d)


def text_predictor(cfg: ModelConfig, tokens: int) -> int:
    d = cfg.sparse.d_model
    return 2 * tokens * (cfg.llm.hidden_size * d + _output_mlp(d))


def sparse_layer(cfg: ModelConfig) -> int:
    return min(cfg.sparse.sparse_layer, cfg.llm.num_layers)


# -- the passes of generate.py ------------------------------------------------------

def prefill_llm(cfg: ModelConfig, t: int, t_after: int, predictor: bool) -> int:
    """`generate.prefill` without the vision tower: layers < l on `t` tokens, the image
    predictor (dynamic mode with an image), layers >= l on `t_after` tokens, the LM head
    on the last token."""
    l, n = sparse_layer(cfg), cfg.llm.num_layers
    out = l * llm_layer(cfg.llm, t, t) + (n - l) * llm_layer(cfg.llm, t_after, t_after)
    return out + (image_predictor(cfg) if predictor else 0) + lm_head(cfg)


def decode_step(cfg: ModelConfig, dense_slots: int, sparse_slots: int, dynamic: bool) -> int:
    """One KV-cache decoding step: the new token attends every slot of its caches
    (unused ones are masked, not skipped)."""
    l, n = sparse_layer(cfg), cfg.llm.num_layers
    out = l * llm_layer(cfg.llm, 1, dense_slots) + (n - l) * llm_layer(cfg.llm, 1, sparse_slots)
    return out + (text_predictor(cfg, 1) if dynamic else 0) + lm_head(cfg)


def no_cache_step(cfg: ModelConfig, full_len: int, compact_len: int, dynamic: bool,
                  has_image: bool = True) -> int:
    """One step of `generate._no_cache_chunk` on static lengths: layers < l on
    `full_len`, both predictors (dynamic), layers >= l on `compact_len`, LM head on 1."""
    l, n = sparse_layer(cfg), cfg.llm.num_layers
    out = l * llm_layer(cfg.llm, full_len, full_len)
    out += (n - l) * llm_layer(cfg.llm, compact_len, compact_len) + lm_head(cfg)
    if dynamic:
        out += (image_predictor(cfg) if has_image else 0) + text_predictor(cfg, full_len)
    return out


def kept_generated(step: int, keep_rate: float) -> int:
    """Generated tokens that layers >= l see at no-cache step `step` (0-based; the sequence
    then holds prompt + `step` generated tokens): the newest always, the older
    `step - 1` at `keep_rate` (an assumed average, rounded)."""
    if step <= 0:
        return 0
    return 1 + int(round(keep_rate * (step - 1)))


def no_cache_ideal(cfg: ModelConfig, prompt: int, prompt_after: int, new_tokens: int,
                   dynamic: bool, keep_rate: float) -> int:
    """A whole no-cache generation (vision tower excluded) where every step runs on the
    exact lengths: step i has prompt + i tokens in layers < l and, in dynamic mode,
    prompt_after + kept_generated(i) in layers >= l (what the paper's method computes)."""
    total = 0
    for i in range(new_tokens):
        full = prompt + i
        compact = prompt_after + kept_generated(i, keep_rate) if dynamic else full
        total += no_cache_step(cfg, full, compact, dynamic)
    return total


def no_cache_buckets(prompt_padded: int, prompt_after: int, new_tokens: int,
                     bucket: int, keep_rate: float = 1.0) -> list[tuple[int, int, int]]:
    """The chunks `generate._generate_no_cache` compiles: (steps, full_len, compact_len).

    Mirrors its rule: the first chunk's layers >= l run on prompt_after + stop slots; a later
    chunk on what was kept at the previous chunk's last step plus one slot per step,
    rounded up to the bucket (with generated tokens kept at `keep_rate`)."""
    out, start, bucket = [], 0, max(1, bucket)
    kept = prompt_after
    while start < new_tokens:
        stop = min(new_tokens, (start // bucket + 1) * bucket)
        need = kept + (stop - start) if start else prompt_after + stop
        compact = min(prompt_after + stop, -(-need // bucket) * bucket)
        out.append((stop - start, prompt_padded + stop, compact))
        kept = prompt_after + kept_generated(stop - 1, keep_rate)
        start = stop
    return out


def no_cache_implemented(cfg: ModelConfig, prompt_padded: int, prompt_after: int,
                         new_tokens: int, dynamic: bool, bucket: int, keep_rate: float = 1.0) -> int:
    """A whole no-cache generation as `generate.py` compiles it (vision excluded): every
    step of a chunk runs on the chunk's static lengths (see `no_cache_buckets`)."""
    return sum(steps * no_cache_step(cfg, full, compact, dynamic)
               for steps, full, compact in no_cache_buckets(prompt_padded, prompt_after,
                                                            new_tokens, bucket, keep_rate))


# -- the paper's count of the image tokens -------------------------------------------

def paper_image_tokens(cfg: ModelConfig, tokens_per_layer: Iterable[int]) -> int:
    """Dynamic-LLaVA's count: sum over layers of 32 N C^2 + 4 N^2 C (SPEC §6).

    32 N C^2 is 2 FLOPs x 16 C^2 multiply-adds per token: q, k, v, o (4 C^2) plus a
    three-matrix MLP of width 4C (12 C^2). LLaMA's real MLP is 11008 = 2.6875 C wide
    (13824 = 2.7 C for 13B), so its layer is ~12.06 C^2 multiply-adds = ~24.1 C^2 FLOPs
    per token: the formula over-counts the dense part by ~33 %.
    4 N^2 C is Q K^T and A V among the N image tokens only, the full square, 2 FLOPs each.
    """
    c = cfg.llm.hidden_size
    return sum(32 * n * c * c + 4 * n * n * c for n in tokens_per_layer)


def real_image_tokens(cfg: ModelConfig, tokens_per_layer: Iterable[int]) -> int:
    """The same count with the model's real layer (its MLP width, GQA)."""
    llm = cfg.llm
    return sum(2 * n * llm_layer_macs_per_token(llm) + 4 * n * n * llm.num_heads * llm.head_dim
               for n in tokens_per_layer)


def image_tokens_per_layer(cfg: ModelConfig, kept: int) -> list[int]:
    l, n = sparse_layer(cfg), cfg.llm.num_layers
    return [cfg.num_image_tokens] * l + [kept] * (n - l)


def marginal_image_tokens(cfg: ModelConfig, text_tokens: int, kept: int, predictor: bool) -> int:
    """What the image adds to the LLM prefill of a prompt with `text_tokens` text tokens:
    the image tokens' dense layers plus all the attention they take part in (image-image
    and image-text, full rectangle), plus the image predictor in dynamic mode."""
    llm = cfg.llm
    out = 0
    for n in image_tokens_per_layer(cfg, kept):
        t = text_tokens + n
        out += 2 * n * llm_layer_macs_per_token(llm)
        out += 4 * (t * t - text_tokens * text_tokens) * llm.num_heads * llm.head_dim
    return out + (image_predictor(cfg) if predictor else 0)

