#!/usr/bin/env python
"""Answer image questions with a converted (Dynamic-)LLaVA checkpoint.

Demo:           python infer.py        (the bundled SynthVQA model answers its bundled question)
One question:   python infer.py --image IMG --prompt "What is in the image?" [--json]
LLaVA eval:     python infer.py --questions Q.jsonl --image-folder DIR --answers-file A.jsonl
                [--num-chunks N --chunk-idx K]   (resumable; bad questions skipped and named)
Sharded:        python infer.py --mesh data=2,tensor=4 ...   (multi-process: + --coordinator
                HOST:PORT --num-processes N --process-id K, or nothing on a TPU pod)
With no arguments it answers the bundled example question with the bundled SynthVQA model
(assets/synthvqa-dynamic-llava) and prints what sparsification saved. With --prompt/--questions
and no --checkpoint it runs the bundled tiny *random* checkpoint (assets/tiny-dynamic-llava): its
answers are gibberish by design; it exercises the code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dynllava_jax.runtime import default_compile_cache, enable_compile_cache, notice


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default where it has one."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if d is not None and d is not False and d != argparse.SUPPRESS and "default" not in h:
            h += " (default: %(default)s)"
        return h


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--checkpoint", help="converted checkpoint directory (default: the bundled tiny random one)")
    p.add_argument("--image", help="image file for --prompt (omit for a text-only question)")
    p.add_argument("--prompt", help="the question")
    p.add_argument("--questions", help="LLaVA eval questions .jsonl ({question_id, image, text})")
    p.add_argument("--image-folder", help="folder the questions' image paths are relative to")
    p.add_argument("--answers-file", help="where to write answers .jsonl (appended as answers come; "
                                          "a rerun skips the question_ids already in it)")
    p.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many shares "
                                                            "(LLaVA's convention)")
    p.add_argument("--chunk-idx", type=int, default=0, help="the share this run answers (0-based)")
    p.add_argument("--batch-size", type=int, default=8, help="questions answered together (one compiled shape)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens generated per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, in [0, 2**32)")
    p.add_argument("--mode", choices=["dense", "dynamic"],
                   help="default: dynamic for checkpoints with predictors, else dense")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every step instead of keeping a KV cache")
    p.add_argument("--vision-keep-rate", type=float, help="fraction of image tokens kept (dynamic mode)")
    p.add_argument("--text-kv-budget", type=float,
                   help="sparse-layer cache slots for generated tokens, as a fraction of --max-new-tokens "
                        "(default 1.0: exact; below 1 a full cache keeps its highest-scoring tokens)")
    p.add_argument("--attention", choices=["auto", "xla", "cudnn", "splash"], default="auto",
                   help="prompt-pass attention: auto (cuDNN on NVIDIA GPUs in half precision, TPU "
                        "splash attention where it compiles, XLA otherwise) or one forced")
    p.add_argument("--json", action="store_true", help="one JSON object per answer on stdout")
    p.add_argument("--compile-cache", metavar="DIR", default=default_compile_cache(),
                   help="keep compiled programs here across runs (default: %(default)s; "
                        "$DYNLLAVA_JAX_COMPILE_CACHE sets it, 'off' turns it off)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,tensor=4 (axes data, fsdp, tensor; "
                                  "default: every device on data); tensor must divide the kv heads")
    p.add_argument("--coordinator", help="multi-process job: the coordinator's HOST:PORT "
                                         "(not needed where jax finds it, e.g. TPU pods, SLURM)")
    p.add_argument("--num-processes", type=int, help="multi-process job: how many processes")
    p.add_argument("--process-id", type=int, help="multi-process job: this process's index")
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
    if not a.temperature >= 0 or a.temperature == float("inf") or not 0.0 < a.top_p <= 1.0:
        return "--temperature must be a finite number >= 0 and --top-p in (0, 1]"
    if not 0 <= a.seed < 2 ** 32:
        return "--seed must be in [0, 2**32) (larger seeds would repeat smaller ones)"
    if a.num_chunks < 1 or not 0 <= a.chunk_idx < a.num_chunks:
        return "--chunk-idx must be in [0, --num-chunks)"
    if (a.num_chunks > 1 or a.chunk_idx) and a.questions is None:
        return "--num-chunks/--chunk-idx split a --questions file"
    if a.num_processes is not None and a.num_processes < 1:
        return "--num-processes must be at least 1"
    if a.process_id is not None and not 0 <= a.process_id < (a.num_processes or 1):
        return "--process-id must be in [0, --num-processes)"
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

    enable_compile_cache(None if a.no_compile_cache else a.compile_cache)
    from dynllava_jax import sharding
    try:  # before anything touches the devices
        sharding.maybe_initialize_distributed(a.coordinator or "", a.num_processes or 0,
                                              -1 if a.process_id is None else a.process_id)
    except (RuntimeError, ValueError) as e:
        fail(f"cannot join the multi-process job (--coordinator/--num-processes/--process-id): {e}")
    from dynllava_jax.checkpoint import CheckpointDirError, load_config
    from dynllava_jax.generate import GenOptions
    from dynllava_jax.image_processing import ImageLoadError
    from dynllava_jax.inference import DEFAULT_CHECKPOINT, Llava, Request
    from dynllava_jax.inputs import InputError

    ckpt = Path(a.checkpoint) if a.checkpoint else DEFAULT_CHECKPOINT
    if not ckpt.is_dir():
        fail(f"checkpoint directory not found: {ckpt}")
    if (msg := check_paths(a, ckpt)) is not None:
        fail(msg)
    try:
        kv_heads = load_config(ckpt).llm.num_kv_heads
    except (CheckpointDirError, OSError, ValueError) as e:
        fail(f"cannot load checkpoint {ckpt}: {e}")
    try:
        mesh = sharding.parse_mesh(a.mesh, kv_heads=kv_heads)
    except ValueError as e:
        fail(f"--mesh {a.mesh or '(default)'}: {e}")
    try:
        with notice(f"loading {ckpt}"):
            model = Llava(ckpt, mesh=mesh)
    except (CheckpointDirError, OSError, ValueError) as e:
        fail(f"cannot load checkpoint {ckpt}: {e}")
    mode = a.mode or ("dynamic" if model.has_predictors else "dense")
    if mode == "dynamic" and not model.has_predictors:
        fail(f"--mode dynamic needs a Dynamic-LLaVA checkpoint; {ckpt} has no predictors")
    opts = GenOptions(max_new_tokens=a.max_new_tokens, mode=mode, use_cache=not a.no_kv_cache,
                      vision_keep_rate=a.vision_keep_rate,
                      text_kv_budget=1.0 if a.text_kv_budget is None else a.text_kv_budget,
                      greedy=a.temperature == 0.0, attention=a.attention)
    from dynllava_jax.attention import check_available
    try:
        check_available(a.attention)
    except ValueError as e:
        fail(f"--attention {a.attention}: {e}")
    if mode == "dense" and (a.vision_keep_rate is not None or a.text_kv_budget is not None):
        fail(f"--vision-keep-rate and --text-kv-budget apply to --mode dynamic; {ckpt} runs dense")
    run = lambda reqs, ids=None: model.answer(reqs, opts, temperature=a.temperature, top_p=a.top_p,
                                              seed=a.seed, keys_from=ids)
    try:
        if a.prompt is not None:
            with notice("answering (a first run compiles; later runs reuse the compile cache)"):
                (ans,) = run([Request(a.prompt, a.image)])
            print(json.dumps(ans) if a.json else ans["text"])
            return 0
        return answer_file(a, model, opts)
    except (ImageLoadError, InputError) as e:
        fail(str(e))


def check_paths(a, ckpt: Path) -> str | None:
    """A one-line reason the files named cannot be used, or None (checked before any work)."""
    if a.questions is None:
        return None
    out = Path(a.answers_file)
    if out.is_dir():
        return f"--answers-file {out} is a directory"
    out = out.resolve()
    if out == Path(a.questions).resolve():
        return f"--answers-file {a.answers_file} is the --questions file"
    if out == ckpt.resolve() or ckpt.resolve() in out.parents:
        return f"--answers-file {a.answers_file} is inside the checkpoint {ckpt}"
    if a.image_folder and out.exists() and Path(a.image_folder).resolve() in out.parents:
        return f"--answers-file {a.answers_file} would overwrite a file in --image-folder"
    return None


def answer_file(a, model, opts) -> int:
    """LLaVA's model_vqa format: questions in, answers out (dynllava_jax.answering)."""
    from dynllava_jax import answering

    on_answer = (lambda q, ans: print(json.dumps(dict(ans, question_id=q.qid)), flush=True)) if a.json else None
    kw = dict(image_folder=a.image_folder, batch_size=a.batch_size, temperature=a.temperature,
              top_p=a.top_p, seed=a.seed, on_answer=on_answer)
    import jax
    try:
        if jax.process_count() > 1 and a.num_chunks > 1:
            fail("--num-chunks splits a file between jobs; this multi-process job already shares "
                 "it between its processes")
        if jax.process_count() > 1:  # one job over many hosts: each answers its share, one merges
            from jax.experimental import multihost_utils
            summary = answering.answer_together(
                model, a.questions, a.answers_file, opts, **kw,
                process=(jax.process_index(), jax.process_count()),
                barrier=lambda: multihost_utils.sync_global_devices("infer.py --answers-file"))
        else:
            summary = answering.answer_questions(model, a.questions, a.answers_file, opts, **kw,
                                                 share=(a.chunk_idx, a.num_chunks))
    except answering.AnsweringError as e:
        fail(str(e))
    print(summary.line(Path(a.answers_file)), file=sys.stderr)
    return 1 if summary.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
