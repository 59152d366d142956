"""SynthVQA: the generator is deterministic and balanced, its answers follow from the scene
(and from the pixels), its tokenizer obeys LLaVA's rules; the eval runs end to end."""

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynllava_jax.data import synthvqa as S

N_TRAIN, N_EVAL = 16, 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthvqa")
    counts = S.write_synthvqa(out, train_images=N_TRAIN, eval_images=N_EVAL, seed=3)
    return out, counts


def _lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_deterministic_from_the_seed(tmp_path, data):
    out, _ = data
    again = tmp_path / "again"
    S.write_synthvqa(again, train_images=N_TRAIN, eval_images=N_EVAL, seed=3)
    for rel in ("train.json", "eval/questions.jsonl", "eval/annotations.jsonl",
                "tokenizer/tokenizer.model", "images/train-00005.png", "images/eval-00007.png"):
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = S.make_scene(S.scene_rng(4, "train", 0))
    assert other != S.make_scene(S.scene_rng(3, "train", 0))


def test_every_type_appears_and_presence_is_balanced(data):
    out, counts = data
    anns = _lines(out / "eval" / "annotations.jsonl")
    assert {a["type"] for a in anns} == set(S.QUESTION_TYPES)
    pres = [a["answer"] for a in anns if a["type"] == "presence"]
    assert abs(pres.count("yes") - pres.count("no")) <= 1 and pres.count("no") > 0
    train = json.loads((out / "train.json").read_text())
    asked = {m["value"].split("\n")[-1] for r in train for m in r["conversations"][::2]}
    assert S.DESCRIBE in asked and S.CHOICE_SUFFIX in asked
    qs = _lines(out / "eval" / "questions.jsonl")
    assert [q["question_id"] for q in qs] == [a["question_id"] for a in anns]
    assert all(set(q) >= {"question_id", "image", "text"} for q in qs)
    pope = _lines(out / "eval" / "pope" / "synth_pope_random.json")
    pope += _lines(out / "eval" / "pope" / "synth_pope_adversarial.json")
    assert sorted(p["question_id"] for p in pope) == sorted(
        a["question_id"] for a in anns if a["type"] == "presence")
    tvqa = json.loads((out / "eval" / "textvqa_annotations.json").read_text())["data"]
    assert tvqa and all(len(t["answers"]) == 10 for t in tvqa)


def _expected(question: str, scene: dict) -> str:
    """The answer, worked out from the scene alone (independently of the generator)."""
    objs = scene["objects"]
    by_shape = {o["shape"]: o for o in objs}
    by_colour = {o["colour"]: o for o in objs}
    stem = question.split("\n")[0]
    if "\nA. " in question:
        right = _expected(stem, scene)
        opts = dict(re.findall(r"\n([ABCD])\. ([^\n]+)", question))
        (letter,) = [k for k, v in opts.items() if v == right]
        return letter
    if m := re.fullmatch(r"(?:What|Which) colour is the (\w+)\?", stem):
        return by_shape[m[1]]["colour"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", stem) or re.fullmatch(
            r"Which shape is (\w+)\?", stem):
        return by_colour[m[1]]["shape"]
    if stem.startswith("How many shapes"):
        return str(len(objs))
    if m := re.fullmatch(r"Is the (\w+) (\w+) to the left or to the right of the (\w+) (\w+)\?", stem):
        return "left" if by_colour[m[1]]["col"] < by_colour[m[3]]["col"] else "right"
    if m := re.fullmatch(r"Is the (\w+) (\w+) above or below the (\w+) (\w+)\?", stem):
        return "above" if by_colour[m[1]]["row"] < by_colour[m[3]]["row"] else "below"
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", stem):
        return "yes" if by_shape.get(m[2], {}).get("colour") == m[1] else "no"
    if "word" in stem or "text" in stem:
        return scene["word"]
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_follow_from_the_scene_and_the_pixels(data):
    out, _ = data
    tok = __import__("dynllava_jax.tokenizer", fromlist=["x"]).LlavaTokenizer.from_dir(
        out / "tokenizer")
    cell = S.IMAGE_SIZE / S.GRID
    for a in _lines(out / "eval" / "annotations.jsonl"):
        scene = a["scene"]
        if a["type"] == "describe":
            n = len(tok.encode(a["answer"]))
            assert 60 <= n <= 200, n
            for o in scene["objects"]:
                assert f"{o['colour']} {o['shape']} in the {S.place(o['row'], o['col'])}" in a["answer"]
        else:
            assert _expected(a["question"], scene) == a["answer"], a["question"]
        image = np.asarray(Image.open(out / a["image"]).convert("RGB"))
        assert image.shape == (S.IMAGE_SIZE, S.IMAGE_SIZE, 3)
        for o in scene["objects"]:  # each shape is painted in its colour at its centre
            cx, cy = int((o["col"] + 0.5) * cell + o["dx"]), int((o["row"] + 0.5) * cell + o["dy"])
            assert tuple(image[cy, cx]) == S.COLOURS[o["colour"]]


def test_lookup_records_name_objects_and_answer_right(data):
    """train_lookup.json: one record a training image whose questions mostly name an object
    (colour, shape, presence, position, choice), each answer following from the scene, plus
    train.json's description records; train.json itself does not depend on it."""
    out, _ = data
    train = json.loads((out / "train.json").read_text())
    lookup = json.loads((out / "train_lookup.json").read_text())
    assert [r for r in lookup if not r["id"].endswith("-lookup")] == [
        r for r in train if r["conversations"][0]["value"].endswith(S.DESCRIBE)]
    named = total = 0
    for i in range(N_TRAIN):
        (r,) = [r for r in lookup if r["id"] == f"train-{i:05d}-lookup"]
        scene = dataclasses.asdict(S.make_scene(S.scene_rng(3, "train", i)))
        conv = r["conversations"]
        assert 2 <= len(conv) <= 14 and conv[0]["value"].startswith("<image>\n")
        assert sum("<image>" in m["value"] for m in conv) == 1
        assert r["cell_text"] == train[i]["cell_text"] and r["image"] == train[i]["image"]
        qs = [m["value"].replace("<image>\n", "") for m in conv[::2]]
        assert len(set(qs)) == len(qs)
        for q, a in zip(qs, conv[1::2]):
            assert _expected(q, scene) == a["value"], q
            named += not (q.startswith("How many") or "word" in q or "text" in q)
            total += 1
    assert named / total > 0.75


def test_cell_objective_per_token():
    """per_token scores every token of a cell against the cell's words: equal to the
    cell-mean objective when a cell's tokens are equal, and to a loop over tokens."""
    import jax
    import jax.numpy as jnp
    from dynllava_jax import objective as O
    rng = np.random.default_rng(0)
    table = rng.normal(size=(20, 8)).astype(np.float32)
    params = {"llm": {"embed_tokens": {"embedding": jnp.asarray(table)}}}
    targets = rng.integers(-1, 20, size=(2, 4, 3)).astype(np.int32)  # 2 x 2 grid, 3 words
    start = np.array([5, -1], np.int32)                               # sample 1: no image
    cells = rng.normal(size=(2, 2, 1, 2, 1, 8)).astype(np.float32)
    same = np.broadcast_to(cells, (2, 2, 3, 2, 3, 8)).reshape(2, 36, 8)
    np.testing.assert_allclose(O.cell_nll(params, jnp.asarray(same), targets, start, True),
                               O.cell_nll(params, jnp.asarray(same), targets, start), rtol=1e-5)
    feats = rng.normal(size=(2, 36, 8)).astype(np.float32)
    got = np.asarray(O.cell_nll(params, jnp.asarray(feats), targets, start, per_token=True))
    want = 0.0
    for r in range(6):
        for c in range(6):
            logp = np.asarray(jax.nn.log_softmax(feats[0, r * 6 + c] @ table.T))
            want -= sum(logp[t] for t in targets[0, (r // 3) * 2 + c // 3] if t >= 0) / 9
    assert got[1] == 0 and got[0] == pytest.approx(want, rel=1e-5)


def test_tokenizer_follows_llava_rules(data):
    from dynllava_jax.conversation import tokenize_conversation_with_labels
    from dynllava_jax.image_processing import ImageProcessor
    from dynllava_jax.tokenizer import LlavaTokenizer
    out, _ = data
    tok = LlavaTokenizer.from_dir(out / "tokenizer")
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.legacy
    assert ImageProcessor.from_dir(out / "tokenizer").image_size == S.IMAGE_SIZE
    for r in json.loads((out / "train.json").read_text()):
        ids, labels = tokenize_conversation_with_labels(tok, r["conversations"], True, None)
        assert tok.unk_id not in ids  # every character is a piece ("\n" included)
        n_answers = len(r["conversations"]) // 2
        assert sum(1 for i in labels if i == tok.eos_id) == n_answers  # no mismatch


def test_fresh_model_assets_are_checked(data):
    from dynllava_jax.config import preset
    from dynllava_jax.trainer import _check_assets
    out, _ = data
    _check_assets(out / "tokenizer", preset("synthvqa"))
    with pytest.raises(ValueError, match="pieces"):
        _check_assets(out / "tokenizer", preset("tiny"))


def test_scores():
    from dynllava_jax.eval.synth import choice_letter, normalise, score, vqa_accuracy
    assert normalise("The Red.") == "red" and normalise("three") == "3"
    assert choice_letter("B") == "B" and choice_letter("The answer is C.") == "C"
    assert choice_letter("B. blue") == "B" and choice_letter("blue") is None
    assert vqa_accuracy("cat", ["cat"] * 10) == 1.0
    assert vqa_accuracy("cat", ["cat"] * 2 + ["dog"] * 8) == pytest.approx(0.6)  # 8x2/3 + 2x1/3
    ann = {"type": "describe", "answer": "A b. C d. E f."}
    assert score(ann, "A b. E f. X.") == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory, data):
    """A small random model of the SynthVQA shapes, converted (shared by the tests below)."""
    import jax
    from dynllava_jax import model as M
    from dynllava_jax.config import preset
    from dynllava_jax.train_checkpoint import export_converted
    out, _ = data
    base = preset("synthvqa")
    cfg = base.replace(vision=dataclasses.replace(base.vision, hidden_size=32, num_heads=2,
                                                  intermediate_size=64),
                       llm=dataclasses.replace(base.llm, hidden_size=32, num_layers=3,
                                               num_heads=2, num_kv_heads=2, intermediate_size=64))
    cfg = cfg.replace_sparse(d_model=16, nhead=2, dim_feedforward=32)
    params = M.init_params(cfg, jax.random.PRNGKey(0), with_predictors=True)
    return export_converted(tmp_path_factory.mktemp("small") / "ckpt", params, cfg,
                            out / "tokenizer")


def test_eval_runs_on_a_handful_of_questions(tmp_path, data, small_ckpt):
    """A small random model through all three modes: report fields and costs."""
    from dynllava_jax.eval.synth import evaluate
    out, _ = data
    report = evaluate(small_ckpt, out, tmp_path / "eval", max_per_type=2, batch_size=2,
                      types=["colour"], progress=False)
    runs = {s["run"]: s for s in report["modes"]}
    assert set(runs) == {"dense", "dynamic", "dynamic-no-kv-cache"}
    assert all(s["questions"] == 2 and 0 <= s["accuracy"]["overall"] <= 1 for s in runs.values())
    assert runs["dense"]["image_tokens_kept_fraction"] == 1.0
    assert runs["dynamic"]["image_tokens_kept_fraction"] == pytest.approx(28 / 144)
    assert runs["dynamic"]["prefill_flops_vs_dense"] < 1.0 == runs["dense"]["prefill_flops_vs_dense"]
    assert runs["dynamic"]["kv_bytes_vs_dense"] < 1.0
    assert (tmp_path / "eval" / "synth_eval.md").read_text().count("| dynamic") == 2
    acc = {k: s["accuracy"]["overall"] for k, s in runs.items()}
    assert runs["dense"]["vs_dense"] == 0.0
    assert runs["dynamic"]["vs_dense"] == pytest.approx(acc["dynamic"] - acc["dense"])


def test_vs_dense_compares_on_the_same_questions():
    """The "vs dense" column: a run on a subset of the questions (no cache, the sweeps) is
    compared with dense on that subset, not with dense's overall figure."""
    from dynllava_jax.eval.synth import vs_dense
    dense = [{"question_id": i, "score": s} for i, s in enumerate([1.0, 0.0, 1.0, 0.0])]
    sub = [{"question_id": 0, "score": 1.0}, {"question_id": 1, "score": 1.0}]
    assert vs_dense(sub, dense) == pytest.approx(1.0 - 0.5)      # dense: 0.5 on q 0, 1
    assert vs_dense([{"question_id": 9, "score": 1.0}], dense) is None
    assert vs_dense(dense, dense) == 0.0


def test_descriptions_are_asked_first(data):
    """Evaluation asks "Describe ..." as the first question: training must too."""
    out, _ = data
    for r in json.loads((out / "train.json").read_text()):
        conv = r["conversations"]
        if any(m["value"].endswith(S.DESCRIBE) for m in conv[::2]):
            assert len(conv) == 2 and conv[0]["value"] == f"<image>\n{S.DESCRIBE}"


def test_cell_labels_reach_the_batch(data):
    """Each training record names its grid cells' contents (`cell_text`); with
    `data.cell_grid` the pipeline turns them into token ids, and a bad `cell_text` is a
    skipped record, not a crash."""
    from dynllava_jax.data.llava_json import BAD_CELL_TEXT, Invalid, encode_record, to_raw_record
    from dynllava_jax.image_processing import ImageProcessor
    from dynllava_jax.tokenizer import LlavaTokenizer
    out, _ = data
    tok = LlavaTokenizer.from_dir(out / "tokenizer")
    kw = dict(tokenizer=tok, image_processor=ImageProcessor.from_dir(out / "tokenizer"),
              image_folder=str(out), num_image_tokens=144, seq_len=512, model_max_length=512)
    rec = json.loads((out / "train.json").read_text())[0]
    scene = S.make_scene(S.scene_rng(3, "train", 0))
    assert rec["cell_text"] == S.cell_text(scene)
    for o in scene.objects:
        text = rec["cell_text"][o.row * S.GRID + o.col]
        assert text.endswith(o.name)
        assert text.startswith(f"{S.ROW_WORDS[o.row]} {S.COL_WORDS[o.col]} ")
    ex = encode_record(to_raw_record(rec, 0), cell_grid=S.GRID, cell_tokens=5, **kw)
    assert ex["cell_targets"].shape == (S.GRID * S.GRID, 5)
    for row, text in zip(ex["cell_targets"], rec["cell_text"]):
        ids = tok.encode(text)
        assert list(row[:len(ids)]) == ids and (row[len(ids):] == -1).all()
    assert "cell_targets" not in encode_record(to_raw_record(rec, 0), **kw)
    bare = encode_record(to_raw_record({k: v for k, v in rec.items() if k != "cell_text"}, 0),
                         cell_grid=S.GRID, **kw)
    assert (bare["cell_targets"] == -1).all()   # no labels: nothing scored
    bad = encode_record(to_raw_record(dict(rec, cell_text=["empty"] * 4), 0), cell_grid=3, **kw)
    assert isinstance(bad, Invalid) and bad.reason == BAD_CELL_TEXT


def _small_run_config(data, small_ckpt, *more, config="synthvqa_dense.py", **over):
    """configs/`config` for 2 steps of the small model on the test's SynthVQA records,
    dense, with `over` (dotted keys) and `more` ("key=value") applied."""
    import configs
    out, _ = data
    base = {"init_from": str(small_ckpt), "assets_dir": "", "train.total_steps": 2,
            "train.global_batch_size": 2, "checkpoint.every": 100, "data.json_path":
            str(out / "train.json"), "data.image_folder": str(out), "data.seq_len": 512,
            "data.model_max_length": 512, "sparse.use_vision_predictor": False,
            "sparse.use_output_text_predictor": False, **over}
    repo = Path(__file__).resolve().parents[1]
    return configs.apply_overrides(configs.load(repo / "configs" / config),
                                   [f"{k}={v}" for k, v in base.items()] + list(more))


def test_train_with_the_cell_objective(tmp_path, data, small_ckpt):
    """train.py's cell objective on SynthVQA records: the batches carry the cells' labels,
    the loss is CE + weight x cell loss, and a config that cannot feed it is refused."""
    from dynllava_jax import trainer as T
    c = _small_run_config(data, small_ckpt, **{
        "objective.cell_loss_weight": 0.5, "objective.attention_loss_weight": 0.0,
        "data.attention_turns": 0, "data.attention_pairs": False,
        "objective.pair_loss_weight": 0.0})
    tr = T.Trainer(c, tmp_path / "run", progress=False)
    tr.run()
    tr.close()
    for row in T.read_metrics(tmp_path / "run"):
        assert 0 < row["cell_loss"] < 10
        assert row["loss"] == pytest.approx(row["ce"] + 0.5 * row["cell_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="cell_grid"):
        T.Trainer(_small_run_config(data, small_ckpt, "objective.cell_loss_weight=0.5",
                                    "data.attention_turns=0", "data.attention_pairs=False",
                                    "objective.pair_loss_weight=0.0", "data.cell_grid=0"),
                  tmp_path / "bad", progress=False)


def test_tower_pretraining_runs_no_llm(tmp_path, data, small_ckpt):
    """objective.ce_loss_weight = 0 (stage 0 of the SynthVQA recipe): the loss is the cell
    objective alone, the tower and projector learn, the LLM is untouched but for the input
    embeddings the cell objective scores against (no weight decay here, so its other weights
    stay bit-identical), and configs whose terms read the LLM, or that
    leave nothing to train, are refused."""
    import jax
    from dynllava_jax import trainer as T
    # stage 0's own config (configs/synthvqa_tower.py), with no weight decay
    over = {"config": "synthvqa_tower.py", "objective.cell_loss_weight": 0.5,
            "optim.weight_decay": 0.0}
    tr = T.Trainer(_small_run_config(data, small_ckpt, **over), tmp_path / "run",
                   progress=False)
    before = jax.tree_util.tree_map(np.asarray, tr.state.all_params())
    tr.run()
    after = jax.tree_util.tree_map(np.asarray, tr.state.all_params())
    tr.close()
    for row in T.read_metrics(tmp_path / "run"):
        assert row["ce"] == 0 and 0 < row["cell_loss"] < 10
        assert row["loss"] == pytest.approx(0.5 * row["cell_loss"], rel=1e-6)
    same = jax.tree_util.tree_map(np.array_equal, before, after)
    assert not same["llm"].pop("embed_tokens")["embedding"]
    assert all(jax.tree_util.tree_leaves(same["llm"]))
    assert not any(jax.tree_util.tree_leaves(same["vision"]))
    assert not all(jax.tree_util.tree_leaves(same["projector"]))
    for bad, match in (("objective.attention_loss_weight=1.0", "attention_loss_weight"),
                       ("objective.cell_loss_weight=0.0", "nothing to train"),
                       ("sparse.use_vision_predictor=True", "predictors"),
                       ("objective.copy_loss_weight=0.5", "copy_loss_weight"),
                       ("objective.ce_loss_weight=-1.0", ">= 0")):
        more = (bad, "data.attention_turns=8") if "attention" in bad else (bad,)
        with pytest.raises(ValueError, match=match):
            T.Trainer(_small_run_config(data, small_ckpt, *more, **over), tmp_path / "bad",
                      progress=False)


def test_dense_fraction_is_refused_where_it_means_nothing(tmp_path, data, small_ckpt):
    """objective.dense_fraction needs a predictor that prunes and a share of the global
    batch that is at least one row and leaves one pruned."""
    from dynllava_jax import trainer as T
    on = ("sparse.use_vision_predictor=True",)
    for more, match in ((("objective.dense_fraction=0.5",), "no predictor prunes"),
                        (on + ("objective.dense_fraction=0.2",), "0 rows"),
                        (on + ("objective.dense_fraction=0.8",), "leave one pruned"),
                        (on + ("objective.dense_fraction=-0.5",), r"\[0, 1\)")):
        with pytest.raises(ValueError, match=match):
            T.Trainer(_small_run_config(data, small_ckpt, *more), tmp_path / "bad",
                      progress=False)


def _named_cell(question: str, answer: str, scene) -> int:
    """The grid cell of the one object a question names (-1: none, or two)."""
    q = question.split("\n")[0]
    for o in scene.objects:
        cell = o.row * S.GRID + o.col
        if q in (f"What colour is the {o.shape}?", f"Which colour is the {o.shape}?",
                 f"What shape is the {o.colour} object?", f"Which shape is {o.colour}?"):
            return cell
        if q.endswith(f" {o.name} in the image?") and answer == "yes":
            return cell
    return -1


def _named_pair(question: str, scene) -> list[int]:
    """The grid cells of the two objects a position question names, in order ([-1, -1])."""
    for a in scene.objects:
        for b in scene.objects:
            if question in (f"Is the {a.name} to the left or to the right of the {b.name}?",
                            f"Is the {a.name} above or below the {b.name}?"):
                return [a.row * S.GRID + a.col, b.row * S.GRID + b.col]
    return [-1, -1]


def test_turn_cells_name_the_asked_objects(data):
    """Each record's `turn_cells` gives, per answer, the grid cell of the object its question
    names (colour, shape, choice of either, presence "yes"), -1 for the others; with
    `data.attention_turns` the pipeline pads them to a fixed length, and a bad list is a
    skipped record."""
    from dynllava_jax.data.llava_json import BAD_TURN_CELLS, Invalid, encode_record, to_raw_record
    from dynllava_jax.image_processing import ImageProcessor
    from dynllava_jax.tokenizer import LlavaTokenizer
    out, _ = data
    named = pairs = 0
    for name in ("train.json", "train_lookup.json"):
        for rec in json.loads((out / name).read_text()):
            i = int(rec["id"].split("-")[1])
            scene = S.make_scene(S.scene_rng(3, "train", i))
            conv = rec["conversations"]
            want = [_named_cell(q["value"].replace("<image>\n", ""), a["value"], scene)
                    for q, a in zip(conv[::2], conv[1::2])]
            assert rec["turn_cells"] == want
            named += sum(c >= 0 for c in want)
            assert rec["turn_pairs"] == [_named_pair(q["value"].replace("<image>\n", ""), scene)
                                         for q in conv[::2]]
            pairs += sum(p[0] >= 0 for p in rec["turn_pairs"])
    assert named > 2 * N_TRAIN and pairs > N_TRAIN / 2
    tok = LlavaTokenizer.from_dir(out / "tokenizer")
    kw = dict(tokenizer=tok, image_processor=ImageProcessor.from_dir(out / "tokenizer"),
              image_folder=str(out), num_image_tokens=144, seq_len=512, model_max_length=512)
    rec = [r for r in json.loads((out / "train.json").read_text()) if len(r["turn_cells"]) > 2][0]
    ex = encode_record(to_raw_record(rec, 0), cell_grid=3, attention_turns=2, **kw)
    assert list(ex["turn_cells"]) == rec["turn_cells"][:2]
    ex = encode_record(to_raw_record(rec, 0), cell_grid=3, attention_turns=16, **kw)
    n = len(rec["turn_cells"])
    assert list(ex["turn_cells"][:n]) == rec["turn_cells"] and (ex["turn_cells"][n:] == -1).all()
    assert "turn_cells" not in encode_record(to_raw_record(rec, 0), cell_grid=3, **kw)
    assert "pair_cells" not in ex
    ex = encode_record(to_raw_record(rec, 0), cell_grid=3, attention_turns=16,
                       attention_pairs=True, **kw)
    assert ex["pair_cells"].shape == (16, 2) and (ex["pair_cells"][n:] == -1).all()
    assert ex["pair_cells"][:n].tolist() == rec["turn_pairs"]
    for bad in ([[9, 0]], [[0]], [3], [[0.5, 1]]):
        got = encode_record(to_raw_record(dict(rec, turn_pairs=bad), 0), cell_grid=3,
                            attention_turns=4, attention_pairs=True, **kw)
        assert isinstance(got, Invalid) and got.reason == BAD_TURN_CELLS, bad
    for bad in ([9], [0.5], "0", [True]):
        got = encode_record(to_raw_record(dict(rec, turn_cells=bad), 0), cell_grid=3,
                            attention_turns=4, **kw)
        assert isinstance(got, Invalid) and got.reason == BAD_TURN_CELLS, bad
    got = encode_record(to_raw_record(rec, 0), attention_turns=4, **kw)   # no grid
    assert isinstance(got, Invalid) and got.reason == BAD_TURN_CELLS


def test_choice_keys_mark_the_chosen_option(data):
    """With `data.choice_targets` each example marks, for every answer that is an option's
    letter, the tokens of that option's text (found in the tokens' own text) with the
    answer's rank; nothing else is marked."""
    from dynllava_jax.data.llava_json import encode_record, to_raw_record
    from dynllava_jax.image_processing import ImageProcessor
    from dynllava_jax.tokenizer import LlavaTokenizer
    out, _ = data
    tok = LlavaTokenizer.from_dir(out / "tokenizer")
    kw = dict(tokenizer=tok, image_processor=ImageProcessor.from_dir(out / "tokenizer"),
              image_folder=str(out), num_image_tokens=144, seq_len=512, model_max_length=512)
    checked = 0
    for i, rec in enumerate(json.loads((out / "train.json").read_text())):
        ex = encode_record(to_raw_record(rec, i), choice_targets=True, **kw)
        texts = tok.token_texts(ex["tokens"][:ex["lengths"]])
        conv = rec["conversations"]
        for r, (q, a) in enumerate(zip(conv[::2], conv[1::2])):
            marked = "".join(t for t, k in zip(texts, ex["choice_keys"]) if k == r)
            if "\nA. " in q["value"]:
                option = [ln for ln in q["value"].split("\n") if ln.startswith(a["value"] + ". ")]
                assert marked.strip() == option[0][3:], (q, a, marked)
                checked += 1
            else:
                assert marked == ""
        assert (ex["choice_keys"][ex["lengths"]:] == -1).all()
        # option_letters: every option's text points at its own letter's token
        lines = [ln for q in conv[::2] for ln in q["value"].split("\n") if ln[1:3] == ". "]
        pointed = [(texts[j], "".join(texts[i] for i in np.flatnonzero(ex["option_letters"] == j)))
                   for j in np.unique(ex["option_letters"][ex["option_letters"] >= 0])]
        assert [f"{a}. {o.strip()}" for a, o in pointed] == lines
    assert checked >= 5
    assert "choice_keys" not in encode_record(to_raw_record(rec, 0), **kw)


def test_train_with_the_attention_and_choice_objectives(tmp_path, data, small_ckpt):
    """train.py's attention (with pairs) and choice (with letter and copy) objectives on
    SynthVQA records: batches carry turn_cells, pair_cells, choice_keys and option_letters,
    the loss adds weight x each term, the
    masses are logged, and configs that cannot feed them (no turn_cells, pairs or choice
    keys, a head or layer past the LLM's) are refused."""
    from dynllava_jax import trainer as T
    over = {"objective.cell_loss_weight": 0.0, "data.attention_turns": 8,
            "objective.attention_loss_weight": 0.5, "data.attention_pairs": True,
            "objective.pair_loss_weight": 0.125, "data.choice_targets": True,
            "objective.choice_loss_weight": 0.25, "objective.choice_layer": 2,
            "objective.letter_loss_weight": 0.75, "objective.copy_loss_weight": 0.375,
            "train.global_batch_size": 4}

    def config(*more):
        return _small_run_config(data, small_ckpt, *more, **over)
    tr = T.Trainer(config(), tmp_path / "run", progress=False)
    tr.run()
    tr.close()
    rows = T.read_metrics(tmp_path / "run")
    for row in rows:
        assert 0 < row["attn_loss"] < 14 and 0 < row["attn_mass"] < 1
        assert row["loss"] == pytest.approx(
            row["ce"] + 0.5 * row["attn_loss"] + 0.125 * row["pair_loss"]
            + 0.25 * row["choice_loss"] + 0.75 * row["letter_loss"]
            + 0.375 * row["copy_loss"], rel=1e-5)
        assert 0 <= row["choice_mass"] < 1 and 0 <= row["pair_mass"] < 1
        assert 0 <= row["letter_mass"] < 1
    assert any(0 < row["choice_loss"] < 14 for row in rows)   # 4 records hold a choice
    assert any(0 < row["pair_loss"] < 14 for row in rows)     # and a position question
    assert any(0 < row["letter_loss"] < 14 for row in rows)
    assert any(row["copy_loss"] > 0 for row in rows)
    for bad, match in (("data.attention_turns=0", "attention_turns"),
                       ("objective.attention_layer=3", "attention_layer"),
                       ("data.choice_targets=False", "choice_targets"),
                       ("data.attention_pairs=False", "attention_pairs"),
                       ("objective.attention_head=1", "attention_head"),
                       ("objective.choice_layer=3", "choice_layer"),
                       ("objective.letter_head=4", "letter_head"),
                       ("data.cell_grid=0", "cell_grid")):
        with pytest.raises(ValueError, match=match):
            T.Trainer(config(bad), tmp_path / "bad", progress=False)
