"""Answering image questions with a converted checkpoint (what `infer.py` runs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

from . import sharding
from .checkpoint import load_config, load_converted
from .conversation import build_prompt
from .generate import GenOptions, GenResult, generate, inference_params, shard_inference_params
from .image_processing import ImageProcessor
from .inputs import IMAGE_MARKER, InputError, expanded_length, length_bucket, prepare_batch
from .sampling import row_keys
from .tokenizer import IMAGE_TOKEN, LlavaTokenizer

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "tiny-dynamic-llava"


def prompt_bucket(n: int, limit: int) -> int:
    """The padded prompt length for a longest prompt of ``n`` tokens: 64, 96, 128, 192, 256,
    384, 512, 768, ... at most ``limit`` (a few buckets: a few compiles per run)."""
    return length_bucket(n, limit)


@dataclasses.dataclass
class Request:
    question: str
    image: Optional[str] = None  # path; None for a text-only question
    pixels: Optional[np.ndarray] = None  # the image already preprocessed (skips loading `image`)


class Llava:
    """A converted checkpoint with its tokenizer and image processor.

    mesh (`sharding.parse_mesh`): parameters are restored straight into the shardings of
    the training table, and `answer` runs the batch sharded over ('data', 'fsdp'), the
    attention and KV caches over 'tensor'. In a multi-process job every process calls
    `answer` with its own requests (the same number in each) and gets their answers.
    None: one device."""

    def __init__(self, checkpoint: str | Path = DEFAULT_CHECKPOINT, mesh=None):
        self.path = Path(checkpoint)
        self.mesh = mesh
        if mesh is None:
            self.cfg, self.params = load_converted(self.path)
            # Unstacked once here: generation then never slices a stacked layer weight.
            self.params = inference_params(jax.device_put(self.params))
        else:
            self.cfg = load_config(self.path)
            sharding.check_tensor_size(mesh.shape["tensor"], self.cfg.llm.num_kv_heads)
            _, stacked = load_converted(self.path, mesh)
            self.params = shard_inference_params(stacked, mesh)
        self.tokenizer = LlavaTokenizer.from_dir(self.path)
        self.images = ImageProcessor.from_dir(self.path)

    @property
    def has_predictors(self) -> bool:
        return self.cfg.sparse.enabled

    def max_prompt_tokens(self, max_new_tokens: int) -> int:
        return self.cfg.llm.max_position_embeddings - max_new_tokens

    def prompt_ids(self, req: Request) -> list[int]:
        """The prompt's ids; an image question has one marker (-200), before the question.

        The question is text whatever it holds: a literal "<image>" in it is tokenised as
        text, never as a second (or, without an image, a fake) image."""
        has_image = req.image is not None or req.pixels is not None
        prompt = build_prompt(req.question, has_image=has_image)
        tok = self.tokenizer
        ids = [tok.bos_id] if tok.add_bos else []
        if not has_image:
            return ids + tok.encode(prompt)
        head, tail = prompt.split(IMAGE_TOKEN, 1)  # the first one is the template's
        return ids + tok.encode(head) + [IMAGE_MARKER] + tok.encode(tail)

    def prompt_length(self, req: Request) -> int:
        """Tokens the prompt takes, image slots included."""
        return expanded_length(self.prompt_ids(req), self.cfg.num_image_tokens)

    def answer(self, requests: Sequence[Request], opts: GenOptions, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, keys_from: Optional[Sequence[int]] = None,
               pad_to: Optional[int] = None) -> list[dict]:
        """Answer a batch; one dict per request (the fields of `infer.py --json`).

        keys_from: a number per request (default 0, 1, ...) that, with `seed`, fixes its sampling
        key, so a sampled answer does not depend on the batch it is in. pad_to: the padded
        prompt length (default: `prompt_bucket` of the longest prompt)."""
        n_real = len(requests)
        if self.mesh is not None:
            # Every batch shard gets rows: pad with copies of the last request (dropped below).
            pad = -n_real % sharding.local_batch_shards(self.mesh)
            requests = list(requests) + [requests[-1]] * pad
            if keys_from is not None:
                keys_from = list(keys_from) + [keys_from[-1]] * pad
        ids = [self.prompt_ids(r) for r in requests]
        if not opts.vocab_limit:  # never generate a padded embedding row the tokenizer cannot decode
            opts = dataclasses.replace(opts, vocab_limit=len(self.tokenizer))
        n_img = self.cfg.num_image_tokens
        limit = self.max_prompt_tokens(opts.max_new_tokens)
        positions = self.cfg.llm.max_position_embeddings
        for r, p in zip(requests, ids):
            n = expanded_length(p, n_img)
            if n > limit and n < positions:  # the answer's reservation is what does not fit
                raise InputError(
                    f"max_new_tokens {opts.max_new_tokens} is too many for this prompt of {n} tokens "
                    f"(image included): the model holds {positions} positions, so at most "
                    f"{positions - n} new tokens")
            if n > limit:
                raise InputError(
                    f"prompt of {n} tokens (image included) does not fit: the model holds "
                    f"{positions} positions and {opts.max_new_tokens} are reserved for the answer")
        pixels = None
        if any(r.image is not None or r.pixels is not None for r in requests):
            s = self.images.image_size
            pixels = np.zeros((len(requests), 3, s, s), np.float32)
            for i, r in enumerate(requests):
                if r.pixels is not None:
                    pixels[i] = r.pixels
                elif r.image is not None:
                    pixels[i] = self.images.load(r.image)
        longest = max(expanded_length(p, n_img) for p in ids)
        pad_to = prompt_bucket(longest, limit) if pad_to is None else pad_to
        batch = prepare_batch(ids, n_img, self.tokenizer.pad_id, pad_to=pad_to)
        keys = row_keys(jax.random.PRNGKey(seed), range(len(requests)) if keys_from is None else keys_from)
        res: GenResult = generate(self.params, self.cfg, batch, pixels, opts, rng=keys,
                                  temperature=temperature, top_p=top_p, mesh=self.mesh)
        out = []
        for i, r in enumerate(requests[:n_real]):
            out.append({
                "text": self.tokenizer.decode(res.new_token_ids[i]).strip(),
                "token_ids": res.new_token_ids[i],
                "prompt_token_ids": ids[i],
                "mode": opts.mode if opts.use_cache else f"{opts.mode}-no-kv-cache",
                "image_tokens_kept": int(res.image_tokens_kept[i]),
                "image_tokens_total": n_img if IMAGE_MARKER in ids[i] else 0,
                "kept_image_indices": res.kept_image_indices[i],
                "generated_tokens_in_cache": int(res.generated_tokens_in_cache[i]),
                "kv_cache_evicted": bool(res.evicted[i]),
                "kv_cache_bytes": res.kv_cache_bytes,
                "kv_cache_bytes_dense": res.kv_cache_bytes_dense,
            })
        return out
