"""Generation equivalences (DESIGN.md): keep-rate 1 == dense, KV cache == no cache,
batch == one by one, compacted/masked implementation == a naive list-based reference,
one compile per shape, budgeted caches stay within capacity."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynllava_jax import generate as gen
from dynllava_jax.checkpoint import load_converted
from dynllava_jax.generate import GenOptions, generate
from dynllava_jax.inference import DEFAULT_CHECKPOINT
from dynllava_jax.inputs import prepare_batch
from dynllava_jax.model import image_features, image_scores, text_scores

N_NEW = 12


@pytest.fixture(scope="module")
def model():
    cfg, params = load_converted(DEFAULT_CHECKPOINT)
    return cfg, jax.tree_util.tree_map(jnp.asarray, params)


@pytest.fixture(scope="module")
def samples(model):
    """Prompts of different lengths, images at different offsets, and a text-only one."""
    cfg, _ = model
    rng = np.random.default_rng(0)
    prompts = []
    for pre, post in [(5, 9), (17, 4), (9, 20), (12, 0)]:
        ids = [1] + rng.integers(3, cfg.llm.vocab_size, pre).tolist() + [-200] + \
            rng.integers(3, cfg.llm.vocab_size, post).tolist()
        prompts.append(ids)
    prompts.append([1] + rng.integers(3, cfg.llm.vocab_size, 23).tolist())
    s = cfg.vision.image_size
    pixels = rng.normal(size=(len(prompts), 3, s, s)).astype(np.float32)
    return prompts, pixels


def _run(model, prompts, pixels, **kw):
    cfg, params = model
    # One padded length for every call: the single-sample runs share their compiles.
    batch = prepare_batch(prompts, cfg.num_image_tokens, pad_to=128)
    opts = GenOptions(max_new_tokens=N_NEW, **kw)
    return generate(params, cfg, batch, pixels, opts)


def _always_keep(params):
    """Output-text predictor that keeps every token (logit0 - logit1 = 200)."""
    p = jax.tree_util.tree_map(lambda x: x, params)
    last = dict(p["text_predictor"]["fc_4"])
    last["kernel"] = jnp.zeros_like(last["kernel"])
    last["bias"] = jnp.array([100.0, -100.0], last["bias"].dtype)
    p["text_predictor"] = dict(p["text_predictor"], fc_4=last)
    return p


@pytest.mark.parametrize("use_cache", [True, False])
def test_keep_everything_equals_dense(model, samples, use_cache):
    cfg, params = model
    prompts, pixels = samples
    dense = _run(model, prompts, pixels, mode="dense", use_cache=True)
    full = _run((cfg, _always_keep(params)), prompts, pixels, mode="dynamic",
                use_cache=use_cache, vision_keep_rate=1.0)
    assert full.new_token_ids == dense.new_token_ids
    assert list(full.image_tokens_kept) == [64, 64, 64, 64, 0]


@pytest.mark.parametrize("bucket", [32, 4])
def test_kv_cache_equals_no_cache(model, samples, bucket, monkeypatch):
    """Bucket 4: three chunks, each compacted to what was kept by the previous one."""
    prompts, pixels = samples
    lengths = []
    real = gen.jit_no_cache

    def spy(*a, **kw):
        lengths.append(kw["compact_len"])
        return real(*a, **kw)

    monkeypatch.setattr(gen, "jit_no_cache", spy)
    kv = _run(model, prompts, pixels, mode="dynamic", use_cache=True)
    nc = _run(model, prompts, pixels, mode="dynamic", use_cache=False, no_cache_bucket=bucket)
    if bucket == 4:  # later chunks run layers >= l on fewer slots than prompt + chunk end
        assert len(lengths) == 3 and lengths[2] < lengths[0] + 8
    assert kv.new_token_ids == nc.new_token_ids
    assert kv.kept_image_indices == nc.kept_image_indices
    assert list(kv.generated_tokens_in_cache) == list(nc.generated_tokens_in_cache)
    # The predictor really drops tokens here, so the equality is not trivial.
    assert 0 < kv.generated_tokens_in_cache.sum() < len(prompts) * (N_NEW - 1)


@pytest.mark.parametrize("mode,use_cache", [("dense", True), ("dense", False),
                                            ("dynamic", True), ("dynamic", False)])
def test_batch_equals_one_by_one(model, samples, mode, use_cache):
    prompts, pixels = samples
    both = _run(model, prompts, pixels, mode=mode, use_cache=use_cache)
    for i, p in enumerate(prompts):
        px = pixels[i:i + 1] if -200 in p else None
        one = _run(model, [p], px, mode=mode, use_cache=use_cache)
        assert one.new_token_ids[0] == both.new_token_ids[i], i
        assert one.kept_image_indices[0] == both.kept_image_indices[i]
        assert one.generated_tokens_in_cache[0] == both.generated_tokens_in_cache[i]


def _np_layer(p, x, pos, c, past_k=None, past_v=None):
    """One LLaMA decoder layer in NumPy for a single unpadded sequence: the new tokens `x`
    attend to the cached keys/values `past_*` (lists of arrays) and causally to each other.
    Returns (x, k, v) with k, v of the new tokens."""
    def rms(v, w):
        return w * (v / np.sqrt((v * v).mean(-1, keepdims=True) + c.rms_norm_eps))

    def rope(v):
        d = v.shape[-1]
        inv = 1.0 / (c.rope_theta ** (np.arange(0, d, 2) / d))
        ang = np.asarray(pos, np.float64)[:, None] * inv[None]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        rot = np.concatenate([-v[..., d // 2:], v[..., : d // 2]], -1)
        return v * cos[:, None] + rot * sin[:, None]

    n, hd = x.shape[0], c.head_dim
    h = rms(x, p["input_norm"]["scale"])
    q = rope((h @ p["q_proj"]["kernel"]).reshape(n, c.num_heads, hd))
    k_new = rope((h @ p["k_proj"]["kernel"]).reshape(n, c.num_kv_heads, hd))
    v_new = (h @ p["v_proj"]["kernel"]).reshape(n, c.num_kv_heads, hd)
    past_k, past_v = list(past_k or []), list(past_v or [])
    m = len(past_k)
    k = np.concatenate([np.stack(past_k), k_new]) if m else k_new
    v = np.concatenate([np.stack(past_v), v_new]) if m else v_new
    rep = c.num_heads // c.num_kv_heads
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("tnd,snd->nts", q, k) / np.sqrt(hd)
    allowed = np.concatenate([np.ones((n, m), bool), np.tril(np.ones((n, n), bool))], axis=1)
    s = np.where(allowed, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + np.einsum("nts,snd->tnd", a, v).reshape(n, -1) @ p["o_proj"]["kernel"]
    h = rms(x, p["post_attention_norm"]["scale"])
    g, u = h @ p["gate_proj"]["kernel"], h @ p["up_proj"]["kernel"]
    x = x + (g / (1 + np.exp(-g)) * u) @ p["down_proj"]["kernel"]
    return x, list(k_new), list(v_new)


def _naive_kv_cache(cfg, params, prompt, pixels, n_new):
    """SPEC §3.1-3.2 with caches as growing Python lists (one list of per-token K/V per
    layer), one sequence, one token at a time: layers < l append every token; at layer l
    the prompt's image tokens are cut to the top-k and each new token is kept iff
    logit0 > logit1; layers >= l append only kept tokens. Returns (new tokens, kept count)."""
    c, l = cfg.llm, cfg.sparse.sparse_layer
    P = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    layer_p = lambda i: jax.tree_util.tree_map(lambda a: a[i], P["llm"]["layers"])
    ks, vs = [[] for _ in range(c.num_layers)], [[] for _ in range(c.num_layers)]
    img_at = prompt.index(-200) if -200 in prompt else None
    n_img = cfg.num_image_tokens
    toks = [t for t in prompt if t != -200]
    if img_at is not None:
        toks = toks[:img_at] + [0] * n_img + toks[img_at:]
    x = P["llm"]["embed_tokens"]["embedding"][np.asarray(toks)]
    if img_at is not None:
        x[img_at: img_at + n_img] = np.asarray(image_features(params, cfg, jnp.asarray(pixels)))[0]
    pos = list(range(len(toks)))
    for i in range(l):
        x, k, v = _np_layer(layer_p(i), x, pos, c)
        ks[i] += k
        vs[i] += v
    keep = pos
    if img_at is not None:
        sc = jax.nn.log_softmax(image_scores(params, cfg, jnp.asarray(x[None], jnp.float32),
                                             jnp.asarray([img_at]))[0], -1)[:, 0]
        top = set(np.argsort(-np.asarray(sc), kind="stable")[: int(n_img * cfg.sparse.vision_keep_rate)].tolist())
        keep = [j for j in pos if not (img_at <= j < img_at + n_img) or (j - img_at) in top]
    x, pos = x[keep], keep
    for i in range(l, c.num_layers):
        x, k, v = _np_layer(layer_p(i), x, pos, c)
        ks[i] += k
        vs[i] += v
    out, kept = [], 0
    score_text = jax.jit(lambda p, h: text_scores(p, cfg, h))
    for step in range(n_new):
        h = x[-1] / np.sqrt((x[-1] ** 2).mean() + c.rms_norm_eps) * P["llm"]["norm"]["scale"]
        out.append(int(np.argmax(h @ P["llm"]["lm_head"]["kernel"])))
        if step == n_new - 1:
            break
        x = P["llm"]["embed_tokens"]["embedding"][[out[-1]]]
        p_new = [len(toks) + step]
        for i in range(c.num_layers):
            if i == l:
                lg = np.asarray(score_text(params, jnp.asarray(x, jnp.float32)))[0]
                is_kept = bool(lg[0] > lg[1])
                kept += is_kept
            x, k, v = _np_layer(layer_p(i), x, p_new, c, ks[i], vs[i])
            if i < l or is_kept:
                ks[i] += k
                vs[i] += v
    return out, kept


def _naive_dynamic(cfg, params, prompt, pixels, n_new):
    """SPEC §3 with Python lists and dynamic lengths, one sequence, no masks or padding,
    decoder layers in NumPy: every step recomputes; layers >= l see only the kept tokens,
    at their original positions. Returns (new tokens, fed-back generated tokens kept)."""
    l = cfg.sparse.sparse_layer
    P = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    layer_p = lambda i: jax.tree_util.tree_map(lambda a: a[i], P["llm"]["layers"])
    img_at = prompt.index(-200) if -200 in prompt else None
    n_img = cfg.num_image_tokens
    toks = [t for t in prompt if t != -200]
    if img_at is not None:
        toks = toks[:img_at] + [0] * n_img + toks[img_at:]
    p_len = len(toks)
    emb = P["llm"]["embed_tokens"]["embedding"]
    feats = (np.asarray(image_features(params, cfg, jnp.asarray(pixels)), np.float64)[0]
             if img_at is not None else None)
    top = None
    score_text = jax.jit(lambda p, h: text_scores(p, cfg, h))
    out, kept_gen = [], []
    for step in range(n_new):
        x = emb[np.asarray(toks)]
        if img_at is not None:
            x[img_at: img_at + n_img] = feats
        n = len(toks)
        for i in range(l):
            x = _np_layer(layer_p(i), x, np.arange(n), cfg.llm)[0]
        keep = list(range(n))
        if img_at is not None:
            if top is None:  # image tokens precede every generated token: scored once
                sc = jax.nn.log_softmax(image_scores(
                    params, cfg, jnp.asarray(x[None], jnp.float32), jnp.asarray([img_at]))[0], -1)[:, 0]
                top = set(np.argsort(-np.asarray(sc), kind="stable")[: int(n_img * cfg.sparse.vision_keep_rate)].tolist())
            keep = [j for j in keep if not (img_at <= j < img_at + n_img) or (j - img_at) in top]
        # Row-wise MLP: padding to a fixed length changes no value and avoids a compile per step.
        padded = np.zeros((256, x.shape[1]), np.float32)
        padded[:n] = x
        logits = np.asarray(score_text(params, jnp.asarray(padded)))[:n]
        keep = [j for j in keep if j < p_len or j == n - 1 or bool(logits[j, 0] > logits[j, 1])]
        y = x[keep]
        for i in range(l, cfg.llm.num_layers):
            y = _np_layer(layer_p(i), y, np.asarray(keep, np.float64), cfg.llm)[0]
        y = y[-1] / np.sqrt((y[-1] ** 2).mean() + cfg.llm.rms_norm_eps) * P["llm"]["norm"]["scale"]
        nxt = int(np.argmax(y @ P["llm"]["lm_head"]["kernel"]))
        out.append(nxt)
        toks.append(nxt)
        # Decisions of every generated token fed so far (the newest one included: it is
        # always kept in this step's recomputation, but its decision counts in later ones).
        kept_gen = [j - p_len for j in range(p_len, n) if bool(logits[j, 0] > logits[j, 1])]
    return out, kept_gen


def test_matches_naive_reference(model, samples):
    cfg, params = model
    prompts, pixels = samples
    for i in (0, 4):  # an image prompt and the text-only one
        px = pixels[i:i + 1] if -200 in prompts[i] else None
        ref, kept = _naive_dynamic(cfg, params, prompts[i], px, N_NEW)
        ref_kv, n_kept = _naive_kv_cache(cfg, params, prompts[i], px, N_NEW)
        assert ref_kv == ref and n_kept == len(kept)
        for use_cache in (True, False):
            got = _run(model, [prompts[i]], px, mode="dynamic", use_cache=use_cache)
            assert got.new_token_ids[0] == ref
            # generated tokens fed back (all but the newest) that the predictor kept
            assert got.generated_tokens_in_cache[0] == len(kept)


def test_one_compile_per_shape(model, samples):
    prompts, pixels = samples
    before = dict(gen.TRACES)
    # Different prompts of the same padded shape: no new trace anywhere.
    batch_a = prepare_batch(prompts[:2], 64, pad_to=128)
    batch_b = prepare_batch(prompts[2:4], 64, pad_to=128)
    cfg, params = model
    opts = GenOptions(max_new_tokens=N_NEW)
    generate(params, cfg, batch_a, pixels[:2], opts)
    after_first = dict(gen.TRACES)
    generate(params, cfg, batch_b, pixels[2:4], opts)
    assert gen.TRACES == after_first
    assert after_first["decode"] - before["decode"] <= 1


def test_budgeted_cache_stays_within_capacity(model, samples):
    cfg, params = model
    prompts, pixels = samples
    opts = GenOptions(max_new_tokens=24, text_kv_budget=0.25)
    batch = prepare_batch(prompts, cfg.num_image_tokens)
    res = generate(params, cfg, batch, pixels, opts)
    exact = generate(params, cfg, batch, pixels, dataclasses.replace(opts, text_kv_budget=1.0))
    assert (res.generated_tokens_in_cache <= 6).all()  # ceil(24 x 0.25)
    over = exact.generated_tokens_in_cache > 6
    assert over.any(), "the test needs a sequence that outgrows the budget"
    # Up to its 7th kept token a sequence decodes exactly as with an unlimited cache, so
    # every sequence that outgrows the budget fills it; a full cache replaced tokens.
    assert (res.generated_tokens_in_cache[over] == 6).all()
    assert res.evicted.any() and not res.evicted[~over].any()
    assert res.kv_cache_bytes < exact.kv_cache_bytes
    # Budget 0: no generated token finds room; each sequence that kept one reports eviction.
    zero = generate(params, cfg, batch, pixels, dataclasses.replace(opts, text_kv_budget=0.0))
    assert (zero.generated_tokens_in_cache == 0).all()
    np.testing.assert_array_equal(zero.evicted, exact.generated_tokens_in_cache > 0)
    # Without a text-only sample the prompt is compacted too: less than dense mode.
    img = prepare_batch(prompts[:4], cfg.num_image_tokens)
    res_img = generate(params, cfg, img, pixels[:4], opts)
    assert res_img.kv_cache_bytes < res_img.kv_cache_bytes_dense


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_ends_each_sequence_on_its_own(model, samples, use_cache):
    """EOS set to a token the greedy answers contain at different steps: each sequence stops
    at its own EOS, pads after it, and equals its run alone."""
    cfg, params = model
    prompts, pixels = samples
    free = _run(model, prompts, pixels, mode="dynamic")
    counts = {}
    for row in free.new_token_ids:
        for tok in set(row[1:]):
            counts[tok] = counts.get(tok, 0) + 1
    eos = max(counts, key=counts.get)  # a token several answers produce
    cfg_eos = cfg.replace(eos_token_id=int(eos), pad_token_id=3)
    both = _run((cfg_eos, params), prompts, pixels, mode="dynamic", use_cache=use_cache)
    stopped = 0
    for i, row in enumerate(free.new_token_ids):
        want = row[: row.index(eos)] if eos in row else row
        assert both.new_token_ids[i] == want
        if eos in row:
            stopped += 1
            k = row.index(eos)
            assert both.tokens[i, k] == eos and (both.tokens[i, k + 1:] == 3).all()
        px = pixels[i:i + 1] if -200 in prompts[i] else None
        one = _run((cfg_eos, params), [prompts[i]], px, mode="dynamic", use_cache=use_cache)
        assert one.new_token_ids[0] == both.new_token_ids[i]
        assert one.generated_tokens_in_cache[0] == both.generated_tokens_in_cache[i]
    assert stopped >= 2


def test_a_tiny_keep_rate_keeps_one_image_token():
    from dynllava_jax.config import preset
    cfg = preset("tiny")  # 64 image tokens: floor(64 x 0.01) would keep none
    assert GenOptions(mode="dynamic", vision_keep_rate=0.01).keep_k(cfg) == 1
    assert GenOptions(mode="dynamic", vision_keep_rate=0.2).keep_k(cfg) == 12  # floor, as the official code
    assert cfg.replace(sparse=dataclasses.replace(cfg.sparse, vision_keep_rate=0.01)).num_image_tokens_kept == 1
