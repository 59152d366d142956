#!/usr/bin/env python
"""Answer image questions with a converted (Dynamic-)LLaVA checkpoint.

Demo:           python infer.py        (the bundled SynthVQA model answers its bundled question)
One question:   python infer.py --image IMG --prompt "What is in the image?" [--json]
LLaVA eval:     python infer.py --questions Q.jsonl --image-folder DIR --answers-file A.jsonl
With --prompt/--questions and no --checkpoint it runs the bundled tiny *random* checkpoint
(assets/tiny-dynamic-llava): its answers are gibberish by design; it exercises the code.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="converted checkpoint directory (default: the bundled tiny random one)")
    p.add_argument("--image", help="image file for --prompt (omit for a text-only question)")
    p.add_argument("--prompt", help="the question")
    p.add_argument("--questions", help="LLaVA eval questions .jsonl ({question_id, image, text})")
    p.add_argument("--image-folder", help="folder the questions' image paths are relative to")
    p.add_argument("--answers-file", help="where to write answers .jsonl")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["dense", "dynamic"],
                   help="default: dynamic for checkpoints with predictors, else dense")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the sequence every step (SPEC §3.3)")
    p.add_argument("--vision-keep-rate", type=float, help="fraction of image tokens kept (dynamic mode)")
    p.add_argument("--text-kv-budget", type=float,
                   help="sparse-layer cache slots for generated tokens, as a fraction of --max-new-tokens "
                        "(default 1.0: exact; below 1 a full cache keeps its highest-scoring tokens)")
    p.add_argument("--json", action="store_true", help="one JSON object per answer on stdout")
    return p.parse_args(argv)


def validate(a) -> str | None:
    """A one-line reason the flags cannot work together, or None."""
    single = a.prompt is not None or a.image is not None
    batch = any(x is not None for x in (a.questions, a.image_folder, a.answers_file))
    if single and batch:
        return "--prompt/--image and --questions/--image-folder/--answers-file are exclusive"
    if batch and not (a.questions and a.answers_file):
        return "--questions needs --answers-file (and --image-folder for image questions)"
    if not single and not batch and a.checkpoint is not None:
        return "nothing to answer: give --prompt (with --image) or --questions"
    if a.image is not None and a.prompt is None:
        return "--image needs --prompt"
    if a.mode == "dense" and (a.vision_keep_rate is not None or a.text_kv_budget is not None):
        return "--vision-keep-rate and --text-kv-budget apply to --mode dynamic only"
    if a.no_kv_cache and a.text_kv_budget is not None:
        return "--text-kv-budget sizes the KV cache; it cannot go with --no-kv-cache"
    if a.vision_keep_rate is not None and not 0.0 < a.vision_keep_rate <= 1.0:
        return "--vision-keep-rate must be in (0, 1]"
    if a.text_kv_budget is not None and not 0.0 <= a.text_kv_budget <= 1.0:
        return "--text-kv-budget must be in [0, 1]"
    if a.max_new_tokens < 1 or a.batch_size < 1:
        return "--max-new-tokens and --batch-size must be at least 1"
    if a.temperature < 0 or not 0.0 < a.top_p <= 1.0:
        return "--temperature must be >= 0 and --top-p in (0, 1]"
    return None


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def is_demo(a) -> bool:
    """No question and no checkpoint given: answer the bundled SynthVQA example."""
    return all(x is None for x in (a.prompt, a.image, a.questions, a.image_folder,
                                   a.answers_file, a.checkpoint))


def main(argv=None) -> int:
    a = parse_args(argv)
    if (msg := validate(a)) is not None:
        fail(msg)
    if is_demo(a):
        from dynllava_jax import demo
        demo.run(mode=a.mode or "dynamic", use_cache=not a.no_kv_cache, as_json=a.json,
                 vision_keep_rate=a.vision_keep_rate,
                 text_kv_budget=1.0 if a.text_kv_budget is None else a.text_kv_budget)
        return 0
    if a.image is not None and not Path(a.image).is_file():
        fail(f"image not found: {a.image}")
    if a.questions is not None and not Path(a.questions).is_file():
        fail(f"questions file not found: {a.questions}")

    from dynllava_jax.checkpoint import CheckpointDirError
    from dynllava_jax.generate import GenOptions
    from dynllava_jax.image_processing import ImageLoadError
    from dynllava_jax.inference import DEFAULT_CHECKPOINT, Llava, Request, batched
    from dynllava_jax.inputs import InputError

    ckpt = Path(a.checkpoint) if a.checkpoint else DEFAULT_CHECKPOINT
    if not ckpt.is_dir():
        fail(f"checkpoint directory not found: {ckpt}")
    try:
        model = Llava(ckpt)
    except (CheckpointDirError, OSError, ValueError) as e:
        fail(f"cannot load checkpoint {ckpt}: {e}")
    mode = a.mode or ("dynamic" if model.has_predictors else "dense")
    if mode == "dynamic" and not model.has_predictors:
        fail(f"--mode dynamic needs a Dynamic-LLaVA checkpoint; {ckpt} has no predictors")
    opts = GenOptions(max_new_tokens=a.max_new_tokens, mode=mode, use_cache=not a.no_kv_cache,
                      vision_keep_rate=a.vision_keep_rate,
                      text_kv_budget=1.0 if a.text_kv_budget is None else a.text_kv_budget,
                      greedy=a.temperature == 0.0)
    if mode == "dense" and (a.vision_keep_rate is not None or a.text_kv_budget is not None):
        fail(f"--vision-keep-rate and --text-kv-budget apply to --mode dynamic; {ckpt} runs dense")
    run = lambda reqs, ids=None: model.answer(reqs, opts, temperature=a.temperature, top_p=a.top_p,
                                              seed=a.seed, keys_from=ids)
    try:
        if a.prompt is not None:
            (ans,) = run([Request(a.prompt, a.image)])
            print(json.dumps(ans) if a.json else ans["text"])
            return 0
        return answer_file(a, model, run, batched, Request)
    except (ImageLoadError, InputError) as e:
        fail(str(e))


def answer_file(a, model, run, batched, Request) -> int:
    """LLaVA's model_vqa format: questions in, answers out, with a progress bar."""
    from tqdm import tqdm
    qs = []
    for n, line in enumerate(Path(a.questions).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
            qs.append((q["question_id"], q["text"], q.get("image")))
        except (json.JSONDecodeError, KeyError) as e:
            fail(f"{a.questions}:{n}: not a question record ({e})")
    for _, _, img in qs:
        if img is not None and a.image_folder is None:
            fail("image questions need --image-folder")
    out_path = Path(a.answers_file)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    model_id = model.path.name
    with tmp.open("w") as f, tqdm(total=len(qs), desc="answering", unit="q", file=sys.stderr) as bar:
        # A question's sampling key comes from its place in the file, not from its batch.
        for chunk in batched(list(enumerate(qs)), a.batch_size):
            ids = [i for i, _ in chunk]
            chunk = [q for _, q in chunk]
            reqs = [Request(text, str(Path(a.image_folder) / img) if img else None) for _, text, img in chunk]
            # A short last batch is padded with copies so that it reuses the compiled shapes.
            pad = min(a.batch_size, len(qs)) - len(reqs)
            reqs, ids = reqs + reqs[-1:] * pad, ids + ids[-1:] * pad
            try:
                answers = run(reqs, ids)
            except (ValueError, OSError) as e:  # bad image or prompt: say which questions
                tmp.unlink(missing_ok=True)
                fail(f"question(s) {[q[0] for q in chunk]}: {e}")
            for (qid, text, _), ans in zip(chunk, answers):
                rec = {"question_id": qid, "prompt": text, "text": ans["text"],
                       "answer_id": uuid.uuid4().hex, "model_id": model_id,
                       "metadata": {k: v for k, v in ans.items() if k != "text"}}
                f.write(json.dumps(rec) + "\n")
                if a.json:
                    print(json.dumps(dict(ans, question_id=qid)))
            bar.update(len(chunk))
    tmp.replace(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
