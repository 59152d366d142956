"""The converted model equals the PyTorch model it came from.

A tiny random `LlavaForConditionalGeneration` (transformers, CLIP tower + LLaMA with
grouped-query attention) is built in-process and saved in every layout the converter
accepts (SPEC §7): llava-hf as transformers 5 writes it, llava-hf with 4.x names, and the
original LLaVA-1.5 layout (tower inside or given by `--vision-tower`, single file or
sharded safetensors / pytorch_model-*.bin). Logits of `forward_dense` must equal the
PyTorch logits within 1e-4 in float32, and 16 greedy tokens must match `generate`.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dynllava_jax.checkpoint import load_converted  # noqa: E402
from dynllava_jax.convert import convert  # noqa: E402
from dynllava_jax.inputs import IMAGE_MARKER, prepare_batch  # noqa: E402
from dynllava_jax.model import forward_dense  # noqa: E402

IMAGE_TOKEN = 150  # llava-hf's image token id in the tiny vocabulary
VOCAB = 160
IMAGE_SIZE = 56
N_IMG = (IMAGE_SIZE // 14) ** 2  # 16 image tokens
PROMPTS = [  # LLaVA prompt ids, -200 marks the image; the last one is text-only
    [1, 5, 6, IMAGE_MARKER, 7, 8, 9],
    [1, 10, IMAGE_MARKER, 11],
    [1, 12, 13, 14, 15, 16],
]
PREPROCESSOR = {
    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True,
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": IMAGE_SIZE},
}
# Predictor shapes for the Dynamic-LLaVA variant of the original layout (SPEC §7).
SPARSE = {"d_model": 32, "nhead": 4, "dim_feedforward": 64, "num_layers": 2, "sparse_layer": 1,
          "vision_keep_rate": 0.25, "output_text_keep_rate": 0.5,
          "output_text_len_for_training": 50, "mask_loss_weight": 100.0,
          "use_vision_predictor": True, "use_output_text_predictor": True,
          "use_instruct_predictor": False, "instruct_keep_rate": 0.7,
          "instruct_len_for_training": 25}


# -- the PyTorch reference, built once per test session -------------------------------

@functools.lru_cache(maxsize=None)
def hf_model():
    """(model, saved llava-hf directory) of a tiny random LLaVA in float32."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=14,
                          projection_dim=32, hidden_act="quick_gelu")
    tc = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.1,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_seq_length=N_IMG)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # bigger logits: clear greedy margins on a random model
        model.lm_head.weight.mul_(4.0)
    root = _tmpdir("dynllava-hf-")
    model.save_pretrained(root / "hf")
    (root / "hf" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return model, root / "hf"


def _tmpdir(prefix: str) -> Path:
    """A directory shared by the tests of this process, removed when it exits."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, root, True)
    return root


def hf_tensors() -> dict[str, "torch.Tensor"]:
    """The tensors as transformers 5 saves them (llava-hf layout)."""
    from safetensors.torch import load_file
    return load_file(str(hf_model()[1] / "model.safetensors"))


def pixels(n: int = len(PROMPTS), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)


def hf_ids(prompt: list[int]) -> list[int]:
    """llava-hf's prompt: the image token repeated once per image feature."""
    out = []
    for t in prompt:
        out.extend([IMAGE_TOKEN] * N_IMG if t == IMAGE_MARKER else [t])
    return out


@functools.lru_cache(maxsize=None)
def torch_logits() -> list[np.ndarray]:
    """PyTorch logits [T, V] per prompt (each run alone, no padding)."""
    model = hf_model()[0]
    px = pixels()
    out = []
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ids = torch.tensor([hf_ids(p)])
            kw = {"pixel_values": torch.from_numpy(px[i: i + 1])} if IMAGE_MARKER in p else {}
            out.append(model(input_ids=ids, **kw).logits[0].float().numpy())
    return out


# -- writing the other layouts from the llava-hf tensors ---------------------------------

def original_config(tower: str = "openai/clip-vit-large-patch14-336", sparse: bool = False) -> dict:
    model = hf_model()[0]
    t, v = model.config.text_config, model.config.vision_config
    cfg = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "hidden_act": "silu", "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_attention_heads": t.num_attention_heads, "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": VOCAB,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "image_aspect_ratio": "pad", "mm_hidden_size": v.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": tower, "torch_dtype": "float32",
    }
    if sparse:
        cfg.update(architectures=["DynamicLlavaLlamaForCausalLM"], model_type="dynamic_llava_llama",
                   sparse_config=SPARSE)
    return cfg


def to_original(tensors: dict, with_tower: bool = True) -> dict:
    out = {}
    for k, v in tensors.items():
        if k.startswith("language_model.model."):
            out["model." + k[len("language_model.model."):]] = v
        elif k == "language_model.lm_head.weight":
            out["lm_head.weight"] = v
        elif k.startswith("multi_modal_projector.linear_"):
            i = {"1": "0", "2": "2"}[k[len("multi_modal_projector.linear_")]]
            out[f"model.mm_projector.{i}." + k.split(".")[-1]] = v
        elif k.startswith("vision_tower."):
            if with_tower:
                out["model.vision_tower.vision_tower.vision_model." + k[len("vision_tower."):]] = v
        else:
            raise AssertionError(f"unmapped llava-hf tensor {k}")
    return out


def to_hf4(tensors: dict) -> dict:
    """The names some transformers 4.x releases write."""
    out = {}
    for k, v in tensors.items():
        for old, new in (("language_model.model.", "model.language_model."),
                         ("language_model.lm_head.", "lm_head."),
                         ("multi_modal_projector.", "model.multi_modal_projector."),
                         ("vision_tower.", "model.vision_tower.vision_model.")):
            if k.startswith(old):
                out[new + k[len(old):]] = v
                break
        else:
            raise AssertionError(k)
    return out


def predictor_tensors(seed: int = 1) -> dict:
    """Random Dynamic-LLaVA predictor weights in the original names (SPEC §7)."""
    g = torch.Generator().manual_seed(seed)
    h, d, f = 64, SPARSE["d_model"], SPARSE["dim_feedforward"]
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    out = {}
    p = "model.image_score_predictor."
    out.update({p + "down_mlp.0.weight": r(h), p + "down_mlp.0.bias": r(h),
                p + "down_mlp.1.weight": r(d, h), p + "down_mlp.1.bias": r(d)})
    for j in range(SPARSE["num_layers"]):
        b = f"{p}transformer.{j}."
        out.update({b + "norm1.weight": r(d), b + "norm1.bias": r(d), b + "norm2.weight": r(d),
                    b + "norm2.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
                    b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
                    b + "mlp.fc1.weight": r(f, d), b + "mlp.fc1.bias": r(f),
                    b + "mlp.fc2.weight": r(d, f), b + "mlp.fc2.bias": r(d)})
    dims = [(d // 2, d), (d // 4, d // 2), (2, d // 4)]
    for k, (o, i) in zip((0, 2, 4), dims):
        out.update({f"{p}output_mlp.{k}.weight": r(o, i), f"{p}output_mlp.{k}.bias": r(o)})
    p = "model.output_text_score_predictor.output_mlp."
    out.update({p + "0.weight": r(h), p + "0.bias": r(h)})
    for k, (o, i) in zip((1, 3, 5, 7), [(h // 2, h), (h // 4, h // 2), (h // 8, h // 4), (2, h // 8)]):
        out.update({f"{p}{k}.weight": r(o, i), f"{p}{k}.bias": r(o)})
    return out


def write_safetensors(d: Path, tensors: dict, shards: int = 1) -> None:
    from safetensors.torch import save_file
    d.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in names}, str(d / "model.safetensors"))
        return
    wm = {}
    for s, part in enumerate(np.array_split(np.array(names, dtype=object), shards)):
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, str(d / fn))
        wm.update({k: fn for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def write_bin(d: Path, tensors: dict, shards: int = 2) -> None:
    d.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    wm = {}
    for s, part in enumerate(np.array_split(np.array(names, dtype=object), shards)):
        fn = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: tensors[k] for k in part}, str(d / fn))
        wm.update({k: fn for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def write_clip_dir(d: Path, tensors: dict) -> Path:
    """A CLIP vision directory as `--vision-tower` takes it (CLIPVisionModel names)."""
    d.mkdir(parents=True, exist_ok=True)
    vc = hf_model()[0].config.vision_config.to_dict()
    vc.update(architectures=["CLIPVisionModel"], model_type="clip_vision_model")
    (d / "config.json").write_text(json.dumps(vc))
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    write_safetensors(d, {"vision_model." + k[len("vision_tower."):]: v
                          for k, v in tensors.items() if k.startswith("vision_tower.")})
    return d


def write_layout(root: Path, layout: str) -> tuple[Path, dict]:
    """Write the tiny model in `layout`; returns (src dir, extra convert() kwargs)."""
    t = hf_tensors()
    src = root / layout
    if layout == "hf":
        return hf_model()[1], {}
    if layout == "hf4":
        write_safetensors(src, to_hf4(t))
        shutil.copy(hf_model()[1] / "config.json", src / "config.json")
        shutil.copy(hf_model()[1] / "preprocessor_config.json", src / "preprocessor_config.json")
        return src, {}
    clip = root / "clip"
    if not clip.exists():
        write_clip_dir(clip, t)
    if layout == "orig-tower-inside":  # tower in the weights too; the CLIP dir names the heads
        write_safetensors(src, to_original(t, with_tower=True))
    elif layout == "orig-no-tower":
        write_safetensors(src, to_original(t, with_tower=False))
    elif layout == "orig-sharded-safetensors":
        write_safetensors(src, to_original(t, with_tower=True), shards=3)
    elif layout == "orig-sharded-bin":
        write_bin(src, to_original(t, with_tower=True), shards=2)
    elif layout == "orig-local-tower-path":  # mm_vision_tower names a local CLIP directory
        write_safetensors(src, to_original(t, with_tower=False))
        (src / "config.json").write_text(json.dumps(original_config(tower=str(clip))))
        return src, {}
    else:
        raise ValueError(layout)
    (src / "config.json").write_text(json.dumps(original_config()))
    return src, {"vision_tower": clip}


# -- running the converted model --------------------------------------------------------

_forward = jax.jit(forward_dense, static_argnums=1)


def jax_logits(params, cfg) -> list[np.ndarray]:
    batch = prepare_batch(PROMPTS, cfg.num_image_tokens, pad_id=0)
    logits = _forward(params, cfg, jnp.asarray(batch.tokens), jnp.asarray(batch.lengths),
                      jnp.asarray(pixels()), jnp.asarray(batch.image_start))
    logits = np.asarray(logits, np.float32)
    return [logits[b, : batch.lengths[b]] for b in range(len(PROMPTS))]


@functools.lru_cache(maxsize=None)
def _converted_root() -> Path:
    return _tmpdir("dynllava-conv-")


@functools.lru_cache(maxsize=None)
def converted(layout: str, dtype: str = "float32"):
    root = _converted_root()
    src, kw = write_layout(root / "src", layout)
    dst = root / f"out-{layout}-{dtype}"
    convert(src, dst, dtype=dtype, progress=False, **kw)
    return load_converted(dst)


def assert_same_params(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- tests ----------------------------------------------------------------------------

def test_llava_hf_logits_match_pytorch():
    cfg, params = converted("hf")
    assert cfg.num_image_tokens == N_IMG and cfg.llm.num_kv_heads == 2
    assert not cfg.sparse.enabled and "image_predictor" not in params
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree_util.tree_leaves(params))
    ref = torch_logits()
    got = jax_logits(params, cfg)
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        assert np.abs(r - g).max() <= 1e-4, np.abs(r - g).max()


@pytest.mark.parametrize("layout", ["hf4", "orig-tower-inside", "orig-no-tower",
                                    "orig-sharded-safetensors", "orig-sharded-bin",
                                    "orig-local-tower-path"])
def test_every_layout_gives_the_same_params(layout):
    cfg_hf, params_hf = converted("hf")
    cfg, params = converted(layout)
    assert cfg == cfg_hf
    assert_same_params(params, params_hf)


def test_original_layout_logits_match_pytorch():
    cfg, params = converted("orig-sharded-bin")
    for r, g in zip(torch_logits(), jax_logits(params, cfg)):
        assert np.abs(r - g).max() <= 1e-4


def test_original_dynamic_llava_predictors(tmp_path):
    """sparse_config and predictor weights: detected, shaped from the config, transposed."""
    t = hf_tensors()
    clip = write_clip_dir(tmp_path / "clip", t)
    src = tmp_path / "dyn"
    pred = predictor_tensors()
    write_safetensors(src, {**to_original(t), **pred}, shards=2)
    (src / "config.json").write_text(json.dumps(original_config(sparse=True)))
    convert(src, tmp_path / "out", vision_tower=clip, progress=False)
    cfg, params = load_converted(tmp_path / "out")
    assert cfg.sparse.enabled and cfg.sparse.d_model == 32 and cfg.sparse.sparse_layer == 1
    assert cfg.sparse.vision_keep_rate == 0.25
    ip, tp = params["image_predictor"], params["text_predictor"]
    p = "model.image_score_predictor."
    np.testing.assert_array_equal(ip["block_1"]["qkv"]["kernel"], pred[p + "transformer.1.attn.qkv.weight"].numpy().T)
    np.testing.assert_array_equal(ip["down_norm"]["scale"], pred[p + "down_mlp.0.weight"].numpy())
    np.testing.assert_array_equal(ip["out_3"]["bias"], pred[p + "output_mlp.4.bias"].numpy())
    q = "model.output_text_score_predictor.output_mlp."
    np.testing.assert_array_equal(tp["fc_4"]["kernel"], pred[q + "7.weight"].numpy().T)
    np.testing.assert_array_equal(tp["norm"]["bias"], pred[q + "0.bias"].numpy())
    # the LLaVA part is untouched by the predictors
    _, params_hf = converted("hf")
    assert_same_params({k: params[k] for k in params_hf}, params_hf)


def test_fp16_bin_shards_convert_exactly(tmp_path):
    """fp16 weights (as the real releases store them) are widened exactly."""
    t = {k: v.half() for k, v in hf_tensors().items()}
    clip = write_clip_dir(tmp_path / "clip", hf_tensors())
    src = tmp_path / "fp16"
    write_bin(src, to_original(t, with_tower=False), shards=2)
    (src / "config.json").write_text(json.dumps(original_config()))
    convert(src, tmp_path / "out", vision_tower=clip, progress=False)
    _, params = load_converted(tmp_path / "out")
    _, params_hf = converted("hf")
    got = np.asarray(params["llm"]["layers"]["gate_proj"]["kernel"])
    want = np.asarray(params_hf["llm"]["layers"]["gate_proj"]["kernel"]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, want)


def test_bfloat16_conversion():
    cfg, params = converted("hf", "bfloat16")
    assert cfg.param_dtype == "bfloat16" and cfg.dtype == "bfloat16"
    assert all(np.asarray(x).dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
    _, params32 = converted("hf")
    w16 = np.asarray(params["llm"]["lm_head"]["kernel"]).astype(np.float32)
    w32 = np.asarray(params32["llm"]["lm_head"]["kernel"])
    np.testing.assert_array_equal(w16, w32.astype(jnp.bfloat16).astype(np.float32))
    for r, g in zip(torch_logits(), jax_logits(params, cfg)):
        scale = np.abs(r).max()
        assert np.abs(r - g).max() <= 0.05 * scale, (np.abs(r - g).max(), scale)
        # the bf16 model still ranks the top token of most positions the same
        assert (r.argmax(-1) == g.argmax(-1)).mean() >= 0.8


def test_greedy_generation_matches_pytorch():
    """16 greedy tokens: transformers' generate vs forward_dense each step and vs generate()."""
    n_new = 16
    model = hf_model()[0]
    cfg, params = converted("hf")
    px = pixels()
    prompts = PROMPTS[:2] + PROMPTS[2:]
    want = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = torch.tensor([hf_ids(p)])
            kw = {"pixel_values": torch.from_numpy(px[i: i + 1])} if IMAGE_MARKER in p else {}
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                 min_new_tokens=n_new, do_sample=False, num_beams=1, eos_token_id=None,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kw)
            want.append(out.sequences[0, ids.shape[1]:].tolist())
            top2 = torch.stack(out.scores)[:, 0].topk(2, dim=-1).values
            assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # the reference itself is unambiguous
    # JAX: a static padded length, so one compile serves every step
    seqs = [list(p) for p in prompts]
    base = prepare_batch(prompts, cfg.num_image_tokens)
    cap = int(base.lengths.max()) + n_new
    for _ in range(n_new):
        batch = prepare_batch(seqs, cfg.num_image_tokens, pad_to=cap)
        logits = _forward(params, cfg, jnp.asarray(batch.tokens), jnp.asarray(batch.lengths),
                          jnp.asarray(px), jnp.asarray(batch.image_start))
        last = np.asarray(logits)[np.arange(len(seqs)), batch.lengths - 1]
        for s, t in zip(seqs, last.argmax(-1)):
            s.append(int(t))
    got = [s[len(p):] for s, p in zip(seqs, prompts)]
    assert got == want
    # The real generation code: compiled prefill + decode loop, with and without a KV cache.
    from dynllava_jax.generate import GenOptions, generate
    eos = cfg.eos_token_id
    want_cut = [w[: w.index(eos)] if eos in w else w for w in want]
    for use_cache in (True, False):
        res = generate(params, cfg, base, px, GenOptions(max_new_tokens=n_new, mode="dense",
                                                          use_cache=use_cache))
        assert res.new_token_ids == want_cut, use_cache


def test_attention_objective_reads_pytorch_attention_probabilities():
    """The attention objective's mass (objective.attention_nll) is the attention probability
    transformers' eager LLaMA attention gives (GQA: query head 3 reads kv head 1), summed
    over the named cell's image tokens, from the hidden states entering that layer."""
    from dynllava_jax import objective as O
    model = hf_model()[0]
    cfg, params = converted("hf")
    ids = torch.tensor([hf_ids(PROMPTS[0])])
    start = PROMPTS[0].index(IMAGE_MARKER)
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=torch.from_numpy(pixels()[:1]),
                        output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation(before)
    t = ids.shape[1]
    queries = {t - 3: 0, t - 2: 3, t - 1: 1}   # position -> named cell of a 2 x 2 grid
    cells = np.full((1, t), -1, np.int32)
    for q, c in queries.items():
        cells[0, q] = c
    member = O.image_token_cells(N_IMG, 2)
    layer = 1
    for head in (0, 3):
        nll, mass = O.attention_nll(
            O.layer_at(params["llm"]["layers"], layer), cfg,
            jnp.asarray(out.hidden_states[layer].numpy()), jnp.arange(t)[None],
            jnp.array([t]), jnp.array([start]), jnp.asarray(cells), 2, head)
        probs = out.attentions[layer][0, head].numpy()             # [query, key]
        want = [probs[q, start:start + N_IMG][member == c].sum() for q, c in queries.items()]
        np.testing.assert_allclose(float(mass[0]), sum(want), rtol=1e-5)
        np.testing.assert_allclose(float(nll[0]), -np.log(want).sum(), rtol=1e-5)
