"""`convert_weights.py --export`: converted directory -> original LLaVA / Dynamic-LLaVA or llava-hf.

- convert -> export -> convert gives bit-identical params (both layouts, float32 and bfloat16);
- the llava-hf export is what transformers' own save_pretrained writes, loads in
  `LlavaForConditionalGeneration` and `AutoProcessor`, and greedy-decodes the tokens of
  `infer.py --mode dense` (the library under it) on the official fixture's prompts;
- the original export of the official fixture equals the fixture's own tensors and config;
- a training run's export (`export_converted`, what `train.py --export-only` writes) exports;
- bad input: one `error:` line, exit code 2, nothing left behind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

try:  # pytest's default import mode puts tests/ on sys.path
    import test_convert as tc
    import test_parity_hf as tiny
except ImportError:  # tests/ imported as a package
    from tests import test_convert as tc
    from tests import test_parity_hf as tiny

import convert_weights  # noqa: E402
from dynllava_jax.checkpoint import load_converted  # noqa: E402
from dynllava_jax.checkpoint_io import CheckpointError, iter_tensors, weight_files  # noqa: E402
from dynllava_jax.convert import convert  # noqa: E402
from dynllava_jax.export import export  # noqa: E402

DTYPES = ["float32", "bfloat16"]


def read_weights(d) -> dict[str, np.ndarray]:
    out = {}
    for f in weight_files(d):
        out.update(iter_tensors(f, native=True))
    return out


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def assert_same_converted(a, b) -> None:
    (cfg_a, pa), (cfg_b, pb) = load_converted(a), load_converted(b)
    assert cfg_a == cfg_b
    tiny.assert_same_params(pa, pb)


# -- sources, converted once per module --------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def official(root, fixtures_dir):
    """The official tiny Dynamic-LLaVA fixture, converted in float32 and bfloat16."""
    out = {}
    for dt in DTYPES:
        out[dt] = root / f"official-{dt}"
        convert(fixtures_dir / "dynamic-llava-tiny", out[dt], vision_tower=fixtures_dir / "clip",
                dtype=dt, progress=False)
    return out


@pytest.fixture(scope="module")
def hf_tiny(root):
    """transformers' tiny random LlavaForConditionalGeneration (test_parity_hf), converted."""
    out = {}
    for dt in DTYPES:
        out[dt] = root / f"hf-{dt}"
        convert(tiny.hf_model()[1], out[dt], dtype=dt, progress=False)
    return out


@pytest.fixture(scope="module")
def official_hf(root, official):
    dst = root / "official-llava-hf"
    export(official["float32"], dst, "llava-hf", dense_only=True, progress=False)
    return dst


# -- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_original(dtype, root, official, fixtures_dir):
    """Predictors included; bfloat16 also written in shards with an index."""
    src, out = official[dtype], root / f"rt-original-{dtype}"
    shard = "5GB" if dtype == "float32" else "600KB"
    info = {}
    export(src, out, "original", max_shard_size=shard, progress=False, info=info)
    if dtype == "bfloat16":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert files == info["files"] and len(files) == 3
        w = read_weights(out)
        per_file = {f: sum(w[k].nbytes for k, g in index["weight_map"].items() if g == f) for f in files}
        assert max(per_file.values()) <= 600_000  # tensor bytes, as transformers counts them
        assert index["metadata"]["total_size"] == sum(per_file.values())
    else:
        assert info["files"] == ["model.safetensors"]
    assert {str(v.dtype) for v in read_weights(out).values()} == {dtype}
    # The tiny tower is not the hub's CLIP: a CLIP directory beside the weights, named by
    # mm_vision_tower, which the converter (and the official code) read without --vision-tower.
    assert json.loads((out / "config.json").read_text())["mm_vision_tower"] == str(out / "vision_tower")
    back = root / f"rt-original-{dtype}-back"
    convert(out, back, dtype=dtype, progress=False)
    assert_same_converted(back, src)
    assert_same_tensors(dict(iter_tensors(back / "unused_tensors.safetensors", native=True)),
                        dict(iter_tensors(src / "unused_tensors.safetensors", native=True)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_llava_hf(dtype, root, hf_tiny):
    """The export is what save_pretrained wrote (names, shapes, values), and converts back."""
    out = root / f"rt-hf-{dtype}"
    info = {}
    export(hf_tiny[dtype], out, "llava-hf", progress=False, info=info)
    assert info["image_token"] == tiny.IMAGE_TOKEN  # kept from the source: no vocabulary change
    want = {k: v.numpy() if dtype == "float32" else v.to(torch.bfloat16).view(torch.int16).numpy()
            for k, v in tiny.hf_tensors().items()}
    got = read_weights(out)
    if dtype == "bfloat16":
        got = {k: v.view(np.int16) for k, v in got.items()}
    assert_same_tensors(got, want)
    def flat(d, pre=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{pre}{k}.").items() if isinstance(v, dict) else [(pre + k, v)])}
    got, ref = (flat(json.loads((d / "config.json").read_text())) for d in (out, tiny.hf_model()[1]))
    ref["dtype"] = dtype
    # what our config does not model: the init scale and CLIP's (unused) projection width
    assert {k for k in got.keys() | ref.keys() if got.get(k) != ref.get(k)} == {
        "text_config.initializer_range", "vision_config.projection_dim"}
    back = root / f"rt-hf-{dtype}-back"
    convert(out, back, dtype=dtype, progress=False)
    assert_same_converted(back, hf_tiny[dtype])


# -- the official fixture ------------------------------------------------------------------

def test_original_export_equals_the_official_fixture(root, official, fixtures_dir):
    out = root / "official-original"
    export(official["float32"], out, "original", progress=False)
    fx = fixtures_dir / "dynamic-llava-tiny"
    assert_same_tensors(read_weights(out), read_weights(fx))
    assert_same_tensors(read_weights(out / "vision_tower"), read_weights(fixtures_dir / "clip"))
    got, want = (json.loads((d / "config.json").read_text()) for d in (out, fx))
    assert got["sparse_config"] == want["sparse_config"]
    assert {k for k in got.keys() | want.keys() if got.get(k) != want.get(k)} == {"mm_vision_tower"}
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (fx / name).read_bytes()


def test_llava_hf_export_runs_in_transformers(root, official, official_hf, fixtures_dir):
    """Loads in LlavaForConditionalGeneration and its processor; greedy tokens = infer's dense."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from dynllava_jax.generate import GenOptions
    from dynllava_jax.inference import Llava, Request

    cases = [c for c in json.loads((fixtures_dir / "expected.json").read_text())["cases"]
             if c["mode"] == "dense"]
    images = [fixtures_dir / "images" / c["image"] if c["image"] else None for c in cases]
    ours = Llava(official["float32"])
    answers = ours.answer([Request(c["question"], str(i) if i else None) for c, i in zip(cases, images)],
                          GenOptions(max_new_tokens=20, mode="dense"))
    assert [a["token_ids"] for a in answers] == [c["new_token_ids"] for c in cases]

    model, loading = LlavaForConditionalGeneration.from_pretrained(official_hf, output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    proc = AutoProcessor.from_pretrained(official_hf)
    n_img = ours.cfg.num_image_tokens
    assert proc.image_token_id == model.config.image_token_index == 384
    for c, image, a in zip(cases, images, answers):
        kw = {}
        if image is not None:
            enc = proc(images=Image.open(image), text=c["prompt"], return_tensors="pt")
            assert int((enc["input_ids"] == proc.image_token_id).sum()) == n_img
            np.testing.assert_array_equal(enc["pixel_values"][0].numpy(), ours.images.load(image))
            kw["pixel_values"] = enc["pixel_values"]
        else:  # without <image> transformers 5 tokenises as LLaVA does
            assert proc(text=c["prompt"])["input_ids"][0] == a["prompt_token_ids"]
        # the same prompt ids (LLaVA's tokenizer_image_token splits at <image>; transformers'
        # tokenizer keeps the space and newline around it, SPEC §1), the image token repeated
        ids = [t for i in a["prompt_token_ids"] for t in ([proc.image_token_id] * n_img if i < 0 else [i])]
        x = torch.tensor([ids])
        with torch.no_grad():
            seq = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=20,
                                 do_sample=False, **kw)[0, len(ids):].tolist()
        eos = model.config.text_config.eos_token_id
        assert (seq[: seq.index(eos)] if eos in seq else seq) == a["token_ids"], c["prompt"]


def test_llava_hf_export_converts_back_with_padded_vocabulary(root, official, official_hf):
    back = root / "official-llava-hf-back"
    convert(official_hf, back, progress=False)
    (cfg, p), (cfg0, p0) = load_converted(back), load_converted(official["float32"])
    assert cfg.llm.vocab_size == 448 and cfg0.llm.vocab_size == 384  # + <image>, <pad>, to 64
    assert cfg == cfg0.replace(sparse=cfg.sparse, llm=dataclasses.replace(cfg0.llm, vocab_size=448))
    assert not cfg.sparse.enabled and "image_predictor" not in p
    emb, head = np.asarray(p["llm"]["embed_tokens"]["embedding"]), np.asarray(p["llm"]["lm_head"]["kernel"])
    emb0, head0 = np.asarray(p0["llm"]["embed_tokens"]["embedding"]), np.asarray(p0["llm"]["lm_head"]["kernel"])
    np.testing.assert_array_equal(emb[:384], emb0)
    np.testing.assert_array_equal(head[:, :384], head0)
    np.testing.assert_array_equal(emb[384:], np.broadcast_to(emb0.mean(0, dtype=np.float64).astype(np.float32), (64, 96)))
    np.testing.assert_array_equal(head[:, 384:].T, np.broadcast_to(head0.T.mean(0, dtype=np.float64).astype(np.float32), (64, 96)))
    rest = lambda t: {k: v for k, v in t.items() if k not in ("image_predictor", "text_predictor")}
    rest_llm = lambda t: {k: v for k, v in t["llm"].items() if k not in ("embed_tokens", "lm_head")}
    tiny.assert_same_params({**rest(p), "llm": rest_llm(p)}, {**rest(p0), "llm": rest_llm(p0)})


def test_llava_hf_refuses_to_drop_predictors_silently(root, official):
    dst = root / "refused"
    with pytest.raises(CheckpointError, match="--dense-only"):
        export(official["float32"], dst, "llava-hf", progress=False)
    assert not dst.exists()


def test_export_of_a_training_export(root, official):
    """`train.py`'s export (`export_converted`, also after `--export-only` of a multi-host run)
    is a converted directory: trained values come out under the official names."""
    import jax
    from dynllava_jax.checkpoint import save_converted
    from dynllava_jax.train_checkpoint import export_converted
    init = official["float32"]
    cfg, params = load_converted(init)
    params = jax.tree_util.tree_map(np.asarray, params)
    params["text_predictor"]["fc_4"]["bias"] = params["text_predictor"]["fc_4"]["bias"] + 0.5
    cfg = cfg.replace_sparse(vision_keep_rate=0.25)
    trained = [export_converted(root / "workdir-export", params, cfg, init)]  # host arrays
    pre = json.loads((init / "preprocessor_config.json").read_text())  # device arrays: OCDBT
    trained.append(save_converted(root / "device-export", jax.device_put(params), cfg, pre, init))
    ln = "model.vision_tower.vision_tower.vision_model.post_layernorm.bias"  # kept from the init
    for i, src in enumerate(trained):
        out = root / f"trained-original-{i}"
        export(src, out, "original", progress=False)
        w = read_weights(out)
        np.testing.assert_array_equal(w["model.output_text_score_predictor.output_mlp.7.bias"],
                                      params["text_predictor"]["fc_4"]["bias"])
        np.testing.assert_array_equal(w[ln], dict(iter_tensors(init / "unused_tensors.safetensors"))[ln])
        sc = json.loads((out / "config.json").read_text())["sparse_config"]
        assert sc["vision_keep_rate"] == 0.25 and sc["use_text_predictor"] and not sc["use_instruct_predictor"]


# -- the command line ------------------------------------------------------------------------

def run_main(capsys, *args):
    code = convert_weights.main(["--quiet", *map(str, args)])
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_cli_export(root, official):
    dst = root / "cli-export"
    r = tc.run_cli("--export", "--src", official["bfloat16"], "--dst", dst, "--format", "original",
                   "--dtype", "float16", "--max-shard-size", "1MB")
    assert r.returncode == 0, r.stderr
    assert "format:      original" in r.stdout and "(float16)" in r.stdout
    assert "predictors:  image_predictor, text_predictor" in r.stdout and str(dst) in r.stdout
    assert (dst / "model.safetensors.index.json").exists()
    w = read_weights(dst)
    _, p = load_converted(official["bfloat16"])
    np.testing.assert_array_equal(w["model.mm_projector.2.weight"],
                                  np.asarray(p["projector"]["linear_2"]["kernel"]).T.astype(np.float16))


def test_directory_without_unused_tensors(root, official):
    """Converted before unused_tensors.safetensors existed: post_layernorm is an identity."""
    src, out = root / "old-style", root / "old-style-original"
    shutil.copytree(official["float32"], src)
    (src / "unused_tensors.safetensors").unlink()
    info = {}
    export(src, out, "original", progress=False, info=info)
    assert any("post_layernorm" in n for n in info["notes"])
    w = read_weights(out)
    ln = "model.vision_tower.vision_tower.vision_model.post_layernorm."
    np.testing.assert_array_equal(w[ln + "weight"], np.ones(48, np.float32))
    np.testing.assert_array_equal(w[ln + "bias"], np.zeros(48, np.float32))


@pytest.mark.parametrize("case", ["not-converted", "missing", "exists", "format", "no-format",
                                  "dtype", "shard-size", "predictors", "params-mismatch"])
def test_cli_export_bad_input(case, tmp_path, capsys, official, fixtures_dir):
    src, dst = official["float32"], tmp_path / "out"
    args = {"format": "original"}
    needles = []
    if case == "not-converted":  # a PyTorch checkpoint, not a converted directory
        src, needles = fixtures_dir / "dynamic-llava-tiny", ["not a converted checkpoint", "model_config.json"]
    elif case == "missing":
        src, needles = tmp_path / "nope", ["not found"]
    elif case == "exists":
        dst.mkdir()
        (dst / "keep.txt").write_text("old")
        needles = ["exists", "--force"]
    elif case == "format":
        args, needles = {"format": "gguf"}, ["unknown --format 'gguf'"]
    elif case == "no-format":
        args, needles = {}, ["--format"]
    elif case == "dtype":
        args["dtype"], needles = "float64", ["--dtype"]
    elif case == "shard-size":
        args["max-shard-size"], needles = "lots", ["--max-shard-size"]
    elif case == "predictors":
        args, needles = {"format": "llava-hf"}, ["--dense-only", "predictors"]
    elif case == "params-mismatch":  # model_config.json says 6 layers, params/ holds 5
        src = tmp_path / "edited"
        shutil.copytree(official["float32"], src)
        mc = json.loads((src / "model_config.json").read_text())
        mc["llm"]["num_layers"] = 6
        (src / "model_config.json").write_text(json.dumps(mc))
        needles = ["does not match its model_config.json", "no layer 5"]
    flags = [x for k, v in args.items() for x in (f"--{k}", v)]
    r = run_main(capsys, "--export", "--src", src, "--dst", dst, *flags)
    if case == "exists":
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "--force" in r.stderr
        assert (dst / "keep.txt").read_text() == "old"  # untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    else:
        tc.assert_clean_failure(r, dst, *needles)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
