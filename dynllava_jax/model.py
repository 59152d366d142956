"""The LLaVA model as functions over one params pytree.

params = {
  "vision":    {"embeddings": ..., "layers": stacked CLIPEncoderLayer},
  "projector": Projector,
  "llm":       {"embed_tokens": {"embedding"}, "layers": stacked DecoderLayer,
                "norm": {"scale"}, "lm_head": {"kernel"}},
  "image_predictor": ImagePredictor, "text_predictor": TextPredictor   (Dynamic-LLaVA only)
}
Inputs use LLaVA's layout expanded to static shapes (see `inputs.py`): `tokens` [B,T] with
the image marker replaced by `num_image_tokens` placeholder slots starting at
`image_start[b]` (-1: no image), and `lengths` [B] real tokens (right padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from .config import ModelConfig
from .llama import DecoderLayer, RMSNorm, run_stack
from .predictors import ImagePredictor, TextPredictor
from .vision import CLIPEmbeddings, CLIPEncoderLayer, Projector, vision_features


def compute_dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


def _stacked_init(module, n, rng, *args):
    keys = jax.random.split(rng, max(n, 1))[:n]
    return jax.vmap(lambda k: module.init(k, *args)["params"])(keys)


def init_params(cfg: ModelConfig, rng, with_predictors: bool | None = None,
                llm_init_std: float = 0.0):
    """Random parameters (tests, and fresh predictors for training from plain LLaVA).

    `llm_init_std` > 0: the LLM's embeddings and kernels are drawn N(0, llm_init_std), as
    LLaMA's own init (`initializer_range`, 0.02), instead of flax's defaults (std
    1/sqrt(fan_in): 0.088 at hidden 128), a scale at which a small LLM trained from random
    weights does not learn to look a named object up among the image tokens (README,
    *The SynthVQA model*)."""
    v, l, s = cfg.vision, cfg.llm, cfg.sparse
    ks = jax.random.split(rng, 8)
    px = jnp.zeros((1, 3, v.image_size, v.image_size))
    tok = jnp.zeros((1, v.num_patches + 1, v.hidden_size))
    h = jnp.zeros((1, 4, l.hidden_size))
    pos = jnp.zeros((1, 4), jnp.int32)
    params = {
        "vision": {
            "embeddings": CLIPEmbeddings(v).init(ks[0], px)["params"],
            "layers": _stacked_init(CLIPEncoderLayer(v), v.num_layers, ks[1], tok),
        },
        "projector": Projector(l.hidden_size).init(ks[2], tok[:, 1:])["params"],
        "llm": {
            "embed_tokens": nn.Embed(l.vocab_size, l.hidden_size).init(
                ks[3], jnp.zeros((1, 1), jnp.int32))["params"],
            "layers": _stacked_init(DecoderLayer(l), l.num_layers, ks[4], h, pos,
                                    jnp.full((1,), 4, jnp.int32)),
            "norm": RMSNorm(l.rms_norm_eps).init(ks[5], h)["params"],
            "lm_head": nn.Dense(l.vocab_size, use_bias=False).init(ks[6], h)["params"],
        },
    }
    if llm_init_std > 0:
        params["llm"] = llama_init(params["llm"], jax.random.fold_in(ks[4], 1), llm_init_std)
    if with_predictors if with_predictors is not None else s.enabled:
        params.update(init_predictors(cfg, ks[7]))
    return params


def llama_init(llm: dict, rng, std: float) -> dict:
    """The LLM tree with every embedding and kernel redrawn N(0, std) and every norm scale
    1 (HF LLaMA's `_init_weights`)."""
    leaves, tdef = jax.tree_util.tree_flatten_with_path(llm)
    out = []
    for i, (path, x) in enumerate(leaves):
        if getattr(path[-1], "key", None) == "scale":
            out.append(jnp.ones_like(x))
        else:
            out.append(std * jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype))
    return jax.tree_util.tree_unflatten(tdef, out)


def init_predictors(cfg: ModelConfig, rng):
    h = jnp.zeros((1, 4, cfg.llm.hidden_size))
    k1, k2 = jax.random.split(rng)
    return {
        "image_predictor": ImagePredictor(cfg.sparse).init(k1, h, jnp.ones((1, 4)))["params"],
        "text_predictor": TextPredictor(cfg.sparse).init(k2, h)["params"],
    }


def image_features(params, cfg: ModelConfig, pixels_BCHW):
    """Projected image tokens [B, num_image_tokens, hidden]."""
    dt = compute_dtype(cfg)
    f = vision_features(params["vision"], cfg.vision, pixels_BCHW, dt)
    return Projector(cfg.llm.hidden_size, dt).apply({"params": params["projector"]}, f)


def embed_inputs(params, cfg: ModelConfig, tokens_BT, image_feats_BNH, image_start_B,
                 row_slices: bool = True):
    """Token embeddings with the image features placed at each sample's image slots.

    row_slices False: a decoding step gathers its rows too (for a table sharded on the
    vocabulary, where each shard answers the ids it holds; a dynamic slice along a sharded
    axis would gather the whole table onto every device)."""
    dt = compute_dtype(cfg)
    table = params["llm"]["embed_tokens"]["embedding"]
    ids = jnp.clip(tokens_BT, 0, table.shape[0] - 1)
    if tokens_BT.shape[1] == 1 and image_feats_BNH is None and row_slices:
        # A decoding step: one row slice per sequence reads B rows; a gather is costed (and
        # on some backends run) as a pass over the whole table.
        rows = [jax.lax.dynamic_slice_in_dim(table, ids[b, 0], 1) for b in range(ids.shape[0])]
        return jnp.stack(rows).astype(dt)
    x = jnp.take(table, ids, axis=0).astype(dt)
    if image_feats_BNH is None:
        return x
    n = image_feats_BNH.shape[1]
    is_img = image_token_mask(n, image_start_B, tokens_BT.shape[1])
    rel = jnp.arange(tokens_BT.shape[1])[None, :] - image_start_B[:, None]
    img = jnp.take_along_axis(image_feats_BNH.astype(dt), jnp.clip(rel, 0, n - 1)[..., None], axis=1)
    return jnp.where(is_img[..., None], img, x)


def image_token_mask(num_image_tokens: int, image_start_B, t: int):
    """[B,T]: the slots that hold image features (none where image_start is -1)."""
    rel = jnp.arange(t)[None, :] - image_start_B[:, None]
    return (image_start_B[:, None] >= 0) & (rel >= 0) & (rel < num_image_tokens)


def lm_logits(params, cfg: ModelConfig, h):
    """Final RMSNorm and LM head; logits in float32."""
    dt = compute_dtype(cfg)
    h = RMSNorm(cfg.llm.rms_norm_eps, dt).apply({"params": params["llm"]["norm"]}, h)
    w = params["llm"]["lm_head"]["kernel"].astype(dt)
    return jnp.einsum("...h,hv->...v", h, w, preferred_element_type=jnp.float32)


def image_scores(params, cfg: ModelConfig, h_BTH, image_start_B, decision_BN=None):
    """Image-predictor logits [B, N, 2] (float32) for the image tokens of each sample."""
    n = cfg.num_image_tokens
    idx = jnp.clip(image_start_B, 0, None)[:, None] + jnp.arange(n)[None, :]
    idx = jnp.clip(idx, 0, h_BTH.shape[1] - 1)
    x = jnp.take_along_axis(h_BTH, idx[..., None], axis=1)
    if decision_BN is None:
        decision_BN = jnp.ones(idx.shape, jnp.float32)
    # Float32 whatever the compute dtype: in bf16 the top-k has ties and near-zero
    # keep/drop margins flip (the predictors are < 1 % of the FLOPs).
    return ImagePredictor(cfg.sparse, jnp.float32).apply(
        {"params": params["image_predictor"]}, x.astype(jnp.float32), decision_BN)


def text_scores(params, cfg: ModelConfig, h):
    """Output-text-predictor logits [..., 2], in float32 (see `image_scores`)."""
    return TextPredictor(cfg.sparse, jnp.float32).apply(
        {"params": params["text_predictor"]}, h.astype(jnp.float32))


def forward_dense(params, cfg: ModelConfig, tokens_BT, lengths_B, pixels_BCHW=None,
                  image_start_B=None, remat: str = "none"):
    """Plain LLaVA-1.5 forward over a right-padded batch: logits [B, T, V]."""
    b, t = tokens_BT.shape
    feats = None
    if pixels_BCHW is not None:
        feats = image_features(params, cfg, pixels_BCHW)
    if image_start_B is None:
        image_start_B = jnp.full((b,), -1, jnp.int32)
    x = embed_inputs(params, cfg, tokens_BT, feats, image_start_B)
    positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    x, _ = run_stack(params["llm"]["layers"], cfg.llm, compute_dtype(cfg), x, positions,
                     lengths_B, remat=remat)
    return lm_logits(params, cfg, x)
