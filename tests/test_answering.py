"""Answering a questions file (dynllava_jax.answering), in-process on the bundled tiny model."""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest

from dynllava_jax import answering, generate
from dynllava_jax.answering import (AnsweringError, Console, answer_questions, get_chunk,
                                    merge_answers, part_path, split_list)
from dynllava_jax.generate import GenOptions
from dynllava_jax.inference import DEFAULT_CHECKPOINT, Llava, Request, prompt_bucket
from dynllava_jax.inputs import IMAGE_MARKER

REPO = Path(__file__).resolve().parents[1]
# Sampled answers: a question's answer depends on its sampling key, so equal answers across
# batchings and shares show the key comes from the question's line, not its batch.
OPTS = GenOptions(max_new_tokens=4, mode="dynamic", greedy=False)
SAMPLING = dict(temperature=1.0, top_p=0.9, seed=5)
# Prompt lengths on the tiny model: these texts pad to 96 tokens, with an image to 192 (few
# shapes: few compiles); LONG pads to 128.
TEXTS = ["Hi", "What colour is the sky?", "Why?", "Name it."]
LONG = "What colour is the sky on a clear day, and why?"


@pytest.fixture(scope="module")
def model():
    return Llava(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for name in ("portrait.png", "small.png"):
        shutil.copy(REPO / "assets" / "images" / name, d / name)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return d


def write_lines(path, lines):
    """Lines as given: str lines are JSON-encoded objects or raw text, bytes are raw bytes."""
    data = b"".join((l if isinstance(l, bytes) else
                     (json.dumps(l) if not isinstance(l, str) else l).encode()) + b"\n" for l in lines)
    path.write_bytes(data)
    return path


def good_questions():
    qs = [{"question_id": i, "text": t} for i, t in enumerate(TEXTS)]
    qs.insert(2, {"question_id": "img-a", "text": "What is in the image?", "image": "portrait.png"})
    qs.append({"question_id": "img-b", "text": "Describe it.", "image": "small.png"})
    return qs


def texts(path):
    return {r["question_id"]: r["text"] for r in map(json.loads, Path(path).read_text().splitlines())}


def ids(path):
    return [json.loads(l)["question_id"] for l in Path(path).read_text().splitlines()]


class Spy:
    """Wraps model.answer: records each batch's prompt lengths and padded length."""

    def __init__(self, model):
        self.model, self.calls, self.real = model, [], model.answer

    def __enter__(self):
        def answer(reqs, opts, **kw):
            self.calls.append(([self.model.prompt_length(r) for r in reqs], kw.get("pad_to")))
            return self.real(reqs, opts, **kw)
        self.model.answer = answer
        return self

    def __exit__(self, *exc):
        del self.model.answer  # the bound method again


@pytest.fixture(scope="module")
def whole(model, folder, tmp_path_factory):
    """The good questions answered in one run (batch size 2), and its model calls."""
    d = tmp_path_factory.mktemp("whole")
    q = write_lines(d / "q.jsonl", good_questions())
    with Spy(model) as spy:
        s = answer_questions(model, q, d / "a.jsonl", OPTS, image_folder=folder, batch_size=2,
                             console=Console(progress=False), **SAMPLING)
    return q, d / "a.jsonl", s, spy.calls


def test_prompt_bucket_ladder():
    assert [prompt_bucket(n, 10_000) for n in (1, 64, 65, 97, 129, 200, 300, 400, 513, 631, 641,
                                                700, 1000, 1025, 1200, 2049)] == \
        [64, 64, 96, 128, 192, 256, 384, 512, 576, 640, 704, 704, 1024, 1152, 1280, 2304]
    assert prompt_bucket(700, 600) == 600 and prompt_bucket(10, 32) == 32


def test_answers_in_question_order_from_length_sorted_batches(whole):
    q, a_whole, s, calls = whole
    assert (s.answered, s.resumed, s.skipped, s.batches) == (6, 0, [], 3)
    assert ids(a_whole) == [x["question_id"] for x in good_questions()]
    lengths = [n for call, _ in calls for n in call]
    assert lengths == sorted(lengths)  # batches cut from the length-sorted questions
    assert all(len(call) == 2 for call, _ in calls)


def test_bad_lines_are_skipped_named_and_counted(model, folder, tmp_path, capsys):
    q = write_lines(tmp_path / "q.jsonl", [
        {"question_id": 1, "text": "Hi"},
        "[1, 2]",                                                   # 2: not an object
        '"hello"',                                                  # 3
        {"question_id": 2, "text": "x", "image": 5},                # 4
        {"question_id": 3, "text": None},                           # 5
        b'{"question_id": 4, "text": "caf\xe9"}',                   # 6: not UTF-8
        '{"question_id": 5, "text": ',                              # 7: bad JSON
        "",                                                         # blank: ignored
        {"question_id": 6, "text": "Where?", "image": "nope.png"},  # 9: missing image
        {"question_id": 7, "text": "And?", "image": "corrupt.png"},  # 10: corrupt image
        {"question_id": 8, "text": "x " * 600},                      # 11: does not fit
        {"question_id": 1, "text": "again"},                         # 12: duplicate id
        {"text": "whose?"},                                          # 13: no question_id
        {"question_id": 9, "text": "an <image>"},                    # answered as text
        {"question_id": 10, "text": "see <image>?", "image": "portrait.png"},
    ])
    got = {}
    s = answer_questions(model, q, tmp_path / "a.jsonl", OPTS, image_folder=folder, batch_size=2,
                         console=Console(progress=False), on_answer=lambda q, a: got.update({q.qid: a}))
    bad = [2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13]
    assert sorted(p.line for p in s.skipped) == bad and s.answered == 3
    err = capsys.readouterr().err.splitlines()
    for line in bad:
        assert sum(e.startswith(f"error: {q}:{line}: ") for e in err) == 1, (line, err)
    assert ids(tmp_path / "a.jsonl") == [1, 9, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "q.jsonl"]  # no .tmp left
    # A literal "<image>" is text: no fake image, and an image question keeps one marker.
    assert got[9]["image_tokens_total"] == 0 and IMAGE_MARKER not in got[9]["prompt_token_ids"]
    assert got[10]["prompt_token_ids"].count(IMAGE_MARKER) == 1
    assert got[10]["image_tokens_total"] == model.cfg.num_image_tokens


def test_literal_image_marker_is_text(model):
    """A question's literal "<image>" is text, with or without an image: the same ids
    whatever the batch, never a second or a fake image."""
    literal = model.tokenizer.encode(" <image>?")[1:]  # the text's own pieces

    def holds(seq, sub):
        return any(seq[i:i + len(sub)] == sub for i in range(len(seq)))
    text_only = model.prompt_ids(Request("what is <image>?"))
    with_image = model.prompt_ids(Request("what is <image>?", "a.png"))
    assert IMAGE_MARKER not in text_only and holds(text_only, literal)
    assert with_image.count(IMAGE_MARKER) == 1 and holds(with_image, literal)
    # Without a literal marker the ids are LLaVA's tokenizer_image_token's.
    from dynllava_jax.conversation import build_prompt
    for img in (None, "a.png"):
        assert model.prompt_ids(Request("Hi", img)) == model.tokenizer.tokenize_prompt(
            build_prompt("Hi", has_image=img is not None))


def test_killed_run_resumes_and_ends_with_every_answer_once(model, folder, tmp_path, capsys, whole):
    q, a_whole, _, _ = whole
    a = tmp_path / "a.jsonl"
    seen = []

    def kill_after_two(question, ans):
        seen.append(question.qid)
        assert ids(a) == seen  # on disk as soon as it is made
        if len(seen) == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        answer_questions(model, q, a, OPTS, image_folder=folder, batch_size=2,
                         console=Console(progress=False), on_answer=kill_after_two, **SAMPLING)
    assert [r for r in ids(a)] == seen  # every answer made before the kill is on disk
    with a.open("a") as f:
        f.write('{"question_id": "img-b", "te')  # and a torn line, as a kill mid-write leaves
    capsys.readouterr()
    s = answer_questions(model, q, a, OPTS, image_folder=folder, batch_size=2,
                         console=Console(progress=False), **SAMPLING)
    assert s.resumed == 2 and s.answered == 4 and not s.skipped
    assert "resuming: 2 of the 6 questions are already answered" in capsys.readouterr().err
    assert ids(a) == ids(a_whole) and texts(a) == texts(a_whole)
    s = answer_questions(model, q, a, OPTS, image_folder=folder, batch_size=2,
                         console=Console(progress=False), **SAMPLING)
    assert (s.resumed, s.answered, s.batches) == (6, 0, 0) and ids(a) == ids(a_whole)


def test_llava_chunks():
    # llava/eval/model_vqa.py: chunk size ceil(len / n), so there may be fewer chunks than n.
    assert [list(c) for c in split_list(list(range(10)), 4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [len(c) for c in split_list(list(range(9)), 4)] == [3, 3, 3]
    assert list(get_chunk(list(range(9)), 4, 3)) == [] and list(get_chunk([], 3, 0)) == []
    with pytest.raises(ValueError):
        get_chunk([1], 2, 2)


def test_lockstep_shares_merge_to_the_whole_run(model, tmp_path):
    """Each process answers its share with the same batch count and lengths; one merges."""
    q = write_lines(tmp_path / "q.jsonl", [{"question_id": i, "text": t} for i, t in
                                           enumerate(TEXTS + [LONG, "Hi!", "Name them."])])
    with Spy(model) as spy:
        answer_questions(model, q, tmp_path / "whole.jsonl", OPTS, batch_size=2,
                         console=Console(progress=False), **SAMPLING)
    assert sorted({pad for _, pad in spy.calls}) == [None]
    out = tmp_path / "a.jsonl"
    parts = [part_path(out, k, 3) for k in range(3)]
    # All processes plan (reading every part file) before any of them writes.
    plans = [answering.plan_share(model, q, parts[k], OPTS, batch_size=2, share=(k, 3), peers=parts)
             for k in range(3)]
    per_share = []
    for k in range(3):
        with Spy(model) as spy:
            answer_questions(model, q, parts[k], OPTS, batch_size=2, share=(k, 3), plan=plans[k],
                             console=Console(progress=False), **SAMPLING)
        per_share.append([pad for _, pad in spy.calls])
    # Shares of 3, 3 and 1 questions: 2 batches each (the last share's second one padding),
    # batch i padded alike everywhere (the long question makes one step 128).
    assert per_share[0] == per_share[1] == per_share[2] and len(per_share[0]) == 2
    assert sorted(per_share[0]) == [96, 128]
    assert merge_answers(parts, out, q) == 7
    assert ids(out) == ids(tmp_path / "whole.jsonl") and texts(out) == texts(tmp_path / "whole.jsonl")


def test_merge_answers(tmp_path):
    q = write_lines(tmp_path / "q.jsonl", [{"question_id": i, "text": "t"} for i in range(4)])
    p1 = write_lines(tmp_path / "p1.jsonl", [{"question_id": 2, "text": "c"},
                                             {"question_id": 0, "text": "a"}])
    p2 = tmp_path / "p2.jsonl"
    p2.write_text(json.dumps({"question_id": 1, "text": "b"}) + "\n"
                  + json.dumps({"question_id": 0, "text": "dup"}) + "\n"
                  + json.dumps({"question_id": 99, "text": "z"}) + "\n" + '{"question_id": 3, "te')
    assert merge_answers([p1, p2], tmp_path / "m.jsonl", q) == 4
    assert [(r["question_id"], r["text"]) for r in map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines())] \
        == [(0, "a"), (1, "b"), (2, "c"), (99, "z")]
    assert merge_answers([p2, p1], tmp_path / "m.jsonl") == 4  # no questions: the parts' order
    assert ids(tmp_path / "m.jsonl") == [1, 0, 99, 2]
    with pytest.raises(AnsweringError, match="not found"):
        merge_answers([tmp_path / "nope.jsonl"], tmp_path / "m.jsonl")
    with pytest.raises(AnsweringError, match="p3.jsonl:1: not an answer record"):
        merge_answers([write_lines(tmp_path / "p3.jsonl", ["[1]", "{}"])], tmp_path / "m.jsonl")


def test_error_lines_do_not_share_the_progress_bar_line(tmp_path):
    class Log:  # a log file, not a terminal
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass
    log = Log()
    c = Console(stream=log)
    c.open_bar(3)
    c.update(1)
    c.say("error: q.jsonl:2: bad")
    c.update(2)
    c.close()
    assert [l for l in log.text.split("\n") if l.startswith("error:")] == ["error: q.jsonl:2: bad"]


def test_no_cache_compiled_programs_are_capped(model, monkeypatch, caplog):
    """Every no-cache shape is a compiled program holding hundreds of memory mappings."""
    monkeypatch.setattr(generate, "MAX_NO_CACHE_PROGRAMS", 1)
    monkeypatch.setattr(generate, "_said_no_cache_cap", [False])
    opts = dataclasses.replace(OPTS, use_cache=False, greedy=True)
    with caplog.at_level(logging.WARNING, logger="dynllava_jax.generate"):
        model.answer([Request("Hi"), Request("Why?")], opts)
        model.answer([Request(LONG), Request("Why?")], opts)  # a second shape: 128 tokens
    assert generate.jit_no_cache._cache_size() <= 1
    assert "dropping them" in caplog.text


def test_image_questions_need_an_image_folder(model, tmp_path):
    q = write_lines(tmp_path / "q.jsonl", [{"question_id": 1, "text": "x", "image": "a.png"}])
    with pytest.raises(AnsweringError, match="q.jsonl:1: image questions need --image-folder"):
        answer_questions(model, q, tmp_path / "a.jsonl", OPTS, console=Console(progress=False))
    assert not (tmp_path / "a.jsonl").exists()
    bad = write_lines(tmp_path / "not-answers.jsonl", ["hello world"])
    with pytest.raises(AnsweringError, match="is this an answers file"):
        answer_questions(model, write_lines(tmp_path / "q2.jsonl", [{"question_id": 1, "text": "x"}]),
                         bad, OPTS, console=Console(progress=False))
    assert bad.read_text() == "hello world\n"
