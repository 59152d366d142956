"""The training objective (SPEC §4): Gumbel straight-through decisions, MaskedSoftmax,
answer spans, policy, loss terms, against naive references written here."""

import itertools
import math
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynllava_jax import model as M
from dynllava_jax import objective as O
from dynllava_jax.checkpoint import load_converted
from dynllava_jax.sparsity import gumbel_hard_keep, masked_softmax
from dynllava_jax.trainer import SyntheticBatches

LEN_FOR_TRAINING = 16  # small, so the tiny batches hold answers long enough to score


@pytest.fixture(scope="module")
def tiny():
    cfg, params = load_converted("assets/tiny-dynamic-llava")
    cfg = cfg.replace_sparse(output_text_len_for_training=LEN_FOR_TRAINING)
    return cfg, jax.tree_util.tree_map(jnp.asarray, params)


@pytest.fixture(scope="module")
def batch(tiny):
    cfg, _ = tiny
    b = SyntheticBatches(cfg, 6, 128, seed=2, text_only_frac=0.3, answer_len=(4, 40)).batch(0)
    start, end = O.answer_span(jnp.asarray(b["labels"]), jnp.asarray(b["lengths"]))
    ans = np.asarray(end - start)
    # the batch must exercise every case
    assert (b["image_start"] < 0).any() and (b["image_start"] >= 0).any()
    assert (ans >= LEN_FOR_TRAINING).any() and (ans < LEN_FOR_TRAINING).any()
    return b


@pytest.fixture(scope="module")
def run(tiny, batch):
    """loss, metrics, policy, per-sample sums and grads: one compile for every test."""
    cfg, params = tiny

    def f(p, bt, rng, tau):
        sums, policy = O.forward_train(p, cfg, bt, rng, tau)
        loss, m = O.combine(sums, O.loss_denominators(bt, cfg), cfg)
        return loss, (m, policy, sums)

    (loss, (m, policy, sums)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(
        params, batch, jax.random.PRNGKey(0), jnp.float32(0.5))
    return dict(loss=loss, metrics=m, policy=np.asarray(policy),
                sums=jax.tree_util.tree_map(np.asarray, sums), grads=grads)


def _answer_span_loops(labels, lengths):
    out = []
    for lab, n in zip(labels, lengths):
        last = -1
        for t in range(n):
            if lab[t] == -100:
                last = t
        out.append((min(last + 1, n), n))
    return out


# -- Gumbel straight-through ----------------------------------------------------------
def test_gumbel_hard_forward_soft_backward():
    logits = jax.random.normal(jax.random.PRNGKey(1), (5, 7, 2)) * 2
    rng, tau = jax.random.PRNGKey(2), 0.7
    hard = gumbel_hard_keep(logits, rng, tau)
    assert set(np.unique(np.asarray(hard)).tolist()) <= {0.0, 1.0}

    def soft(lg):  # the soft sample that the straight-through gradient follows
        logp = jax.nn.log_softmax(lg, -1)
        g = jax.random.gumbel(rng, logp.shape, jnp.float32)
        return jax.nn.softmax((logp + g) / tau, -1)[..., 0]

    # hard decision = argmax of the soft sample
    np.testing.assert_array_equal(np.asarray(hard), (np.asarray(soft(logits)) > 0.5).astype(np.float32))
    w = jax.random.normal(jax.random.PRNGKey(3), hard.shape)
    g_hard = jax.grad(lambda lg: (gumbel_hard_keep(lg, rng, tau) * w).sum())(logits)
    g_soft = jax.grad(lambda lg: (soft(lg) * w).sum())(logits)
    np.testing.assert_allclose(np.asarray(g_hard), np.asarray(g_soft), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(g_hard)).max() > 0


def test_decisions_are_hard_and_both_predictors_get_gradients(run, batch, tiny):
    cfg, _ = tiny
    policy = run["policy"]
    assert set(np.unique(policy).tolist()) == {0.0, 1.0}
    gn = {k: float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                               for x in jax.tree_util.tree_leaves(v))))
          for k, v in run["grads"].items()}
    assert gn["image_predictor"] > 0 and gn["text_predictor"] > 0, gn
    assert gn["llm"] > 0 and gn["projector"] > 0
    # every leaf of both predictors receives a gradient
    for name in ("image_predictor", "text_predictor"):
        for path, g in jax.tree_util.tree_leaves_with_path(run["grads"][name]):
            assert np.abs(np.asarray(g)).max() > 0, (name, path)


# -- MaskedSoftmax ----------------------------------------------------------------------
def _masked_softmax_loops(s, mask, p, eps=1e-6):
    b, t, n = s.shape
    out = np.zeros_like(s, dtype=np.float64)
    for bi, i in itertools.product(range(b), range(t)):
        row = [s[bi, i, j] if mask[bi, i, j] else -np.inf for j in range(n)]
        m = max(row)
        a = []
        for j in range(n):
            g = 1.0 if i == j else p[bi, j]
            a.append(math.exp(row[j] - m) * g if mask[bi, i, j] else 0.0)
        tot = sum(a)
        for j in range(n):
            out[bi, i, j] = (a[j] + eps / n) / (tot + eps)
    return out


def test_masked_softmax_matches_loops():
    rng = np.random.default_rng(0)
    b, t = 2, 9
    s = rng.normal(size=(b, t, t)).astype(np.float32) * 3
    valid = np.array([[1] * 9, [1] * 6 + [0] * 3], bool)
    mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
    p = (rng.random((b, t)) > 0.5).astype(np.float32)
    got = np.asarray(masked_softmax(jnp.asarray(s), jnp.asarray(mask), jnp.asarray(p)))
    want = _masked_softmax_loops(s, mask, p)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # a dropped key is still seen by itself (g_ii = 1); later queries give it only
    # eps/S / (sum a + eps) (sum a can be < 1 when the row's max key is dropped)
    j = int(np.flatnonzero(p[0] == 0)[0])
    assert got[0, j, j] > 1e-3
    assert np.all(got[0, j + 1:, j] < 1e-4)


def test_masked_softmax_all_ones_policy_is_softmax_within_eps():
    rng = np.random.default_rng(1)
    t = 16
    s = jnp.asarray(rng.normal(size=(3, t, t)).astype(np.float32) * 4)
    mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None].repeat(3, 0))
    got = masked_softmax(s, mask, jnp.ones((3, t)))
    ref = masked_softmax(s, mask)  # plain softmax
    # |(a + eps/S)/(sum a + eps) - a/sum a| <= eps (sum a >= 1 since the max term is 1),
    # plus float32 rounding of values <= 1: honest bound eps + a few ulp.
    err = float(jnp.max(jnp.abs(got - ref)))
    assert err <= 1e-6 + 4 * np.finfo(np.float32).eps, err
    assert err > 0  # the eps terms are really there (masked keys get eps/S/(sum+eps))


# -- spans, policy, loss ----------------------------------------------------------------
def test_answer_span_matches_loops(batch):
    start, end = O.answer_span(jnp.asarray(batch["labels"]), jnp.asarray(batch["lengths"]))
    want = _answer_span_loops(batch["labels"], batch["lengths"])
    assert list(zip(np.asarray(start).tolist(), np.asarray(end).tolist())) == want
    # the answer ends with </s> (id 2), which is scored and inside the span
    for (a, e), lab in zip(want, batch["labels"]):
        assert lab[e - 1] == 2 and (lab[a:e] != -100).all()


def test_answer_span_multi_turn_and_truncated():
    i = -100
    labels = np.array([
        [i, i, i, 5, 6, 2, i, i, 7, 8, 9, 2, i, i],   # two rounds: the last answer only
        [i, i, i, i, i, i, i, i, 3, 4, i, i, i, i],   # truncated inside the answer (length 10)
        [i, i, i, i, i, i, i, i, i, i, i, i, i, i],   # nothing to learn: empty span
    ], np.int32)
    lengths = np.array([12, 10, 9], np.int32)
    start, end = O.answer_span(jnp.asarray(labels), jnp.asarray(lengths))
    assert np.asarray(start).tolist() == [8, 8, 9] and np.asarray(end).tolist() == [12, 10, 9]


def test_policy_layout(run, batch, tiny):
    cfg, _ = tiny
    p = run["policy"]
    n_img = cfg.num_image_tokens
    spans = _answer_span_loops(batch["labels"], batch["lengths"])
    for r, (a, e) in enumerate(spans):
        is_img = np.zeros(p.shape[1], bool)
        if batch["image_start"][r] >= 0:
            s0 = batch["image_start"][r]
            is_img[s0:s0 + n_img] = True
        in_ans = np.zeros(p.shape[1], bool)
        in_ans[a:e] = True
        # 1 on every other token (system, question, padding)
        assert (p[r][~is_img & ~in_ans] == 1).all()
        if e - a < LEN_FOR_TRAINING:
            assert (p[r][in_ans] == 1).all()  # short answers: forced keep
        if batch["image_start"][r] >= 0:
            assert 0 < p[r][is_img].sum() < n_img  # real decisions on the image tokens


def test_loss_terms_match_naive_formula(run, batch, tiny):
    cfg, params = tiny
    sc = cfg.sparse
    p, sums, m = run["policy"], run["sums"], run["metrics"]
    n_img = cfg.num_image_tokens
    spans = _answer_span_loops(batch["labels"], batch["lengths"])
    img_terms, txt_terms = [], []
    for r, (a, e) in enumerate(spans):
        if batch["image_start"][r] >= 0:
            s0 = batch["image_start"][r]
            img_terms.append((sc.vision_keep_rate - p[r, s0:s0 + n_img].mean()) ** 2)
        if e - a >= sc.output_text_len_for_training:
            txt_terms.append((sc.output_text_keep_rate - p[r, a:e].mean()) ** 2)
        else:
            txt_terms.append(0.0)  # official: a short answer adds 0 but counts in the mean
    want_img = sc.mask_loss_weight * np.mean(img_terms)
    want_txt = sc.mask_loss_weight * np.sum(txt_terms) / len(spans)
    np.testing.assert_allclose(float(m["img_ratio_loss"]), want_img, rtol=1e-5)
    np.testing.assert_allclose(float(m["txt_ratio_loss"]), want_txt, rtol=1e-5)
    # text-only samples: no image term
    assert (sums["has_img"][batch["image_start"] < 0] == 0).all()
    assert (sums["img_sq"][batch["image_start"] < 0] == 0).all()
    # CE: token mean over the scored next tokens (labels[t+1] != -100)
    n_tok = sum(int((lab[1:] != -100).sum()) for lab in batch["labels"])
    np.testing.assert_allclose(float(m["answer_tokens"]), n_tok)
    np.testing.assert_allclose(float(run["loss"]),
                               float(m["ce"]) + want_img + want_txt, rtol=1e-5)


def test_no_predictors_equals_dense_llava_loss(tiny, batch):
    cfg, params = tiny
    cfg0 = cfg.replace_sparse(use_vision_predictor=False, use_output_text_predictor=False)
    loss, m = jax.jit(lambda p, b: O.loss_fn(p, cfg0, b, jax.random.PRNGKey(0), 1.0))(params, batch)
    logits = np.asarray(M.forward_dense(params, cfg, jnp.asarray(batch["tokens"]),
                                        jnp.asarray(batch["lengths"]), jnp.asarray(batch["pixels"]),
                                        jnp.asarray(batch["image_start"])), np.float64)
    tot, n = 0.0, 0
    for r in range(logits.shape[0]):  # HF: shift, CrossEntropyLoss(ignore_index=-100), mean
        for t in range(logits.shape[1] - 1):
            y = batch["labels"][r, t + 1]
            if y != -100:
                row = logits[r, t]
                tot += np.log(np.exp(row - row.max()).sum()) + row.max() - row[y]
                n += 1
    np.testing.assert_allclose(float(loss), tot / n, rtol=2e-5)
    assert float(m["img_ratio_loss"]) == 0 and float(m["txt_ratio_loss"]) == 0


def test_split_batch_sums_to_full_batch_loss(tiny, batch, run):
    """Global denominators + per-sample keys: micro-batches add up to the batch loss."""
    cfg, params = tiny
    denom = O.loss_denominators(batch, cfg)
    rng, tau = jax.random.PRNGKey(0), jnp.float32(0.5)

    @jax.jit
    def part(bt):
        sums, _ = O.forward_train(params, cfg, bt, rng, tau)
        return O.combine(sums, denom, cfg)[0]

    ids = np.arange(6, dtype=np.int32)
    cw = np.asarray(O.ce_weights(jnp.asarray(batch["labels"])))
    halves = [np.array([0, 2, 4]), np.array([1, 3, 5])]
    total = sum(float(part({**{k: v[h] for k, v in batch.items()}, "sample_id": ids[h],
                            "ce_weight": cw[h]})) for h in halves)
    np.testing.assert_allclose(total, float(run["loss"]), rtol=1e-5)


def test_cell_objective_matches_naive_formula(tiny, batch):
    """objective.cell_loss_weight: each cell's mean projected image token scored against
    the input embeddings; its term adds to the loss, and micro-batches still add up."""
    cfg, params = tiny
    side = math.isqrt(cfg.num_image_tokens)
    g = 2 if side % 2 == 0 else side
    v = params["llm"]["embed_tokens"]["embedding"].shape[0]
    targets = np.random.default_rng(0).integers(-1, v, (6, g * g, 2)).astype(np.int32)
    bt = dict(batch, cell_targets=targets)
    w, rng, tau = 0.5, jax.random.PRNGKey(0), jnp.float32(0.5)
    f = jax.jit(lambda b, cw: O.loss_fn(params, cfg, b, rng, tau,
                                        O.Objective(cell_loss_weight=cw)), static_argnums=1)
    loss, m = f(bt, w)
    loss0, _ = f(batch, 0.0)

    feats = np.asarray(M.image_features(params, cfg, jnp.asarray(batch["pixels"])), np.float64)
    table = np.asarray(params["llm"]["embed_tokens"]["embedding"], np.float64)
    per = side // g
    tot, n = 0.0, 0
    for b in range(6):
        if batch["image_start"][b] < 0:
            continue
        grid = feats[b].reshape(side, side, -1)
        for c in range(g * g):
            r, col = divmod(c, g)
            x = grid[r * per:(r + 1) * per, col * per:(col + 1) * per].mean((0, 1))
            logits = table @ x
            lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
            for y in targets[b, c]:
                if y >= 0:
                    tot, n = tot + lse - logits[y], n + 1
    np.testing.assert_allclose(float(m["cell_loss"]), tot / n, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(loss0) + w * tot / n, rtol=1e-5)

    denom = O.loss_denominators(bt, cfg)
    cw = np.asarray(O.ce_weights(jnp.asarray(batch["labels"])))
    ids = np.arange(6, dtype=np.int32)
    part = jax.jit(lambda b: O.combine(O.forward_train(params, cfg, b, rng, tau)[0], denom, cfg,
                                       O.Objective(cell_loss_weight=w))[0])
    total = sum(float(part({**{k: val[h] for k, val in bt.items()}, "sample_id": ids[h],
                            "ce_weight": cw[h]})) for h in (np.array([0, 2, 4]), np.array([1, 3, 5])))
    np.testing.assert_allclose(total, float(loss), rtol=1e-5)


def test_ce_group_mean_is_the_official_per_device_mean():
    """ce_group_size=k: mean over groups of k samples of each group's token-mean CE (the
    official CrossEntropyLoss per device batch, averaged by DDP / accumulation)."""
    rng = np.random.default_rng(0)
    labels = np.full((8, 20), -100, np.int32)
    for r in range(8):
        n = int(rng.integers(1, 15))
        labels[r, 3:3 + n] = 5
    nll = rng.random((8, 20)).astype(np.float32)
    _, w = O.scored_targets(jnp.asarray(labels))
    per_sample = (np.asarray(w) * nll).sum(1)
    for k in (0, 2, 4, 8):
        got = float((per_sample * np.asarray(O.ce_weights(jnp.asarray(labels), k))).sum())
        groups = [list(range(8))] if k in (0, 8) else [list(range(i, i + k)) for i in range(0, 8, k)]
        want = np.mean([sum(per_sample[i] for i in g) / sum(np.asarray(w)[i].sum() for i in g)
                        for g in groups])
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gumbel_tau_schedule():
    assert float(O.gumbel_tau(0, 100)) == pytest.approx(1.0)
    assert float(O.gumbel_tau(100, 100)) == pytest.approx(0.1)
    assert float(O.gumbel_tau(50, 100)) == pytest.approx(0.1 ** 0.5, rel=1e-6)
    assert float(O.gumbel_tau(50, 100, 2.0, 0.5)) == pytest.approx(1.0, rel=1e-6)


def test_chunked_cross_entropy_equals_whole(tiny, batch, run):
    """objective.ce_chunk: the LM head in chunks gives the same loss and gradients."""
    cfg, params = tiny

    def f(p, bt, rng, tau):
        sums, _ = O.forward_train(p, cfg, bt, rng, tau, O.Objective(ce_chunk=32))
        return O.combine(sums, O.loss_denominators(bt, cfg), cfg)[0]

    loss, grads = jax.jit(jax.value_and_grad(f))(params, batch, jax.random.PRNGKey(0),
                                                  jnp.float32(0.5))
    np.testing.assert_allclose(float(loss), float(run["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(run["grads"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="must divide"):
        O.forward_train(params, cfg, batch, jax.random.PRNGKey(0), jnp.float32(0.5),
                        O.Objective(ce_chunk=48))


def _attention_queries_loops(labels, turn_cells, image_start):
    """Reference: the first scored position of each answer run gets that turn's cell."""
    out = np.full(labels.shape, -1)
    for b in range(labels.shape[0]):
        r = 0
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != -100 and (t == 0 or labels[b, t] == -100):
                if r < turn_cells.shape[1] and image_start[b] >= 0:
                    out[b, t] = turn_cells[b, r]
                r += 1
    return out


def test_attention_queries_mark_each_answers_first_prediction():
    lab = np.full((3, 12), -100, np.int32)
    lab[0, [3, 4, 7, 8, 9, 11]] = 5          # three answers: runs at 3, 7, 11
    lab[1, [2, 3]] = 5                        # one answer
    lab[2, [1, 5]] = 5                        # two answers, no image
    cells = np.array([[4, -1], [2, 7], [1, 1]], np.int32)
    start = np.array([0, 1, -1], np.int32)
    got = np.asarray(O.attention_queries(jnp.asarray(lab), jnp.asarray(cells), jnp.asarray(start)))
    want = np.full((3, 12), -1)
    want[0, 2] = 4                            # answer 2 names no cell, answer 3 is past R = 2
    want[1, 1] = 2
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, _attention_queries_loops(lab, cells, start))
    np.testing.assert_array_equal(O.image_token_cells(16, 2),
                                  [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3])


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    return x * cos + np.concatenate([-x[:, d // 2:], x[:, :d // 2]], -1) * sin


def _head_qkv(x_TH, lp, c, head: int):
    """float64 q, k (with RoPE) and v of query head `head` of decoder layer `lp` for one
    sample's hidden states entering it."""
    d, kvh = c.head_dim, head // (c.num_heads // c.num_kv_heads)
    h = x_TH / np.sqrt((x_TH ** 2).mean(-1, keepdims=True) + c.rms_norm_eps)
    h = h * lp["input_norm"]["scale"]
    pos = np.arange(x_TH.shape[0])
    q = _rope(h @ lp["q_proj"]["kernel"][:, head * d:(head + 1) * d], pos, c.rope_theta)
    k = _rope(h @ lp["k_proj"]["kernel"][:, kvh * d:(kvh + 1) * d], pos, c.rope_theta)
    return q, k, h @ lp["v_proj"]["kernel"][:, kvh * d:(kvh + 1) * d]


def test_attention_objective_matches_naive_formula(tiny, batch):
    """objective.attention_loss_weight: -log of the attention mass that one head of one
    layer (before the sparse layer) puts on the named cell's image tokens, at each answer's
    first prediction; the rest of the forward is unchanged and micro-batches add up."""
    cfg, params = tiny
    side = math.isqrt(cfg.num_image_tokens)
    g, layer, head, w = 2, 1, 3, 0.7
    turns = np.random.default_rng(1).integers(-1, g * g, (6, 3)).astype(np.int32)
    turns[:, 0] = np.arange(6) % (g * g)    # every sample with an image marks its first answer
    bt = dict(batch, turn_cells=turns)
    rng, tau = jax.random.PRNGKey(0), jnp.float32(0.5)
    ob = O.Objective(attention_grid=g, attention_layer=layer, attention_head=head)
    fwd = jax.jit(lambda b: O.forward_train(params, cfg, b, rng, tau, ob)[0])
    sums, sums0 = fwd(bt), fwd(batch)
    for k in ("ce_sum", "img_sq", "txt_sq", "img_kept", "txt_kept"):
        np.testing.assert_allclose(sums[k], sums0[k], rtol=1e-5, atol=1e-7)

    # naive: the hidden states entering `layer`, then one head's softmax in float64
    c = cfg.llm
    lp = jax.tree_util.tree_map(lambda a: np.asarray(a[layer], np.float64),
                                params["llm"]["layers"])
    first = jax.tree_util.tree_map(lambda a: a[:layer], params["llm"]["layers"])
    feats = M.image_features(params, cfg, jnp.asarray(batch["pixels"]))
    x = M.embed_inputs(params, cfg, jnp.asarray(batch["tokens"]), feats,
                       jnp.asarray(batch["image_start"]))
    t = x.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t)[None], x.shape[:2])
    x, _ = O.run_stack(first, c, jnp.float32, x, pos, jnp.asarray(batch["lengths"]))
    x = np.asarray(x, np.float64)
    marks = _attention_queries_loops(batch["labels"], turns, batch["image_start"])
    d = c.head_dim
    tot, tot_u, n = 0.0, 0.0, 0
    for b in range(6):
        q, k, _ = _head_qkv(x[b], lp, c, head)
        for qi in np.flatnonzero(marks[b] >= 0):
            s = q[qi] @ k[:min(qi + 1, batch["lengths"][b])].T / np.sqrt(d)
            p = np.exp(s - s.max())
            p /= p.sum()
            mass, logs = 0.0, []
            for j in range(len(p)):
                rel = j - batch["image_start"][b]
                if 0 <= rel < cfg.num_image_tokens:
                    r, col = divmod(rel, side)
                    if (r // (side // g)) * g + col // (side // g) == marks[b, qi]:
                        mass, logs = mass + p[j], logs + [np.log(p[j])]
            tot, tot_u, n = tot - np.log(max(mass, 1e-6)), tot_u - np.mean(logs), n + 1
    assert n >= (batch["image_start"] >= 0).sum() >= 3   # each image sample: its first answer
    loss, m = jax.jit(lambda b: O.loss_fn(params, cfg, b, rng, tau,
                                          replace(ob, attention_loss_weight=w)))(bt)
    loss0, _ = jax.jit(lambda b: O.loss_fn(params, cfg, b, rng, tau))(batch)
    np.testing.assert_allclose(float(m["attn_loss"]), tot / n, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(loss0) + w * tot / n, rtol=1e-5)
    assert 0 < float(m["attn_mass"]) < 1
    uniform = replace(ob, attention_loss_weight=w, attention_target="uniform")
    _, mu = jax.jit(lambda b: O.loss_fn(params, cfg, b, rng, tau, uniform))(bt)
    np.testing.assert_allclose(float(mu["attn_loss"]), tot_u / n, rtol=1e-5)
    assert float(mu["attn_mass"]) == pytest.approx(float(m["attn_mass"]), rel=1e-6)

    denom = O.loss_denominators(bt, cfg)
    assert float(denom["attn"]) == n
    cw = np.asarray(O.ce_weights(jnp.asarray(batch["labels"])))
    ids = np.arange(6, dtype=np.int32)
    part = jax.jit(lambda b: O.combine(O.forward_train(params, cfg, b, rng, tau, ob)[0], denom,
                                       cfg, replace(ob, attention_loss_weight=w))[0])
    total = sum(float(part({**{k: val[h] for k, val in bt.items()}, "sample_id": ids[h],
                            "ce_weight": cw[h]})) for h in (np.array([0, 2, 4]), np.array([1, 3, 5])))
    np.testing.assert_allclose(total, float(loss), rtol=1e-5)
    with pytest.raises(ValueError, match="before the sparse layer"):
        O.forward_train(params, cfg, bt, rng, tau, O.Objective(attention_grid=g, attention_layer=2))


def test_choice_objective_matches_naive_formula(tiny, batch):
    """objective.choice_loss_weight: -log of the attention mass that one head of a layer past
    the sparse layer (its MaskedSoftmax under the step's decisions) puts on the marked option
    tokens, at the first prediction of the answer they belong to; copy_loss_weight: the NLL
    of the answer's first token from that head's output alone through the final norm and the
    LM head; the rest is unchanged."""
    from dynllava_jax.data.choice_keys import answer_runs
    cfg, params = tiny
    layer, head, w = cfg.sparse.sparse_layer + 1, 2, 0.3
    keys = np.full(batch["labels"].shape, -1, np.int32)
    rs = np.random.default_rng(4)
    for b in range(6):
        prev = 0
        for r, (s, e) in enumerate(answer_runs(batch["labels"][b])):
            if r % 2 == 0 and s - prev > 2:   # every other answer's prompt holds its "option"
                lo = int(rs.integers(prev, s - 2))
                keys[b, lo:lo + 3] = r
            prev = e
    bt = dict(batch, choice_keys=keys)
    rng, tau = jax.random.PRNGKey(0), jnp.float32(0.5)
    ob = O.Objective(choice_layer=layer, choice_head=head)
    fwd = jax.jit(lambda b: O.forward_train(params, cfg, b, rng, tau, ob))
    (sums, policy), (sums0, _) = fwd(bt), fwd(batch)
    for k in ("ce_sum", "img_sq", "txt_sq", "img_kept", "txt_kept"):
        np.testing.assert_allclose(sums[k], sums0[k], rtol=1e-5, atol=1e-7)

    # naive: the hidden states entering `layer` (the layers from the sparse one under the
    # policy), then one head's MaskedSoftmax in float64
    c, lay = cfg.llm, params["llm"]["layers"]
    lp = jax.tree_util.tree_map(lambda a: np.asarray(a[layer], np.float64), lay)
    feats = M.image_features(params, cfg, jnp.asarray(batch["pixels"]))
    x = M.embed_inputs(params, cfg, jnp.asarray(batch["tokens"]), feats,
                       jnp.asarray(batch["image_start"]))
    t = x.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t)[None], x.shape[:2])
    n_len = jnp.asarray(batch["lengths"])
    sl = cfg.sparse.sparse_layer
    x, _ = O.run_stack(jax.tree_util.tree_map(lambda a: a[:sl], lay), c, jnp.float32, x, pos, n_len)
    x, _ = O.run_stack(jax.tree_util.tree_map(lambda a: a[sl:layer], lay), c, jnp.float32, x, pos,
                       n_len, policy=policy)
    x, pol = np.asarray(x, np.float64), np.asarray(policy, np.float64)
    d = c.head_dim
    tot, n, copy = 0.0, 0, 0.0
    for b in range(6):
        q, k, v = _head_qkv(x[b], lp, c, head)
        for r, (s, e) in enumerate(answer_runs(batch["labels"][b])):
            qi = s - 1                           # the position predicting the answer's first token
            if not (keys[b] == r).any():
                continue
            sc = q[qi] @ k.T / np.sqrt(d)
            vis = (np.arange(t) <= qi) & (np.arange(t) < batch["lengths"][b])
            g = np.where(np.arange(t) == qi, 1.0, pol[b])
            a = np.where(vis, np.exp(sc - sc[vis].max()) * g, 0.0)
            p = (a + 1e-6 / t) / (a.sum() + 1e-6)
            tot, n = tot - np.log(max(p[keys[b] == r].sum(), 1e-6)), n + 1
            out = p @ v @ lp["o_proj"]["kernel"][head * d:(head + 1) * d]
            logits = np.asarray(M.lm_logits(params, cfg, jnp.asarray(out[None, None], jnp.float32)),
                                np.float64)[0, 0]
            m_ = logits.max()
            copy += m_ + np.log(np.exp(logits - m_).sum()) - logits[batch["labels"][b, s]]
    assert n >= 4
    loss, m = jax.jit(lambda b: O.loss_fn(params, cfg, b, rng, tau,
                                          replace(ob, choice_loss_weight=w)))(bt)
    loss0, _ = jax.jit(lambda b: O.loss_fn(params, cfg, b, rng, tau))(batch)
    np.testing.assert_allclose(float(m["choice_loss"]), tot / n, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(loss0) + w * tot / n, rtol=1e-5)
    loss_c, mc = jax.jit(lambda b: O.loss_fn(params, cfg, b, rng, tau,
                                             replace(ob, copy_loss_weight=0.5)))(bt)
    np.testing.assert_allclose(float(mc["copy_loss"]), copy / n, rtol=1e-4)
    np.testing.assert_allclose(float(loss_c), float(loss0) + 0.5 * copy / n, rtol=1e-5)
    assert 0 < float(m["choice_mass"]) < 1
    assert float(O.loss_denominators(bt, cfg)["choice"]) == n
    with pytest.raises(ValueError, match="choice_layer"):
        O.forward_train(params, cfg, bt, rng, tau, O.Objective(choice_layer=c.num_layers))


def test_pair_objective_is_two_heads_attention_objective(tiny, batch):
    """objective.pair_loss_weight: heads h and h + 1 of the attention layer scored, like the
    attention objective, on the first and the second cell of each answer's pair."""
    cfg, params = tiny
    g, layer, head, w = 2, 1, 1, 0.4
    rs = np.random.default_rng(5)
    turns = rs.integers(-1, g * g, (6, 3)).astype(np.int32)
    pairs = rs.integers(-1, g * g, (6, 3, 2)).astype(np.int32)
    pairs[:, 0] = np.stack([np.arange(6) % 4, (np.arange(6) + 1) % 4], -1)
    rng, tau = jax.random.PRNGKey(0), jnp.float32(0.5)
    ob = O.Objective(attention_grid=g, attention_layer=layer)
    fwd = jax.jit(lambda b, h: O.forward_train(params, cfg, b, rng, tau,
                                               replace(ob, attention_head=h))[0],
                  static_argnums=1)
    both = fwd(dict(batch, turn_cells=turns, pair_cells=pairs), head)
    first = fwd(dict(batch, turn_cells=pairs[..., 0]), head)
    second = fwd(dict(batch, turn_cells=pairs[..., 1]), head + 1)
    np.testing.assert_allclose(both["pair_sum"], first["attn_sum"] + second["attn_sum"], rtol=1e-6)
    np.testing.assert_allclose(both["pair_mass"], first["attn_mass"] + second["attn_mass"], rtol=1e-6)
    bt = dict(batch, turn_cells=turns, pair_cells=pairs)
    denom = O.loss_denominators(bt, cfg)
    n = sum(int((O.attention_queries(jnp.asarray(batch["labels"]), jnp.asarray(pairs[..., k]),
                                     jnp.asarray(batch["image_start"])) >= 0).sum()) for k in (0, 1))
    assert float(denom["pair"]) == n >= 6
    _, m = O.combine(both, denom, cfg, O.Objective(pair_loss_weight=w))
    np.testing.assert_allclose(float(m["pair_loss"]),
                               float((first["attn_sum"] + second["attn_sum"]).sum()) / n, rtol=1e-6)
    with pytest.raises(ValueError, match="attention_head"):
        O.forward_train(params, cfg, bt, rng, tau,
                        replace(ob, attention_head=cfg.llm.num_heads - 1))


def test_letter_objective_matches_naive_formula(tiny, batch):
    """objective.letter_loss_weight: at every marked token, -log of the attention that one
    head of a layer before the sparse layer puts on the token it names (its option's letter);
    the rest is unchanged."""
    cfg, params = tiny
    layer, head, w = 0, 1, 0.4
    letters = np.full(batch["labels"].shape, -1, np.int32)
    rs = np.random.default_rng(5)
    for b in range(6):
        for q in rs.choice(np.arange(3, int(batch["lengths"][b])), 4, replace=False):
            letters[b, q] = q - int(rs.integers(1, 4))
    bt = dict(batch, option_letters=letters)
    rng, tau = jax.random.PRNGKey(0), jnp.float32(0.5)
    ob = O.Objective(letter_layer=layer, letter_head=head)
    fwd = jax.jit(lambda b: O.forward_train(params, cfg, b, rng, tau, ob))
    sums, sums0 = fwd(bt)[0], fwd(batch)[0]
    for k in ("ce_sum", "img_sq", "txt_sq", "img_kept", "txt_kept"):
        np.testing.assert_allclose(sums[k], sums0[k], rtol=1e-5, atol=1e-7)

    c = cfg.llm
    lp = jax.tree_util.tree_map(lambda a: np.asarray(a[layer], np.float64), params["llm"]["layers"])
    feats = M.image_features(params, cfg, jnp.asarray(batch["pixels"]))
    x = np.asarray(M.embed_inputs(params, cfg, jnp.asarray(batch["tokens"]), feats,
                                  jnp.asarray(batch["image_start"])), np.float64)
    t, d = x.shape[1], c.head_dim
    tot, n = 0.0, 0
    for b in range(6):
        q, k, _ = _head_qkv(x[b], lp, c, head)
        for qi in np.flatnonzero(letters[b] >= 0):
            sc = q[qi] @ k.T / np.sqrt(d)
            vis = np.arange(t) <= qi
            p = np.where(vis, np.exp(sc - sc[vis].max()), 0.0)
            tot, n = tot - np.log(max(p[letters[b, qi]] / p.sum(), 1e-6)), n + 1
    assert n == 24
    loss, m = jax.jit(lambda b: O.loss_fn(params, cfg, b, rng, tau,
                                          replace(ob, letter_loss_weight=w)))(bt)
    loss0, _ = jax.jit(lambda b: O.loss_fn(params, cfg, b, rng, tau))(batch)
    np.testing.assert_allclose(float(m["letter_loss"]), tot / n, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(loss0) + w * tot / n, rtol=1e-5)
    assert 0 < float(m["letter_mass"]) < 1
    assert float(O.loss_denominators(bt, cfg)["letter"]) == n
    with pytest.raises(ValueError, match="letter_head"):
        O.forward_train(params, cfg, bt, rng, tau, O.Objective(letter_head=c.num_heads))


def test_dense_rows_keep_every_token_and_leave_the_ratio_losses(tiny, batch, run):
    """objective.dense_fraction: the drawn rows run as with the predictors off (policy all
    ones, the same CE), the others exactly as before, and the ratio losses average over the
    pruned rows alone."""
    cfg, params = tiny
    sc = cfg.sparse
    draws = [np.asarray(O.dense_rows(jax.random.PRNGKey(k), 6, 0.5)) for k in range(6)]
    assert all(d.sum() == 3 for d in draws) and len({d.tobytes() for d in draws}) > 1
    dense = np.array([True, False, True, False, False, True])
    # the rows must cover both cases: dense and pruned rows with images and long answers
    assert (batch["image_start"][dense] >= 0).any() and (batch["image_start"][~dense] >= 0).any()
    rng, tau = jax.random.PRNGKey(0), jnp.float32(0.5)
    bt = dict(batch, dense_rows=dense)

    @jax.jit
    def f(bt):
        sums, policy = O.forward_train(params, cfg, bt, rng, tau)
        return sums, policy, O.combine(sums, O.loss_denominators(bt, cfg), cfg)[1]

    sums, policy, m = jax.device_get(f(bt))
    cfg0 = cfg.replace_sparse(use_vision_predictor=False, use_output_text_predictor=False)
    plain = jax.device_get(jax.jit(
        lambda b: O.forward_train(params, cfg0, b, rng, tau)[0])(batch))
    assert (policy[dense] == 1).all()
    np.testing.assert_array_equal(policy[~dense], run["policy"][~dense])
    np.testing.assert_allclose(sums["ce_sum"][dense], plain["ce_sum"][dense], rtol=1e-5)
    np.testing.assert_allclose(sums["ce_sum"][~dense], run["sums"]["ce_sum"][~dense], rtol=1e-5)
    for k in ("img_sq", "img_kept", "has_img", "txt_sq", "txt_kept", "txt_long"):
        assert (sums[k][dense] == 0).all(), k
    has_img = batch["image_start"] >= 0
    want_img = run["sums"]["img_sq"][~dense & has_img].mean()
    np.testing.assert_allclose(float(m["img_ratio_loss"]), sc.mask_loss_weight * want_img,
                               rtol=1e-5)
    want_txt = run["sums"]["txt_sq"][~dense].sum() / (~dense).sum()   # "all": pruned rows
    np.testing.assert_allclose(float(m["txt_ratio_loss"]), sc.mask_loss_weight * want_txt,
                               rtol=1e-5)
    # loss_fn draws its rows from the key, as the train step does
    loss, _ = O.loss_fn(params, cfg, batch, rng, tau, O.Objective(dense_fraction=0.5))
    drawn = dict(batch, dense_rows=np.asarray(O.dense_rows(rng, 6, 0.5)))
    sums2 = jax.device_get(f(drawn))
    np.testing.assert_allclose(float(loss), float(sums2[2]["loss"]), rtol=1e-5)


def test_every_objective_option_of_the_config_reaches_the_step():
    """`Objective` holds exactly the config's ``objective.*`` options (plus the grid from
    ``data.cell_grid``), so that none is dropped on its way to the train step."""
    import dataclasses
    import configs
    c = configs.base_config()
    fields = {f.name for f in dataclasses.fields(O.Objective)}
    assert fields - {"attention_grid"} == set(c.objective.keys())
    c.objective.dense_fraction, c.objective.attention_target = 0.5, "uniform"
    ob = O.Objective.from_config(c.objective, 3)
    assert (ob.dense_fraction, ob.attention_target, ob.attention_grid) == (0.5, "uniform", 3)
    assert O.Objective.from_config(configs.base_config().objective) == O.Objective()
