"""What a real checkpoint and everyday mistakes do to the converter (issues 9 and 10).

- a llava-hf checkpoint written by the installed transformers' `save_pretrained` (model and
  processor: `processor_config.json`, `tokenizer.json`, no `preprocessor_config.json` or
  `tokenizer.model`) converts as it is and answers with transformers' greedy tokens;
- its tokenizer.json gives LLaVA's ids (those of the sentencepiece model it came from);
- llava-hf's padded embedding rows are never generated, and decode survives them;
- bad configs, weights, destinations, tokenizers and model configs: one clear error each,
  naming the file / field / tensor, nothing deleted;
- per-tensor checksums catch corrupt params; converted directories get the user's umask.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

try:  # pytest's default import mode puts tests/ on sys.path
    import test_parity_hf as tiny
except ImportError:  # tests/ imported as a package
    from tests import test_parity_hf as tiny

from dynllava_jax.checkpoint import CheckpointDirError, load_converted  # noqa: E402
from dynllava_jax.checkpoint_io import CheckpointError  # noqa: E402
from dynllava_jax.checksums import CHECKSUM_FILE, ChecksumError  # noqa: E402
from dynllava_jax.config import ConfigError  # noqa: E402
from dynllava_jax.convert import convert, read_source  # noqa: E402
from dynllava_jax.tokenizer import LlavaTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SP_VOCAB = 400  # sentencepiece pieces; llava-hf adds <image> (400) and <pad> (401)
IMAGE_ID, PAD_ID, HF_VOCAB = SP_VOCAB, SP_VOCAB + 1, 448  # padded to a multiple of 64
IMAGE_SIZE = 56
N_IMG = (IMAGE_SIZE // 14) ** 2
CORPUS = [line for line in (REPO / "README.md").read_text().splitlines() if line.strip()]


def train_llama_tokenizer(d: Path, legacy: bool = True) -> Path:
    """A small sentencepiece BPE model with LLaMA's settings (byte fallback, no normaliser
    rules, dummy prefix, spaces kept), in a directory as the hub ships one."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, allow_whitespace_only_pieces=True, minloglevel=2)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({"legacy": legacy, "add_bos_token": True}))
    return d


def strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    chars = list("abcdefgh ABC  \n\t.,:?!0123456789éü中文🙂") + ["</s>", "<s>", "\u2581"]
    out = []
    for _ in range(n):
        parts = [rng.choice(chars) if rng.random() < 0.5 else
                 rng.choice(CORPUS)[rng.randrange(40):][:rng.randrange(14)] for _ in range(rng.randrange(1, 9))]
        out.append("".join(parts))
    return out


# -- a transformers-5 llava-hf checkpoint, built and saved in-process --------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def sp_dir(root):
    return train_llama_tokenizer(root / "sp")


@pytest.fixture(scope="module")
def hf5(root, sp_dir):
    """(model, dir): `LlavaForConditionalGeneration` + `LlavaProcessor`, both `save_pretrained`."""
    from transformers import (AddedToken, AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    try:
        from transformers.models.llava import LlavaImageProcessorPil as ImageProc
    except ImportError:  # earlier 5.x
        from transformers import LlavaImageProcessor as ImageProc
    tok = AutoTokenizer.from_pretrained(str(sp_dir))
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [IMAGE_ID, PAD_ID]
    ip = ImageProc(crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                   size={"shortest_edge": IMAGE_SIZE}, do_pad=True)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=IMAGE_SIZE, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
    tc = LlamaConfig(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_ID,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_seq_length=N_IMG)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        w = model.lm_head.weight
        w.mul_(4.0)
        # padded rows that greedy decoding would pick: +-10x one row's logit
        w[PAD_ID + 1::2] = 10.0 * w[5]
        w[PAD_ID + 2::2] = -10.0 * w[5]
    d = root / "llava-hf-t5"
    model.save_pretrained(d)
    proc.save_pretrained(d)
    names = {p.name for p in d.iterdir()}
    assert {"processor_config.json", "tokenizer.json"} <= names
    assert not {"preprocessor_config.json", "tokenizer.model"} & names
    return model, d


@pytest.fixture(scope="module")
def converted_hf5(root, hf5):
    info: dict = {}
    dst = root / "conv-hf5"
    convert(hf5[1], dst, progress=False, info=info)
    return dst, info


def test_transformers5_checkpoint_answers_with_transformers_greedy_tokens(hf5, converted_hf5):
    from dynllava_jax.generate import GenOptions
    from dynllava_jax.inference import Llava, Request

    model, _ = hf5
    dst, info = converted_hf5
    assert info["layout"] == "llava-hf" and "tokenizer.json" in info["tokenizer"] and not info["warnings"]
    llava = Llava(dst)
    assert len(llava.tokenizer) == PAD_ID + 1 and llava.cfg.llm.vocab_size == HF_VOCAB
    image = str(REPO / "assets" / "images" / "portrait.png")
    reqs = [Request("What is in the image?", image), Request("Describe a cat.")]
    n_new = 12
    got = llava.answer(reqs, GenOptions(max_new_tokens=n_new, mode="dense"))
    pixels = llava.images.load(image)
    suppressed = list(range(PAD_ID + 1, HF_VOCAB))
    picked_padding = False
    for req, ans in zip(reqs, got):
        ids = []
        for t in ans["prompt_token_ids"]:
            ids.extend([IMAGE_ID] * N_IMG if t == -200 else [t])
        ids = torch.tensor([ids])
        kw = {"pixel_values": torch.from_numpy(pixels[None])} if req.image else {}
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                 do_sample=False, num_beams=1, eos_token_id=2, pad_token_id=PAD_ID,
                                 suppress_tokens=suppressed, **kw)
            raw = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                 do_sample=False, num_beams=1, eos_token_id=2, pad_token_id=PAD_ID, **kw)
        want = out[0, ids.shape[1]:].tolist()
        want = want[: want.index(2)] if 2 in want else want
        assert ans["token_ids"] == want
        assert max(ans["token_ids"], default=0) <= PAD_ID
        picked_padding |= any(t > PAD_ID for t in raw[0, ids.shape[1]:].tolist())
        assert isinstance(ans["text"], str)
    assert picked_padding  # unmasked, the padded rows would have been generated


def test_processor_config_gives_the_image_settings(hf5, converted_hf5):
    dst, _ = converted_hf5
    pre = json.loads((dst / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert pre["image_processor_type"] == "CLIPImageProcessor" and "do_pad" not in pre


@pytest.mark.parametrize("legacy", [True, False])
def test_tokenizer_json_gives_llavas_ids(root, sp_dir, hf5, legacy):
    """tokenizer.json (all transformers 5 writes) == the sentencepiece model it came from."""
    a_dir = train_llama_tokenizer(root / f"sp-{legacy}", legacy) if not legacy else sp_dir
    b_dir = root / f"json-{legacy}"
    b_dir.mkdir()
    shutil.copy(hf5[1] / "tokenizer.json", b_dir)
    conf = json.loads((hf5[1] / "tokenizer_config.json").read_text())
    (b_dir / "tokenizer_config.json").write_text(json.dumps({**conf, "legacy": legacy}))
    a, b = LlavaTokenizer(a_dir), LlavaTokenizer(b_dir)
    assert a.sp.get_piece_size() == b.sp.get_piece_size() == SP_VOCAB
    for s in strings(1500, seed=int(legacy)):
        s = s.replace("<image>", "<im>").replace("<pad>", "<p>")  # added tokens only b has
        assert b.encode(s) == a.encode(s), s
    prompt = "A chat. USER: <image>\nWhat is in the image? ASSISTANT: a cat.</s>USER: and? ASSISTANT:"
    assert b.tokenize_prompt(prompt) == a.tokenize_prompt(prompt)
    assert b.decode(b.tokenize_prompt(prompt)) == a.decode(a.tokenize_prompt(prompt))


def test_tokenizer_json_matches_transformers_on_plain_text(hf5):
    """transformers 5's own tokenizer on the same files agrees where LLaVA's rules do not
    differ from it (text without special tokens, not starting with a space: SPEC §1)."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(hf5[1]))
    ours = LlavaTokenizer(hf5[1])
    for s in strings(800, seed=3):
        s = s.replace("</s>", "").replace("<s>", "").replace("\u2581", "").lstrip()
        assert ours.encode(s) == hf(s, add_special_tokens=False).input_ids, s
    assert ours.bos_id == hf.bos_token_id and ours.eos_id == hf.eos_token_id and ours.pad_id == PAD_ID


# -- padded vocabularies ----------------------------------------------------------------

def test_sampling_never_picks_padded_rows():
    import jax
    import jax.numpy as jnp
    from dynllava_jax.sampling import sample
    logits = jnp.zeros((8, 16)).at[:, 12:].set(50.0)  # the padding wins by far
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    assert int(sample(logits, keys, True, 1.0, 1.0).min()) >= 12  # unmasked: picked
    assert int(sample(logits, keys, True, 1.0, 1.0, vocab=12).max()) < 12
    assert int(sample(logits, keys, False, 2.0, 0.9, vocab=12).max()) < 12


def test_decode_skips_ids_past_the_vocabulary(converted_hf5):
    tok = LlavaTokenizer(converted_hf5[0])
    assert tok.decode([300, HF_VOCAB - 1, 10_000, IMAGE_ID, 301]) == tok.decode([300, IMAGE_ID, 301])


# -- tokenizers at conversion time -------------------------------------------------------

def _hf5_copy(root: Path, hf5, name: str) -> Path:
    d = root / name
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(hf5[1], d)
    return d


def test_truncated_tokenizer_is_refused(root, hf5, sp_dir, tmp_path):
    src = _hf5_copy(root, hf5, "trunc-tok")
    raw = (sp_dir / "tokenizer.model").read_bytes()
    for cut in (len(raw) // 2, len(raw) - 3):
        (src / "tokenizer.model").write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="tokenizer.model is not a valid sentencepiece model"):
            convert(src, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
        # and at load time, in a converted directory (what infer.py reads)
        with pytest.raises(ValueError, match="tokenizer.model is not a valid sentencepiece model"):
            LlavaTokenizer(src)


def test_missing_tokenizer_is_reported(root, hf5, tmp_path):
    src = _hf5_copy(root, hf5, "no-tok")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).unlink()
    info: dict = {}
    convert(src, tmp_path / "out", progress=False, info=info)
    assert info["warnings"] and "no tokenizer.model or tokenizer.json" in info["warnings"][0]


# -- source configs -----------------------------------------------------------------------

def _with_config(root: Path, hf5, name: str, edit) -> Path:
    src = _hf5_copy(root, hf5, name)
    c = json.loads((src / "config.json").read_text())
    c = edit(c)
    (src / "config.json").write_text(json.dumps(c))
    return src


def _set(section, **kw):
    def edit(c):
        (c[section] if section else c).update(kw)
        return c
    return edit


@pytest.mark.parametrize("edit, needle", [
    (_set("text_config", hidden_size="64"), 'text_config.hidden_size: must be an integer, got "64"'),
    (_set("text_config", num_hidden_layers=2.0), "text_config.num_hidden_layers: must be an integer, got 2.0"),
    (_set("text_config", num_attention_heads=0), "text_config.num_attention_heads must be positive"),
    (_set("text_config", num_key_value_heads=3), "num_key_value_heads 3 does not divide"),
    (_set("vision_config", hidden_size=True), "vision_config.hidden_size: must be an integer"),
    (_set("text_config", eos_token_id=[2, 3]), "eos_token_id is a list"),
    (_set("text_config", rms_norm_eps="1e-5"), "text_config.rms_norm_eps: must be a number"),
    (lambda c: [c], "must be a JSON object"),
])
def test_bad_source_config(root, hf5, edit, needle):
    src = _with_config(root, hf5, "badcfg", edit)
    with pytest.raises(CheckpointError) as e:
        read_source(src)
    assert needle in str(e.value) and "config.json" in str(e.value)


def test_bad_sparse_config(tmp_path):
    src, kw = tiny.write_layout(tmp_path, "orig-tower-inside")
    for field, value, needle in (("vision_keep_rate", "0.2", "sparse_config.vision_keep_rate: must be a number"),
                                 ("vision_keep_rate", 1.5, "sparse.vision_keep_rate: must be in (0, 1]"),
                                 ("sparse_layer", 7, "sparse.sparse_layer: 7 is not a layer")):
        c = tiny.original_config(sparse=True)
        c["sparse_config"] = dict(c["sparse_config"], **{field: value})
        (src / "config.json").write_text(json.dumps(c))
        with pytest.raises(CheckpointError) as e:
            read_source(src, kw["vision_tower"])
        assert needle in str(e.value), str(e.value)


# -- weights -------------------------------------------------------------------------------

def _with_tensor(root: Path, hf5, name: str, fn) -> Path:
    from safetensors.torch import load_file, save_file
    src = _hf5_copy(root, hf5, "badw")
    t = load_file(str(src / "model.safetensors"))
    t[name] = fn(t[name])
    save_file(t, str(src / "model.safetensors"))
    return src


NORM = "language_model.model.norm.weight"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_refused_unless_allowed(root, hf5, tmp_path, value):
    def poison(w):
        w = w.clone()
        w[3] = value
        return w
    src = _with_tensor(root, hf5, NORM, poison)
    with pytest.raises(CheckpointError, match=f"tensor {NORM} has 1 NaN/Inf value.*--allow-nonfinite"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    convert(src, tmp_path / "out", progress=False, allow_nonfinite=True)
    _, params = load_converted(tmp_path / "out")
    assert not np.isfinite(np.asarray(params["llm"]["norm"]["scale"])[3])


def test_integer_weights_refused(root, hf5, tmp_path):
    src = _with_tensor(root, hf5, NORM, lambda w: (w * 10).to(torch.int32))
    with pytest.raises(CheckpointError, match=f"tensor {NORM} is stored as int32, not floating point"):
        convert(src, tmp_path / "out", progress=False)


# -- destinations ---------------------------------------------------------------------------

def _run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(REPO / "convert_weights.py"), "--quiet", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_refuses_dst_overlapping_a_source(root, hf5):
    """--force with --dst = --src (or its parent, or a folder inside) used to delete the source."""
    src = _hf5_copy(root, hf5, "keep-me")
    (root / "keep-beside.txt").write_text("x")
    before = sorted(p.name for p in src.iterdir())
    r = _run_cli("--src", src, "--dst", src, "--force")
    assert r.returncode == 2 and r.stderr.startswith(f"error: --dst {src} is --src"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    for dst, rel in ((src / "sub", "is inside --src"), (root, "contains --src")):
        with pytest.raises(CheckpointDirError, match=f"{rel}"):
            convert(src, dst, force=True, progress=False)
    assert sorted(p.name for p in src.iterdir()) == before and (root / "keep-beside.txt").exists()
    clip = tiny.write_clip_dir(root / "clip-keep", tiny.hf_tensors())
    with pytest.raises(CheckpointDirError, match="is --vision-tower"):
        convert(src, clip, vision_tower=clip, force=True, progress=False)
    assert (clip / "config.json").exists()


def test_export_refuses_dst_equal_to_src(converted_hf5):
    from dynllava_jax.export import export
    dst, _ = converted_hf5
    with pytest.raises(CheckpointDirError, match="is --src"):
        export(dst, dst, "original", force=True, progress=False)
    assert (dst / "model_config.json").exists()


def test_force_over_a_file_and_a_stale_old(root, hf5, tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    with pytest.raises(CheckpointDirError, match="exists and is not a directory"):
        convert(hf5[1], f, force=True, progress=False)
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    dst = tmp_path / "out"
    convert(hf5[1], dst, progress=False)
    stale = tmp_path / "out.old"
    stale.mkdir()
    (stale / "x").write_text("left by someone")
    convert(hf5[1], dst, force=True, progress=False)
    assert (stale / "x").read_text() == "left by someone"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "out", "out.old"]


def test_directories_get_the_users_umask(converted_hf5, tmp_path):
    from dynllava_jax.export import export
    old = os.umask(0o022)
    try:
        export(converted_hf5[0], tmp_path / "exp", "llava-hf", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "exp").stat().st_mode) == 0o755
    want = 0o777 & ~old
    assert stat.S_IMODE(converted_hf5[0].stat().st_mode) == want


# -- checkpoint files -----------------------------------------------------------------------

def test_malicious_pickle_refused_without_torch_advice(tmp_path):
    from dynllava_jax.checkpoint_io import tensor_names

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    f = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.zeros(2), "b": Evil()}, f)
    with pytest.raises(CheckpointError) as e:
        tensor_names([f])
    msg = str(e.value)
    assert "refused" in msg and "system" in msg
    assert "weights_only" not in msg and "will likely succeed" not in msg


def test_shard_index_outside_the_folder(tmp_path):
    from dynllava_jax.checkpoint_io import weight_files
    src = tmp_path / "ckpt"
    src.mkdir()
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        weight_files(src)
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": str(tmp_path / "elsewhere.safetensors")}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        weight_files(src)


# -- converted directories: checksums and model_config.json -----------------------------------

def _conv_copy(converted_hf5, tmp_path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(converted_hf5[0], d)
    return d


def test_corrupt_params_are_detected(converted_hf5, tmp_path):
    from dynllava_jax.export import export
    d = _conv_copy(converted_hf5, tmp_path)
    assert (d / CHECKSUM_FILE).is_file()
    load_converted(d)
    # another leaf's valid chunk in place of llm/norm/scale's: it decodes, to other values
    shutil.copy(d / "params" / "projector.linear_2.bias" / "0", d / "params" / "llm.norm.scale" / "0")
    with pytest.raises(ChecksumError, match="tensor llm/norm/scale does not match its checksum"):
        load_converted(d)
    with pytest.raises(ChecksumError, match="llm/norm/scale"):
        export(d, tmp_path / "exp", "original", progress=False)
    (d / CHECKSUM_FILE).unlink()  # written before checksums existed: loads unverified
    load_converted(d)


def test_exported_tensors_are_verified_when_converted_back(converted_hf5, tmp_path):
    from dynllava_jax.checkpoint_io import _safetensors_refs
    from dynllava_jax.export import export
    exp = tmp_path / "exp"
    export(converted_hf5[0], exp, "llava-hf", progress=False)
    sums = json.loads((exp / "tensor_checksums.json").read_text())["files"]
    assert "language_model.model.norm.weight" in sums["model.safetensors"]
    ref = _safetensors_refs(exp / "model.safetensors")["language_model.model.norm.weight"]
    with open(exp / "model.safetensors", "r+b") as fh:
        fh.seek(ref.offset + 1)
        b = fh.read(1)
        fh.seek(ref.offset + 1)
        fh.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(ChecksumError, match="language_model.model.norm.weight does not match"):
        convert(exp, tmp_path / "back", progress=False)


def test_bundled_checkpoint_is_verified_and_a_flipped_bit_caught(tmp_path):
    from dynllava_jax import checksums
    from dynllava_jax.inference import DEFAULT_CHECKPOINT
    _, params = load_converted(DEFAULT_CHECKPOINT)
    assert checksums.verify(DEFAULT_CHECKPOINT, params)
    d = tmp_path / "tiny"
    shutil.copytree(DEFAULT_CHECKPOINT, d)
    chunk = d / "params" / "llm.embed_tokens.embedding" / "0.0"
    raw = bytearray(chunk.read_bytes())
    raw[5000] ^= 0x04  # inside the compressed data: it still decodes, to other values
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="tensor llm/embed_tokens/embedding does not match"):
        load_converted(d)
    # what train.py --init-from calls: verified too, except leaves it restores cast
    import jax
    import jax.numpy as jnp
    from dynllava_jax.checkpoint import checkpoint_shapes, load_params
    shapes = checkpoint_shapes(d / "params")
    with pytest.raises(ChecksumError, match="llm/embed_tokens/embedding"):
        load_params(d, shapes)
    cast = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), shapes)
    assert load_params(d, cast)["llm"]["norm"]["scale"].dtype == jnp.bfloat16


def _edit_model_config(d: Path, fn) -> None:
    c = json.loads((d / "model_config.json").read_text())
    (d / "model_config.json").write_text(json.dumps(fn(c)))


@pytest.mark.parametrize("fn, exc, needle", [
    (lambda c: {**c, "llm": {**c["llm"], "hidden_size": 128}}, CheckpointDirError,
     "does not match"),
    (lambda c: {**c, "llm": {**c["llm"], "num_heads": "4"}}, ConfigError,
     'llm.num_heads: must be an integer, got "4"'),
    (lambda c: {**c, "dtype": "float8"}, ConfigError, "dtype: 'float8' is not one of"),
    (lambda c: {}, ConfigError, "vision: missing section"),
    (lambda c: {**c, "vision": None}, ConfigError, "vision: must be an object, got null"),
    (lambda c: {**c, "eos_token_id": HF_VOCAB}, ConfigError, "eos_token_id: 448 is not a token id"),
])
def test_model_config_not_matching_params(converted_hf5, tmp_path, fn, exc, needle):
    d = _conv_copy(converted_hf5, tmp_path)
    _edit_model_config(d, fn)
    with pytest.raises(exc) as e:
        load_converted(d)
    assert needle in str(e.value) and "model_config.json" in str(e.value)


def test_infer_cli_reports_bad_model_config_in_one_line(converted_hf5, tmp_path):
    d = _conv_copy(converted_hf5, tmp_path)
    _edit_model_config(d, lambda c: {**c, "llm": {**c["llm"], "num_heads": "4"}})
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(REPO / "infer.py"), "--checkpoint", str(d), "--prompt", "hi"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert "model_config.json" in lines[-1] and "llm.num_heads" in lines[-1]


def test_original_export_of_a_tokenizer_json_checkpoint_has_tokenizer_model(converted_hf5, sp_dir, tmp_path):
    """The official code's slow tokenizer reads only tokenizer.model: rebuilt from the JSON."""
    from dynllava_jax.export import export
    exp = tmp_path / "orig"
    export(converted_hf5[0], exp, "original", progress=False)
    shutil.copy(sp_dir / "tokenizer_config.json", exp / "tokenizer_config.json")
    a, b = LlavaTokenizer(sp_dir), LlavaTokenizer(exp)  # b: from the written tokenizer.model
    assert (exp / "tokenizer.model").is_file()
    for s in strings(200, seed=5):
        s = s.replace("<image>", "<im>").replace("<pad>", "<p>")
        assert b.encode(s) == a.encode(s), s
