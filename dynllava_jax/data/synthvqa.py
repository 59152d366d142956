"""SynthVQA: a synthetic visual question-answering set, deterministic from a seed.

Each image (168 px: 144 patches of 14 px) shows 1-4 coloured shapes and, in most
images, a short word, on a textured grey background. Objects sit in the cells of a
3 x 3 grid, each covering a few patches, so most patches are background: a model that
keeps 20 % of the image tokens can still answer. Within one image every shape and
every colour occurs at most once, so "the circle" and "the red object" are unambiguous.

Question types (`QUESTION_TYPES`), each answer derived from the scene alone:

==========  ========================================================  ===============
type        question                                                  answer
==========  ========================================================  ===============
colour      What colour is the circle?                                red
shape       What shape is the red object?                             circle
count       How many shapes are there in the image?                   3
position    Is the red circle to the left or to the right of ...?     left
presence    Is there a green square in the image? (POPE: balanced)    yes / no
choice      Which colour is the square?\\nA. red\\nB. blue ... (SQA)    B
ocr         What word is written in the image? (TextVQA: 10 refs)     cat
describe    Describe the image in detail.                             60-200 tokens
==========  ========================================================  ===============

`write_synthvqa(out, ...)` writes::

    out/images/{train,eval}-NNNNN.png
    out/train.json                  LLaVA instruction format, one multi-turn record per
                                    training image (the pipeline and tfds_builder read it),
                                    with `cell_text` and `turn_cells` (optional objectives)
    out/train_lookup.json           the same images: questions that name objects (see
                                    `lookup_record`) + train.json's description records
    out/eval/questions.jsonl        LLaVA's eval format: {question_id, image, text, category}
    out/eval/annotations.jsonl      {question_id, type, answer, answers, category, image}
    out/eval/pope/synth_pope_{random,adversarial}.json   POPE label files
    out/eval/textvqa_annotations.json                    TextVQA-style (10 answers each)
    out/eval/sqa/{problems,pid_splits}.json              ScienceQA-style
    out/tokenizer/                  sentencepiece tokenizer trained on the generated text +
                                    preprocessor_config.json (what `init_from=random` needs)

    python -m dynllava_jax.data.synthvqa --out data/synthvqa [--train-images 12000 --seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 168
GRID = 3
COLOURS = {"red": (215, 35, 35), "green": (30, 160, 50), "blue": (35, 70, 215),
           "yellow": (240, 215, 30), "purple": (135, 45, 175), "orange": (245, 135, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
WORDS = ("cat", "sun", "box", "map", "fox", "cup", "key", "owl", "bus", "pen", "hat", "jam")
BACKGROUNDS = {"light grey": (185, 185, 185), "dark grey": (95, 95, 95), "beige": (190, 175, 150)}
TEXTURES = ("noise", "stripes", "checks")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("colour", "shape", "count", "position", "presence", "choice", "ocr", "describe")
SHORT_TYPES = QUESTION_TYPES[:-1]
DESCRIBE = "Describe the image in detail."
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    row: int
    col: int
    radius: int
    dx: int = 0
    dy: int = 0

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    texture: str
    objects: tuple[Obj, ...]
    word: Optional[str] = None
    word_row: int = 0
    word_col: int = 0
    word_colour: str = "white"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def place(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "centre"
    return f"{ROWS[row]} {COLS[col]}"


# -- scenes and pixels -----------------------------------------------------------------
def make_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, 5))
    cells = rng.permutation(GRID * GRID)
    colours = rng.permutation(len(COLOURS))[:n]
    shapes = rng.permutation(len(SHAPES))[:n]
    objs = tuple(Obj(list(COLOURS)[int(c)], SHAPES[int(s)], int(cell) // GRID, int(cell) % GRID,
                     int(rng.integers(11, 17)), int(rng.integers(-5, 6)), int(rng.integers(-5, 6)))
                 for c, s, cell in zip(colours, shapes, cells[:n]))
    bg = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    word = None
    wr = wc = 0
    if rng.random() < 0.7:
        word = WORDS[int(rng.integers(len(WORDS)))]
        wr, wc = int(cells[n]) // GRID, int(cells[n]) % GRID
    return Scene(bg, TEXTURES[int(rng.integers(len(TEXTURES)))], objs, word, wr, wc,
                 "white" if bg == "dark grey" else "black")


_FONT = None


def _font():
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default(size=20)
    return _FONT


def draw_scene(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene's pixels; `rng` only draws the texture noise."""
    base = np.array(BACKGROUNDS[scene.background], np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    if scene.texture == "stripes":
        pattern = 12.0 * np.sign(np.sin((xx + yy) * np.pi / 6.0))
    elif scene.texture == "checks":
        pattern = 10.0 * (((xx // 12) + (yy // 12)) % 2 * 2 - 1)
    else:
        pattern = np.zeros((size, size), np.float32)
    noise = rng.normal(0.0, 8.0, (size, size, 3))
    pix = np.clip(base[None, None] + pattern[..., None] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pix, "RGB")
    draw = ImageDraw.Draw(image)
    cell = size / GRID
    for o in scene.objects:
        cx, cy = (o.col + 0.5) * cell + o.dx, (o.row + 0.5) * cell + o.dy
        r = o.radius
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            s = r * 0.85
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    if scene.word:
        cx, cy = (scene.word_col + 0.5) * cell, (scene.word_row + 0.5) * cell
        fill = (250, 250, 250) if scene.word_colour == "white" else (15, 15, 15)
        draw.text((cx, cy), scene.word, fill=fill, font=_font(), anchor="mm")
    return image


# -- questions ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QA:
    type: str
    question: str
    answer: str
    category: str = ""          # presence: random | adversarial
    choices: tuple = ()          # choice: the options, in order
    cell: int = -1               # the grid cell of the one object the question names
                                 # (colour, shape, presence "yes", choice of colour/shape)
    pair: tuple = (-1, -1)       # position: the cells of the two objects it names, in order


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _relation(a: Obj, b: Obj) -> Optional[tuple[str, str]]:
    """(question, answer) about where `a` is relative to `b`, or None if they share a cell."""
    if a.col != b.col:
        return (f"Is the {a.name} to the left or to the right of the {b.name}?",
                "left" if a.col < b.col else "right")
    if a.row != b.row:
        return f"Is the {a.name} above or below the {b.name}?", "above" if a.row < b.row else "below"
    return None


def _choice(rng, question: str, right: str, pool) -> QA:
    others = [p for p in pool if p != right]
    opts = [right] + [others[int(i)] for i in rng.permutation(len(others))[:3]]
    opts = [opts[int(i)] for i in rng.permutation(len(opts))]
    letters = "ABCD"
    text = question + "\n" + "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(opts))
    return QA("choice", f"{text}\n{CHOICE_SUFFIX}", letters[opts.index(right)], choices=tuple(opts))


def make_question(scene: Scene, qtype: str, rng: np.random.Generator,
                  negative: Optional[bool] = None, obj: Optional[Obj] = None) -> Optional[QA]:
    """One question of `qtype` about `scene` (None where the type does not apply: position
    with one shape, ocr without a word). presence: `negative` picks the answer (default:
    random); colour, shape, choice: `obj` names the object asked about (default: random)."""
    objs = scene.objects
    pick = objs[int(rng.integers(len(objs)))]  # drawn either way: the same draws follow
    pick = obj if obj is not None else pick
    cell = pick.row * GRID + pick.col
    if qtype == "colour":
        return QA(qtype, f"What colour is the {pick.shape}?", pick.colour, cell=cell)
    if qtype == "shape":
        return QA(qtype, f"What shape is the {pick.colour} object?", pick.shape, cell=cell)
    if qtype == "count":
        return QA(qtype, "How many shapes are there in the image?", str(len(objs)))
    if qtype == "position":
        if len(objs) < 2:
            return None
        i, j = rng.permutation(len(objs))[:2]
        a, b = objs[int(i)], objs[int(j)]
        q, ans = _relation(a, b)
        return QA(qtype, q, ans, pair=(a.row * GRID + a.col, b.row * GRID + b.col))
    if qtype == "presence":
        neg = bool(rng.integers(2)) if negative is None else negative
        if not neg:
            return QA(qtype, f"Is there {_article(pick.colour)} {pick.name} in the image?", "yes",
                      "random" if rng.integers(2) else "adversarial", cell=cell)
        present = {(o.colour, o.shape) for o in objs}
        adversarial = bool(rng.integers(2))
        if adversarial:  # a shape that is there, in a colour it does not have
            cands = [(c, o.shape) for o in objs for c in COLOURS if (c, o.shape) not in present]
        else:            # a shape that is not there at all
            used = {o.shape for o in objs}
            cands = [(c, s) for s in SHAPES if s not in used for c in COLOURS]
            if not cands:
                adversarial = True
                cands = [(c, o.shape) for o in objs for c in COLOURS if (c, o.shape) not in present]
        c, s = cands[int(rng.integers(len(cands)))]
        return QA(qtype, f"Is there {_article(c)} {c} {s} in the image?", "no",
                  "adversarial" if adversarial else "random")
    if qtype == "choice":
        kind = int(rng.integers(3))
        if kind == 0:
            return dataclasses.replace(_choice(rng, f"Which colour is the {pick.shape}?",
                                               pick.colour, list(COLOURS)), cell=cell)
        if kind == 1:
            return dataclasses.replace(_choice(rng, f"Which shape is {pick.colour}?", pick.shape,
                                               list(SHAPES)), cell=cell)
        return _choice(rng, "How many shapes are in the image?", str(len(objs)),
                       [str(k) for k in range(1, 6)])
    if qtype == "ocr":
        if not scene.word:
            return None
        q = ("What word is written in the image?", "What does the text in the image say?")[
            int(rng.integers(2))]
        return QA(qtype, q, scene.word)
    if qtype == "describe":
        return QA(qtype, DESCRIBE, describe(scene))
    raise ValueError(f"unknown question type {qtype!r}")


def describe(scene: Scene) -> str:
    """The detailed description: every fact of the scene, in reading order."""
    objs = sorted(scene.objects, key=lambda o: (o.row, o.col))
    n = len(objs)
    noun = "shape" if n == 1 else "shapes"
    out = [f"The image shows {NUMBER_WORDS[n]} {noun} on a {scene.background} background "
           f"with a {'noise' if scene.texture == 'noise' else scene.texture} texture."]
    for o in objs:
        size = size_word(o)
        out.append(f"There is {_article(size)} {size} {o.name} in the {place(o.row, o.col)}.")
        edge = "It is round." if o.shape == "circle" else (
            f"It has {'four' if o.shape in ('square', 'diamond') else 'three'} straight edges.")
        out.append(edge)
    out.append("The shapes are flat, with sharp outlines and no shadows.")
    for a, b in zip(objs, objs[1:]):
        rel = _relation(a, b)
        if rel:
            where = {"left": "to the left of", "right": "to the right of", "above": "above",
                     "below": "below"}[rel[1]]
            out.append(f"The {a.name} is {where} the {b.name}.")
    if scene.word:
        out.append(f"The word {scene.word} is written in {scene.word_colour} letters in the "
                   f"{place(scene.word_row, scene.word_col)}.")
    else:
        out.append("There is no text in the image.")
    empty = GRID * GRID - n - (1 if scene.word else 0)
    out.append(f"{NUMBER_WORDS[min(empty, 4)].capitalize() if empty < 5 else 'Most'} of the nine "
               f"grid cells {'is' if empty == 1 else 'are'} empty, and nothing else is visible.")
    return " ".join(out)


def size_word(o: Obj) -> str:
    return "small" if o.radius <= 13 else "large"


# -- records ----------------------------------------------------------------------------
def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, {"train": 0, "eval": 1, "lookup": 2}[split], index])


def train_record(scene: Scene, rng: np.random.Generator, rid: str, image: str,
                 with_describe: bool, max_rounds: int = 7) -> dict:
    """One record: up to `max_rounds` short questions of shuffled types, or (`with_describe`)
    the description alone: its first and last answer, so that it is learnt as the answer to
    a first question (as it is asked) and the output-text predictor is trained on it
    (SPEC §4: decisions cover the last answer)."""
    qas = []
    for t in SHORT_TYPES:
        for _ in range(2 if t in ("colour", "shape", "presence") else 1):
            qa = make_question(scene, t, rng)
            if qa is not None and all(qa.question != q.question for q in qas):
                qas.append(qa)
    qas = [qas[int(i)] for i in rng.permutation(len(qas))][:max_rounds]
    if with_describe:
        qas = [make_question(scene, "describe", rng)]
    return _record(qas, rid, image, scene)


def lookup_record(scene: Scene, rng: np.random.Generator, rid: str, image: str,
                  max_rounds: int = 7) -> dict:
    """One record of up to `max_rounds` short questions, most of which name an object and
    need its cell found among the image tokens: the colour and the shape question about
    every object, three presence questions, two position questions, one multiple choice,
    plus count and ocr (shuffled, the first `max_rounds` kept): 5.8 object-naming questions
    a record on average (2.9 colour or shape), against 5.4 (2.4) in `train_record`'s."""
    qas: list[QA] = []

    def add(qa):
        if qa is not None and all(qa.question != q.question for q in qas):
            qas.append(qa)
    for o in scene.objects:
        add(make_question(scene, "colour", rng, obj=o))
        add(make_question(scene, "shape", rng, obj=o))
    for t, n in (("presence", 3), ("position", 2), ("choice", 1), ("count", 1), ("ocr", 1)):
        for _ in range(n):
            add(make_question(scene, t, rng))
    qas = [qas[int(i)] for i in rng.permutation(len(qas))][:max_rounds]
    return _record(qas, rid, image, scene)


def _record(qas: list[QA], rid: str, image: str, scene: Scene) -> dict:
    """A LLaVA record, plus `cell_text`, `turn_cells` and `turn_pairs`: per answer, the grid
    cell (row * GRID + col) of the one object its question names, -1 where it names none or
    two (count, position, ocr, describe, presence "no"), and the cells of the two objects a
    position question names ([-1, -1] for the others): the labels of the optional attention
    objective (``objective.attention_loss_weight``, data.attention_turns, and
    ``objective.pair_loss_weight``, data.attention_pairs)."""
    conv = []
    for k, qa in enumerate(qas):
        q = f"<image>\n{qa.question}" if k == 0 else qa.question
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": qa.answer}]
    return {"id": rid, "image": image, "conversations": conv, "cell_text": cell_text(scene),
            "turn_cells": [qa.cell for qa in qas], "turn_pairs": [list(qa.pair) for qa in qas]}


ROW_WORDS = ("top", "middle", "bottom")
COL_WORDS = ("left", "centre", "right")


def cell_text(scene: Scene) -> list[str]:
    """Each grid cell's place and content, row by row (`top left small red circle`, `middle
    right cat`, `bottom centre empty`): the labels of the optional cell objective
    (`objective.cell_loss_weight`, data.cell_grid; 5 tokens: data.cell_tokens = 5). Naming
    the place teaches each cell's image tokens where they are, which the lookup of a named
    object and the comparison of two objects read (docs/synthvqa_history.md)."""
    cells = ["empty"] * (GRID * GRID)
    for o in scene.objects:
        cells[o.row * GRID + o.col] = f"{size_word(o)} {o.name}"
    if scene.word:
        cells[scene.word_row * GRID + scene.word_col] = scene.word
    return [f"{ROW_WORDS[i // GRID]} {COL_WORDS[i % GRID]} {t}" for i, t in enumerate(cells)]


def eval_questions(scene: Scene, rng: np.random.Generator, index: int, per_image: int,
                   presence_negative: bool) -> list[QA]:
    """`per_image` questions of distinct types, the types rotating with the image index so
    that each type appears about equally often; a presence question's answer is "no" iff
    `presence_negative` (the caller alternates it: balanced yes / no)."""
    out = []
    k = index * per_image
    tried = 0
    while len(out) < per_image and tried < len(QUESTION_TYPES):
        t = QUESTION_TYPES[(k + tried) % len(QUESTION_TYPES)]
        tried += 1
        qa = make_question(scene, t, rng, negative=presence_negative if t == "presence" else None)
        if qa is not None:
            out.append(qa)
    return out


def tokenizer_corpus(records: list[dict]) -> list[str]:
    """The text the tokenizer is trained on: the prompt template and every message."""
    from dynllava_jax.conversation import SYSTEM
    lines = [SYSTEM, "USER: ASSISTANT:"] * 50
    for r in records:
        for m in r["conversations"]:
            lines.append(m["value"].replace("<image>", ""))
    return lines


def write_synthvqa(out_dir, train_images: int = 12000, eval_images: int = 160, seed: int = 0,
                   eval_per_image: int = 3, describe_every: int = 3, vocab_size: int = 512,
                   progress: bool = False) -> dict:
    """Write the dataset and its tokenizer (see the module docstring); returns counts."""
    records = write_train(out_dir, train_images, seed, describe_every, progress)
    counts = write_eval(out_dir, eval_images, seed, eval_per_image, progress)
    tok_dir = train_tokenizer(Path(out_dir) / "tokenizer", tokenizer_corpus(records), vocab_size)
    return {"train_records": len(records), **counts, "tokenizer": str(tok_dir)}


def write_train(out_dir, train_images: int, seed: int, describe_every: int = 3,
                progress: bool = False) -> list[dict]:
    """The training images, `train.json` and `train_lookup.json`; returns the records of
    `train.json` (what the tokenizer is trained on).

    train_lookup.json: the same images, each with a `lookup_record` (its own random stream,
    so train.json does not depend on it), plus train.json's description records."""
    from tqdm import tqdm
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records, lookup = [], []
    for i in tqdm(range(train_images), desc="train images", disable=not progress, file=sys.stderr):
        rng = scene_rng(seed, "train", i)
        scene = make_scene(rng)
        rel = f"images/train-{i:05d}.png"
        draw_scene(scene, rng).save(out / rel)
        records.append(train_record(scene, rng, f"train-{i:05d}", rel, i % describe_every == 0))
        lookup.append(lookup_record(scene, scene_rng(seed, "lookup", i), f"train-{i:05d}-lookup",
                                    rel))
        if i % describe_every == 0:
            lookup.append(records[-1])
    _write_json(out / "train.json", records)
    _write_json(out / "train_lookup.json", lookup)
    return records


def write_eval(out_dir, eval_images: int, seed: int, eval_per_image: int = 3,
               progress: bool = False) -> dict:
    """The held-out images, questions and annotation files; returns counts per type."""
    from tqdm import tqdm
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "pope").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "sqa").mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    n_presence = 0
    for i in tqdm(range(eval_images), desc="eval images", disable=not progress, file=sys.stderr):
        rng = scene_rng(seed, "eval", i)
        scene = make_scene(rng)
        rel = f"images/eval-{i:05d}.png"
        draw_scene(scene, rng).save(out / rel)
        for qa in eval_questions(scene, rng, i, eval_per_image, n_presence % 2 == 1):
            n_presence += qa.type == "presence"
            qid = len(questions)
            questions.append({"question_id": qid, "image": rel, "text": qa.question,
                              "category": qa.type})
            answers = [qa.answer] * 7 + [qa.answer.upper()] * 3 if qa.type == "ocr" else [qa.answer]
            annotations.append({"question_id": qid, "image": rel, "type": qa.type,
                                "question": qa.question,
                                "answer": qa.answer, "answers": answers,
                                "category": qa.category, "choices": list(qa.choices),
                                "scene": scene.to_dict()})
    _write_lines(out / "eval" / "questions.jsonl", questions)
    _write_lines(out / "eval" / "annotations.jsonl", annotations)
    _write_benchmark_files(out / "eval", annotations)
    counts = {"eval_questions": len(questions)}
    for t in QUESTION_TYPES:
        counts[f"eval_{t}"] = sum(a["type"] == t for a in annotations)
    return counts


def _write_benchmark_files(d: Path, annotations: list[dict]) -> None:
    """The same held-out questions in the files LLaVA's benchmark scorers read."""
    for cat in ("random", "adversarial"):
        _write_lines(d / "pope" / f"synth_pope_{cat}.json", [
            {"question_id": a["question_id"], "image": a["image"], "label": a["answer"]}
            for a in annotations if a["type"] == "presence" and a["category"] == cat])
    _write_json(d / "textvqa_annotations.json", {"data": [
        {"question_id": a["question_id"], "image_id": a["image"], "answers": a["answers"]}
        for a in annotations if a["type"] == "ocr"]})
    problems = {str(a["question_id"]): {"question": a["question"].split("\n")[0],
                                        "choices": a["choices"],
                                        "answer": "ABCD".index(a["answer"]), "image": a["image"],
                                        "split": "test"}
                for a in annotations if a["type"] == "choice"}
    _write_json(d / "sqa" / "problems.json", problems)
    _write_json(d / "sqa" / "pid_splits.json", {"test": list(problems)})


def train_tokenizer(out_dir, lines: list[str], vocab_size: int = 512) -> Path:
    """A LLaMA-style sentencepiece BPE model (<unk>=0, <s>=1, </s>=2, legacy rules; "\\n" is
    one piece, where LLaMA has a byte piece, so that no text maps to <unk>) plus the
    tokenizer and preprocessor files of a converted checkpoint (SPEC §1)."""
    import io
    import sentencepiece as spm
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        byte_fallback=False, split_digits=True, user_defined_symbols=["\n"], add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        num_threads=1, minloglevel=2, input_sentence_size=0, shuffle_input_sentence=False)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    special = {k: {"content": v, "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False} for k, v in
               (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
    _write_json(out / "special_tokens_map.json", special)
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "legacy": True,
        "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer",
        "added_tokens_decoder": {str(i): {**special[k], "special": True} for i, k in
                                 ((0, "unk_token"), (1, "bos_token"), (2, "eos_token"))}})
    _write_json(out / "preprocessor_config.json", {
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": IMAGE_SIZE}})
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2,
                                                 "pad_token_id": 0})
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _write_lines(path: Path, rows) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write the SynthVQA dataset and its tokenizer.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--train-images", type=int, default=12000,
                    help="training images (default 12000: what the bundled model was trained on)")
    ap.add_argument("--eval-images", type=int, default=160)
    ap.add_argument("--eval-per-image", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=512)
    a = ap.parse_args(argv)
    if a.train_images < 1 or a.eval_images < 1 or a.eval_per_image < 1:
        print("error: --train-images, --eval-images and --eval-per-image must be >= 1",
              file=sys.stderr)
        return 2
    counts = write_synthvqa(a.out, a.train_images, a.eval_images, a.seed, a.eval_per_image,
                            vocab_size=a.vocab_size, progress=True)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
