"""Answering image questions with a converted checkpoint (what `infer.py` runs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Optional, Sequence

import jax
import numpy as np

from . import sharding
from .checkpoint import load_config, load_converted
from .conversation import build_prompt
from .generate import GenOptions, GenResult, generate, inference_params, shard_inference_params
from .image_processing import ImageProcessor
from .inputs import InputError, expanded_length, prepare_batch, round_up
from .sampling import row_keys
from .tokenizer import LlavaTokenizer

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "tiny-dynamic-llava"
PROMPT_BUCKET = 64  # prompts are padded to a multiple of this: one compile serves many calls


@dataclasses.dataclass
class Request:
    question: str
    image: Optional[str] = None  # path; None for a text-only question


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
        return self.tokenizer.tokenize_prompt(build_prompt(req.question, has_image=req.image is not None))

    def answer(self, requests: Sequence[Request], opts: GenOptions, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, keys_from: Optional[Sequence[int]] = None) -> list[dict]:
        """Answer a batch; one dict per request (the fields of `infer.py --json`).

        keys_from: a number per request (default 0, 1, ...) that, with `seed`, fixes its sampling
        key, so a sampled answer does not depend on the batch it is in."""
        n_real = len(requests)
        if self.mesh is not None:
            # Every batch shard gets rows: pad with copies of the last request (dropped below).
            pad = -n_real % sharding.local_batch_shards(self.mesh)
            requests = list(requests) + [requests[-1]] * pad
            if keys_from is not None:
                keys_from = list(keys_from) + [keys_from[-1]] * pad
        ids = [self.prompt_ids(r) for r in requests]
        n_img = self.cfg.num_image_tokens
        limit = self.max_prompt_tokens(opts.max_new_tokens)
        for r, p in zip(requests, ids):
            if expanded_length(p, n_img) > limit:
                raise InputError(
                    f"prompt of {expanded_length(p, n_img)} tokens (image included) does not fit: "
                    f"the model holds {self.cfg.llm.max_position_embeddings} positions and "
                    f"{opts.max_new_tokens} are reserved for the answer")
        pixels = None
        if any(r.image is not None for r in requests):
            s = self.images.image_size
            pixels = np.zeros((len(requests), 3, s, s), np.float32)
            for i, r in enumerate(requests):
                if r.image is not None:
                    pixels[i] = self.images.load(r.image)
        longest = max(expanded_length(p, n_img) for p in ids)
        pad_to = min(round_up(longest, PROMPT_BUCKET), limit)
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
                "image_tokens_total": n_img if r.image is not None else 0,
                "kept_image_indices": res.kept_image_indices[i],
                "generated_tokens_in_cache": int(res.generated_tokens_in_cache[i]),
                "kv_cache_evicted": bool(res.evicted[i]),
                "kv_cache_bytes": res.kv_cache_bytes,
                "kv_cache_bytes_dense": res.kv_cache_bytes_dense,
            })
        return out


def batched(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i: i + size]
