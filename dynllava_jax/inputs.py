"""Host-side batching: LLaVA prompt ids (-200 = image) -> static-shape arrays."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

IMAGE_MARKER = -200


class InputError(ValueError):
    pass


@dataclasses.dataclass
class Batch:
    tokens: np.ndarray       # [B, T] int32; image slots and padding hold pad_id
    lengths: np.ndarray      # [B] real tokens (image slots included)
    image_start: np.ndarray  # [B] first image slot, -1 without an image


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def length_bucket(n: int, limit: int | None = None, smallest: int = 64) -> int:
    """The padded length of an ``n``-token sequence: ``smallest``, then 1.5x and 2x steps up
    to 512 (64, 96, 128, 192, 256, 384, 512), then steps of an eighth of the power of two
    below (512 + 64k up to 1024, 1024 + 128k up to 2048, ...), at most ``limit``.

    The buckets bound the compiled shapes of a run (each costs a compile and hundreds of
    memory mappings: 7 up to 512, then 8 per doubling); above 512, where LLaVA's prompts lie (576 image tokens plus the
    text), a prefill computes every padded position, so the steps are finer there: at most
    an eighth is padding (631 tokens -> 640, not 768)."""
    b = smallest
    while b < n:
        if b >= 512:
            b += (1 << (b.bit_length() - 1)) // 8
        else:
            b = b * 3 // 2 if (b & (b - 1)) == 0 else b // 3 * 4  # 2^k -> 1.5 * 2^k -> 2^(k+1)
    return b if limit is None else min(b, limit)


def expanded_length(prompt_ids: Sequence[int], num_image_tokens: int) -> int:
    n_img = sum(1 for t in prompt_ids if t == IMAGE_MARKER)
    return len(prompt_ids) - n_img + n_img * num_image_tokens


def prepare_batch(prompts: Sequence[Sequence[int]], num_image_tokens: int, pad_id: int = 0,
                  pad_to: Optional[int] = None, bucket: int = 1) -> Batch:
    """Expand each prompt's image marker to `num_image_tokens` slots and right-pad.

    The padded length is `pad_to` if given, else the longest prompt rounded up to `bucket`
    (a few buckets keep the number of compiled shapes small).
    """
    rows, starts = [], []
    for ids in prompts:
        ids = [int(t) for t in ids]
        marks = [i for i, t in enumerate(ids) if t == IMAGE_MARKER]
        if len(marks) > 1:
            raise InputError(f"a prompt has {len(marks)} image markers; LLaVA-1.5 takes at most one image")
        if marks:
            i = marks[0]
            row = ids[:i] + [pad_id] * num_image_tokens + ids[i + 1:]
            starts.append(i)
        else:
            row = ids
            starts.append(-1)
        if any(t < 0 for t in row):
            raise InputError("prompt ids must be non-negative (except the single image marker -200)")
        rows.append(row)
    longest = max(len(r) for r in rows)
    t = pad_to if pad_to is not None else round_up(longest, bucket)
    if longest > t:
        raise InputError(f"a prompt has {longest} tokens, more than the capacity {t}")
    tokens = np.full((len(rows), t), pad_id, np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    return Batch(tokens, np.array([len(r) for r in rows], np.int32), np.array(starts, np.int32))
