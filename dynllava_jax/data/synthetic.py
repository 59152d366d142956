"""A tiny synthetic dataset in the LLaVA instruction format (tests, the tiny training run).

``write_synthetic_dataset(out_dir, n, seed, image_size)`` writes ``out_dir/data.json``
and PNG images under ``out_dir/images/`` (record ``image`` paths are relative to
``out_dir``, the image folder). Images show 1-3 coloured shapes on a coloured
background, in varied, mostly non-square sizes; the answers describe them. Every
other image sample gets a long answer (well over 60 tokens with the tiny
tokenizer, 50 is the output-text threshold of SPEC §4) and some samples have two
rounds; the rest get short answers. ``with_text_only`` adds text-only records
(about one in five), ``with_bad`` appends one record of each kind the pipeline must
skip (the ``id`` says which).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 170), "orange": (240, 140, 30),
           "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right", "centre")
QUESTIONS_SHORT = ("What is the main shape in the image?", "Name one colour you see.",
                   "How many shapes are there?")
QUESTIONS_LONG = ("Describe the image in detail.",
                  "Explain everything you can see in this picture.")
TEXT_ONLY = [
    ("What is two plus three?", "Two plus three is five."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("Write a few sentences about squares.",
     "A square has four equal sides and four right angles. Its diagonals have the same length "
     "and cross in the middle at a right angle. Squares tile the plane without gaps, which is "
     "why floors and chess boards use them so often. A square is also a special rectangle and "
     "a special rhombus at the same time."),
]
BAD_KINDS = ("missing_image", "corrupt_image", "empty_conversation", "no_gpt_turn",
             "image_truncated")


class SyntheticDataset(NamedTuple):
    json_path: Path      # the LLaVA JSON file
    image_folder: Path   # what the records' image paths are relative to (= out_dir)
    num_records: int     # all records, bad ones included
    num_bad: int         # records the pipeline must skip


def _draw(rng: random.Random, image_size: int) -> tuple[Image.Image, list[tuple[str, str, str]]]:
    w = rng.randint(image_size // 2, 2 * image_size)
    h = rng.choice([w, rng.randint(image_size // 2, 2 * image_size)])
    bg_name = rng.choice(list(COLOURS))
    image = Image.new("RGB", (w, h), COLOURS[bg_name])
    draw = ImageDraw.Draw(image)
    shapes = []
    for _ in range(rng.randint(1, 3)):
        colour = rng.choice([c for c in COLOURS if c != bg_name])
        shape, place = rng.choice(SHAPES), rng.choice(PLACES)
        cx = {"left": w // 4, "right": 3 * w // 4}.get(place.split()[-1], w // 2)
        cy = {"top": h // 4, "bottom": 3 * h // 4}.get(place.split()[0], h // 2)
        r = max(2, min(w, h) // 6)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        shapes.append((colour, shape, place))
    return image, [(bg_name, "background", "")] + shapes


def _long_answer(rng: random.Random, desc) -> str:
    """80-130 tokens with the tiny tokenizer (over the 50-token output-text threshold)."""
    parts = [f"The background is {desc[0][0]}."]
    parts += [f"There is a {colour} {shape} in the {place}." for colour, shape, place in desc[1:]]
    parts.append(rng.choice(["Every shape has a flat colour and sharp edges.",
                             "The shapes are flat, with sharp edges and no texture."]))
    parts.append(rng.choice(["Nothing else is visible.", "There is no text anywhere."]))
    return " ".join(parts)


def _short_answer(question: str, desc) -> str:
    if question.startswith("How many"):
        return f"There {'is one shape' if len(desc) == 2 else f'are {len(desc) - 1} shapes'}."
    if question.startswith("Name"):
        return f"{desc[1][0].capitalize()}."
    return f"A {desc[1][0]} {desc[1][1]}."


def write_synthetic_dataset(out_dir: str | os.PathLike, n: int, seed: int, image_size: int,
                            with_text_only: bool = True,
                            with_bad: bool = False) -> SyntheticDataset:
    """Write ``n`` good records (+ ``len(BAD_KINDS)`` bad ones if ``with_bad``) to ``out_dir``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        rid = f"syn-{i:05d}"
        if with_text_only and i % 5 == 4:
            q, a = TEXT_ONLY[rng.randrange(len(TEXT_ONLY))]
            records.append({"id": rid, "conversations": [{"from": "human", "value": q},
                                                         {"from": "gpt", "value": a}]})
            continue
        image, desc = _draw(rng, image_size)
        rel = f"images/{rid}.png"
        image.save(out / rel)
        long = i % 2 == 0
        q = rng.choice(QUESTIONS_LONG if long else QUESTIONS_SHORT)
        a = _long_answer(rng, desc) if long else _short_answer(q, desc)
        first = rng.choice([f"<image>\n{q}", f"{q}\n<image>"])
        conv = [{"from": "human", "value": first}, {"from": "gpt", "value": a}]
        if i % 3 == 1:  # a second round: the last answer is what output-text decisions cover
            conv += [{"from": "human", "value": "What colour is the background?"},
                     {"from": "gpt", "value": f"The background is {desc[0][0]}."}]
        records.append({"id": rid, "image": rel, "conversations": conv})

    num_bad = 0
    if with_bad:
        image, desc = _draw(rng, image_size)
        image.save(out / "images" / "bad-ok.png")
        ask = [{"from": "human", "value": "<image>\nDescribe the image."},
               {"from": "gpt", "value": _long_answer(rng, desc)}]
        (out / "images" / "bad-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(
            rng.randrange(256) for _ in range(200)))
        # ~2000 tokens of chat before the image: its slots fall past any test-sized length.
        chatter = " ".join(["The quick brown fox jumps over the lazy dog again and again."] * 100)
        records += [
            {"id": "bad-missing_image", "image": "images/does-not-exist.png", "conversations": ask},
            {"id": "bad-corrupt_image", "image": "images/bad-corrupt.png", "conversations": ask},
            {"id": "bad-empty_conversation", "image": "images/bad-ok.png", "conversations": []},
            {"id": "bad-no_gpt_turn", "image": "images/bad-ok.png", "conversations": ask[:1]},
            {"id": "bad-image_truncated", "image": "images/bad-ok.png", "conversations": [
                {"from": "human", "value": "Tell me a story."}, {"from": "gpt", "value": chatter},
                {"from": "human", "value": "<image>\nAnd this picture?"},
                {"from": "gpt", "value": "Some shapes."}]},
        ]
        num_bad = len(BAD_KINDS)

    json_path = out / "data.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(json_path)
    return SyntheticDataset(json_path, out, len(records), num_bad)
