"""The grain data pipeline: LLaVA JSON / TFDS records -> fixed-shape batches."""

import json
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dynllava_jax.conversation import IGNORE_INDEX
from dynllava_jax.data import llava_json, pipeline, synthetic
from dynllava_jax.data.llava_json import RawRecord, encode_record
from dynllava_jax.image_processing import ImageProcessor
from dynllava_jax.tokenizer import LlavaTokenizer

ASSETS = "assets/tiny-dynamic-llava"
N_IMG = 64  # the tiny model: 112 px, patch 14
SEQ = 384
N_GOOD = 30


@pytest.fixture(scope="module")
def tok():
    from pathlib import Path
    return LlavaTokenizer.from_dir(Path(__file__).resolve().parents[1] / ASSETS)


@pytest.fixture(scope="module")
def improc():
    from pathlib import Path
    return ImageProcessor.from_dir(Path(__file__).resolve().parents[1] / ASSETS)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return synthetic.write_synthetic_dataset(tmp_path_factory.mktemp("syn"), N_GOOD, seed=0,
                                             image_size=112, with_text_only=True, with_bad=True)


@pytest.fixture(scope="module")
def tfds_dir(syn, tmp_path_factory):
    from dynllava_jax.data import tfds_builder
    out = tmp_path_factory.mktemp("tfds")
    rc = tfds_builder.main(["--json", str(syn.json_path), "--image-folder", str(syn.image_folder),
                            "--data-dir", str(out), "--threads", "4"])
    assert rc == 0
    return out


def cfg_for(syn, **kw):
    cfg = pipeline.default_data_config()
    cfg.json_path = str(syn.json_path)
    cfg.image_folder = str(syn.image_folder)
    cfg.seq_len = SEQ
    cfg.model_max_length = SEQ
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def batches(cfg, tok, improc, *, seed=0, shard_index=0, shard_count=1, batch_size=4, n=None):
    it = pipeline.make_iterator(cfg, tok, improc, N_IMG, seed=seed, shard_index=shard_index,
                                shard_count=shard_count, batch_size=batch_size)
    out = list(it) if n is None else [next(it) for _ in range(n)]
    return out, it


def rows(bs):
    for b in bs:
        for i in range(len(b["lengths"])):
            yield {k: v[i] for k, v in b.items()}


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_format_and_labels(syn, tok, improc):
    """In JSON order: exact keys/dtypes/shapes, image expansion, pixels, labels = the answers."""
    cfg = cfg_for(syn, shuffle=False, num_epochs=1, drop_remainder=False)
    bs, it = batches(cfg, tok, improc)
    b = bs[0]
    assert set(b) == {"tokens", "labels", "lengths", "image_start", "pixels"}
    assert {k: (v.dtype, v.shape) for k, v in b.items()} == {
        "tokens": (np.int32, (4, SEQ)), "labels": (np.int32, (4, SEQ)), "lengths": (np.int32, (4,)),
        "image_start": (np.int32, (4,)), "pixels": (np.float32, (4, 3, 112, 112))}
    assert [len(x["lengths"]) for x in bs] == [4] * 7 + [2]  # 30 good records, the bad ones skipped

    records = json.loads(syn.json_path.read_text())[:N_GOOD]
    n_text_only = 0
    for rec, row in zip(records, rows(bs)):
        n = int(row["lengths"])
        assert (row["tokens"][n:] == 0).all() and (row["labels"][n:] == IGNORE_INDEX).all()
        start = int(row["image_start"])
        if "image" in rec:
            assert start > 0 and (row["tokens"][start:start + N_IMG] == 0).all()
            assert (row["labels"][start:start + N_IMG] == IGNORE_INDEX).all()
            np.testing.assert_array_equal(row["pixels"],
                                          improc.load(syn.image_folder / rec["image"]))
        else:
            n_text_only += 1
            assert start == -1 and not row["pixels"].any()
        assert (row["tokens"][:n] > 0).all() == (start == -1)
        # labels: the target AT each position (the loss shifts), exactly the gpt answers + </s>.
        lab = row["labels"][:n]
        on = lab != IGNORE_INDEX
        np.testing.assert_array_equal(lab[on], row["tokens"][:n][on])
        edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(int), [0]])))
        spans = [row["tokens"][s:e] for s, e in zip(edges[::2], edges[1::2])]
        answers = [m["value"] for m in rec["conversations"] if m["from"] == "gpt"]
        assert len(spans) == len(answers)
        for span, answer in zip(spans, answers):
            assert span[-1] == tok.eos_id
            # The tiny sentencepiece model strips the trailing "▁" of "ASSISTANT: ", so the
            # official `instruction_len - 2` leaves the ":" labelled (see test_conversation).
            assert tok.decode(span).removeprefix(":").strip() == answer
    assert n_text_only >= 4
    assert it.num_examples == N_GOOD


def test_bad_records_skipped_and_counted(syn, tok, improc, caplog):
    cfg = cfg_for(syn, shuffle=True, num_epochs=2)
    with caplog.at_level("WARNING", logger="dynllava_jax.data.pipeline"):
        bs, it = batches(cfg, tok, improc, seed=1)
    assert it.skipped == {k: 2 for k in synthetic.BAD_KINDS}
    assert it.metrics()["data/skipped"] == 10 and it.num_examples == 2 * N_GOOD == 4 * len(bs)
    assert "bad-corrupt_image (corrupt_image)" in caplog.text
    # requires_image (the official run): text-only records dropped, counted apart.
    bs, it = batches(cfg_for(syn, num_epochs=1, requires_image=True, drop_remainder=False),
                     tok, improc)
    assert it.skipped[llava_json.TEXT_ONLY] == 6 and it.num_skipped == 5
    assert it.num_examples == N_GOOD - 6 and all((b["image_start"] >= 0).all() for b in bs)


def test_mostly_bad_data_raises(syn, tok, improc, tmp_path):
    """A wrong image folder (every image missing): a clear DataError, not a silent run."""
    cfg = cfg_for(syn, image_folder=str(tmp_path))
    it = pipeline.make_iterator(cfg, tok, improc, N_IMG, seed=0, shard_index=0, shard_count=1,
                                batch_size=4)
    with pytest.raises(pipeline.DataError, match="image_folder"):
        for _ in range(100):
            next(it)


def test_encode_truncation(tok, improc, syn):
    rec = json.loads(syn.json_path.read_text())[0]  # an image sample with a long answer
    raw = llava_json.to_raw_record(rec, 0)
    kw = dict(tokenizer=tok, image_processor=improc, image_folder=str(syn.image_folder),
              num_image_tokens=N_IMG)
    full = encode_record(raw, seq_len=SEQ, model_max_length=SEQ, **kw)
    n = int(full["lengths"])
    assert n < SEQ
    # Cut inside the answer (by model_max_length or by seq_len): a prefix of the full example.
    for seq_len, mml in ((n - 10, SEQ), (SEQ, n - 10)):
        cut = encode_record(raw, seq_len=seq_len, model_max_length=mml, **kw)
        assert int(cut["lengths"]) == n - 10 and cut["tokens"].shape == (seq_len,)
        np.testing.assert_array_equal(cut["tokens"][:n - 10], full["tokens"][:n - 10])
        np.testing.assert_array_equal(cut["labels"][:n - 10], full["labels"][:n - 10])
    start = int(full["image_start"])
    bad = encode_record(raw, seq_len=start + N_IMG - 1, model_max_length=SEQ, **kw)
    assert isinstance(bad, llava_json.Invalid) and bad.reason == llava_json.IMAGE_TRUNCATED
    # Truncated before any answer token: nothing to learn.
    bad = encode_record(raw, seq_len=start + N_IMG + 3, model_max_length=SEQ, **kw)
    assert isinstance(bad, llava_json.Invalid) and bad.reason == llava_json.NO_TARGET
    # Malformed conversations.
    for conv, image, reason in (
            ([{"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}], None,
             llava_json.BAD_CONVERSATION),
            ([{"from": "human", "value": 3}], None, llava_json.BAD_CONVERSATION),
            (None, "x.png", llava_json.EMPTY_CONVERSATION),
            ([{"from": "human", "value": "<image>\na"}, {"from": "gpt", "value": "b"},
              {"from": "human", "value": "c <image>"}, {"from": "gpt", "value": "d"}], "x.png",
             llava_json.IMAGE_MARKER_COUNT),
            ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "x.png",
             llava_json.IMAGE_MARKER_COUNT)):
        out = encode_record(RawRecord("r", conv, image=image), seq_len=SEQ, model_max_length=SEQ,
                            **kw)
        assert isinstance(out, llava_json.Invalid) and out.reason == reason, (conv, out)


def test_tfds_matches_json(syn, tok, improc, tfds_dir):
    from dynllava_jax.data import tfds_builder
    meta = json.loads((tfds_dir / "llava_instruct" / "1.0.0" / "metadata.json").read_text())
    assert meta["num_records"] == syn.num_records and meta["num_missing_images"] == 1
    cfg = cfg_for(syn, shuffle=True, num_epochs=2)
    ref, ref_it = batches(cfg, tok, improc, seed=7)
    cfg_t = cfg_for(syn, shuffle=True, num_epochs=2, source="tfds", tfds_data_dir=str(tfds_dir),
                    json_path="", image_folder="")
    got, got_it = batches(cfg_t, tok, improc, seed=7)
    assert_same(got, ref)
    assert got_it.skipped == ref_it.skipped
    assert "tensorflow" not in sys.modules
    with pytest.raises(ValueError, match="cell_text"):   # the tfds copy has no cell labels
        pipeline.make_source(cfg_for(syn, source="tfds", tfds_data_dir=str(tfds_dir),
                                     cell_grid=3))
    # Rebuilding reuses the complete dataset; bad inputs give a clear error and exit status 1.
    assert tfds_builder.build_tfds(syn.json_path, syn.image_folder, tfds_dir, progress=False) == \
        tfds_dir / "llava_instruct" / "1.0.0"
    assert tfds_builder.main(["--json", str(tfds_dir / "nope.json"), "--image-folder", ".",
                              "--data-dir", str(tfds_dir)]) == 1


def test_per_host_sharding_is_disjoint(tok, improc, tmp_path):
    recs = [{"id": str(i), "conversations": [{"from": "human", "value": f"What is {i} plus one?"},
                                            {"from": "gpt", "value": f"It is {i + 1}."}]}
            for i in range(21)]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    cfg = pipeline.default_data_config()
    cfg.update(dict(json_path=str(tmp_path / "d.json"), seq_len=128, model_max_length=128,
                    num_epochs=1, drop_remainder=False))

    def answers(shard_index, shard_count):
        bs, _ = batches(cfg, tok, improc, seed=5, shard_index=shard_index,
                        shard_count=shard_count, batch_size=3)
        return [tok.decode(r["labels"][r["labels"] >= 0]) for r in rows(bs)]

    a0, a1 = answers(0, 2), answers(1, 2)
    assert len(a0) == len(a1) == 10  # equal shards; the odd record out is unused
    assert not set(a0) & set(a1) and len(set(a0)) == len(set(a1)) == 10
    assert set(a0) | set(a1) <= set(answers(0, 1)) and len(answers(0, 1)) == 21


def test_iterator_checkpoint_resume(syn, tok, improc, tmp_path):
    """Orbax + grain's handler: restoring mid-run (across an epoch end) gives the same batches."""
    cfg = cfg_for(syn, shuffle=True)  # repeat forever

    def make():
        return pipeline.make_iterator(cfg, tok, improc, N_IMG, seed=3, shard_index=0,
                                      shard_count=1, batch_size=4)

    it = make()
    for _ in range(5):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    skipped_at_save = dict(it.skipped)
    ref = [next(it) for _ in range(6)]  # 44 records: past the end of the first epoch

    it2 = make()
    next(it2)  # a used iterator is fine too: the state replaces its position
    mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    assert it2.skipped == skipped_at_save
    assert_same([next(it2) for _ in range(6)], ref)
    assert it2.skipped == it.skipped and it2.num_examples == it.num_examples
    mngr.close()


def test_worker_processes_match(syn, tok, improc):
    cfg0 = cfg_for(syn, shuffle=True)
    ref, ref_it = batches(cfg0, tok, improc, seed=2, n=10)
    got, it = batches(cfg_for(syn, shuffle=True, worker_count=2), tok, improc, seed=2, n=10)
    try:
        assert_same(got, ref)
        assert it.skipped == ref_it.skipped and it.num_skipped >= 5  # the counts cross processes
    finally:
        it.close()


def test_synthetic_answer_lengths(synthetic_llava_data, tok):
    assert synthetic_llava_data.num_bad == 0 and synthetic_llava_data.num_records == 32
    records = json.loads(synthetic_llava_data.json_path.read_text())
    last = [len(tok.encode(r["conversations"][-1]["value"])) for r in records]
    assert sum(n >= 60 for n in last) >= 5 and sum(n < 50 for n in last) >= 5
    assert sum("image" not in r for r in records) >= 4


def test_epoch_of_image_records_is_counted(synthetic_llava_data):
    """`requires_image` runs size their epoch by the image records only."""
    from dynllava_jax.data.llava_json import JsonRecords
    records = json.loads(synthetic_llava_data.json_path.read_text())
    with_image = sum(1 for r in records if r.get("image"))
    assert 0 < with_image < len(records)
    assert JsonRecords(synthetic_llava_data.json_path).num_with_image == with_image


def test_tfds_builder_refuses_a_wrong_image_folder(syn, tmp_path, caplog):
    """Most images missing (a wrong --image-folder) is refused and writes nothing; a few
    missing are warned about (the fixture's one bad record)."""
    from dynllava_jax.data import tfds_builder
    (tmp_path / "wrong").mkdir()
    with pytest.raises(tfds_builder.TooManyMissingImages, match=r"missing under --image-folder"):
        tfds_builder.build_tfds(syn.json_path, tmp_path / "wrong", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "llava_instruct").exists()
    assert tfds_builder.main(["--json", str(syn.json_path), "--image-folder", str(tmp_path / "wrong"),
                              "--data-dir", str(tmp_path / "out"), "--max-missing-images", "1"]) == 0
    assert any("of the" in r.getMessage() and "are missing under" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
